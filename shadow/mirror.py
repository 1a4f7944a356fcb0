"""Per-worker traffic mirroring: bounded ring → shadow scorer → records.

    handler ── offer_one / offer_batch ──▶ MirrorRing (shared memory; full → dropped,
                                              │           counted)
                                              ▼  the consumer takes batches of it
            PairRecorder: ShadowTarget.score(features) → PairStats + paired records
                          → SegmentWriter, stats file for the supervisor

The hot path only samples, filters and writes values it already has (decoded inputs,
the feature row the primary computed, its score) into a slot of the worker's
:class:`~riskwire.shadow.ring.MirrorRing`: it never waits for the shadow and does no
I/O. The ring is consumed by a :class:`PairRecorder`, which runs either

* in a **shadow scorer process** of the worker (``scorer="process"``, the server's
  default, :mod:`riskwire.shadow.scorer_process`): it maps the ring itself, so nothing
  in the worker touches a mirrored row after the hot path wrote it; scoring, statistics
  and Parquet writing run at idle CPU priority with their own interpreter lock; or
* on the worker's mirror thread (``scorer="thread"``), whose kernels and remote calls
  release the GIL while they work.

Either way the mirror thread applies configuration changes (the control file) and
publishes the worker's stats.

Loss on a crash (SIGKILL) of a worker: with the scorer process, none of the committed
rows (the process scores the ring and flushes before it exits); with the thread, the
rows in the ring (≤ ``queue_size``) and the records buffered for the next segment
(≤ ``flush_rows`` rows, ≤ ``flush_seconds`` old). A graceful stop scores what is queued
and flushes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from riskwire.files import write_text_atomic
from riskwire.kernels.schema import NUM_FEATURES

from .compare import DECISIONS, PairStats
from .config import RequestFilter, ShadowConfig, parse_filter, read_control
from .records import RECORD_SCHEMA, RECORD_SCHEMA_NO_FEATURES, SegmentWriter
from .ring import MirrorRing, TakenRows
from .targets import LocalTarget, RemoteTarget, ShadowTarget, decision_codes

log = logging.getLogger(__name__)

# (primary model, primary version, shadow model, shadow version)
PairKey = tuple[str, str, str, str]
# name, version ("" = serving version) → a loaded model of this worker
ResolveLocal = Callable[[str, str], LocalTarget]
_DECISION_ARRAY = np.array(DECISIONS, dtype=object)
_FILTER_COLUMNS = ("channel", "country", "card_country", "currency", "mcc", "amount")


@dataclass(frozen=True)
class MirrorSettings:
    """Knobs of one worker's mirror (from the server settings)."""

    records_dir: Path
    stats_path: Path
    control_path: Path | None = None
    queue_size: int = 10_000
    batch_rows: int = 256
    flush_rows: int = 10_000
    flush_seconds: float = 5.0
    record_features: bool = True
    poll_s: float = 0.25  # control-file poll and stats publication interval
    max_delay_s: float = 0.05  # longest a mirrored request waits for a fuller batch
    idle_sleep_s: float = 0.01


@dataclass
class TargetSpec:
    """How to build the shadow target where the recorder runs: an object of this process
    (``local``), a package to load (``package_dir``, in the scorer process) or a remote
    endpoint (``remote``: :class:`RemoteTarget` keyword arguments)."""

    local: ShadowTarget | None = None
    package_dir: str = ""
    remote: dict | None = None

    def portable(self) -> TargetSpec:
        """The same target for another process: a local one by its package directory."""
        if self.local is None:
            return self
        package_dir = getattr(self.local, "package_dir", "")
        if not package_dir:
            raise ValueError(f"shadow target {self.local.name} has no package to load")
        return TargetSpec(package_dir=str(package_dir))

    def build(self) -> ShadowTarget:
        """The target, ready to score."""
        if self.local is not None:
            return self.local
        if self.remote is not None:
            return RemoteTarget(**self.remote)
        from riskwire.pipeline.package import load_package

        package = load_package(self.package_dir)
        package.forest.warmup()
        return LocalTarget(
            package.name,
            str(package.version),
            package.forest,
            float(package.thresholds["review"]),
            float(package.thresholds["decline"]),
            self.package_dir,
        )


