"""The test suite's one server launcher: :class:`AppServer` runs an ASGI app in a subprocess on
127.0.0.1, on any plane the suite uses, and :class:`Controller` lets a node test stop, start or
kill one. Not a test module (no ``test_`` prefix).

Planes (``PLANES``): "uvicorn" (stock uvicorn, its default WebSocket implementation), "native"
(uvicorn with wsmanager's protocol class, ``NATIVE_WS``; ``via_main=True`` runs
``python -m wsmanager`` instead, which adds wsmanager's HTTP protocol), "hypercorn", "granian",
"daphne", and "gunicorn" (wsmanager's worker class: the native plane in gunicorn's process model).

The listening socket is bound here and handed to the server (``--fd``, ``fd://``): the port is
the server's from the start, nothing can take it between a free-port probe and the server's own
bind (tests/ports.py tells the race this ends). Granian cannot take a socket; it gets a port from
tests/ports.py. A restarted server gets the same port again. The listener is set up as the server
would set up its own: TCP_NODELAY is set on it (accepted connections inherit it) for the servers
that set it on every connection, which a socket passed to uvicorn with ``--fd`` would lose.

The server is ready when it gives an HTTP answer (any status; over TLS when it was given
``--ssl-certfile``): a bound socket alone says nothing, a server with worker processes binds
before a worker serves. It runs in a process group of its own (``own_session``: in a session of
its own), so it is stopped as a group: ``stop()`` signals it, waits a bounded time, then kills
whatever is left of the group.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Mapping, Sequence

from tests.ports import free_port
from wsmanager.__main__ import NATIVE_WS  # noqa: F401 - the protocol class path, owned by the library

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PLANES = ("uvicorn", "native", "hypercorn", "granian", "daphne", "gunicorn")

#: The suite's graceful-shutdown bound per plane (seconds), passed with the server's own option:
#: a hung connection cannot hold a stop past it.
GRACEFUL = {"uvicorn": 10.0, "native": 10.0, "hypercorn": 2.0, "gunicorn": 5.0}
#: Servers that cannot take a listening socket: they bind a port of tests/ports.py themselves.
OWN_BIND = {"granian"}
#: Servers that leave Nagle's algorithm on (Twisted): their listener gets no TCP_NODELAY.
NAGLE = {"daphne"}
_OWN_GROUP: dict[str, Any] = ({"process_group": 0} if sys.version_info >= (3, 11)
                              else {"preexec_fn": os.setpgrp})


@functools.cache
def native_available() -> bool:
    """The native plane is built: wsmanager.uvicorn (and the C engine under it) imports."""
    try:
        import wsmanager.uvicorn  # noqa: F401
    except ImportError:
        return False
    return True


_log_dir: str | None = None


def _default_log(plane: str) -> Path:
    """A log file of this run for a server given none (removed when the run ends)."""
    global _log_dir
    if _log_dir is None:
        _log_dir = tempfile.mkdtemp(prefix="wsm-servers-")
        atexit.register(shutil.rmtree, _log_dir, True)
    return Path(tempfile.mkstemp(prefix=f"{plane}-", suffix=".log", dir=_log_dir)[1])


class ServerFailed(RuntimeError):
    """The server exited, or gave no HTTP answer in time, before it was ready. ``returncode``
    is None when it was still running (it is killed then); ``output`` is its whole log."""

    def __init__(self, message: str, returncode: int | None, output: str) -> None:
        super().__init__(f"{message}\n--- server log (tail) ---\n{output[-4000:]}")
        self.returncode = returncode
        self.output = output


class AppServer:
    """``app`` ("module:attribute") served on 127.0.0.1 by ``plane`` in a subprocess.

    * ``env`` is added to the environment: this process's, with the repository on PYTHONPATH and
      PYTHONUNBUFFERED=1, or exactly ``environ`` when given.
    * ``extra`` is appended to the command line (it wins over what comes before it).
    * ``log_path`` gets the server's stdout and stderr (appended to on a restart); default: a
      file of this run. ``log_level`` is passed in the server's own option; None: its default.
    * ``lifespan``: uvicorn's ``--lifespan`` (None: uvicorn's default). ``graceful``: the
      server's graceful-shutdown option in seconds (None: ``GRACEFUL`` for the plane).
    * ``port``: a fixed port to bind (default: one the kernel picks; kept across restarts).
    * ``python``, ``cwd``, ``prefix``: the interpreter, the working directory, and a command the
      server's command line is run under (e.g. ``unshare ... --``).
    * ``own_session``: a session of its own (as a deployed server has), not only a process group
      of its own in the tests' session. The kernel's autogroup scheduler then gives the server a
      CPU share apart from the tests': on a loaded machine it starts and runs at its own pace
      (four Redis nodes start in parallel), while in the tests' session it shares theirs (the
      native-plane tests, whose timing at a descriptor limit, test_hostile_handshake, depends
      on it). Either way a terminal's Ctrl-C goes to the tests only.
    * ``ready_path``, ``ready_timeout``: what readiness asks for, and how long it may take.
    * ``start=False``: construct only; ``start()`` launches (``wait=False``: without waiting
      for it to be ready, so that several servers start in parallel; then ``wait_ready()``).
    """

    def __init__(self, app: str, plane: str = "uvicorn", *, via_main: bool = False,
                 env: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None,
                 extra: Sequence[str] = (), log_path: Path | None = None,
                 log_level: str | None = "warning", lifespan: str | None = None,
                 graceful: float | None = None, port: int | None = None,
                 python: str | os.PathLike[str] = sys.executable, cwd: Path = ROOT,
                 prefix: Sequence[str] = (), own_session: bool = False,
                 ready_path: str = "/__ready", ready_timeout: float = 30.0,
                 start: bool = True) -> None:
        if plane not in PLANES:
            raise ValueError(f"unknown plane {plane!r}")
        if via_main and plane != "native":
            raise ValueError("python -m wsmanager serves the native plane")
        self.app, self.plane, self.via_main = app, plane, via_main
        if environ is None:
            path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
            environ = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
        self.env = {**environ, **(env or {})}
        self.extra = list(extra)
        self.log_path = log_path or _default_log(plane)
        self.log_level, self.lifespan = log_level, lifespan
        self.graceful = GRACEFUL.get(plane) if graceful is None else graceful
        self.port = port
        self.python, self.cwd, self.prefix = str(python), cwd, list(prefix)
        self.own_session = own_session
        self.ready_path, self.ready_timeout = ready_path, ready_timeout
        self.stop_signal = signal.SIGTERM if plane == "gunicorn" else signal.SIGINT
        self.proc: subprocess.Popen[bytes] | None = None
        self.command: list[str] = []
        self.stop_seconds = 0.0  # how long the last stop() took
        self._starts = 0
        if start:
            self.start()

    # ---- the command line ----------------------------------------------------------------

    def _command(self, fd: int | None) -> list[str]:
        """The server's command line, on the listening socket ``fd`` (None: on self.port)."""
        plane, level, grace = self.plane, self.log_level, self.graceful
        cmd = [self.python, "-m"]
        if plane in ("uvicorn", "native"):
            cmd += ["wsmanager"] if self.via_main else ["uvicorn"]
            cmd += [self.app, "--fd", str(fd)]
            if plane == "native" and not self.via_main:
                cmd += ["--ws", NATIVE_WS]
            cmd += ["--log-level", level] if level else []
            cmd += ["--lifespan", self.lifespan] if self.lifespan else []
            cmd += ["--timeout-graceful-shutdown", f"{grace:g}"] if grace is not None else []
        elif plane == "hypercorn":
            cmd += ["hypercorn", "--bind", f"fd://{fd}"]
            cmd += ["--log-level", level.upper()] if level else []
            cmd += ["--graceful-timeout", f"{grace:g}"] if grace is not None else []
            cmd += [self.app]
        elif plane == "granian":
            cmd += ["granian", "--interface", "asgi", "--host", HOST, "--port", str(self.port)]
            cmd += ["--log-level", level] if level else []
            cmd += ["--workers", "1", self.app]
        elif plane == "daphne":
            cmd += ["daphne", "--fd", str(fd)]
            cmd += ["-v", {"debug": "2", "info": "1"}.get(level, "0")] if level else []
            cmd += [self.app]
        else:  # gunicorn
            cmd += ["gunicorn", "-k", "wsmanager.workers.UvicornWorker", "-b", f"fd://{fd}"]
            cmd += ["--log-level", level] if level else []
            cmd += ["--graceful-timeout", f"{grace:g}"] if grace is not None else []
            cmd += [self.app]
        return self.prefix + cmd + self.extra

    def _listen(self) -> socket.socket:
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.plane not in NAGLE:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((HOST, self.port or 0))
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        return sock

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self, wait: bool = True) -> "AppServer":
        """Launches the server (a no-op while it runs) and, with ``wait``, waits until it is
        ready (:class:`ServerFailed` if it is not: it is killed then)."""
        if self.running:
            return self
        sock = None
        if self.plane in OWN_BIND:
            self.port = self.port or free_port()
        else:
            sock = self._listen()
        try:
            fd = sock.fileno() if sock else None
            self.command = self._command(fd)
            with open(self.log_path, "ab" if self._starts else "wb") as log:
                self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=log,
                                             stderr=subprocess.STDOUT, pass_fds=(fd,) if sock else (),
                                             **({"start_new_session": True} if self.own_session
                                                else _OWN_GROUP))
        finally:
            if sock:
                sock.close()  # the server has it; connections queue in its backlog until it serves
        self._starts += 1
        return self.wait_ready() if wait else self

    def wait_ready(self, timeout: float | None = None) -> "AppServer":
        """Waits for an HTTP answer to GET ``ready_path``."""
        assert self.proc is not None, "not started"
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        while True:
            if self.proc.poll() is not None:
                raise ServerFailed(f"{self.plane} server exited with {self.proc.returncode}: "
                                   f"{' '.join(self.command)}", self.proc.returncode, self.log())
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise ServerFailed(f"{self.plane} server gave no HTTP answer in "
                                   f"{self.ready_timeout:g} s: {' '.join(self.command)}",
                                   None, self.log())
            with contextlib.suppress(OSError):
                if self._answers(max(left, 0.1)):
                    return self
            time.sleep(0.05)

    def _answers(self, timeout: float) -> bool:
        request = f"GET {self.ready_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        with socket.create_connection((HOST, self.port), timeout=timeout) as raw:
            sock = raw
            if "--ssl-certfile" in self.extra:
                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                sock = ctx.wrap_socket(raw, server_hostname=HOST)
            sock.sendall(request.encode())
            return sock.recv(16).startswith(b"HTTP/")

    def stop(self, sig: int | None = None, timeout: float = 15.0) -> int | None:
        """Sends ``sig`` (default: SIGINT; gunicorn's arbiter SIGTERM) to the server, waits up
        to ``timeout`` s for it to exit, then kills whatever is left of its process group.
        Returns its exit code, or None when it had to be killed (it did not stop on its own);
        ``stop_seconds`` is how long it took."""
        if self.proc is None:
            return None
        t0 = time.monotonic()
        rc = self.proc.poll()
        if rc is None:
            self.proc.send_signal(self.stop_signal if sig is None else sig)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                rc = None
        self.stop_seconds = time.monotonic() - t0
        self._kill_group()
        return rc

    def kill(self) -> int | None:
        """A crash: SIGKILL to the whole group (clients see their connections reset)."""
        if self.proc is None:
            return None
        self._kill_group()
        return self.proc.returncode

    def _kill_group(self) -> None:
        assert self.proc is not None
        # A worker may outlive its supervisor: the group, not only the process.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> "AppServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what it says, where it is ---------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 4000) -> str:
        return self.log()[-n:]

    @property
    def base(self) -> str:
        return f"{HOST}:{self.port}"

    def url(self, path: str = "") -> str:
        return f"http://{self.base}{path}"

    def ws_url(self, path: str = "") -> str:
        return f"ws://{self.base}{path}"

    def get(self, path: str, timeout: float = 10.0) -> Any:
        """The JSON body of a 200 answer to GET ``path``; OSError for anything else."""
        return self._request("GET", path, None, timeout)

    def post(self, path: str, params: Mapping[str, Any] | None = None,
             timeout: float = 30.0) -> Any:
        """The JSON body of a 200 answer to POST ``path?params``; OSError for anything else."""
        return self._request("POST", path, params, timeout)

    def _request(self, method: str, path: str, params: Mapping[str, Any] | None,
                 timeout: float) -> Any:
        # Read to EOF, not to the end of the body: the server has closed its end, and so let its
        # descriptor go, when this returns (at a descriptor limit the next request needs it).
        target = f"{path}?{urllib.parse.urlencode(params)}" if params else path
        request = f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n" \
                  "Connection: close\r\n\r\n"
        data = b""
        with socket.create_connection((HOST, self.port), timeout=timeout) as sock:
            sock.sendall(request.encode())
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1] if head.startswith(b"HTTP/") else b""
        if status != b"200":
            raise OSError(f"{method} {target}: {head[:60]!r}")
        if b"transfer-encoding: chunked" in head.lower():
            body = _unchunk(body)
        return json.loads(body)


def _unchunk(body: bytes) -> bytes:
    out = b""
    while True:
        size, _, rest = body.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            return out
        out, body = out + rest[:n], rest[n + 2:]


class Controller:
    """POST /stop, /start, /kill, /restart (SIGKILL + start on the same port) and
    /restart-graceful (SIGTERM: the server closes the sockets itself) for a node test, on
    127.0.0.1 (``url``)."""

    def __init__(self, server: AppServer) -> None:
        lock = threading.Lock()

        def stop() -> None:
            server.stop(signal.SIGTERM, 5)

        actions = {"/stop": stop, "/start": server.start, "/kill": server.kill,
                   "/restart": lambda: (server.kill(), server.start()),
                   "/restart-graceful": lambda: (stop(), server.start())}

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
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

        self.httpd = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "Controller":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
