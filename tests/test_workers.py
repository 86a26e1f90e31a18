"""Worker models: gunicorn with wsmanager's worker class serves natively from every worker, and
several processes serving one app without a backend are detected: one WARNING per process at
start-up, none with one process or with ``WSMANAGER_REDIS_URL``."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import time

import pytest
from websockets.sync.client import connect

from tests.conftest import unless_installed
from tests.redis_helpers import REDIS_SERVER, RedisServer
from tests.servers import AppServer, native_available

APP = "tests.workers_app:app"
WARNING = "processes serve this app"
FAST_RECHECK = {"WSM_TEST_RECHECK_AFTER": "0.3"}
pytestmark = pytest.mark.timeout(90)


def _pids(log: str, text: str) -> list[int]:
    """The pid of every line of ``log`` that contains ``text`` (our handler prints ``pid=N``)."""
    return [int(m.group(1)) for line in log.splitlines() if text in line
            for m in [re.search(r"pid=(\d+)", line)] if m]


def _wait_log(server: AppServer, text: str, processes: int, timeout: float = 30,
              lines: int = 0) -> list[int]:
    """Waits until ``text`` was logged by ``processes`` distinct processes (and on ``lines``
    lines); returns the pid of every such line."""
    deadline = time.monotonic() + timeout
    while True:
        pids = _pids(server.log(), text)
        if (len(set(pids)) >= processes and len(pids) >= lines) or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def _serving_pids(server: AppServer, want: int, attempts: int = 200) -> dict[int, bool]:
    """Opens connections (held open, so a busy worker does not take them all) until ``want``
    processes answered; returns pid -> native."""
    seen: dict[int, bool] = {}
    with contextlib.ExitStack() as held:
        for i in range(attempts):
            ws = held.enter_context(connect(server.ws_url(f"/ws?cid=c{i}"), open_timeout=10))
            hello = json.loads(ws.recv(timeout=10))
            seen[hello["pid"]] = hello["native"] and seen.get(hello["pid"], True)
            if len(seen) >= want:
                break
    return seen


@pytest.mark.skipif(not native_available(), reason="the native extension is not built")
@unless_installed(importlib.util.find_spec("gunicorn") is None
                  or importlib.util.find_spec("uvicorn_worker") is None, "gunicorn or uvicorn-worker")
def test_gunicorn_worker_class_serves_natively_from_every_worker(start_server):
    server = start_server(APP, "gunicorn", FAST_RECHECK, extra=["-w", "2"])
    started = _wait_log(server, "workers_app started", 2)
    assert len(set(started)) == 2, server.log()
    served = _serving_pids(server, 2)
    assert set(served) == set(started), (served, started)
    assert all(served.values()), served  # every connection on the C engine
    # gunicorn -w 2 without Redis: the warning, once in each worker
    assert sorted(_wait_log(server, WARNING, 2)) == sorted(started), server.log()


def test_uvicorn_workers_without_backend_warn_once_per_worker(start_server):
    server = start_server(APP, "uvicorn", FAST_RECHECK, extra=["--workers", "2", "--lifespan", "on"])
    started = _wait_log(server, "workers_app started", 2)
    assert len(set(started)) == 2, server.log()
    warned = _wait_log(server, WARNING, 2)
    time.sleep(0.6)  # past the second look: still one warning per worker
    warned = _pids(server.log(), WARNING)
    assert sorted(warned) == sorted(started), server.log()
    line = next(line for line in server.log().splitlines() if WARNING in line)
    assert line.startswith("WARNING wsmanager ")
    for what in ("2 processes", "broadcast()", "max_connections_per_user", "get_stats()",
                 "WSMANAGER_REDIS_URL", f"127.0.0.1:{server.port}"):
        assert what in line, (what, line)


def test_one_process_does_not_warn(start_server):
    server = start_server(APP, "uvicorn", FAST_RECHECK, extra=["--lifespan", "on"])
    assert len(_wait_log(server, "workers_app started", 1)) == 1, server.log()
    # both looks happened (debug lines) and found one process
    assert len(_wait_log(server, "1 process(es) serve", 1, timeout=10, lines=2)) == 2, server.log()
    assert WARNING not in server.log()


@unless_installed(not os.path.exists(REDIS_SERVER), "redis-server")
def test_workers_with_redis_do_not_warn(tmp_path):
    redis = RedisServer().start()
    server = None
    try:
        server = AppServer(APP, "uvicorn", env={**FAST_RECHECK, "WSMANAGER_REDIS_URL": redis.url},
                           extra=["--workers", "2"], lifespan="on", log_path=tmp_path / "server.log",
                           own_session=True)
        started = _wait_log(server, "workers_app started (backend redis)", 2)
        assert len(set(started)) == 2, server.log()
        time.sleep(0.6)
        assert WARNING not in server.log()
        assert "process(es) serve" not in server.log()  # not even looked: nothing to warn about
    finally:
        if server is not None:
            server.stop()  # before Redis goes
        redis.cleanup()