def _unpin() -> None:
    """Let the calling thread run on any core the machine allows, not only the worker's
    pinned one: its GIL-free work (kernels, compression, fsync) can then use an idle core
    instead of queueing behind the worker's request threads."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: nothing to do
        os.sched_setaffinity(threading.get_native_id(), range(os.cpu_count() or 1))


def _yield_gil() -> None:
    """Let request threads waiting for the GIL run now: the scorer's Python steps are
    short, so no request waits for the interpreter's 5 ms switch interval."""
    time.sleep(0)


class PairRecorder:
    """Scores mirrored batches with the shadow target and records the pairs: per-pair
    statistics (published for the supervisor) and paired records (Parquet segments).

    Runs on the worker's mirror thread or in its shadow scorer process; ``pid`` is the
    worker's, in the stats and the segment names, wherever the recorder runs.
    """

    consumes_ring = True  # the mirror thread takes the rows off the ring for it

    def __init__(self, worker: int, settings: MirrorSettings, pid: int | None = None) -> None:
        self.worker = worker
        self.settings = settings
        self.pid = pid or os.getpid()
        # Set when tracing is on: each scored batch becomes a span linked to the server
        # spans of its calls (riskwire.server.tracing.Tracing.shadow_span).
        self.tracing = None
        self.target: ShadowTarget | None = None
        self.target_error: str | None = None
        self.config = ShadowConfig()
        self.primary = ""
        self.label = ("", "")  # (shadow model, version) of the current config
        self._stats: dict[PairKey, PairStats] = {}
        self._dropped: dict[PairKey, int] = {}
        self._dropped_lock = threading.Lock()
        self._stats_dirty = True
        self.ring: MirrorRing | None = None
        self._waiting_since: float | None = None  # when the oldest committed row was seen
        schema = RECORD_SCHEMA if settings.record_features else RECORD_SCHEMA_NO_FEATURES
        self.writer = SegmentWriter(
            settings.records_dir,
            schema,
            worker=worker,
            flush_rows=settings.flush_rows,
            flush_seconds=settings.flush_seconds,
            pid=self.pid,
        )

    @property
    def active(self) -> bool:
        """Whether a target is configured and built."""
        return self.target is not None

    def configure(
        self, config: ShadowConfig, primary: str, spec: TargetSpec | None, error: str | None
    ) -> None:
        """Switch to ``config``: build the target from ``spec`` (None: off, or ``error``)."""
        previous, self.target = self.target, None
        if previous is not None:
            previous.close()
        self.config, self.primary, self.target_error = config, primary, error
        self.label = config.label(primary)
        self._stats_dirty = True
        if spec is None:
            return
        try:
            self.target = spec.build()
        except Exception as exc:  # noqa: BLE001 - reported in the stats; primary unaffected
            self.target_error = f"{type(exc).__name__}: {exc}"
            log.error("shadow target unavailable: %s", self.target_error)

    def count_drop(self, model_version: str, count: int) -> None:
        """Count mirrors dropped for a full queue (any thread)."""
        key = (self.primary, model_version, *self.label)
        with self._dropped_lock:
            self._dropped[key] = self._dropped.get(key, 0) + count
            self._stats_dirty = True

    def set_dropped(self, dropped: Mapping[PairKey, int]) -> None:
        """Take the drop counts kept elsewhere (the worker's, in the scorer process)."""
        with self._dropped_lock:
            if dropped != self._dropped:
                self._dropped = dict(dropped)
                self._stats_dirty = True

    def attach(self, ring: MirrorRing) -> None:
        """Consume ``ring`` (the worker's, or its mapping in the scorer process)."""
        self.ring = ring

    def pump(self, now: float) -> bool:
        """Score one batch off the ring when one is due: ``batch_rows`` committed, or the
        oldest waiting for ``max_delay_s``. True when it scored."""
        ring, settings = self.ring, self.settings
        if ring is None:
            return False
        ready = ring.committed(settings.batch_rows)
        if not ready:
            self._waiting_since = None
            return False
        if self._waiting_since is None:
            self._waiting_since = now
        waited = now - self._waiting_since
        if ready < settings.batch_rows and waited < settings.max_delay_s:
            return False
        self._score_next(settings.batch_rows)
        self._waiting_since = now
        return True

    def drain(self, upto: int | None = None) -> None:
        """Score every committed row of the ring (before sequence ``upto`` when given)."""
        while self.ring is not None and self._score_next(self.settings.batch_rows, upto):
            pass

    def _score_next(self, limit: int, upto: int | None = None) -> bool:
        taken = self.ring.take(limit, upto)
        if taken is None:
            return False
        self.score(taken, release=self.ring.release)
        return True

    def score(self, taken: TakenRows, release: Callable[[TakenRows], None] | None = None) -> None:
        """Score and record rows taken off the ring (the steps yield the GIL between them);
        ``release`` frees their slots once scored, before they are recorded: a crash
        while scoring leaves them to the next consumer, and none is recorded twice."""
        target = self.target
        rows = taken.count
        error: str | None = None
        started, started_ns = time.perf_counter(), time.time_ns()
        if target is None:
            error = self.target_error or "shadow target not loaded"
            shadow = np.full(rows, np.nan)
        else:
            try:
                shadow = np.asarray(target.score(taken.features), dtype=np.float64)
                if shadow.shape != (rows,):
                    raise ValueError(f"shadow returned shape {shadow.shape} for {rows} rows")
            except Exception as exc:  # noqa: BLE001 - any shadow failure is recorded
                error = f"{type(exc).__name__}: {exc}"[:500]
                shadow = np.full(rows, np.nan)
        _yield_gil()
        shadow_latency_us = (time.perf_counter() - started) * 1e6 / rows
        name, version = self.label
        if self.tracing is not None and taken.traces:
            attributes = {"riskwire.shadow.model": name, "riskwire.shadow.version": version,
                          "riskwire.shadow.rows": rows}  # fmt: skip
            self.tracing.shadow_span(taken.traces, started_ns, time.time_ns(), attributes, error)
        ok = ~np.isnan(shadow)
        shadow_codes = np.full(rows, -1, np.int64)
        if target is not None and ok.any():
            shadow_codes[ok] = decision_codes(
                shadow[ok], target.review_threshold, target.decline_threshold
            )
        primary_codes = taken.decision_codes.astype(np.int64)
        versions = taken.versions
        if versions.count(versions[0]) == rows:  # the usual case: one primary version
            by_version = {versions[0]: np.arange(rows)}
        else:
            as_array = np.array(versions, dtype=object)
            by_version = {v: np.flatnonzero(as_array == v) for v in set(versions)}
        for primary_version, picked in by_version.items():
            stats = self._stats.setdefault(
                (self.primary, primary_version, name, version), PairStats()
            )
            stats.mirrored += len(picked)
            good = picked[ok[picked]]
            stats.failed += len(picked) - len(good)
            stats.add_scored(
                taken.probabilities[good], shadow[good], primary_codes[good], shadow_codes[good]
            )
        self._stats_dirty = True
        if release is not None:
            release(taken)
        _yield_gil()
        shadow_decisions = np.where(ok, _DECISION_ARRAY[np.clip(shadow_codes, 0, 2)], None)
        columns: list = [
            taken.request_ids,
            taken.transaction_ids,
            taken.time_ms,
            taken.card_keys,
            [self.worker] * rows,
            [self.primary] * rows,
            versions,
            [name] * rows,
            [version] * rows,
            taken.probabilities,
            pa.array(shadow, from_pandas=True),  # NaN (failed) → null
            list(taken.decisions),
            list(shadow_decisions),
            taken.latency_us,
            np.full(rows, shadow_latency_us),
            [error] * rows,
            taken.clients,
        ]
        if self.settings.record_features:
            columns.extend(np.ascontiguousarray(taken.features.T))
        try:
            self.writer.add_rows(columns)
        except OSError as exc:
            log.error("shadow records could not be written: %s", exc)

    def maybe_flush(self, now: float) -> None:
        """Write a segment if the oldest buffered record is ``flush_seconds`` old."""
        if self.writer.maybe_flush(now) is not None:
            self._stats_dirty = True  # records_written changed

    def publish(self, queued: int, active: bool | None = None) -> None:
        """Write this worker's stats for the supervisor (atomic; only when changed)."""
        if not self._stats_dirty:
            return
        self._stats_dirty = False
        with self._dropped_lock:
            dropped = dict(self._dropped)
        pairs = {key: PairStats() for key in dropped}
        pairs.update(self._stats)
        payload = {
            "worker": self.worker,
            "pid": self.pid,
            "generation": self.config.generation,
            "active": self.active if active is None else active,
            "target_error": self.target_error,
            "queued": queued,
            "records_written": self.writer.rows_written,
            "pairs": [
                {
                    "primary_model": key[0],
                    "primary_version": key[1],
                    "shadow_model": key[2],
                    "shadow_version": key[3],
                    "stats": {**stats.to_dict(), "dropped": dropped.get(key, 0)},
                }
                for key, stats in pairs.items()
            ],
        }
        path = self.settings.stats_path
        try:
            write_text_atomic(path, json.dumps(payload))
        except OSError as exc:
            log.error("shadow stats could not be written to %s: %s", path, exc)

    def mark_dirty(self) -> None:
        """Publish at the next :meth:`publish` even if nothing was scored."""
        self._stats_dirty = True

    def close(self, queued: int = 0) -> None:
        """Flush the records, publish the stats, release the target."""
        try:
            self.writer.flush()
        finally:
            self._stats_dirty = True
            self.publish(queued)
            if self.target is not None:
                self.target.close()


