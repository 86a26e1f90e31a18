"""Helpers for the Redis scale-out tests: a throwaway redis-server, a start for several app
servers at once (tests/servers.py's AppServer), and a RedisBackend that can crash.

Everything binds 127.0.0.1 on a free port chosen at run time; processes are killed by pid.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

from tests.ports import free_port
from tests.servers import AppServer

try:
    from wsmanager.backends.redis import RedisBackend
except ImportError:  # redis-py missing: the servers below still serve tests/test_workers.py
    RedisBackend = object  # type: ignore[assignment,misc]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None,
               probe: bytes | None = None, expect: bytes | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                if probe is None:
                    return
                s.sendall(probe)
                if s.recv(64).startswith(expect or b""):
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.02)
    raise TimeoutError(f"nothing answered on port {port} within {timeout} s ({last})")


class CrashableRedisBackend(RedisBackend):
    """A RedisBackend whose node can vanish like a killed process (``kill -9``).

    :meth:`crash` is ``stop()`` without its ``_leave()`` step: the tasks end and the
    connections close, but nothing is removed from Redis (no atexit hook either), so this
    node's entries stay until ``node_ttl`` ends them and a live node collects them."""

    _crashing = False

    async def crash(self) -> None:
        self._crashing = True
        try:
            await self.stop()
        finally:
            self._crashing = False

    async def _leave(self) -> None:
        if not self._crashing:
            await super()._leave()


class RedisServer:
    """``redis-server --port N --save "" --appendonly no`` on 127.0.0.1; restartable on N."""

    def __init__(self, *args: str, password: str | None = None) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix="wsm-redis-")
        self.password = password
        self.args = [*args, *(["--requirepass", password] if password else [])]

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--loglevel", "warning", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, 10, self.proc, b"PING\r\n", b"-NOAUTH" if self.password else b"+PONG")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def command(self, *args: str) -> bytes:
        """One raw RESP command, for assertions that must not depend on the code under test."""
        payload = b"*%d\r\n" % len(args) + b"".join(
            b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(payload)
            return s.recv(65536)


def start_all(servers: list[AppServer], timeout: float = 30) -> list[AppServer]:
    """Launch every server (tests/servers.py's, ``start=False``), then wait for each: they start
    in parallel. A server of one process must answer /healthz with its own pid."""
    for server in servers:
        server.start(wait=False)
    for server in servers:
        server.wait_ready(timeout)
        if "--workers" not in server.extra and server.get("/healthz")["pid"] != server.pid:
            raise RuntimeError(f"port {server.port} is not served by pid {server.pid}"
                               f"\n{server.log_tail(3000)}")
    return servers


class WsClient:
    """A websockets client of tests/redis_app.py: collects messages, awaits acks."""

    def __init__(self, ws, hello: dict) -> None:
        import asyncio
        self.ws = ws
        self.hello = hello
        self.cid: str = hello["cid"]
        self.user: str | None = None
        self.pid: int = hello["pid"]
        self.messages: list[dict] = []
        self.acks: dict[int, dict] = {}
        self.closed: tuple[int | None, str] | None = None
        self._seq = 0
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, base_url: str, user: str | None = None, cid: str | None = None,
                   timeout: float = 10) -> "WsClient":
        """Connect and read the hello; raises ``Rejected`` when the server refuses."""
        import asyncio
        import json
        from urllib.parse import urlencode

        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        query = urlencode({k: v for k, v in (("user", user), ("cid", cid)) if v})
        try:
            ws = await connect(f"{base_url}/ws?{query}", open_timeout=timeout,
                               ping_interval=None, max_queue=None)
        except InvalidStatus as exc:
            raise Rejected(exc.response.status_code) from None
        try:
            hello = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        except ConnectionClosed as exc:
            raise Rejected(exc.rcvd.code if exc.rcvd else None) from None
        assert hello["type"] == "hello", hello
        client = cls(ws, hello)
        client.user = user
        return client

    async def _read(self) -> None:
        import json

        from websockets.exceptions import ConnectionClosed
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                if msg.get("type") == "ack":
                    self.acks[msg["seq"]] = msg
                else:
                    self.messages.append(msg)
                self._changed.set()
        except ConnectionClosed:
            pass
        finally:
            self.closed = (self.ws.close_code, self.ws.close_reason)
            self._changed.set()

    async def wait(self, predicate, timeout: float = 10) -> None:
        import asyncio
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"client {self.cid}: condition not met; "
                                   f"{len(self.messages)} messages, closed={self.closed}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.2))
            except asyncio.TimeoutError:
                pass

    async def send(self, **msg) -> int:
        import json
        self._seq += 1
        await self.ws.send(json.dumps({**msg, "seq": self._seq}))
        return self._seq

    async def command(self, timeout: float = 10, **msg) -> dict | None:
        seq = await self.send(**msg)
        await self.wait(lambda: seq in self.acks or self.closed is not None, timeout)
        return self.acks.get(seq)

    def contents(self, kind: str | None = None) -> list:
        return [m.get("content") for m in self.messages if kind is None or m["type"] == kind]

    async def close(self) -> None:
        try:
            await self.ws.close()
        except Exception:  # noqa: BLE001
            pass
        self._task.cancel()


class Rejected(Exception):
    """The server refused the connection: HTTP status of the handshake, or the close code."""

    def __init__(self, code: int | None) -> None:
        super().__init__(code)
        self.code = code
