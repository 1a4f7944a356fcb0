"""A worker's helper process on a socket pair: started with :func:`spawn`, told to finish
by closing the socket (:func:`finish`), or killed (:func:`kill`).

The shadow scorer (``shadow/scorer_process.py``) and the prediction log's writer
(``server/monitoring/prediction_writer.py``) are such processes. Each reads its
messages from the socket and treats end of file (the worker closed it, or died) as the
order to finish its work and exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from multiprocessing.connection import Connection

log = logging.getLogger(__name__)


def spawn(module: str, *fds: int) -> tuple[subprocess.Popen, Connection]:
    """Start ``python -m module SOCKET_FD FD…``, passing it its end of a new socket pair
    and the descriptors ``fds``; returns the process and this side's connection."""
    parent, child = socket.socketpair()
    try:
        with child:
            process = subprocess.Popen(
                [sys.executable, "-m", module, str(child.fileno()), *map(str, fds)],
                pass_fds=(child.fileno(), *fds),
                stdin=subprocess.DEVNULL,
            )
    except BaseException:
        parent.close()
        raise
    return process, Connection(parent.detach())


def finish(
    conn: Connection | None, process: subprocess.Popen | None, timeout: float, name: str
) -> None:
    """Close the socket (the process then finishes its work and exits) and wait for the
    process; kill it after ``timeout`` seconds."""
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.close()
    if process is not None:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("%s did not finish in %.0f s", name, timeout)
            process.kill()
            process.wait()


def kill(conn: Connection | None, process: subprocess.Popen | None) -> None:
    """Close the socket and kill the process if it still runs."""
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.close()
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()


def run_anywhere() -> None:
    """Let this process run on any core (a worker pins itself to one, and its children
    inherit that)."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