class ShadowMirror:
    """One worker's mirror of its primary's traffic to the configured shadow target.

    ``recorder`` consumes the ring: a :class:`PairRecorder` on the mirror thread (the
    default) or a :class:`riskwire.shadow.scorer_process.ScorerProcess`.
    """

    def __init__(
        self,
        worker: int,
        settings: MirrorSettings,
        resolve_local: ResolveLocal,
        default_primary: str,
        initial: ShadowConfig | None = None,
        recorder: PairRecorder | None = None,
    ) -> None:
        self.worker = worker
        self.settings = settings
        self._resolve_local = resolve_local
        self._default_primary = default_primary
        self.ring = MirrorRing.create(settings.queue_size, NUM_FEATURES)
        self._random = random.random
        self.recorder = recorder if recorder is not None else PairRecorder(worker, settings)
        self.recorder.attach(self.ring)
        # Read lock-free on the hot path; replaced as a whole by the mirror thread.
        self.active = False
        self._primary = ""
        self._rate = 100.0
        self._filter: RequestFilter | None = None
        self._config = ShadowConfig()
        self._control_mtime: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shadow-mirror", daemon=True)
        if initial is not None:
            self._apply(initial)

    @property
    def target_error(self) -> str | None:
        """Why the configured target could not be made (None when it could)."""
        return self.recorder.target_error

    # ------------------------------------------------------------------ hot path
    def sampled(self) -> bool:
        """Whether to mirror the next single request (the configured rate)."""
        rate = self._rate
        return rate >= 100.0 or self._random() * 100.0 < rate

    def offer_one(
        self,
        model_name: str,
        model_version: str,
        request_id: str,
        transaction_id: str,
        time_ms: int,
        card_key: int,
        probability: float,
        decision: str,
        latency_us: float,
        features: np.ndarray,
        filter_values: tuple,
        trace: tuple | None = None,
        client: str = "",
    ) -> None:
        """Mirror one scored request if it passes the filter (never blocks).

        The caller samples first (:meth:`sampled`), so unsampled requests cost nothing
        more; ``features`` (a C-contiguous float64 row) is copied into the ring;
        ``filter_values`` is (channel, country, card_country, currency, mcc, amount).
        """
        if model_name != self._primary:
            return
        wanted = self._filter
        if wanted is not None and not wanted(*filter_values):
            return
        if not self.ring.put_one(
            model_version, request_id, transaction_id, client, time_ms, card_key,
            probability, decision, latency_us, features, trace,
        ):  # fmt: skip
            self.recorder.count_drop(model_version, 1)

    def offer_batch(
        self,
        model_name: str,
        model_version: str,
        request_id: str,
        transaction_ids: Sequence[str] | None,
        time_ms: np.ndarray,
        card_keys: np.ndarray,
        probabilities: np.ndarray,
        decisions: np.ndarray,
        latency_us: float,
        features: np.ndarray,
        columns: Mapping[str, Sequence],
        rows: np.ndarray,
        trace: tuple | None = None,
        client: str = "",
    ) -> None:
        """Mirror the scored rows of a batch call; ``rows`` index them in ``columns``
        (the raw request), ``features`` etc. are already restricted to them."""
        if model_name != self._primary or not len(rows):
            return
        keep = np.ones(len(rows), dtype=bool)
        if self._rate < 100.0:
            keep &= np.random.random(len(rows)) * 100.0 < self._rate
        wanted = self._filter
        if wanted is not None:
            picked = [columns[name] for name in _FILTER_COLUMNS]
            keep &= np.array([wanted(*(c[i] for c in picked)) for i in rows], dtype=bool)
        if not keep.any():
            return
        index = np.flatnonzero(keep)
        ids = [f"{request_id}/{i}" for i in rows[index]]
        tids = [transaction_ids[i] for i in rows[index]] if transaction_ids else [""] * len(ids)
        if not self.ring.put_rows(
            model_version, ids, tids, client, time_ms[index], card_keys[index],
            probabilities[index], decisions[index], latency_us,
            np.ascontiguousarray(features[index], dtype=np.float64), trace,
        ):  # fmt: skip
            self.recorder.count_drop(model_version, len(ids))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the mirror thread."""
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Score what is queued (within ``timeout_s``), flush records, publish stats."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.recorder.close(self.ring.pending())

    def queued(self) -> int:
        """Requests waiting for the shadow scorer."""
        return self.ring.pending()

    # ------------------------------------------------------------------ mirror thread
    def _run(self) -> None:
        """Apply configuration changes, publish stats and let the recorder take its
        batches off the ring (on this thread, or the scorer process's supervision)."""
        settings = self.settings
        _unpin()
        next_poll = 0.0
        while True:
            now = time.monotonic()
            if self._stop.is_set():
                self.recorder.drain()  # what is queued (the scorer process: at its close)
                return
            if now >= next_poll:
                next_poll = now + settings.poll_s
                self.refresh()
                self.recorder.publish(self.ring.pending(), self.active)
            recorder = self.recorder
            if recorder.pump(now):
                continue
            recorder.maybe_flush(now)
            if recorder.consumes_ring and (self.active or self.ring.pending()):
                self._stop.wait(settings.idle_sleep_s)
            else:  # nothing for this thread until the next poll: no wake-ups under load
                self._stop.wait(max(next_poll - time.monotonic(), 0.0))

    def refresh(self) -> None:
        """Apply the control file if it changed (the mirror thread calls this itself)."""
        path = self.settings.control_path
        if path is None:
            return
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._control_mtime:
            return
        self._control_mtime = mtime
        try:
            config = read_control(path)
        except (OSError, ValueError) as exc:
            log.error("shadow control file %s unreadable: %s", path, exc)
            return
        if config is not None and config.generation != self._config.generation:
            # What was mirrored under the old target is scored by it.
            self.recorder.drain(self.ring.written())
            self._apply(config)

    def _apply(self, config: ShadowConfig) -> None:
        """Switch to ``config`` (from the mirror thread, or before it starts)."""
        self.active = False
        self._config = config
        self._primary = config.primary or self._default_primary
        self._rate = config.rate_percent
        self._filter = parse_filter(config.filter)
        if not config.enabled:
            self.recorder.configure(config, self._primary, None, None)
            log.info("shadow off")
            return
        try:
            spec = self._target_spec(config)
        except Exception as exc:  # noqa: BLE001 - reported in the stats; primary unaffected
            error = f"{type(exc).__name__}: {exc}"
            self.recorder.configure(config, self._primary, None, error)
            log.error("shadow target unavailable: %s", error)
            return
        self.recorder.configure(config, self._primary, spec, None)
        if not self.recorder.active:
            return
        self.active = True
        name, version = config.label(self._primary)
        log.info(
            "shadow on: %s traffic → %s v%s at %.1f%%%s",
            self._primary, name, version, self._rate,
            f" where {config.filter}" if config.filter else "",
        )  # fmt: skip

    def _target_spec(self, config: ShadowConfig) -> TargetSpec:
        name, version = config.label(self._primary)
        if not config.endpoint:
            return TargetSpec(local=self._resolve_local(name, version))
        primary = self._resolve_local(self._primary, "")
        review, decline = config.review_threshold, config.decline_threshold
        return TargetSpec(
            remote={
                "endpoint": config.endpoint,
                "name": config.model or self._primary,
                "version": config.version,
                "input_name": config.endpoint_input,
                "timeout_s": config.timeout_s,
                "review_threshold": review if review >= 0 else primary.review_threshold,
                "decline_threshold": decline if decline >= 0 else primary.decline_threshold,
            }
        )
