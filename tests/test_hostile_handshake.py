"""Before the 101: hostile clients against real native servers (``python -m wsmanager``, which
passes ``--http wsmanager.uvicorn:HTTPProtocol``, on a pre-bound 127.0.0.1 socket), and the
privacy of ``/ws/stats``.

Half-open upgrade requests, a head trickled a byte at a time, silent connections and a half
second request on a keep-alive connection are closed at ``WSMANAGER_HANDSHAKE_TIMEOUT``; above
``WSMANAGER_MAX_HANDSHAKES`` the oldest waiting connection goes and a legitimate client gets in
at once (one WARNING per burst); HTTP/1.0 upgrades get 400; descriptor exhaustion at the
hand-off answers 503 with no traceback. The HTTP-protocol tests run against both of uvicorn's
HTTP implementations (``HTTPProtocol`` = httptools when installed, and ``H11HTTPProtocol``).
Each test prints its figures (``FIGURES ...``, shown with ``-s``).
"""
from __future__ import annotations

import logging
import re
import resource
import select
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from fastapi import Depends, FastAPI, Header, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.testclient import TestClient

pytest.importorskip("wsmanager.uvicorn")

from tests.handshake_support import (  # noqa: E402
    UPGRADE_HEAD, close_all, closed_times, http_exchange, open_half, time_to_eof,
)
from tests.native_support import RawClient, frame  # noqa: E402
from tests.servers import AppServer  # noqa: E402

from wsmanager import WebSocketManager  # noqa: E402
from wsmanager.fastapi import PRIVATE_STATS_KEYS, router  # noqa: E402

APP = "tests.handshake_support:manager_app"
TIMEOUT = 1.0  # WSMANAGER_HANDSHAKE_TIMEOUT of these servers
SLACK = 1.0    # closed within TIMEOUT + SLACK of connecting
HTTP_IMPLS = {"auto": [], "h11": ["--http", "wsmanager.uvicorn:H11HTTPProtocol"]}
BURST_WINDOW = 1.0  # a burst's one log line is written this long after its first event


def figures(**values: Any) -> None:
    print("FIGURES", values)


@pytest.fixture(scope="module", params=sorted(HTTP_IMPLS))
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    log = tmp_path_factory.mktemp("handshake") / "server.log"
    env = {"WSMANAGER_HANDSHAKE_TIMEOUT": str(TIMEOUT), "WSMANAGER_MAX_HANDSHAKES": "4096",
           "WSMANAGER_PING_INTERVAL": "3600"}
    s = AppServer(APP, "native", via_main=True, env=env, log_path=log, extra=HTTP_IMPLS[request.param])
    yield s
    assert s.stop() == 0, s.log()


def counters(server: AppServer) -> dict[str, int]:
    return server.get("/handshake")


def wait_counter(server: AppServer, key: str, value: int, timeout: float = 5) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        got = counters(server)
        if got[key] >= value or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def assert_echoes(c: RawClient, payload: bytes) -> None:
    """``c`` got its 101 and a text frame it sends comes back; ``c`` is closed in any case."""
    try:
        assert c.status == 101
        c.send(frame(1, payload))
        assert c.recv_data() == (1, payload)
    finally:
        c.close()


def test_two_thousand_half_open_upgrades_are_closed_at_the_timeout(server: AppServer) -> None:
    before = counters(server)
    t0 = time.monotonic()
    conns = open_half(server.port, 2000)
    opened_in = time.monotonic() - t0
    try:
        times = closed_times(conns, TIMEOUT + SLACK + 3)
    finally:
        close_all(conns)
    closed = [t for t in times if t is not None]
    after = wait_counter(server, "timed_out", before["timed_out"] + 2000)
    figures(opened_in=round(opened_in, 3), closed=len(closed),
            min_s=round(min(closed), 3) if closed else None,
            max_s=round(max(closed), 3) if closed else None,
            timed_out=after["timed_out"] - before["timed_out"])
    assert len(closed) == 2000, f"{2000 - len(closed)} half-open connections still open"
    assert max(closed) <= TIMEOUT + SLACK
    assert min(closed) >= TIMEOUT - 0.1  # the timeout closed them, nothing earlier
    assert after["timed_out"] - before["timed_out"] == 2000
    assert after["evicted"] == before["evicted"]
    assert server.get("/handshake")["waiting"] == 0


