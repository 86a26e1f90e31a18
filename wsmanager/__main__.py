"""``python -m wsmanager app:app [uvicorn options]``: uvicorn with the native WebSocket plane.

Every uvicorn option works; ``--ws`` defaults to ``wsmanager.uvicorn:WebSocketProtocol`` and
``--http`` to ``wsmanager.uvicorn:HTTPProtocol`` (uvicorn's own HTTP protocol, h11 or httptools,
plus the defences before the 101: request-head timeout, cap on waiting connections, HTTP/1.0
upgrades refused). An explicit ``--http`` (or ``--http2``, which needs uvicorn's zttp) wins.

Logging: the ``wsmanager`` loggers get uvicorn's ``default`` handler and formatter at the
``--log-level`` (``UVICORN_LOG_LEVEL``; default info), through uvicorn's own default log config
(:func:`wsmanager.logs.uvicorn_log_config`), so they come out as uvicorn's lines do, in the
workers of ``--workers``/``--reload`` too. A ``--log-config`` of yours is used unchanged: name
``wsmanager`` in it (otherwise wsmanager/logs.py's fallback sends its records to
``uvicorn.error``'s handlers, unless the file's ``disable_existing_loggers`` turns it off).
"""
from __future__ import annotations

import logging
import sys

NATIVE_WS = "wsmanager.uvicorn:WebSocketProtocol"
NATIVE_HTTP = "wsmanager.uvicorn:HTTPProtocol"


def _given(args: list[str], *options: str) -> bool:
    return any(a == o or a.startswith(o + "=") for a in args for o in options)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not _given(args, "--ws"):
        args = ["--ws", NATIVE_WS, *args]
    if not _given(args, "--http", "--http2"):
        args = ["--http", NATIVE_HTTP, *args]
    from uvicorn.main import main as uvicorn_cli  # the click command behind `uvicorn`

    _configure_logging(uvicorn_cli, args)
    uvicorn_cli.main(args=args, prog_name="python -m wsmanager")


def _configure_logging(uvicorn_cli, args: list[str]) -> None:
    # The options as uvicorn's CLI will read them (arguments or UVICORN_* variables); resilient:
    # no callbacks, no errors -- the real parse below reports those.
    import click

    try:
        params = uvicorn_cli.make_context("python -m wsmanager", list(args), resilient_parsing=True).params
    except click.ClickException:
        return  # reported by the real parse
    level = params.get("log_level")
    if params.get("log_config") is not None:
        if level:  # the file's own wsmanager level, if it has one, replaces this
            from uvicorn.config import LOG_LEVELS

            logging.getLogger("wsmanager").setLevel(LOG_LEVELS[level])
        return
    from uvicorn.config import LOGGING_CONFIG

    from .logs import uvicorn_log_config

    # In place: the CLI passes this very dict to uvicorn.Config when --log-config is absent
    # (a file would lose --use-colors, which uvicorn applies to dict configs only).
    LOGGING_CONFIG.update(uvicorn_log_config(level or "info", base=LOGGING_CONFIG))


if __name__ == "__main__":
    main()
