"""Fixtures: the same test bodies run on every data plane.

``plane`` is "testclient" (Starlette's TestClient, in-process), "uvicorn" (stock uvicorn in a
subprocess, its default WebSocket implementation) or "native" (uvicorn with wsmanager's own
protocol class and the C engine). Real servers listen on 127.0.0.1 on a free port and are killed
at the end of the test.
"""
from __future__ import annotations

import contextlib
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

SERVER_PLANES = ["uvicorn"] + (["native"] if HAVE_NATIVE else [])
ALL_PLANES = ["testclient"] + SERVER_PLANES


def unless_installed(missing: bool, what: str) -> pytest.MarkDecorator:
    """Skips a test whose tool is missing on a developer's machine; never on CI, where
    `make test` installs every tool and a missing one must fail, not hide."""
    return pytest.mark.skipif(missing and not os.environ.get("CI"),
                              reason=f"{what} is not installed (make test installs it)")


class Server:
    """A uvicorn subprocess serving ``app`` on 127.0.0.1."""

    def __init__(self, app: str, plane: str, env: dict[str, str] | None = None,
                 extra: list[str] | None = None, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.plane = plane
        cmd = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning", "--lifespan", "off"]
        if plane == "native":
            cmd += ["--ws", "wsmanager.uvicorn:WebSocketProtocol"]
        cmd += extra or []
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

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
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
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
