"""Lighter per-call scopes in grpc's synchronous server (the same behaviour, less Python).

Every call grpcio's synchronous server answers enters three generator-based context
managers (``contextlib.contextmanager``), each costing a generator, its frame and
``contextlib``'s bookkeeping:

* ``grpc._create_servicer_context``, around the handler: it builds the servicer context
  and finalises it after a normal exit;
* ``grpc._observability.get_plugin``, twice (when the call's context is installed, and
  in ``maybe_record_rpc_latency`` at its end): it yields the registered observability
  plugin — ``None`` unless grpcio-observability is set up — while holding a module lock,
  so every call of every thread also takes that lock twice.

Under load, ``py-spy`` found ``contextlib`` in 7% of the samples in which a worker's
polling thread was processing calls.
:func:`install` replaces the three with classes that do the same:

* the servicer context is built on entry and finalised after a normal exit only (the
  generator skips ``_finalize_state`` when the body raises; so does this);
* the plugin is read without the lock: reading a module global is atomic, and a plugin
  set or cleared meanwhile is seen by the next call, as before;
* ``maybe_record_rpc_latency`` returns at once when no plugin is registered (it would
  record nothing then), and otherwise runs grpc's own.

Both riskwire's workers and the echo baseline install it (``server/worker.py``
``polling_thread_dispatch``). :func:`install` checks that what it replaces is grpc's own
and otherwise leaves grpc untouched.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

_installed = False
_lock = threading.Lock()


class PluginScope:
    """``with get_plugin() as plugin``: the registered observability plugin, or None."""

    __slots__ = ()

    def __enter__(self) -> Any:
        from grpc import _observability

        return _observability._OBSERVABILITY_PLUGIN  # noqa: SLF001

    def __exit__(self, *exc_info: object) -> bool:
        return False


class ServicerContextScope:
    """``with _create_servicer_context(rpc_event, state, deserializer) as context``."""

    __slots__ = ("_context",)

    def __init__(self, rpc_event: Any, state: Any, request_deserializer: Any) -> None:
        from grpc import _server

        self._context = _server._Context(rpc_event, state, request_deserializer)  # noqa: SLF001

    def __enter__(self) -> Any:
        return self._context

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> bool:
        if exc_type is None:
            self._context._finalize_state()  # noqa: SLF001
        return False


def _plugin_scope() -> PluginScope:
    return _PLUGIN_SCOPE


_PLUGIN_SCOPE = PluginScope()


def install() -> bool:
    """Replace the three scopes once per process; False (nothing changed) when this
    grpcio's are not the generator-based functions this module stands in for."""
    global _installed
    with _lock:
        if _installed:
            return True
        import grpc
        from grpc import _observability, _server

        originals = (
            getattr(grpc, "_create_servicer_context", None),
            getattr(_observability, "get_plugin", None),
            getattr(_observability, "maybe_record_rpc_latency", None),
        )
        expected = (
            all(callable(f) and getattr(f, "__module__", "").startswith("grpc") for f in originals)
            and hasattr(_observability, "_OBSERVABILITY_PLUGIN")
            and hasattr(_server, "_Context")
            and hasattr(_server._Context, "_finalize_state")  # noqa: SLF001
        )
        if not expected:
            log.warning("grpc's per-call scopes left as they are: not the ones expected")
            return False
        record_latency = originals[2]

        def maybe_record_rpc_latency(state: Any) -> None:
            if _observability._OBSERVABILITY_PLUGIN is not None:  # noqa: SLF001
                record_latency(state)

        grpc._create_servicer_context = ServicerContextScope  # noqa: SLF001
        _observability.get_plugin = _plugin_scope
        _observability.maybe_record_rpc_latency = maybe_record_rpc_latency
        _installed = True
        return True