def test_a_trickled_head_is_closed_at_the_timeout(server: AppServer) -> None:
    """One byte every 0.2 s: each byte would cancel uvicorn's own keep-alive timer."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    start = time.monotonic()
    sent = 0
    closed_after = None
    try:
        while time.monotonic() - start < TIMEOUT + SLACK + 2:
            try:
                s.send(UPGRADE_HEAD[sent:sent + 1])
                sent += 1
            except OSError:
                closed_after = time.monotonic() - start
                break
            readable, _, _ = select.select([s], [], [], 0.2)
            if readable:
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    closed_after = time.monotonic() - start
                    break
    finally:
        s.close()
    figures(closed_after=closed_after and round(closed_after, 3), bytes_sent=sent)
    assert closed_after is not None, "a trickling client was never closed"
    assert TIMEOUT - 0.1 <= closed_after <= TIMEOUT + SLACK
    assert sent < len(UPGRADE_HEAD)


def assert_closed_at_timeout(server: AppServer, figure: str,
                             prelude: Callable[[socket.socket], None] | None = None) -> None:
    """Opens a connection, lets ``prelude`` use it, then asserts the server closes it within
    the handshake timeout of that (the seconds reported as the figure ``figure``)."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        if prelude is not None:
            prelude(s)
        after = time_to_eof(s, TIMEOUT + SLACK + 2)
    finally:
        s.close()
    figures(**{figure: after and round(after, 3)})
    assert after is not None and TIMEOUT - 0.1 <= after <= TIMEOUT + SLACK


def test_a_silent_connection_is_closed_at_the_timeout(server: AppServer) -> None:
    assert_closed_at_timeout(server, "closed_after")


