"""Per-worker traffic mirroring: bounded queue → background shadow scorer → records.

    handler ── offer_one / offer_batch ──▶ deque (bounded; full → dropped, counted)
                                              │  shadow scorer thread
                                              ▼
            ShadowTarget.score(features) → PairStats + paired records → SegmentWriter

The hot path only samples, filters and appends a tuple of values it already has
(decoded inputs, the feature row the primary computed, its score): it never waits for
the shadow, takes no lock and does no I/O. Everything else runs on the scorer thread,
whose model kernels and remote calls release the GIL while they work.

Loss on a crash (SIGKILL) of a worker: the requests still queued (≤ ``queue_size``)
plus the records buffered for the next segment (≤ ``flush_rows`` rows, ≤
``flush_seconds`` old). A graceful stop scores what is queued and flushes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from riskwire.files import write_text_atomic

from .compare import DECISION_CODES, DECISIONS, PairStats
from .config import RequestFilter, ShadowConfig, parse_filter, read_control
from .records import RECORD_SCHEMA, RECORD_SCHEMA_NO_FEATURES, SegmentWriter
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


@dataclass(slots=True)
class _Batch:
    """A mirrored ScoreBatch / multi-row ModelInfer call (arrays of its scored rows)."""

    model_version: str
    request_ids: list[str]
    transaction_ids: Sequence[str]
    time_ms: np.ndarray
    card_keys: np.ndarray
    probabilities: np.ndarray
    decisions: np.ndarray
    latency_us: float
    features: np.ndarray
    traces: list | None = None  # (trace id, span id, parent) of the calls, when tracing
    clients: list | None = None  # per row: the caller's client id (None without auth)


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


class ShadowMirror:
    """One worker's mirror of its primary's traffic to the configured shadow target."""

    def __init__(
        self,
        worker: int,
        settings: MirrorSettings,
        resolve_local: ResolveLocal,
        default_primary: str,
        initial: ShadowConfig | None = None,
    ) -> None:
        self.worker = worker
        self.settings = settings
        self._resolve_local = resolve_local
        self._default_primary = default_primary
        self._queue: deque = deque()
        self._queue_size = settings.queue_size
        self._random = random.random
        # Set by the worker when tracing is on: each scored batch becomes a span linked
        # to the server spans of its calls (riskwire.server.tracing.Tracing.shadow_span).
        self.tracing = None
        # Read lock-free on the hot path; replaced as a whole by the scorer thread.
        self.active = False
        self._primary = ""
        self._rate = 100.0
        self._filter: RequestFilter | None = None
        self._config = ShadowConfig()
        self._target: ShadowTarget | None = None
        self._target_error: str | None = None
        self._control_mtime: int | None = None
        self._stats: dict[PairKey, PairStats] = {}
        self._shadow_label = ("", "")  # (shadow model, version) of the current config
        self._dropped: dict[PairKey, int] = {}
        self._dropped_lock = threading.Lock()
        self._stats_dirty = True
        schema = RECORD_SCHEMA if settings.record_features else RECORD_SCHEMA_NO_FEATURES
        self._writer = SegmentWriter(
            settings.records_dir,
            schema,
            worker=worker,
            flush_rows=settings.flush_rows,
            flush_seconds=settings.flush_seconds,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shadow-scorer", daemon=True)
        if initial is not None:
            self._apply(initial)

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
        more; ``features`` must be the caller's own copy; ``filter_values`` is (channel,
        country, card_country, currency, mcc, amount).
        """
        if model_name != self._primary:
            return
        wanted = self._filter
        if wanted is not None and not wanted(*filter_values):
            return
        if len(self._queue) >= self._queue_size:
            self._count_drop(model_version, 1)
            return
        self._queue.append(
            (
                model_version, request_id, transaction_id, time_ms, card_key,
                probability, decision, latency_us, features, trace, client or None,
            )
        )  # fmt: skip

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
        if len(self._queue) >= self._queue_size:
            self._count_drop(model_version, int(keep.sum()))
            return
        index = np.flatnonzero(keep)
        ids = [f"{request_id}/{i}" for i in rows[index]]
        tids = [transaction_ids[i] for i in rows[index]] if transaction_ids else [""] * len(ids)
        self._queue.append(
            _Batch(
                model_version, ids, tids, time_ms[index], card_keys[index],
                probabilities[index], decisions[index], latency_us, features[index],
                [trace] if trace is not None else None,
                [client] * len(ids) if client else None,
            )
        )  # fmt: skip

    def _count_drop(self, model_version: str, count: int) -> None:
        key = (self._primary, model_version, *self._shadow_label)
        with self._dropped_lock:
            self._dropped[key] = self._dropped.get(key, 0) + count
            self._stats_dirty = True

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the shadow scorer thread."""
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Score what is queued (within ``timeout_s``), flush records, publish stats."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        try:
            self._writer.flush()
        finally:
            self._publish()
            if self._target is not None:
                self._target.close()

    def queued(self) -> int:
        """Requests waiting for the shadow scorer."""
        return len(self._queue)

    # ------------------------------------------------------------------ scorer thread
    def _run(self) -> None:
        """Score queued requests in batches: when ``batch_rows`` are waiting or the oldest
        has waited ``max_delay_s``. Few large batches keep the thread's share of the GIL
        (and so its effect on the primary's latency) small."""
        settings = self.settings
        _unpin()
        next_poll = last_batch = 0.0
        while True:
            stopping = self._stop.is_set()
            now = time.monotonic()
            if now >= next_poll and not stopping:
                next_poll = now + settings.poll_s
                self.refresh()
                self._publish()
            waiting = len(self._queue)
            full = waiting >= settings.batch_rows
            if waiting and (full or stopping or now - last_batch >= settings.max_delay_s):
                self._score(self._take(settings.batch_rows))
                last_batch = now
                continue
            if stopping:
                return
            if self._writer.maybe_flush(now) is not None:
                self._stats_dirty = True  # records_written changed
            if not waiting:
                last_batch = now  # the next request starts a fresh wait
            time.sleep(settings.idle_sleep_s)

    def _take(self, limit: int) -> list:
        items, rows, queue = [], 0, self._queue
        while rows < limit and queue:
            item = queue.popleft()
            items.append(item)
            rows += len(item.request_ids) if isinstance(item, _Batch) else 1
        return items

    def refresh(self) -> None:
        """Apply the control file if it changed (the scorer thread calls this itself)."""
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
            while self._queue:  # what was mirrored under the old target is scored by it
                self._score(self._take(self.settings.batch_rows))
            self._apply(config)

    def _apply(self, config: ShadowConfig) -> None:
        """Switch to ``config`` (from the scorer thread, or before it starts)."""
        self.active = False
        previous, self._target = self._target, None
        if previous is not None:
            previous.close()
        self._config, self._target_error = config, None
        self._primary = config.primary or self._default_primary
        self._shadow_label = config.label(self._primary)
        self._rate = config.rate_percent
        self._filter = parse_filter(config.filter)
        self._stats_dirty = True
        if not config.enabled:
            log.info("shadow off")
            return
        try:
            self._target = self._make_target(config)
        except Exception as exc:  # noqa: BLE001 - reported in the stats; primary unaffected
            self._target_error = f"{type(exc).__name__}: {exc}"
            log.error("shadow target unavailable: %s", self._target_error)
            return
        self.active = True
        log.info(
            "shadow on: %s traffic → %s v%s at %.1f%%%s",
            self._primary, self._target.name, self._target.version, self._rate,
            f" where {config.filter}" if config.filter else "",
        )  # fmt: skip

    def _make_target(self, config: ShadowConfig) -> ShadowTarget:
        name, version = config.label(self._primary)
        if not config.endpoint:
            return self._resolve_local(name, version)
        primary = self._resolve_local(self._primary, "")
        review, decline = config.review_threshold, config.decline_threshold
        return RemoteTarget(
            config.endpoint,
            name=config.model or self._primary,
            version=config.version,
            input_name=config.endpoint_input,
            timeout_s=config.timeout_s,
            review_threshold=review if review >= 0 else primary.review_threshold,
            decline_threshold=decline if decline >= 0 else primary.decline_threshold,
        )

    def _score(self, items: list) -> None:
        """Score taken items and record them (the steps yield the GIL between them)."""
        singles = [item for item in items if not isinstance(item, _Batch)]
        batches = [item for item in items if isinstance(item, _Batch)]
        if singles:
            (
                versions, request_ids, transaction_ids, times, keys,
                probabilities, decisions, latencies, rows, traces, clients,
            ) = zip(*singles, strict=True)  # fmt: skip
            batches.append(
                _Batch(
                    "", list(request_ids), list(transaction_ids), np.array(times, np.int64),
                    np.array(keys, np.uint64), np.array(probabilities),
                    np.array(decisions, dtype=object), 0.0, np.stack(rows),
                    [t for t in traces if t is not None] or None, list(clients),
                )
            )  # fmt: skip
            single_versions, single_latencies = list(versions), np.array(latencies)
        for batch in batches:
            if batch.model_version:
                versions_of = [batch.model_version] * len(batch.request_ids)
                latency = np.full(len(batch.request_ids), batch.latency_us)
            else:
                versions_of, latency = single_versions, single_latencies
            self._score_batch(batch, versions_of, latency)

    def _score_batch(self, batch: _Batch, versions: list[str], latency: np.ndarray) -> None:
        target = self._target
        rows = len(batch.request_ids)
        error: str | None = None
        started, started_ns = time.perf_counter(), time.time_ns()
        if target is None:
            error = self._target_error or "shadow target not loaded"
            shadow = np.full(rows, np.nan)
        else:
            try:
                shadow = np.asarray(target.score(batch.features), dtype=np.float64)
                if shadow.shape != (rows,):
                    raise ValueError(f"shadow returned shape {shadow.shape} for {rows} rows")
            except Exception as exc:  # noqa: BLE001 - any shadow failure is recorded
                error = f"{type(exc).__name__}: {exc}"[:500]
                shadow = np.full(rows, np.nan)
        _yield_gil()
        shadow_latency_us = (time.perf_counter() - started) * 1e6 / rows
        name, version = self._shadow_label
        if self.tracing is not None and batch.traces:
            attributes = {"riskwire.shadow.model": name, "riskwire.shadow.version": version,
                          "riskwire.shadow.rows": rows}  # fmt: skip
            self.tracing.shadow_span(batch.traces, started_ns, time.time_ns(), attributes, error)
        ok = ~np.isnan(shadow)
        shadow_codes = np.full(rows, -1, np.int64)
        if target is not None and ok.any():
            shadow_codes[ok] = decision_codes(
                shadow[ok], target.review_threshold, target.decline_threshold
            )
        primary_codes = np.array([DECISION_CODES.get(d, -1) for d in batch.decisions], np.int64)
        if versions.count(versions[0]) == rows:  # the usual case: one primary version
            by_version = {versions[0]: np.arange(rows)}
        else:
            as_array = np.array(versions, dtype=object)
            by_version = {v: np.flatnonzero(as_array == v) for v in set(versions)}
        for primary_version, picked in by_version.items():
            stats = self._stats.setdefault(
                (self._primary, primary_version, name, version), PairStats()
            )
            stats.mirrored += len(picked)
            good = picked[ok[picked]]
            stats.failed += len(picked) - len(good)
            stats.add_scored(
                batch.probabilities[good], shadow[good], primary_codes[good], shadow_codes[good]
            )
        self._stats_dirty = True
        _yield_gil()
        shadow_decisions = np.where(ok, _DECISION_ARRAY[np.clip(shadow_codes, 0, 2)], None)
        columns: list = [
            batch.request_ids,
            list(batch.transaction_ids),
            batch.time_ms,
            batch.card_keys,
            [self.worker] * rows,
            [self._primary] * rows,
            versions,
            [name] * rows,
            [version] * rows,
            batch.probabilities.astype(np.float64),
            pa.array(shadow, from_pandas=True),  # NaN (failed) → null
            list(batch.decisions),
            list(shadow_decisions),
            latency.astype(np.float64),
            np.full(rows, shadow_latency_us),
            [error] * rows,
            batch.clients or [None] * rows,
        ]
        if self.settings.record_features:
            columns.extend(np.ascontiguousarray(batch.features.T))
        try:
            self._writer.add_rows(columns)
        except OSError as exc:
            log.error("shadow records could not be written: %s", exc)

    def _publish(self) -> None:
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
            "pid": os.getpid(),
            "generation": self._config.generation,
            "active": self.active,
            "target_error": self._target_error,
            "queued": len(self._queue),
            "records_written": self._writer.rows_written,
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
