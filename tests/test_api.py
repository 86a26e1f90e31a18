"""The manager's Python API: argument checking, configuration, views, error classification."""
from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from datetime import datetime, timedelta

import pytest
from fastapi import FastAPI, WebSocket
from fastapi.testclient import TestClient

from wsmanager import ConfigError, WebSocketManager
from wsmanager.errors import close_code_reason, is_disconnect_error


# ---- configuration -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc", [
    ({"ping_interval": -1}, ValueError),
    ({"stale_timeout": 0}, ValueError),
    ({"ping_timeout": -0.5}, ValueError),
    ({"ping_interval": "30"}, TypeError),
    ({"max_connections_per_user": -1}, ValueError),
    ({"max_connections_per_user": 2.5}, TypeError),
    ({"send_timeout": float("nan")}, ValueError),
    ({"json_dumps": 42}, TypeError),
    ({"redis_url": 6379}, TypeError),
])
def test_bad_options_raise(kwargs, exc):
    with pytest.raises(exc):
        WebSocketManager(**kwargs)


@pytest.mark.filterwarnings("ignore::wsmanager.config.ConfigWarning")  # WSMANAGER_UNRELATED
def test_env_configuration():
    m = WebSocketManager.from_env({"WSMANAGER_PING_INTERVAL": "2.5", "WSMANAGER_MAX_CONNECTIONS_PER_USER": "0",
                                   "WSMANAGER_GREETING": "yes", "WSMANAGER_UNRELATED": "x"})
    assert (m.ping_interval, m.max_connections_per_user, m.greeting) == (2.5, 0, True)
    assert m.stale_timeout == 12.5
    with pytest.raises(ConfigError, match="WSMANAGER_MAX_CONNECTIONS_PER_USER"):
        WebSocketManager.from_env({"WSMANAGER_MAX_CONNECTIONS_PER_USER": "five"})
    with pytest.raises(ConfigError, match=r"WSMANAGER_PING_INTERVAL='-3': must be >= 0; accepted: "):
        WebSocketManager.from_env({"WSMANAGER_PING_INTERVAL": "-3"})
    off = WebSocketManager.from_env({"WSMANAGER_PING_INTERVAL": "0"})  # heartbeat off
    assert (off.ping_interval, off.stale_timeout) == (0.0, 0.0)
    with pytest.raises(ConfigError, match="not a Redis URL"):
        WebSocketManager.from_env({"WSMANAGER_REDIS_URL": "http://127.0.0.1:6379"})


def test_lifespan_starts_and_stops_the_manager():
    manager = WebSocketManager(ping_interval=60)
    app = FastAPI(lifespan=manager.lifespan)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        await manager.connect(websocket, "only")
        await websocket.receive_text()

    with TestClient(app) as client:
        assert manager._heartbeat_task is not None and not manager._heartbeat_task.done()
        with client.websocket_connect("/ws") as ws:
            ws.send_text("x")
    assert manager._heartbeat_task is None
    assert manager.get_stats()["total_connections"] == 0


def test_bad_environment_fails_at_import_naming_the_variable():
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSMANAGER_")}
    proc = subprocess.run([sys.executable, "-c", "import wsmanager"], capture_output=True, text=True,
                          env={**env, "WSMANAGER_PING_TIMEOUT": "soon"}, timeout=60,
                          cwd=str(__import__("pathlib").Path(__file__).parent.parent))
    assert proc.returncode != 0
    assert "WSMANAGER_PING_TIMEOUT" in proc.stderr and "ConfigError" in proc.stderr


# ---- API on a live connection (TestClient) --------------------------------------------------

