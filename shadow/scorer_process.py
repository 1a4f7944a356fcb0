"""The shadow scorer process: a worker's shadow scoring, off the worker's CPU and GIL.

    worker: request threads ── rows ──▶ MirrorRing (shared memory) ──┐
            mirror thread ── ("configure" | "drain" | "status", …) ─▶ socket pair
    scorer process (idle priority): PairRecorder ◀───────────────────┘
        takes batches off the ring → target.score → PairStats → stats file;
        paired records → Parquet segments

The worker keeps only the hot path (sample, filter, write the row into its ring); its
mirror thread only forwards configuration changes and drop counts and restarts a dead
process. This process, started by the worker with :class:`ScorerProcess`, maps the
ring, builds the shadow target (loads the package, or connects to the remote endpoint),
takes batches, scores, keeps the pair statistics and writes the records under the
worker's number and pid, exactly as the in-worker recorder would. At ``SCHED_IDLE``
priority (the default) it runs only on CPU time nothing else wants, so mirroring does
not lengthen the primary's queue; when the machine is saturated it falls behind, the
ring fills and further mirrors are dropped and counted, never blocking a request.

It ignores SIGTERM and SIGINT and ends when the worker closes the socket or dies (end
of file): it then scores every committed row of the ring, flushes its records and
publishes its stats, so a SIGKILL of the worker loses no mirrored row. A process that
dies is restarted and continues from the ring's read position; it loses the records it
had buffered for its next segment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from . import child_process
from .config import ShadowConfig
from .mirror import MirrorSettings, PairKey, PairRecorder, TargetSpec
from .ring import MirrorRing

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 30.0  # the process scores what it received before it exits
RESTART_INTERVAL_S = 1.0  # at most one restart of a dead process per interval


class ScorerProcess:
    """The worker's side of its shadow scorer process; a drop-in for the mirror's
    :class:`PairRecorder` (same methods), forwarding everything over a socket pair.

    ``tracing`` holds :func:`riskwire.server.tracing.make_tracing` arguments when
    tracing is on.
    """

    consumes_ring = False  # the process does; the mirror thread only supervises it

    def __init__(
        self,
        worker: int,
        settings: MirrorSettings,
        *,
        idle_priority: bool = True,
        tracing: dict[str, Any] | None = None,
    ) -> None:
        self.worker = worker
        self.settings = settings
        self.tracing = None  # spans are made in the process (``tracing`` arguments)
        self.target_error: str | None = None  # errors known here; the process adds its own
        self.primary = ""
        self.label = ("", "")
        self.ring: MirrorRing | None = None
        self._active = False
        self._start = {
            "worker": worker,
            "settings": settings,
            "pid": os.getpid(),
            "idle_priority": idle_priority,
            "tracing": tracing,
        }
        self._dropped: dict[PairKey, int] = {}
        self._dropped_lock = threading.Lock()
        self._configure_message: tuple | None = None
        self._status_sent: tuple | None = None
        self._conn: Connection | None = None
        self._process: subprocess.Popen | None = None
        self._started_at = 0.0
        self._spawned = False
        self.restarts = 0  # dead processes replaced (published as a metric)
        # Until the shadow is first turned on no process runs: this worker's stats (its
        # configuration generation, inactive) are published from here.
        self._idle = PairRecorder(worker, settings)

    @property
    def active(self) -> bool:
        """Whether a target was configured (the process reports whether it loaded)."""
        return self._active

    @property
    def process_pid(self) -> int | None:
        """The scorer process's pid."""
        return self._process.pid if self._process is not None else None

    def attach(self, ring: MirrorRing) -> None:
        """The ring the process will consume (its descriptor is passed at start)."""
        self.ring = ring

    def _spawn(self) -> None:
        if self.ring is None:
            raise RuntimeError("attach the mirror ring before starting the scorer process")
        self._spawned = True
        self._process, self._conn = child_process.spawn(__name__, self.ring.fd)
        self._started_at = time.monotonic()
        self._conn.send(("start", self._start))
        if self._configure_message is not None:
            self._conn.send(self._configure_message)
        self._status_sent = None

    def _send(self, message: tuple) -> bool:
        """Send, restarting a dead process (rate-limited); False when not sent."""
        for _ in range(2):
            conn = self._conn
            try:
                if conn is None:
                    raise BrokenPipeError("no scorer process")
                conn.send(message)
                return True
            except OSError as exc:
                log.error("shadow scorer process of worker %d is gone: %s", self.worker, exc)
                if not self._restart():
                    return False
        return False

    def _restart(self) -> bool:
        if time.monotonic() - self._started_at < RESTART_INTERVAL_S:
            return False
        self._reap()
        self.restarts += 1
        try:
            self._spawn()
        except OSError as exc:
            log.error("shadow scorer process could not be started: %s", exc)
            self._conn = None
            return False
        return True

    def _reap(self) -> None:
        child_process.kill(self._conn, self._process)
        self._conn = None

    # ------------------------------------------------------------------ recorder API
    def configure(
        self, config: ShadowConfig, primary: str, spec: TargetSpec | None, error: str | None
    ) -> None:
        """Send the new configuration; the process builds the target from ``spec``."""
        self.primary, self.label = primary, config.label(primary)
        portable = None
        if spec is not None:
            try:
                portable = spec.portable()
            except ValueError as exc:
                error = str(exc)
        self.target_error, self._active = error, portable is not None
        if not self._spawned and portable is None:
            self._idle.configure(config, primary, None, error)
            return
        self._configure_message = ("configure", config, primary, portable, error)
        if not self._spawned:
            try:
                self._spawn()  # sends the configuration
            except OSError as exc:
                log.error("shadow scorer process could not be started: %s", exc)
                self._conn = None
            return
        self._send(self._configure_message)

    def count_drop(self, model_version: str, count: int) -> None:
        """Count mirrors dropped for a full ring (any thread; sent with the status)."""
        key = (self.primary, model_version, *self.label)
        with self._dropped_lock:
            self._dropped[key] = self._dropped.get(key, 0) + count

    def pump(self, now: float) -> bool:
        """The process takes its own batches: restart it if it died (rate-limited)."""
        process = self._process
        if process is not None and process.poll() is not None:
            log.error(
                "shadow scorer process of worker %d exited (%s)", self.worker, process.returncode
            )
            self._restart()
        return False

    def drain(self, upto: int | None = None) -> None:
        """Have the process score the rows before ``upto`` before what comes next (a
        configuration); without ``upto``, nothing: the process drains at its close."""
        if upto is not None and self._spawned:
            self._send(("drain", upto))

    def maybe_flush(self, now: float) -> None:
        """Nothing: the process flushes its own records."""

    def publish(self, queued: int, active: bool | None = None) -> None:
        """Send the worker's queue length and drop counts when they changed."""
        if not self._spawned:
            self._idle.publish(queued, active)
            return
        with self._dropped_lock:
            status = (queued, dict(self._dropped))
        if status != self._status_sent and self._send(("status", *status)):
            self._status_sent = status

    def close(self, queued: int = 0) -> None:
        """Let the process score the ring, flush and exit (within a timeout)."""
        if not self._spawned:
            self._idle.close(queued)
            return
        self.publish(queued)
        child_process.finish(self._conn, self._process, CLOSE_TIMEOUT_S, "shadow scorer process")
        self._conn = None


