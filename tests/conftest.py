"""Fixtures: the same test bodies run on every data plane and every ASGI server.

``plane`` is "testclient" (Starlette's TestClient, in-process) or a server plane: "uvicorn"
(stock uvicorn, its default WebSocket implementation), "native" (uvicorn with wsmanager's own
protocol class and the C engine), "hypercorn", "granian" or "daphne" (each in its default
configuration). ``server_plane`` is every server plane. Real servers are tests/servers.py's
``AppServer`` (127.0.0.1, a socket bound for them), started by ``start_server`` and stopped at
the end of the test.

The three other servers (``OTHER_SERVERS``) run the bodies whose outcome depends on the
server -- how it reports a close, which close codes it accepts, how a send to a dead or stalled
peer fails -- and not the ones that only exercise the manager's own bookkeeping once more: those
are parametrized with ``UVICORN_PLANES`` / ``UVICORN_SERVER_PLANES`` (test_planes.py and
test_fanout_real.py say which and why). ``start_server`` also starts gunicorn with wsmanager's
worker class (plane "gunicorn"), and takes AppServer's options (``extra=["--workers", "2"]``).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.servers import AppServer, native_available

#: The ASGI servers besides uvicorn that the README promises, each a pip package (``.[test]``).
OTHER_SERVERS = ("hypercorn", "granian", "daphne")
# Left out on a developer's machine without them; never on CI, where `make test` installs
# .[test] and a missing server must fail its tests, not hide them.
_MISSING = [] if os.environ.get("CI") else [s for s in OTHER_SERVERS if importlib.util.find_spec(s) is None]

#: uvicorn's planes: for test bodies about the manager's own logic, which the server under it
#: does not change (resolving users and channels, the JSON heartbeat, a thousand clients).
UVICORN_SERVER_PLANES = ["uvicorn"] + (["native"] if native_available() else [])
UVICORN_PLANES = ["testclient"] + UVICORN_SERVER_PLANES
SERVER_PLANES = UVICORN_SERVER_PLANES + [s for s in OTHER_SERVERS if s not in _MISSING]
ALL_PLANES = ["testclient"] + SERVER_PLANES
#: The planes where the manager talks ASGI (not the native engine).
PORTABLE_PLANES = [p for p in ALL_PLANES if p != "native"]

#: Servers that refuse close codes 1001-2999 and send no close reason (daphne: autobahn's
#: sendClose); the manager then closes with 4000 + (code - 1000) (WebSocketManager._close_portable).
STRICT_CLOSE_SERVERS = {"daphne"}
#: Servers whose websocket.disconnect never carries the peer's close code (hypercorn: 1006
#: for every close the peer started), so a dropped connection counts as "normal" there.
PEER_CODE_UNREPORTED = {"hypercorn"}


def close_as_seen(plane: str, code: int, reason: str) -> tuple[int, str]:
    """What a client on ``plane`` receives when the manager closes with ``code``/``reason``."""
    if plane in STRICT_CLOSE_SERVERS:
        return (4000 + code - 1000 if 1001 <= code <= 1999 else code), ""
    return code, reason


def unless_installed(missing: bool, what: str) -> pytest.MarkDecorator:
    """Skips a test whose tool is missing on a developer's machine; never on CI, where
    `make test` installs every tool and a missing one must fail, not hide."""
    return pytest.mark.skipif(missing and not os.environ.get("CI"),
                              reason=f"{what} is not installed (make test installs it)")


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Any]:
    """``start_server(app, plane, env=None, **AppServer options)``: a server on ``plane`` (uvicorn
    with ``--lifespan off``), its log in the test's tmp_path; every one is stopped afterwards."""
    servers: list[AppServer] = []

    def start(app: str, plane: str, env: dict[str, str] | None = None, **kw: Any) -> AppServer:
        if plane in ("uvicorn", "native"):
            kw.setdefault("lifespan", "off")
        s = AppServer(app, plane, env=env, log_path=tmp_path / f"server{len(servers)}.log",
                      own_session=True, **kw)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


class SyncClient:
    """One WebSocket client with the TestClient session's API, for every plane."""

    def __init__(self, session: Any, kind: str) -> None:
        self._s = session
        self.kind = kind

    def send_json(self, obj: Any) -> None:
        if self.kind == "testclient":
            self._s.send_json(obj)
        else:
            self._s.send(json.dumps(obj))

    def receive_json(self, timeout: float = 10) -> Any:
        if self.kind == "testclient":
            return self._s.receive_json()
        return json.loads(self._s.recv(timeout=timeout))

    def receive_until(self, kind: str, timeout: float = 10) -> Any:
        """Skips heartbeat pings, returns the first message of ``kind``."""
        while True:
            msg = self.receive_json(timeout)
            if msg.get("type") == kind:
                return msg
            if msg.get("type") != "ping":
                raise AssertionError(f"expected {kind!r}, got {msg!r}")

    def close(self) -> None:
        self._s.close()


@pytest.fixture(params=ALL_PLANES)
def plane(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=SERVER_PLANES)
def server_plane(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def reset_ws_manager() -> Iterator[Any]:
    """The in-process ``ws_manager`` restored to defaults around a TestClient test."""
    from wsmanager import ws_manager
    yield ws_manager
    ws_manager.configure(ping_interval=30, ping_timeout=10, max_connections_per_user=5,
                         stale_timeout=40, greeting=False)