def make_app(manager: WebSocketManager, results: dict) -> FastAPI:
    app = FastAPI()

    @app.websocket("/ws/{cid}")
    async def ws(websocket: WebSocket, cid: str):
        if not await manager.connect(websocket, cid, "user-" + cid[0]):
            return
        try:
            while True:
                msg = await websocket.receive_text()
                if msg == "dup":
                    try:
                        await manager.connect(websocket, cid)
                    except ValueError as exc:
                        results["dup"] = str(exc)
                elif msg == "checks":
                    results["checks"] = await run_checks(manager, cid)
                await websocket.send_text("done")
        except Exception:  # noqa: BLE001
            pass
        finally:
            await manager.disconnect(cid)

    return app


async def run_checks(m: WebSocketManager, cid: str) -> dict:
    out: dict = {}
    for name, call in {
        "send_bad_type": lambda: m.send_message(cid, object()),
        "send_int_id": lambda: m.send_message(5, "x"),
        "broadcast_str_exclude": lambda: m.broadcast("x", exclude=cid),
        "send_to_user_int": lambda: m.send_to_user(5, "x"),
        "disconnect_bad_code": lambda: m.disconnect(cid, code="1000"),
    }.items():
        try:
            await call()
            out[name] = "no error"
        except (TypeError, ValueError) as exc:
            out[name] = type(exc).__name__
    for name, call in {
        "join_unknown": lambda: m.join("nope", "room"),
        "join_empty_channel": lambda: m.join(cid, ""),
        "mark_unknown": lambda: m.mark_disconnecting("nope"),
    }.items():
        try:
            call()
            out[name] = "no error"
        except (TypeError, ValueError) as exc:
            out[name] = type(exc).__name__
    out["send_unknown"] = await m.send_message("nope", {"a": 1})
    out["is_connected"] = m.is_connected(cid)
    out["is_connected_unknown"] = m.is_connected("nope")
    info = m.connection_info.get(cid)
    out["info_type"] = type(info).__name__
    before = info.last_ping
    info.last_ping = datetime.now() + timedelta(seconds=60)
    out["last_ping_moved"] = (info.last_ping - before).total_seconds()
    out["info_dump_keys"] = sorted(info.model_dump())
    out["active"] = (cid in m.active_connections, len(m.active_connections),
                     m.active_connections.get("nope"))
    out["users"] = dict(m.user_connections)
    m.mark_disconnecting(cid)
    out["disconnecting"] = m.is_disconnecting(cid)
    out["send_while_disconnecting"] = await m.send_message(cid, "x")
    out["broadcast_while_disconnecting"] = await m.broadcast("x")
    return out


def test_argument_errors_and_views():
    manager = WebSocketManager()
    results: dict = {}
    client = TestClient(make_app(manager, results))
    with client.websocket_connect("/ws/a1") as ws:
        ws.send_text("dup")
        assert ws.receive_text() == "done"
        ws.send_text("checks")
        assert ws.receive_text() == "done"
    assert "already registered" in results["dup"]
    c = results["checks"]
    assert c["send_bad_type"] == "TypeError"
    assert c["send_int_id"] == "TypeError"
    assert c["broadcast_str_exclude"] == "TypeError"
    assert c["send_to_user_int"] == "TypeError"
    assert c["disconnect_bad_code"] == "TypeError"
    assert c["join_unknown"] == "ValueError"
    assert c["join_empty_channel"] == "ValueError"
    assert c["mark_unknown"] == "ValueError"
    assert c["send_unknown"] is False
    assert c["is_connected"] is True and c["is_connected_unknown"] is False
    assert c["info_type"] == "ConnectionInfo"
    assert 59 < c["last_ping_moved"] < 61
    assert c["info_dump_keys"] == sorted(["connection_id", "user_id", "connected_at", "last_ping", "last_seen",
                                          "is_alive", "messages_in", "messages_out", "bytes_in", "bytes_out"])
    assert c["active"] == (True, 1, None)
    assert c["users"] == {"user-a": {"a1"}}
    assert c["disconnecting"] is True
    assert c["send_while_disconnecting"] is False and c["broadcast_while_disconnecting"] == 0
    assert manager.get_stats()["total_connections"] == 0


