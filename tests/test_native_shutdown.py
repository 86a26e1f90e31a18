"""Server shutdown on the native plane: every connection gets 1012, the process exits cleanly."""
from __future__ import annotations

import os
import resource
import selectors
import signal
import struct
import time
from pathlib import Path

import pytest

pytest.importorskip("wsmanager.uvicorn")

from tests.native_support import RawClient, close_frame, frame, serving  # noqa: E402
from tests.servers import AppServer  # noqa: E402

N = 1000


def _raise_fd_limit(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def _read_closes(clients: list[RawClient], timeout: float) -> dict[int, int | None]:
    """Reads every client until its Close frame (answering it); returns index -> code."""
    sel = selectors.DefaultSelector()
    for i, c in enumerate(clients):
        c.sock.setblocking(False)
        sel.register(c.sock, selectors.EVENT_READ, i)
    codes: dict[int, int | None] = {}
    deadline = time.monotonic() + timeout
    while len(codes) < len(clients) and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            c = clients[key.data]
            try:
                chunk = c.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            c.buf += chunk
            if len(c.buf) >= 4 and c.buf[0] == 0x88:
                codes[key.data] = struct.unpack("!H", c.buf[2:4])[0]
            elif not chunk:
                codes[key.data] = None
            else:
                continue
            sel.unregister(c.sock)
            try:
                c.sock.setblocking(True)
                c.sock.sendall(close_frame(codes[key.data] or 1000))
            except OSError:
                pass
    sel.close()
    return codes


def test_shutdown_with_1000_connections(tmp_path: Path) -> None:
    _raise_fd_limit(4 * N + 256)
    env = {"WSMANAGER_PING_INTERVAL": "3600", "WSMANAGER_CLOSE_TIMEOUT": "3"}
    s = AppServer("tests.native_support:echo_app", "native", env=env, log_path=tmp_path / "server.log")
    clients: list[RawClient] = []
    try:
        for _ in range(N):
            c = RawClient(s.port, timeout=10)
            assert c.status == 101
            clients.append(c)
        assert s.get("/stats")["connections"] == N
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGINT)
        codes = _read_closes(clients, timeout=20)
        assert len(codes) == N
        assert set(codes.values()) == {1012}, {v for v in codes.values()}
        rc = s.proc.wait(timeout=20)
        assert rc == 0, s.log()
        assert time.monotonic() - t0 < 15
        log = s.log()
        assert "Traceback" not in log and "ERROR" not in log, log
    finally:
        for c in clients:
            c.close()
        s.stop()


def test_shutdown_does_not_wait_for_silent_peers_forever(tmp_path: Path) -> None:
    env = {"WSMANAGER_PING_INTERVAL": "3600", "WSMANAGER_CLOSE_TIMEOUT": "1"}
    s = AppServer("tests.native_support:echo_app", "native", env=env, log_path=tmp_path / "server.log")
    try:
        silent = [RawClient(s.port) for _ in range(5)]
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(timeout=15) == 0, s.log()
        assert time.monotonic() - t0 < 5  # one close timeout, not one per connection
        for c in silent:
            assert c.expect_close()[0] == 1012
            c.close()
    finally:
        s.stop()


def _proc_counts(pid: int) -> tuple[int, int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return fds, threads, rss


def test_connect_disconnect_cycles_leave_no_growth(tmp_path: Path) -> None:
    """`python -m wsmanager` (the native plane by default) through many connection cycles."""
    env = {"WSMANAGER_PING_INTERVAL": "3600", "WSMANAGER_CLOSE_TIMEOUT": "1"}
    with serving("echo_app", tmp_path / "server.log", env=env, via_main=True) as s:
        def cycles(n: int) -> None:
            for i in range(n):
                c = RawClient(s.port)
                assert c.status == 101
                if i % 2:
                    c.send(frame(1, b"x"))
                    assert c.recv_data() == (1, b"x")
                    c.send(close_frame(1000))
                    c.expect_close()
                c.close()

        cycles(300)  # warm-up
        time.sleep(1.5)  # lingering sockets of the warm-up are released
        before = _proc_counts(s.proc.pid)
        cycles(10000)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            after = _proc_counts(s.proc.pid)
            if after[0] <= before[0]:
                break
            time.sleep(0.2)
        assert after[0] <= before[0], (before, after)  # fds
        assert after[1] == before[1], (before, after)  # threads
        if "asan" not in os.environ.get("LD_PRELOAD", ""):
            assert after[2] - before[2] < 16 * 1024, (before, after)  # RSS KiB
        assert s.get("/stats")["connections"] == 0
