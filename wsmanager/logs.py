"""How wsmanager logs: as a library, and visibly under the server it runs on.

wsmanager logs under the ``wsmanager`` logger (the router under ``wsmanager.fastapi``) and
never configures logging for the application. What happens to its records:

1. **You configured logging** -- a handler on ``wsmanager`` (a ``NullHandler`` counts: that is
   how to silence it), or handlers on the root logger that its records propagate to
   (``logging.basicConfig``, a ``dictConfig`` with a root, daphne, pytest): your handlers get
   them and wsmanager adds nothing.
2. **You configured nothing, and the process is an ASGI server that set up its own logging**
   (``uvicorn app:app``, ``uvicorn.run(app)``, hypercorn, granian, gunicorn's workers): the
   records go through that server's error logger (:data:`SERVER_LOGGERS`, the first one with
   handlers of its own), so they come out in the server's format and at the server's level
   (``--log-level``), e.g. ``WARNING:  Connection limit reached for user dave ...`` under
   uvicorn. The server is looked up when wsmanager is imported (``uvicorn app:app`` configures
   logging before it imports the app) or else at the first record that gets this far, and the
   first server found is kept; at that moment, if you left the ``wsmanager`` level unset, it is
   set to the server logger's effective level, so INFO lines (stale cleanups, Redis recovery)
   show under uvicorn's default ``info`` and DEBUG ones under ``--log-level debug``. A
   ``wsmanager`` level set by you is never touched, and the one set here is taken back if you
   configure logging later (case 1).
3. **Neither** (a plain script, nothing configured): the records are dropped, as with a
   ``NullHandler`` -- never printed bare by Python's last-resort handler.

All three come from one :class:`ServerLogHandler`, installed on the ``wsmanager`` logger at
import (:func:`install`). It decides per record whether case 1 holds (a walk over two or three
loggers, for records that passed the level check only: the DEBUG calls on the hot paths stop at
``isEnabledFor`` as before). A ``dictConfig`` that names ``wsmanager`` removes it, as it removes
every handler of a logger it configures.

``python -m wsmanager`` does not rely on case 2: it gives uvicorn a log config with a
``wsmanager`` logger on uvicorn's ``default`` handler and formatter, at the ``--log-level``
(:func:`uvicorn_log_config`); with your own ``--log-config`` it uses yours unchanged.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

__all__ = ["LOGGER", "SERVER_LOGGERS", "ServerLogHandler", "install", "uvicorn_log_config"]

#: The logger every wsmanager module logs under (or under a child of it).
LOGGER = "wsmanager"

#: The error loggers of the servers wsmanager runs under, in the order they are looked up.
#: uvicorn's (also what ``uvicorn_worker.UvicornWorker`` gives gunicorn's handlers to),
#: hypercorn's, granian's (``_granian``, its Python-side logger) and gunicorn's own.
SERVER_LOGGERS = ("uvicorn.error", "hypercorn.error", "_granian", "gunicorn.error")


def _server_handlers(logger: logging.Logger) -> bool:
    """Whether records handed to ``logger`` meet a handler below the root (a server's own
    handlers: uvicorn's sit on ``uvicorn``, the parent of ``uvicorn.error``)."""
    node: logging.Logger | None = logger
    while node is not None and node is not logging.root:
        if node.handlers:
            return True
        if not node.propagate:
            return False
        node = node.parent  # type: ignore[assignment]
    return False


class ServerLogHandler(logging.Handler):
    """The one handler wsmanager installs on its logger: hands a record to the server's error
    logger when nobody else would handle it, and drops it otherwise (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._server: logging.Logger | None = None
        self._level_set: int | None = None  # the wsmanager level set here, to be taken back

    def _handled_elsewhere(self, name: str) -> bool:
        node = logging.root.manager.loggerDict.get(name)
        if not isinstance(node, logging.Logger):
            node = logging.getLogger(LOGGER)
        while node is not None:
            for handler in node.handlers:
                if handler is not self:
                    return True
            if not node.propagate:
                return False
            node = node.parent  # type: ignore[assignment]
        return False

    def server(self) -> logging.Logger | None:
        """The server logger records go to: the one found first, kept while it has handlers."""
        if self._server is not None and _server_handlers(self._server):
            return self._server
        known = logging.root.manager.loggerDict  # look, never create a server's logger
        for name in SERVER_LOGGERS:
            candidate = known.get(name)
            if isinstance(candidate, logging.Logger) and _server_handlers(candidate):
                self._server = candidate
                ours = logging.getLogger(LOGGER)
                if ours.level == logging.NOTSET:
                    self._level_set = candidate.getEffectiveLevel()
                    ours.setLevel(self._level_set)
                return candidate
        return None

    def bind(self) -> logging.Logger | None:
        """Looks the server up now (a no-op when logging is configured otherwise)."""
        return None if self._handled_elsewhere(LOGGER) else self.server()

    def handle(self, record: logging.LogRecord) -> bool:  # no lock: nothing here needs one
        if self._handled_elsewhere(record.name):
            ours = logging.getLogger(LOGGER)
            if self._level_set is not None and ours.level == self._level_set:
                ours.setLevel(logging.NOTSET)  # configured after all: the level is theirs again
            self._level_set = None
            return False
        server = self.server()
        if server is None or server.disabled or record.levelno < server.getEffectiveLevel():
            return False
        server.handle(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() does it all
        self.handle(record)


def install() -> ServerLogHandler:
    """Puts the :class:`ServerLogHandler` on the ``wsmanager`` logger (once per process) and
    looks for the server right away. Called when ``wsmanager`` is imported."""
    logger = logging.getLogger(LOGGER)
    for handler in logger.handlers:
        if isinstance(handler, ServerLogHandler):
            return handler
    handler = ServerLogHandler()
    logger.addHandler(handler)
    handler.bind()
    return handler


def uvicorn_log_config(level: int | str = "info", base: dict[str, Any] | None = None) -> dict[str, Any]:
    """uvicorn's log config (``base``, default ``uvicorn.config.LOGGING_CONFIG``; copied) with
    the ``wsmanager`` logger on its ``default`` handler and formatter, at ``level`` (a name of
    uvicorn's ``--log-level``, e.g. ``"debug"``, or a number)::

        uvicorn.run(app, ws="wsmanager.uvicorn:WebSocketProtocol",
                    log_config=uvicorn_log_config("info"))
    """
    if base is None:
        from uvicorn.config import LOGGING_CONFIG as base
    if isinstance(level, str):
        from uvicorn.config import LOG_LEVELS

        level = LOG_LEVELS[level.lower()]
    config = copy.deepcopy(base)
    config.setdefault("loggers", {})[LOGGER] = {"handlers": ["default"], "level": level,
                                                "propagate": False}
    return config