def test_connect_rejects_bad_arguments():
    m = WebSocketManager()

    async def run():
        with pytest.raises(TypeError):
            await m.connect(object(), "x")
        with pytest.raises(TypeError):
            await m.connect(None, 123)
        with pytest.raises(ValueError):
            await m.connect(None, "")

    asyncio.run(run())


def test_greeting_is_sent_when_configured():
    manager = WebSocketManager(greeting=True)
    client = TestClient(make_app(manager, {}))
    with client.websocket_connect("/ws/g1") as ws:
        hello = ws.receive_json()
        assert hello["type"] == "connection_established"
        assert hello["connection_id"] == "g1" and hello["user_id"] == "user-g"


# ---- error classification ------------------------------------------------------------------

class ConnectionClosedError(Exception):
    """Same name as websockets' exception: classification goes by name, not by import."""


class FailingSocket:
    """A WebSocket whose sends fail the way real servers fail. Real servers produce these only
    on racy timing, so this one stand-in raises them on demand."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.scope = {"type": "websocket", "extensions": {}}

    async def accept(self, subprotocol=None, headers=None) -> None:
        pass

    async def send(self, message) -> None:
        raise self.exc

    async def close(self, code=1000, reason=None) -> None:
        raise self.exc


@pytest.mark.parametrize("exc, level", [
    (ConnectionClosedError("no close frame received or sent"), logging.DEBUG),
    (BrokenPipeError(32, "Broken pipe"), logging.DEBUG),
    (ConnectionResetError(104, "Connection reset by peer"), logging.DEBUG),
    (OSError(121, "The semaphore timeout period has expired"), logging.DEBUG),
    (RuntimeError('Cannot call "send" once a close message has been sent.'), logging.DEBUG),
    (RuntimeError("Unexpected ASGI message 'websocket.send', after sending 'websocket.close'."), logging.DEBUG),
    (ValueError("something genuinely wrong"), logging.WARNING),
])
def test_send_errors_are_classified_and_never_raise(exc, level, caplog):
    m = WebSocketManager()

    async def run():
        await m.connect(FailingSocket(exc), "c1", "u")
        await m.connect(FailingSocket(exc), "c2", "u")
        with caplog.at_level(logging.DEBUG, logger="wsmanager"):
            assert await m.send_message("c1", {"x": 1}) is False
            assert await m.broadcast("hello") == 0
        await m.stop()

    asyncio.run(run())
    send_logs = [r for r in caplog.records if r.name == "wsmanager" and
                 ("send error" in r.getMessage() or "already closed" in r.getMessage())]
    assert send_logs and {r.levelno for r in send_logs} == {level}
    if level == logging.WARNING:
        assert type(exc).__name__ in send_logs[0].getMessage()
    stats = m.get_stats()
    assert stats["total_connections"] == 0 and stats["send_failures"] == 2
    assert stats["disconnects"]["abrupt"] == 2


def test_classification_helpers():
    assert is_disconnect_error(ConnectionClosedError("x"))
    assert not is_disconnect_error(KeyError("x"))
    assert close_code_reason(1000) == "normal" and close_code_reason(1006) == "abrupt"
    assert close_code_reason(1007) == "protocol_error" and close_code_reason(1012) == "shutdown"



def test_default_json_matches_starlette_send_json_bytes():
    """The manager's own encoder (one C encoder made once) must write what Starlette's
    websocket.send_json writes, so an endpoint mixing both sends the same bytes."""
    import json

    from wsmanager.manager import _default_dumps

    for obj in ({"type": "message", "content": "héllo \"ü\" \u2028", "n": [1, 2.5, None, True]},
                [], {}, [{"nested": {"k": float("inf")}}], {"emoji": "\U0001f600"}):
        assert _default_dumps(obj) == json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    with pytest.raises(TypeError, match="not JSON serializable"):
        _default_dumps({"x": object()})
