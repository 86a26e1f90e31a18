"""Fixtures: the same test bodies run on every data plane and every ASGI server.

``plane`` is "testclient" (Starlette's TestClient, in-process) or a server plane: "uvicorn"
(stock uvicorn, its default WebSocket implementation), "native" (uvicorn with wsmanager's own
protocol class and the C engine), "hypercorn", "granian" or "daphne" (each in its default
configuration). ``server_plane`` is every server plane. Real servers listen on 127.0.0.1 on a
free port in a subprocess and are stopped at the end of the test.

The three other servers (``OTHER_SERVERS``) run the bodies whose outcome depends on the
server -- how it reports a close, which close codes it accepts, how a send to a dead or stalled
peer fails -- and not the ones that only exercise the manager's own bookkeeping once more: those
are parametrized with ``UVICORN_PLANES`` / ``UVICORN_SERVER_PLANES`` (test_planes.py and
test_fanout_real.py say which and why). ``Server`` also starts gunicorn with wsmanager's worker
class (plane "gunicorn"), and takes extra command-line arguments (``--workers 2``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent

try:
    import wsmanager.uvicorn  # noqa: F401
    HAVE_NATIVE = True
except ImportError:
    HAVE_NATIVE = False

NATIVE_WS = "wsmanager.uvicorn:WebSocketProtocol"

#: The ASGI servers besides uvicorn that the README promises, each a pip package (``.[test]``).
OTHER_SERVERS = ("hypercorn", "granian", "daphne")
# Left out on a developer's machine without them; never on CI, where `make test` installs
# .[test] and a missing server must fail its tests, not hide them.
_MISSING = [] if os.environ.get("CI") else [s for s in OTHER_SERVERS if importlib.util.find_spec(s) is None]

#: uvicorn's planes: for test bodies about the manager's own logic, which the server under it
#: does not change (resolving users and channels, the JSON heartbeat, a thousand clients).
UVICORN_SERVER_PLANES = ["uvicorn"] + (["native"] if HAVE_NATIVE else [])
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


def server_command(app: str, plane: str, port: int) -> list[str]:
    """The command line that serves ``app`` on 127.0.0.1:``port`` on ``plane``.

    "gunicorn" is gunicorn with wsmanager's worker class (the native plane in gunicorn's
    process model); the others are named above. Every server logs at WARNING and keeps the
    app's lifespan as it ships it (uvicorn: off, as before; the others have no such switch
    that their users would set)."""
    host = "127.0.0.1"
    py = [sys.executable, "-m"]
    if plane in ("uvicorn", "native"):
        cmd = py + ["uvicorn", app, "--host", host, "--port", str(port), "--log-level", "warning",
                    "--lifespan", "off"]
        return cmd + (["--ws", NATIVE_WS] if plane == "native" else [])
    if plane == "hypercorn":
        return py + ["hypercorn", "--bind", f"{host}:{port}", "--log-level", "WARNING",
                     "--graceful-timeout", "2", app]
    if plane == "granian":
        return py + ["granian", "--interface", "asgi", "--host", host, "--port", str(port),
                     "--log-level", "warning", "--workers", "1", app]
    if plane == "daphne":
        return py + ["daphne", "-b", host, "-p", str(port), "-v", "0", app]
    if plane == "gunicorn":
        return py + ["gunicorn", "-k", "wsmanager.workers.UvicornWorker", "-b", f"{host}:{port}",
                     "--log-level", "warning", "--graceful-timeout", "5", app]
    raise ValueError(f"unknown plane {plane!r}")


class Server:
    """An ASGI server subprocess serving ``app`` on 127.0.0.1 (see :func:`server_command`);
    ``extra`` is appended to its command line (e.g. ``["--workers", "2"]`` for uvicorn)."""

    def __init__(self, app: str, plane: str, env: dict[str, str] | None = None,
                 extra: list[str] | None = None, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.plane = plane
        cmd = server_command(app, plane, self.port) + (extra or [])
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        # Its own session: a server with worker processes is stopped as a group.
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(OSError):
                # An HTTP answer, not only a bound socket: servers with worker processes bind
                # before a worker serves. Any status will do (every app has a 404).
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"GET /__ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if sock.recv(16).startswith(b"HTTP/"):
                        return
            time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self.log()}")

    def log(self) -> str:
        if self.log_path is None:
            return ""
        if self._log is not subprocess.DEVNULL and not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    @property
    def base(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.base}{path}"

    def ws_url(self, path: str) -> str:
        return f"ws://{self.base}{path}"

    def get(self, path: str, **kw: Any) -> Any:
        r = httpx.get(self.url(path), timeout=10, **kw)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, **kw: Any) -> Any:
        r = httpx.post(self.url(path), timeout=30, **kw)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            # A supervisor stops its workers itself; gunicorn's arbiter answers SIGINT by
            # killing uvicorn workers after its graceful timeout, SIGTERM at once.
            self.proc.send_signal(signal.SIGTERM if self.plane == "gunicorn" else signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of the group (a worker that outlived its supervisor, or all of it).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def start(app: str, plane: str, env: dict[str, str] | None = None, **kw: Any) -> Server:
        s = Server(app, plane, env, log_path=tmp_path / f"server{len(servers)}.log", **kw)
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
