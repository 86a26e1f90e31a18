"""A gunicorn worker class for the native plane.

``gunicorn -k wsmanager.workers.UvicornWorker -w 4 app:app`` runs uvicorn in each gunicorn
worker, as ``uvicorn_worker.UvicornWorker`` does, with wsmanager's WebSocket protocol
(``wsmanager.uvicorn:WebSocketProtocol``: the C engine owns each upgraded socket) and, when this
wsmanager has it, its HTTP protocol (``wsmanager.uvicorn:HTTPProtocol``: uvicorn's own plus the
defences before the 101). Everything else -- loop, keep-alive, TLS, max requests, graceful
timeout -- comes from gunicorn's settings, as with the base class.

Each worker is a process with its own manager: without ``WSMANAGER_REDIS_URL`` a broadcast,
a per-user limit and ``get_stats()`` cover one worker (the manager warns at start-up).

The base class is ``uvicorn_worker.UvicornWorker`` (PyPI ``uvicorn-worker``, where uvicorn's
worker classes live now), else ``uvicorn.workers.UvicornWorker`` for uvicorns that still ship it.
"""
from __future__ import annotations

from typing import Any

from .__main__ import NATIVE_HTTP, NATIVE_WS  # the protocol class paths, owned by `python -m wsmanager`

try:
    from uvicorn_worker import UvicornWorker as _BaseWorker
except ImportError:  # pragma: no cover - older setups
    try:
        from uvicorn.workers import UvicornWorker as _BaseWorker
    except ImportError as exc:  # pragma: no cover
        raise ImportError("wsmanager.workers needs gunicorn and uvicorn-worker: "
                          "pip install gunicorn uvicorn-worker") from exc

__all__ = ["UvicornWorker"]


def _native_kwargs() -> dict[str, Any]:
    kwargs: dict[str, Any] = {"ws": NATIVE_WS}
    try:
        from . import uvicorn as native
        has_http = hasattr(native, "HTTPProtocol")
    except Exception:  # noqa: BLE001 - no HTTP protocol of ours: uvicorn's own
        has_http = False
    if has_http:
        kwargs["http"] = NATIVE_HTTP
    return kwargs


class UvicornWorker(_BaseWorker):
    """uvicorn in a gunicorn worker, on wsmanager's native WebSocket plane."""

    CONFIG_KWARGS: dict[str, Any] = {**_BaseWorker.CONFIG_KWARGS, **_native_kwargs()}
