"""Real servers for the kit's tests: uvicorn in a subprocess on a free 127.0.0.1 port, on the
stock ("uvicorn") or the native plane, plus a tiny HTTP controller so a node test can stop/start/kill it.

Not a test module (no ``test_`` prefix): imported by test_js_client, test_browser, test_signaling.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
NATIVE_WS = "wsmanager.uvicorn:WebSocketProtocol"


def native_plane_available() -> bool:
    try:
        return importlib.util.find_spec("wsmanager.uvicorn") is not None
    except ImportError:
        return False


def planes() -> list[str]:
    """The planes to run on (conftest.py's names): stock uvicorn always, the native engine once it exists."""
    return ["uvicorn", "native"] if native_plane_available() else ["uvicorn"]


class UvicornServer:
    """``python -m uvicorn <app>`` on 127.0.0.1; the port survives restarts."""

    def __init__(self, app: str, *, plane: str = "uvicorn", port: int | None = None,
                 env: dict[str, str] | None = None, log_path: Path | None = None,
                 health: str = "/healthz") -> None:
        self.app = app
        self.plane = plane
        self.port = port or free_port()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = log_path
        self.health = health
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "uvicorn", self.app, "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning",
               "--timeout-graceful-shutdown", "2"]
        if self.plane == "native":
            cmd += ["--ws", NATIVE_WS]
        return cmd

    def start(self, timeout: float = 20.0) -> "UvicornServer":
        if self.proc and self.proc.poll() is None:
            return self
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env,
                                     stdout=self._log or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT if self._log else subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {self.proc.returncode}: "
                                   f"{' '.join(self.command())}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.health, timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"uvicorn not ready after {timeout}s\n{self.log_tail()}")

    def _wait(self, timeout: float) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful: SIGTERM (uvicorn closes the WebSockets), SIGKILL after ``timeout``."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self._wait(timeout)
        self._close_log()

    def kill(self) -> None:
        """A crash: SIGKILL, the clients see their TCP connections reset."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self._wait(5)
        self._close_log()

    def restart(self, graceful: bool = False) -> None:
        self.stop() if graceful else self.kill()
        self.start()

    def _close_log(self) -> None:
        if self._log:
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 4000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def __enter__(self) -> "UvicornServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Controller:
    """POST /stop, /start, /kill, /restart, /restart-graceful on 127.0.0.1 for a node test."""

    def __init__(self, server: UvicornServer) -> None:
        target = server
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                actions = {"/stop": target.stop, "/start": target.start, "/kill": target.kill,
                           "/restart": target.restart,
                           "/restart-graceful": lambda: target.restart(graceful=True)}
                action = actions.get(self.path)
                if action is None:
                    self.send_error(404)
                    return
                try:
                    with lock:
                        action()
                    body, status = json.dumps({"ok": True}).encode(), 200
                except Exception as exc:  # reported to the node test, which fails on it
                    body, status = json.dumps({"ok": False, "error": str(exc)}).encode(), 500
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "Controller":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