def test_keep_alive_then_half_a_request_is_closed_at_the_timeout(server: AppServer) -> None:
    def half_request_after_keep_alive(s: socket.socket) -> None:
        status, _, _ = http_exchange(s, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
        time.sleep(0.3)  # idle on a keep-alive connection: uvicorn's own timer (5 s) governs
        s.sendall(b"GET /events HTTP/1.1\r\nHo")

    assert_closed_at_timeout(server, "closed_after_half_request", half_request_after_keep_alive)


def test_a_slow_but_complete_head_is_served(server: AppServer) -> None:
    """The timeout is on the head as a whole: one that completes in time is served, and the
    keep-alive connection goes on serving."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        s.sendall(b"GET /events HTTP/1.1\r\n")
        time.sleep(TIMEOUT / 2)
        status, _, body = http_exchange(s, b"Host: x\r\n\r\n")
        assert (status, body) == (200, b"[]")
        time.sleep(TIMEOUT / 2)
        assert http_exchange(s, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
    finally:
        s.close()


def test_http10_upgrade_is_refused_with_400(server: AppServer) -> None:
    before = counters(server)
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        status, _, body = http_exchange(s, UPGRADE_HEAD.replace(b"HTTP/1.1", b"HTTP/1.0", 1))
    finally:
        s.close()
    assert status == 400 and b"HTTP/1.1" in body
    assert counters(server)["http10_refused"] == before["http10_refused"] + 1
    assert_echoes(RawClient(server.port, path="/ws?user=ok"), b"hello")  # HTTP/1.1 goes through
    # python -m wsmanager runs wsmanager's HTTP protocol: no warning about uvicorn's
    assert "does not time out connections" not in server.log(), server.log()


@pytest.mark.parametrize("impl", sorted(HTTP_IMPLS))
def test_above_the_cap_the_oldest_go_and_a_legit_client_connects_at_once(impl: str, tmp_path: Path) -> None:
    env = {"WSMANAGER_HANDSHAKE_TIMEOUT": "30", "WSMANAGER_MAX_HANDSHAKES": "50",
           "WSMANAGER_PING_INTERVAL": "3600"}
    s = AppServer(APP, "native", via_main=True, env=env, log_path=tmp_path / "server.log",
                  extra=HTTP_IMPLS[impl])
    conns: list = []
    try:
        conns = open_half(s.port, 200)
        t0 = time.monotonic()
        legit = RawClient(s.port, path="/ws?user=legit")
        connect_s = time.monotonic() - t0
        assert_echoes(legit, b"still here")
        times = closed_times(conns, 1.0)
        closed = [i for i, t in enumerate(times) if t is not None]
        stats = s.get("/handshake")
        time.sleep(BURST_WINDOW + 0.3)  # the burst's line is due a window after its start
        lines = [line for line in s.log().splitlines() if "WSMANAGER_MAX_HANDSHAKES=50" in line]
        figures(impl=impl, legit_connect_s=round(connect_s, 4), evicted=len(closed),
                stats=stats, warning_lines=len(lines))
        # 200 half-open over a cap of 50: 150 go while they arrive, one more for the legit client
        assert closed == list(range(151)), closed  # the oldest, in order
        assert stats["evicted"] == 151 and stats["waiting"] == 49
        assert connect_s < 0.5
        assert len(lines) == 1, s.log()
        assert re.search(r"closed 151 connection", lines[0]), lines[0]
    finally:
        close_all(conns)
        assert s.stop() == 0, s.log()


def test_plain_uvicorn_http_protocol_gets_one_warning(tmp_path: Path) -> None:
    """``uvicorn --ws wsmanager.uvicorn:WebSocketProtocol`` alone: uvicorn's HTTP protocol, no
    request-head timeout (nor HTTP/1.0 refusal): the native plane says so, once."""
    s = AppServer(APP, "native", env={"WSMANAGER_PING_INTERVAL": "3600"},
                  log_path=tmp_path / "server.log")
    try:
        for _ in range(3):
            c = RawClient(s.port, path="/ws?user=a")
            assert c.status == 101
            c.close()
    finally:
        assert s.stop() == 0, s.log()
    log = s.log()
    assert log.count("does not time out connections") == 1, log
    assert "--http wsmanager.uvicorn:HTTPProtocol" in log


# ---- descriptors exhausted at the hand-off ----------------------------------------------------

FD_LIMIT = 64


def _handshake(port: int, path: str) -> tuple[RawClient | None, int | None, RawClient | None]:
    """(open client, status, refused client): a 101 stays open, anything else is read to EOF."""
    try:
        c = RawClient(port, path=path, handshake=False)
        status = c.handshake(path)
    except OSError:
        return None, None, None
    if status == 101:
        return c, status, None
    c.body()
    return None, status, c


def _handshake_retrying(port: int, path: str, refusals: list[RawClient], tries: int = 5) -> int | None:
    """The status of a handshake retried (after 50 ms) while the connection is dropped before
    any answer; a refused client goes to ``refusals``."""
    status = None
    for _ in range(tries):
        c, status, refused = _handshake(port, path)
        assert c is None, "a 101 past the descriptor limit"
        if refused is not None:
            refusals.append(refused)
        if status is not None:
            return status
        time.sleep(0.05)
    return status


def test_descriptor_exhaustion_at_hand_off_answers_503(tmp_path: Path) -> None:
    s = AppServer(APP, "native", via_main=True, env={"WSMANAGER_PING_INTERVAL": "3600"},
                  log_path=tmp_path / "server.log")
    held: list[RawClient] = []
    try:
        # warm up every path first (the engine's own descriptors, lazy imports)
        for path in ("/ws?user=warm", "/raw"):
            c = RawClient(s.port, path=path)
            assert c.status == 101
            c.close()
        for path in ("/ws/stats", "/outcomes", "/handshake"):
            s.get(path)
        deadline = time.monotonic() + 5
        while s.get("/ws/stats")["total_connections"] and time.monotonic() < deadline:
            time.sleep(0.05)
        base = s.get("/fds")["open"]
        assert base < FD_LIMIT - 8, base
        resource.prlimit(s.proc.pid, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))

        statuses: list[int | None] = []
        refusals: list[RawClient] = []
        for i in range(FD_LIMIT - base + 10):
            c, status, refused = _handshake(s.port, f"/ws?user=u{i}")
            statuses.append(status)
            if c is not None:
                held.append(c)
            if refused is not None:
                refusals.append(refused)
        # Then every handshake gets a 503. A client may still find the accept queue's turn at a
        # moment when a descriptor is briefly in use (the last refusal's socket closes on the
        # loop's next turn; under ASan the runtime opens files of its own): the loop drops it
        # (a reset), and a client that retries gets its 503.
        tail = [_handshake_retrying(s.port, f"/ws?user=t{i}", refusals) for i in range(4)]
        raw_statuses = []
        for _ in range(3):  # an endpoint that calls websocket.accept() itself
            c, status, refused = _handshake(s.port, "/raw")
            raw_statuses.append(status)
            if c is not None:
                held.append(c)
        ok, refused_503 = statuses.count(101), statuses.count(503) + tail.count(503)
        stats = s.get("/ws/stats")  # a plain HTTP request still gets through
        outcomes = s.get("/outcomes")
        counts = s.get("/handshake")
        time.sleep(BURST_WINDOW + 0.3)
        log = s.log()
        warnings = [line for line in log.splitlines() if "with 503 Service Unavailable" in line]
        figures(fd_base=base, fd_limit=FD_LIMIT, accepted=ok, refused_503=refused_503,
                dropped_at=[i for i, x in enumerate(statuses) if x is None], raw=raw_statuses,
                registered=stats["total_connections"], handshake=counts, warning_lines=len(warnings))
        # 101 while descriptors last; then 503. Right at the edge the last 101's transport may
        # not have let its own descriptor go yet (it closes on the loop's next turn), so a
        # connection or two finds none at accept() and the loop drops it (None: reset or EOF).
        assert statuses[:ok] == [101] * ok, statuses
        assert set(statuses[ok:]) <= {503, None}, statuses
        assert statuses.count(503) >= 1 and tail == [503] * 4, (statuses, tail)  # later: 503
        for r in refusals:
            assert r.header("Retry-After") == "1"
        assert raw_statuses == [503] * 3
        # the manager registered only the connections that got their 101 (warm-up left)
        assert stats["total_connections"] == ok
        assert outcomes["refused"] == refused_503
        assert outcomes["raw"] == [{"accept": "ClientDisconnected", "receive": 1006}] * 3
        assert counts["unavailable"] == refused_503 + 3
        assert "Exception in ASGI application" not in log and "Traceback" not in log, log
        assert len(warnings) == 1, log
        assert f"answered {refused_503 + 3} WebSocket handshake(s)" in warnings[0], warnings[0]

        for c in held:  # the clients leave; the server serves again
            c.close()
        held.clear()
        deadline = time.monotonic() + 5
        while s.get("/ws/stats")["total_connections"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert_echoes(RawClient(s.port, path="/ws?user=after"), b"back")
    finally:
        for c in held:
            c.close()
        assert s.stop() == 0, s.log()


# ---- /ws/stats names no user to a caller the router does not admit -----------------------------

def _stats_app(manager: WebSocketManager, **options: Any) -> FastAPI:
    app = FastAPI()
    app.include_router(router(manager, **options))

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, user: str = "anon") -> None:
        if await manager.connect(websocket, f"c-{user}", user):
            manager.join(f"c-{user}", f"dm:{user}")
            try:
                await websocket.receive_text()
            except WebSocketDisconnect:
                pass
            finally:
                await manager.disconnect(f"c-{user}")

    return app


def current_user(x_user: str | None = Header(default=None)) -> str:
    if x_user is None:  # a sub-dependency that refuses anonymous callers itself
        raise HTTPException(401, "login required")
    return x_user


def require_root(user: str = Depends(current_user)) -> bool:
    return user == "root"


def _public_ok(body: dict[str, Any]) -> None:
    assert not PRIVATE_STATS_KEYS & set(body), sorted(body)
    assert "alice" not in str(body) and "dm:" not in str(body)
    assert body["total_connections"] == 1 and body["total_users"] == 1
    assert body["total_channels"] == 1


def _full_ok(body: dict[str, Any]) -> None:
    assert body["connections_by_user"] == {"alice": 1}
    assert body["channels"] == {"dm:alice": 1}


def test_public_stats_drop_user_and_channel_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSMANAGER_ADMIN_TOKEN", "s3cret")
    app = _stats_app(WebSocketManager(ping_interval=0))  # admin=None: admin_token()
    with TestClient(app) as client, client.websocket_connect("/ws?user=alice"):
        _public_ok(client.get("/ws/stats").json())
        wrong = client.get("/ws/stats", headers={"Authorization": "Bearer guess"})
        assert wrong.status_code == 200  # a refused admin check is the public view, not a 403
        _public_ok(wrong.json())
        _full_ok(client.get("/ws/stats", headers={"Authorization": "Bearer s3cret"}).json())
        _full_ok(client.get("/ws/stats", headers={"X-Admin-Token": "s3cret"}).json())
        status = client.get("/api/debug/websocket-status", headers={"X-Admin-Token": "s3cret"})
        _full_ok(status.json()["current_stats"])


def test_no_admin_token_configured_means_public_stats_for_all(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("WSMANAGER_ADMIN_TOKEN", raising=False)
    caplog.set_level(logging.INFO, logger="wsmanager.fastapi")
    app = _stats_app(WebSocketManager(ping_interval=0))
    with TestClient(app) as client, client.websocket_connect("/ws?user=alice"):
        caplog.clear()
        for _ in range(3):
            _public_ok(client.get("/ws/stats").json())
        assert client.get("/api/debug/websocket-status").status_code == 403
    # asking the admin check on every stats request is not a "debug route refused" each time
    assert sum("refused" in r.getMessage() for r in caplog.records) == 1


def test_a_custom_admin_dependency_and_its_sub_dependencies(monkeypatch: pytest.MonkeyPatch) -> None:
    app = _stats_app(WebSocketManager(ping_interval=0), admin=require_root)
    with TestClient(app) as client, client.websocket_connect("/ws?user=alice"):
        _public_ok(client.get("/ws/stats").json())  # current_user raised 401: still 200, public
        _public_ok(client.get("/ws/stats", headers={"X-User": "bob"}).json())  # admin said False
        _full_ok(client.get("/ws/stats", headers={"X-User": "root"}).json())
        app.dependency_overrides[current_user] = lambda: "root"  # overrides apply to the check
        _full_ok(client.get("/ws/stats").json())
        app.dependency_overrides.clear()
        _public_ok(client.get("/ws/stats").json())


def test_protect_stats_admits_admins_only_and_shows_them_everything() -> None:
    app = _stats_app(WebSocketManager(ping_interval=0), admin=require_root, protect_stats=True)
    with TestClient(app) as client, client.websocket_connect("/ws?user=alice"):
        assert client.get("/ws/stats").status_code == 401
        assert client.get("/ws/stats", headers={"X-User": "bob"}).status_code == 403
        _full_ok(client.get("/ws/stats", headers={"X-User": "root"}).json())
