"""wsmanager logs as a library does (wsmanager/logs.py): never through Python's last-resort
handler, through the server's own logging when the app configured nothing, through the app's
configuration when it has one, and with uvicorn's format and level under ``python -m wsmanager``.

The server tests run real servers with their out-of-the-box logging (no ``--log-level``) and
make the manager log a WARNING: a sixth connection of one user against the default limit of 5,
on the seed's endpoint (examples/seed_endpoint/app.py, ``?token=tok-<user>``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import unless_installed
from tests.servers import AppServer

ROOT = Path(__file__).resolve().parent.parent
SEED_APP = "examples.seed_endpoint.app:app"
LIMIT_MESSAGE = "Connection limit reached for user dave"
# Environment of every child: the defaults (no WSMANAGER_* from the developer's shell), our tree.
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith(("WSMANAGER_", "UVICORN_"))},
       "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=60)


# ------------------------------------------------------------------ in a plain process

def test_nothing_configured_prints_nothing():
    """A script that configured no logging: wsmanager's WARNINGs are dropped (NullHandler
    behaviour), not printed bare by the last-resort handler."""
    out = run_python("import logging, wsmanager\n"
                     "logging.getLogger('wsmanager').warning('Connection limit reached for x')\n"
                     "logging.getLogger('wsmanager.fastapi').error('wrong admin token')\n")
    assert out.returncode == 0, out.stderr
    assert out.stderr == "" and out.stdout == ""


def test_the_apps_configuration_wins_and_gets_each_record_once():
    out = run_python("import logging, wsmanager\n"
                     "logging.basicConfig(format='APP %(levelname)s %(name)s %(message)s')\n"
                     "logging.getLogger('wsmanager').warning('one')\n"
                     "logging.getLogger('wsmanager.fastapi').warning('two')\n")
    assert out.stderr.splitlines() == ["APP WARNING wsmanager one", "APP WARNING wsmanager.fastapi two"]


def test_a_handler_of_the_app_on_wsmanager_silences_the_fallback():
    """A NullHandler on ``wsmanager`` is how an app says "not under uvicorn's lines"."""
    out = run_python("import logging, uvicorn.config, logging.config, wsmanager\n"
                     "logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)\n"
                     "logging.getLogger('wsmanager').addHandler(logging.NullHandler())\n"
                     "logging.getLogger('wsmanager').warning('hidden')\n")
    assert out.stderr == ""


def test_uvicorns_loggers_configured_first_give_their_format_and_level():
    """``uvicorn app:app`` configures logging, then imports the app: wsmanager finds uvicorn's
    error logger at import and takes its level (INFO lines show, DEBUG does not)."""
    out = run_python("import logging, logging.config, uvicorn.config\n"
                     "logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)\n"
                     "import wsmanager\n"
                     "log = logging.getLogger('wsmanager')\n"
                     "log.debug('not shown'); log.info('Cleaned up 2 stale connections')\n"
                     "log.warning('careful')\n")
    assert out.stderr.splitlines() == ["INFO:     Cleaned up 2 stale connections",
                                       "WARNING:  careful"]


def test_uvicorn_configured_after_the_import_is_found_at_the_first_record():
    """``uvicorn.run(app)`` in a script that imported wsmanager first."""
    out = run_python("import logging, logging.config, uvicorn.config, wsmanager\n"
                     "logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)\n"
                     "logging.getLogger('uvicorn.error').setLevel(logging.DEBUG)\n"
                     "log = logging.getLogger('wsmanager')\n"
                     "log.warning('first'); log.debug('then debug too')\n"
                     "logging.basicConfig(format='APP %(message)s')\n"  # configured after all
                     "log.warning('to the app only')\n"
                     "print(log.level)\n")
    assert out.stderr.splitlines() == ["WARNING:  first", "DEBUG:    then debug too",
                                       "APP to the app only"]
    assert out.stdout.strip() == "0"  # the level borrowed from uvicorn was given back


def test_uvicorn_log_config_adds_wsmanager_on_uvicorns_default_handler():
    import uvicorn.config

    from wsmanager.logs import uvicorn_log_config

    before = json.dumps(uvicorn.config.LOGGING_CONFIG, sort_keys=True)
    config = uvicorn_log_config("debug")
    assert config["loggers"]["wsmanager"] == {"handlers": ["default"], "level": 10, "propagate": False}
    assert config["formatters"] == uvicorn.config.LOGGING_CONFIG["formatters"]
    assert json.dumps(uvicorn.config.LOGGING_CONFIG, sort_keys=True) == before  # a copy
    assert uvicorn_log_config("trace")["loggers"]["wsmanager"]["level"] == 5


# ------------------------------------------------------------------ under real servers

def serve(plane: str, log: Path, via_main: bool = False, log_level: str | None = None,
          **kw) -> AppServer:
    """The seed's app on ``plane`` with the server's out-of-the-box logging (no ``--log-level``
    unless given) and the defaults of every WSMANAGER_* option."""
    return AppServer(SEED_APP, plane, via_main=via_main, environ=ENV, log_path=log,
                     log_level=log_level, own_session=True, **kw)


def six_connections_of_dave(port: int, log: Path) -> str:
    """Opens 6 connections of user dave (limit 5): the sixth is closed with 1008 and the
    manager logs a WARNING. Returns the server's output once that line is in it."""
    url = f"ws://127.0.0.1:{port}/api/v1/ws?token=tok-dave"
    with contextlib.ExitStack() as stack:
        for _ in range(5):
            stack.enter_context(connect(url, open_timeout=10))
        sixth = stack.enter_context(connect(url, open_timeout=10))
        with pytest.raises(ConnectionClosed) as closed:
            sixth.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        deadline = time.monotonic() + 10
        while LIMIT_MESSAGE not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.05)
    return log.read_text(errors="replace")