def _lower_priority(idle: bool) -> None:
    """Run on any core, at idle priority when asked (Linux; elsewhere as is)."""
    child_process.run_anywhere()
    if idle:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (OSError, AttributeError):
            with contextlib.suppress(OSError):
                os.nice(19)


def serve(conn: Connection, recorder: PairRecorder) -> None:
    """Take batches off the ring and handle the worker's messages until it closes the
    socket; then score what is committed, flush and publish."""
    settings = recorder.settings
    queued, next_publish, scored = 0, 0.0, False
    try:
        while True:
            try:  # messages first: a configuration applies to the rows after it
                while conn.poll(0 if scored else settings.idle_sleep_s):
                    message = conn.recv()
                    kind = message[0]
                    if kind == "drain":
                        recorder.drain(message[1])
                    elif kind == "configure":
                        recorder.configure(*message[1:])
                    elif kind == "status":
                        queued = message[1]
                        recorder.set_dropped(message[2])
                        recorder.mark_dirty()
            except (EOFError, OSError):  # the worker closed the socket or died
                recorder.drain()
                return
            now = time.monotonic()
            scored = recorder.pump(now)
            recorder.maybe_flush(now)
            if now >= next_publish:
                next_publish = now + settings.poll_s
                recorder.publish(queued)
    finally:
        recorder.close(0)
        if recorder.tracing is not None:
            recorder.tracing.shutdown()


def main(argv: list[str] | None = None) -> int:
    """``python -m riskwire.shadow.scorer_process FD RING_FD``: serve the socket on
    ``FD``, consuming the mirror ring on ``RING_FD``."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the worker's end of file stops us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, ring_fd = (int(arg) for arg in (argv if argv is not None else sys.argv[1:])[:2])
    conn = Connection(fd)
    kind, start = conn.recv()
    if kind != "start":
        raise SystemExit(f"scorer process: expected 'start', got {kind!r}")
    _lower_priority(start["idle_priority"])
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s shadow-scorer w{start['worker']} %(levelname)s %(message)s",
    )
    recorder = PairRecorder(start["worker"], start["settings"], pid=start["pid"])
    recorder.attach(MirrorRing.attach(ring_fd))
    if start["tracing"] is not None:
        from riskwire.server.tracing import make_tracing

        recorder.tracing = make_tracing(start["tracing"])
    serve(conn, recorder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