def assert_formatted_never_bare(output: str, formatted: str) -> None:
    lines = [line for line in output.splitlines() if LIMIT_MESSAGE in line]
    assert len(lines) == 1, output
    assert re.match(formatted, lines[0]), lines[0]
    bare = [line for line in output.splitlines() if line.startswith(("Connection limit", "WebSocket "))]
    assert bare == [], output  # what Python's last-resort handler would have printed


UVICORN_LINE = r"WARNING:  Connection limit reached for user dave \(user limit\); rejecting "
HYPERCORN_LINE = r"\[[-\d :+]+\] \[\d+\] \[WARNING\] Connection limit reached for user dave"
GRANIAN_LINE = r"\[WARNING\] Connection limit reached for user dave"

SERVERS = {  # name: (plane, python -m wsmanager, the line's format)
    "uvicorn": ("uvicorn", False, UVICORN_LINE),
    "uvicorn-native": ("native", False, UVICORN_LINE),
    "python -m wsmanager": ("native", True, UVICORN_LINE),
    "hypercorn": ("hypercorn", False, HYPERCORN_LINE),
    "granian": ("granian", False, GRANIAN_LINE),
}


def _server_param(name: str):
    package = name.split()[0].split("-")[0]
    package = "uvicorn" if package == "python" else package
    missing = importlib.util.find_spec(package) is None
    return pytest.param(name, marks=unless_installed(missing, package), id=name.replace(" ", "_"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("server", [_server_param(name) for name in SERVERS])
def test_a_managers_warning_comes_out_in_the_servers_format(server, tmp_path):
    plane, via_main, formatted = SERVERS[server]
    log = tmp_path / "server.log"
    with serve(plane, log, via_main) as s:
        output = six_connections_of_dave(s.port, log)
    assert_formatted_never_bare(output, formatted)


@pytest.mark.timeout(60)
def test_python_m_wsmanager_follows_log_level(tmp_path):
    log = tmp_path / "server.log"
    with serve("native", log, via_main=True, log_level="debug") as s:
        output = six_connections_of_dave(s.port, log)
    assert_formatted_never_bare(output, UVICORN_LINE)
    assert len(re.findall(r"^DEBUG:    WebSocket connected: \S+ \(user dave\)$", output, re.M)) == 5

    log = tmp_path / "quiet.log"
    with serve("native", log, via_main=True, log_level="error") as s:
        six_connections_of_dave(s.port, log)
        time.sleep(0.3)
    assert LIMIT_MESSAGE not in log.read_text()


@pytest.mark.timeout(60)
def test_python_m_wsmanager_uses_the_users_log_config(tmp_path):
    config = {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"mine": {"format": "MINE %(levelname)s %(name)s: %(message)s"}},
        "handlers": {"mine": {"class": "logging.StreamHandler", "formatter": "mine",
                              "stream": "ext://sys.stderr"}},
        "loggers": {"wsmanager": {"handlers": ["mine"], "level": "INFO", "propagate": False}},
    }
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(config))
    log = tmp_path / "server.log"
    with serve("native", log, via_main=True, extra=["--log-config", str(path)]) as s:
        output = six_connections_of_dave(s.port, log)
    assert_formatted_never_bare(output, r"MINE WARNING wsmanager: Connection limit reached for user dave")
