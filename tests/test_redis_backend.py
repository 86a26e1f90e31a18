"""Redis scale-out backend against a real redis-server (started here on a free port).

Part 1 drives RedisBackend directly, several "nodes" in one event loop, each with a stub host
(the backend's whole view of a manager). Part 2 runs real uvicorn processes sharing one Redis
with real WebSocket clients.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.redis_helpers import (REDIS_SERVER, CrashableRedisBackend, Rejected, RedisServer,
                                 WsClient, start_all)

from tests.conftest import unless_installed
from tests.servers import AppServer, native_available
from wsmanager.backends.redis import decode_envelope, encode_envelope

pytestmark = unless_installed(not os.path.exists(REDIS_SERVER), "redis-server")


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def own_redis():
    """A redis-server of the test's own, for tests that kill it."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


class StubHost:
    """A BackendHost without a manager: records what is delivered, reports made-up stats."""

    def __init__(self) -> None:
        self.node_id = uuid.uuid4().hex
        self.received: list[dict] = []
        self.arrived = asyncio.Event()
        self.connections: dict[str, str | None] = {}

    async def deliver(self, envelope: dict) -> int:
        self.received.append(envelope)
        self.arrived.set()
        return 1

    def local_users(self) -> set[str]:
        return {user for user in self.connections.values() if user is not None}

    def local_channel_users(self, channel: str) -> set[str]:
        return set()

    def local_stats(self) -> dict:
        by_user: dict[str, int] = {}
        for user in self.connections.values():
            if user is not None:
                by_user[user] = by_user.get(user, 0) + 1
        return {"total_connections": len(self.connections), "total_users": len(by_user),
                "connections_by_user": by_user, "messages_sent": 7,
                "disconnects": {"normal": 1, "stale": 0}, "backend": {"ignored": True}}


class Node:
    def __init__(self, url: str, prefix: str, **options) -> None:
        self.host = StubHost()
        self.backend = CrashableRedisBackend(url, prefix=prefix, **options)

    async def connect(self, cid: str, user: str | None, limit: int = 5) -> bool:
        ok = await self.backend.reserve(cid, user, limit)
        if ok:
            self.host.connections[cid] = user
        return ok

    async def disconnect(self, cid: str) -> None:
        user = self.host.connections.pop(cid, None)
        await self.backend.release(cid, user)


FAST = {"node_ttl": 1.0, "heartbeat_interval": 0.2, "backoff_base": 0.05, "backoff_max": 0.3,
        "op_timeout": 1.0}


@pytest.fixture
async def nodes(redis_server):
    prefix = "t" + uuid.uuid4().hex[:8]
    made: list[Node] = []

    async def make(n: int = 2, url: str | None = None, **options) -> list[Node]:
        out = []
        for _ in range(n):
            node = Node(url or redis_server.url, prefix, **{**FAST, **options})
            await node.backend.start(node.host)
            made.append(node)
            out.append(node)
        return out

    yield make
    for node in made:
        await node.backend.stop()


async def eventually(predicate, timeout: float = 5.0, interval: float = 0.02):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


# --- part 1: the backend on its own -------------------------------------------------------------

def test_envelope_round_trip():
    text = {"kind": "channel", "target": "room\n1", "text": '{"a": "é\\n"}', "data": None,
            "exclude": {"c1", "c2"}}
    back = decode_envelope(encode_envelope(text, "n1"))
    assert back["node"] == "n1" and back["kind"] == "channel" and back["target"] == "room\n1"
    assert back["text"] == text["text"] and back["data"] is None
    assert sorted(back["exclude"]) == ["c1", "c2"]
    blob = bytes(range(256)) + b"\n\n"
    back = decode_envelope(encode_envelope({"kind": "all", "data": blob}, "n2"))
    assert back["data"] == blob and back["text"] is None and back["exclude"] == []
    back = decode_envelope(encode_envelope(
        {"kind": "disconnect", "target": "c9", "code": 4001, "reason": "bye"}, "n3"))
    assert (back["kind"], back["target"], back["code"], back["reason"]) == (
        "disconnect", "c9", 4001, "bye")
    # Presence events for the other nodes' hooks: the member, and a leave's disconnect reason.
    back = decode_envelope(encode_envelope(
        {"kind": "leave", "target": "room", "connection_id": "c7", "user_id": "ann",
         "reason": "abrupt"}, "n4"))
    assert (back["kind"], back["target"], back["connection_id"], back["user_id"],
            back["reason"], back["text"]) == ("leave", "room", "c7", "ann", "abrupt", None)
    back = decode_envelope(encode_envelope(
        {"kind": "join", "target": "room", "connection_id": "c8", "user_id": None}, "n4"))
    assert (back["connection_id"], back["user_id"], back["reason"]) == ("c8", None, "")
    with pytest.raises(ValueError):
        encode_envelope({"kind": "nope"}, "n")


@pytest.mark.parametrize("raw_subscriber", [True, False], ids=["hiredis-socket", "redis-py-pubsub"])
async def test_publish_reaches_every_other_node_once(nodes, raw_subscriber):
    a, b, c = await nodes(3, raw_subscriber=raw_subscriber)
    assert a.backend.raw_subscriber is raw_subscriber
    sent = [
        {"kind": "all", "target": None, "text": '{"n": 1}', "exclude": ["x1"]},
        {"kind": "user", "target": "alice", "data": b"\x00\x01"},
        {"kind": "channel", "target": "room", "text": "hi"},
        {"kind": "conn", "target": "cid-7", "text": "direct"},
        {"kind": "disconnect", "target": "cid-8", "code": 1001, "reason": "moved"},
    ]
    for env in sent:
        await a.backend.publish(env)
    for other in (b, c):
        await eventually(lambda o=other: len(o.host.received) >= len(sent))
    await asyncio.sleep(0.2)  # anything extra (a duplicate) would have arrived by now
    assert a.host.received == []
    for other in (b, c):
        got = other.host.received
        assert [e["kind"] for e in got] == [e["kind"] for e in sent]
        assert all(e["node"] == a.backend.node_id for e in got)
        assert got[0]["text"] == '{"n": 1}' and got[0]["exclude"] == ["x1"]
        assert got[1]["data"] == b"\x00\x01" and got[1]["target"] == "alice"
        assert got[4]["code"] == 1001 and got[4]["reason"] == "moved"
    assert a.backend.stats()["published"] == len(sent)
    assert b.backend.stats()["delivered"] == len(sent)


async def test_user_limit_is_atomic_across_nodes(nodes):
    a, b, c = await nodes(3)
    trio = (a, b, c)
    results = await asyncio.gather(*(trio[i % 3].connect(f"c{i}", "alice", 3) for i in range(30)))
    assert sum(results) == 3
    # Another user is independent, and a released slot can be taken from any node.
    assert await b.connect("bob-1", "bob", 3)
    holder = next(n for n in trio for cid in n.host.connections if cid.startswith("c"))
    cid = next(cid for cid in holder.host.connections if cid.startswith("c"))
    await holder.disconnect(cid)
    other = c if holder is not c else a
    assert await other.connect("late", "alice", 3)
    assert not await a.connect("later", "alice", 3)
    assert sum(n.backend.stats()["reserve_rejected"] for n in trio) >= 28
    # 0 (or None) means no limit, as in WebSocketManager(max_connections_per_user=0).
    assert all(await asyncio.gather(*(trio[i % 3].connect(f"u{i}", "unlimited", 0)
                                      for i in range(12))))
    assert await a.connect("u-none", "unlimited", None)


async def test_cancelled_admission_leaves_no_entry(nodes, redis_server):
    a, b = await nodes(2)
    cancelled = 0
    for i in range(120):  # cancel at varying points of the script's round trip
        cid = f"victim{i}"
        task = asyncio.ensure_future(a.connect(cid, "ivy", 1))
        for _ in range(i % 12):
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            cancelled += 1
        if cid in a.host.connections:
            await a.disconnect(cid)
    assert cancelled >= 3
    await asyncio.sleep(0.2)  # the compensation runs in the background
    assert redis_server.command("HLEN", f"{a.backend.prefix}:user:ivy") == b":0\r\n"
    assert await b.connect("b0", "ivy", 1)  # ivy's one slot is free


async def test_presence_and_cluster_stats_add_up(nodes):
    a, b = await nodes(2)
    for i in range(3):
        assert await a.connect(f"a{i}", f"user{i}")
    assert await b.connect("b0", "user0")
    assert await b.connect("b1", "zoe")
    assert await b.connect("anon", None)
    await a.backend.joined("a1", "user1", "room")
    await b.backend.joined("b1", "zoe", "room")
    await b.backend.joined("anon", None, "room")
    assert await a.backend.online_users() == {"user0", "user1", "user2", "zoe"}
    assert await b.backend.channel_members("room") == {"user1", "zoe"}
    await a.backend.left("a1", "user1", "room")
    assert await a.backend.channel_members("room") == {"zoe"}
    await b.disconnect("b1")  # leaving a connection leaves its channels too
    assert await a.backend.channel_members("room") == set()

    await a.backend._heartbeat()
    await b.backend._heartbeat()
    snap = await a.backend.refresh_cluster_stats()
    assert snap["nodes"] == 2 and snap["stale"] is False
    assert snap["total_connections"] == 3 + 2
    assert snap["connections_by_user"] == {"user0": 2, "user1": 1, "user2": 1}
    assert snap["total_users"] == 3
    assert snap["messages_sent"] == 14 and snap["disconnects"] == {"normal": 2, "stale": 0}
    assert set(snap["per_node"]) == {a.backend.node_id, b.backend.node_id}
    assert "backend" not in snap or snap["backend"] != {"ignored": True}
    assert a.backend.cluster_stats()["total_connections"] == 5  # the cached copy


async def test_stopped_node_leaves_at_once_crashed_node_within_ttl(nodes, redis_server):
    a, b, c = await nodes(3)
    for i in range(3):
        assert await b.connect(f"b{i}", "alice", 3)
    assert await c.connect("c0", "carol", 3)
    await b.backend.joined("b0", "alice", "room")
    assert not await a.connect("a0", "alice", 3)

    await c.backend.stop()                                      # clean stop: gone at once
    assert "carol" not in await a.backend.online_users()

    await b.backend.crash()                                     # like kill -9: nothing cleaned
    assert await a.backend.online_users() == {"alice"}
    assert not await a.connect("a0", "alice", 3)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await eventually(lambda: a.connect("a0", "alice", 3), timeout=3)
    assert loop.time() - t0 <= FAST["node_ttl"] + 0.5
    assert await a.backend.channel_members("room") == set()
    await eventually(lambda: a.backend.cluster_stats()["nodes"] == 1 and
                     a.backend.cluster_stats()["total_connections"] == 1, timeout=3)
    # The dead node's indexes are collected, not just ignored.
    assert redis_server.command("EXISTS", f"{a.backend.prefix}:conns:{b.backend.node_id}") == b":0\r\n"


@pytest.mark.parametrize("raw_subscriber", [True, False], ids=["hiredis-socket", "redis-py-pubsub"])
async def test_redis_outage_degrades_then_recovers(nodes, own_redis, caplog, raw_subscriber):
    caplog.set_level(logging.INFO, logger="wsmanager")
    a, b = await nodes(2, url=own_redis.url, raw_subscriber=raw_subscriber)
    assert await a.connect("a0", "alice", 1)
    assert await b.connect("b-x", "bob", 1)
    await b.backend.joined("b-x", "bob", "room")

    own_redis.kill()
    await a.backend.publish({"kind": "all", "text": "probe"})  # may notice the loss here
    await eventually(lambda: a.backend.stats()["state"] == "down" and
                     b.backend.stats()["state"] == "down", timeout=3)
    dropped = a.backend.stats()["publish_dropped"]
    for i in range(50):
        await a.backend.publish({"kind": "all", "text": f"lost {i}"})  # returns at once
    assert a.backend.stats()["publish_dropped"] == dropped + 50
    assert a.backend.stats()["pending"] == 0
    # Admission falls back to the local view, presence answers from the mirror.
    assert await a.connect("a1", "dave", 1)
    assert await a.backend.online_users() == {"alice", "dave"}  # local view only
    assert a.backend.cluster_stats()["stale"] is True
    await asyncio.sleep(0.5)  # several failed retries: still one warning per node

    own_redis.start()  # same port, empty
    await eventually(lambda: a.backend.stats()["state"] == "up" and
                     b.backend.stats()["state"] == "up", timeout=5)
    # This node's entries were rewritten into the empty Redis.
    assert await b.backend.online_users() == {"alice", "dave", "bob"}
    assert await b.backend.channel_members("room") == {"bob"}
    assert not await b.connect("b1", "alice", 1)  # the cluster-wide limit holds again
    await a.backend.publish({"kind": "all", "text": "after"})
    await eventually(lambda: any(e["text"] == "after" for e in b.host.received))
    assert not any((e["text"] or "").startswith("lost") for e in b.host.received)

    records = [r for r in caplog.records if r.name == "wsmanager"]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    infos = [r for r in records if r.levelno == logging.INFO and "reconnected" in r.message]
    assert len(warnings) == 2, [r.message for r in warnings]  # one per node
    assert all("lost" in r.message for r in warnings)
    assert len(infos) == 2 and "dropped" in infos[0].message
    assert a.backend.stats()["outages"] == 1 and a.backend.stats()["reconnects"] == 1


async def test_hung_redis_never_blocks_callers_for_long(nodes, own_redis):
    a, b = await nodes(2, url=own_redis.url)
    loop = asyncio.get_running_loop()
    os.kill(own_redis.proc.pid, signal.SIGSTOP)  # accepts bytes, never answers
    try:
        t0 = loop.time()
        await a.backend.publish({"kind": "all", "text": "queued"})
        assert loop.time() - t0 < 0.05  # publishing never waits on Redis
        assert await a.connect("a0", "alice", 1)  # admission waits at most op_timeout
        assert loop.time() - t0 < FAST["op_timeout"] + 0.5
        await eventually(lambda: a.backend.stats()["state"] == "down", timeout=3)
        t1 = loop.time()
        assert await a.connect("a1", "bob", 1)  # known down: no wait at all
        assert loop.time() - t1 < 0.05
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    await eventually(lambda: a.backend.stats()["state"] == "up" and
                     b.backend.stats()["state"] == "up", timeout=5)
    assert {"alice", "bob"} <= await b.backend.online_users()
    await a.backend.publish({"kind": "all", "text": "resumed"})
    await eventually(lambda: any(e["text"] == "resumed" for e in b.host.received))


async def test_publish_queue_is_bounded_while_redis_hangs(nodes, own_redis):
    (a,) = await nodes(1, url=own_redis.url, max_pending=3, op_timeout=0.5)
    loop = asyncio.get_running_loop()
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        longest, peak = 0.0, 0
        for i in range(20):
            t0 = loop.time()
            await a.backend.publish({"kind": "all", "text": f"m{i}"})
            longest = max(longest, loop.time() - t0)
            peak = max(peak, a.backend.stats()["pending"])
        assert peak <= 3 and longest < 0.5 + 0.3
        await eventually(lambda: a.backend.stats()["state"] == "down", timeout=3)
        stats = a.backend.stats()
        assert stats["pending"] == 0 and stats["published"] == 0
        assert stats["publish_dropped"] == 20
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("raw_subscriber", [True, False], ids=["hiredis-socket", "redis-py-pubsub"])
async def test_password_protected_redis(nodes, raw_subscriber, caplog):
    server = RedisServer(password="s3cret").start()
    try:
        a, b = await nodes(2, url=server.url, raw_subscriber=raw_subscriber)
        assert a.backend.stats()["state"] == "up" and "s3cret" not in a.backend.stats()["url"]
        await a.backend.publish({"kind": "all", "text": "authed"})
        await eventually(lambda: [e["text"] for e in b.host.received] == ["authed"])
        caplog.set_level(logging.INFO, logger="wsmanager")
        (bad,) = await nodes(1, url=server.url.replace("s3cret", "wrong"))
        assert bad.backend.stats()["state"] == "down"
        assert "s3cret" not in caplog.text and "wrong" not in caplog.text
    finally:
        server.cleanup()


async def test_start_without_redis_runs_local_and_connects_later(nodes, own_redis, caplog):
    caplog.set_level(logging.INFO, logger="wsmanager")
    own_redis.kill()
    (a,) = await nodes(1, url=own_redis.url)
    assert a.backend.stats()["state"] == "down"
    assert await a.connect("a0", "alice")
    own_redis.start()
    await eventually(lambda: a.backend.stats()["state"] == "up", timeout=5)
    assert await a.backend.online_users() == {"alice"}
    messages = [r.message for r in caplog.records if r.name == "wsmanager"]
    assert sum("cannot reach" in m for m in messages) == 1


async def test_expired_node_reregisters_itself(nodes, redis_server):
    a, b = await nodes(2)
    assert await a.connect("a0", "alice", 1)
    # Simulate a stall past the TTL: another node collected us.
    redis_server.command("DEL", f"{a.backend.prefix}:node:{a.backend.node_id}")
    await b.backend.refresh_cluster_stats()
    assert "alice" not in await b.backend.online_users()
    await eventually(lambda: b.backend.online_users(), timeout=3)
    assert await b.backend.online_users() == {"alice"}
    assert not await b.connect("b0", "alice", 1)


_ABANDON = """
import asyncio, sys, uuid
from wsmanager.backends.redis import RedisBackend

class Host:
    node_id = uuid.uuid4().hex
    async def deliver(self, envelope): return 0
    def local_stats(self): return {"total_connections": 1}
    def local_users(self): return {"zed"}
    def local_channel_users(self, channel): return set()

async def main():
    backend = RedisBackend(sys.argv[1], prefix=sys.argv[2])
    await backend.start(Host())
    assert await backend.reserve("c1", "zed", 5)
    print(backend.node_id, flush=True)

if sys.argv[3] == "asyncio.run":   # the loop cancels our tasks on its way out
    asyncio.run(main())
else:                              # the loop is simply abandoned: atexit does it
    asyncio.new_event_loop().run_until_complete(main())
"""


@pytest.mark.parametrize("how", ["asyncio.run", "atexit"])
def test_process_exit_without_stop_removes_its_entries(redis_server, how):
    import subprocess
    import sys
    prefix = "x" + uuid.uuid4().hex[:8]
    out = subprocess.run([sys.executable, "-c", _ABANDON, redis_server.url, prefix, how],
                         capture_output=True, text=True, timeout=30,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip()) == 32
    assert redis_server.command("KEYS", f"{prefix}:*") == b"*0\r\n"


# --- part 2: real uvicorn processes sharing one Redis -------------------------------------------

NODE_TTL = 2.0
# Another app module with the same routes may be substituted (for developing the backend alone).
TEST_APP = "tests.redis_app:app"


def _planes() -> list[str]:
    return ["stock", "native"] if native_available() else ["stock"]




@pytest.fixture
def cluster(redis_server):
    """``cluster(n, workers=1, redis=None, plane="stock", **env)`` → n uvicorn servers on
    tests/redis_app.py sharing one Redis under a fresh prefix; all killed afterwards."""
    made: list[AppServer] = []

    def make(n: int, workers: int = 1, redis=None, plane: str = "stock", **env):
        env = {"WSMANAGER_REDIS_URL": (redis or redis_server).url,
               "WSMANAGER_REDIS_PREFIX": "it" + uuid.uuid4().hex[:8],
               "WSMANAGER_REDIS_NODE_TTL": str(NODE_TTL),
               "WSMANAGER_REDIS_HEARTBEAT": "0.25",
               "WSMANAGER_REDIS_BACKOFF_BASE": "0.05",
               "WSMANAGER_REDIS_BACKOFF_MAX": "0.5",
               "WSMANAGER_MAX_CONNECTIONS_PER_USER": "3",
               "PYTHONUNBUFFERED": "1", **env}
        servers = [AppServer(TEST_APP, "native" if plane == "native" else "uvicorn", env=env,
                             lifespan="on", extra=["--workers", str(workers)] if workers > 1 else [],
                             own_session=True, start=False)
                   for _ in range(n)]
        made.extend(servers)
        return start_all(servers)

    yield make
    for server in made:
        server.kill()


async def get_json(server: AppServer, path: str) -> dict:
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(server.url(path))
        response.raise_for_status()
        return response.json()


async def settle(clients, quiet: float = 0.3) -> None:
    """Wait until no client receives anything for ``quiet`` s (a duplicate would show up)."""
    counts = None
    while True:
        now = [len(c.messages) for c in clients]
        if now == counts:
            return
        counts = now
        await asyncio.sleep(quiet)


def assert_clean_logs(*servers) -> None:
    for server in servers:
        out = server.log()
        assert "ENDPOINT-EXCEPTION" not in out and "Traceback" not in out, out[-3000:]


@pytest.mark.parametrize("plane", _planes())
async def test_four_processes_deliver_exactly_once(cluster, plane):
    servers = cluster(4, plane=plane)
    # Two clients per process; users spread so that every user spans two processes.
    clients = [await WsClient.open(s.ws_url(), user=f"u{(i + j) % 4}")
               for i, s in enumerate(servers) for j in range(2)]
    assert len({c.pid for c in clients}) == 4
    sender, rest = clients[0], clients[1:]

    for i in range(20):
        ack = await sender.command(type="broadcast", content=f"b{i}", exclude_self=True)
        assert ack["n"] == 1  # local receivers only: the other client on its process
    await asyncio.gather(*(c.wait(lambda c=c: len(c.contents("broadcast")) >= 20) for c in rest))

    # Channel membership on three processes; the sender is excluded although it is a member.
    members = [clients[0], clients[3], clients[5], clients[6]]
    for c in members:
        await c.command(type="join", channel="room")
    await sender.command(type="to_channel", channel="room", content="c0", exclude_self=True)
    await clients[4].command(type="to_user", user="u1", content="for-u1")
    target = clients[7]
    ack = await sender.command(type="to_conn", cid=target.cid, content="direct")
    assert ack["n"] in (True, 1)
    await settle(clients)

    assert sender.contents("broadcast") == []
    for c in rest:
        assert c.contents("broadcast") == [f"b{i}" for i in range(20)]  # once each, in order
    for c in clients:
        expected = ["c0"] if c in members[1:] else []
        assert c.contents("to_channel") == expected, c.hello
        expected = ["for-u1"] if c.user == "u1" else []
        assert c.contents("to_user") == expected
        assert c.contents("to_conn") == (["direct"] if c is target else [])

    # Disconnecting a connection held by another process.
    victim = clients[5]
    await sender.command(type="kick", cid=victim.cid)
    await victim.wait(lambda: victim.closed is not None)
    assert victim.closed[0] == 4000
    for c in clients:
        if c is not victim:
            await c.close()
    assert_clean_logs(*servers)




async def test_real_workers_share_one_port(cluster):
    (server,) = cluster(1, workers=2)
    # The parent binds the socket before its workers are up: wait until both answer.
    seen: set[int] = set()
    deadline = time.monotonic() + 15
    while len(seen) < 2 and time.monotonic() < deadline:
        async with httpx.AsyncClient(timeout=5) as http:
            seen.add((await http.get(server.url("/healthz"))).json()["pid"])
    clients: list[WsClient] = []
    for _ in range(15):  # the kernel picks the worker; keep going until both hold clients
        clients += await asyncio.gather(*(WsClient.open(server.ws_url(), user=f"w{len(clients) + k}")
                                          for k in range(4)))
        if len(clients) >= 8 and len({c.pid for c in clients}) == 2:
            break
    pids = {c.pid for c in clients}
    assert len(pids) == 2, "all connections landed on one worker"
    sender = clients[0]
    for i in range(10):
        await sender.command(type="broadcast", content=f"m{i}", exclude_self=True)
    await asyncio.gather(*(c.wait(lambda c=c: len(c.contents()) >= 10) for c in clients[1:]))
    await settle(clients)
    assert sender.contents() == []
    for c in clients[1:]:
        assert c.contents("broadcast") == [f"m{i}" for i in range(10)]
    cluster_stats = await get_json(server, "/cluster")
    deadline = time.monotonic() + 5
    while cluster_stats.get("total_connections") != len(clients) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        cluster_stats = await get_json(server, "/cluster")
    assert cluster_stats["total_connections"] == len(clients)
    assert cluster_stats["nodes"] == 2
    for c in clients:
        await c.close()
    assert_clean_logs(server)


async def test_user_limit_holds_across_processes_under_concurrent_connects(cluster):
    servers = cluster(4)  # WSMANAGER_MAX_CONNECTIONS_PER_USER=3

    async def attempt(i: int):
        try:
            return await WsClient.open(servers[i % 4].ws_url(), user="crowd")
        except Rejected as exc:
            return exc

    results = await asyncio.gather(*(attempt(i) for i in range(16)))
    admitted = [r for r in results if isinstance(r, WsClient)]
    rejected = [r for r in results if isinstance(r, Rejected)]
    assert len(admitted) == 3 and len(rejected) == 13
    assert all(r.code in (1008, 403) for r in rejected), [r.code for r in rejected]
    # A freed slot is usable from any process.
    await admitted[0].close()
    other = servers[3]
    deadline = time.monotonic() + 5
    while True:
        try:
            late = await WsClient.open(other.ws_url(), user="crowd")
            break
        except Rejected:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    for c in [*admitted[1:], late]:
        await c.close()
    assert_clean_logs(*servers)


async def test_cluster_stats_add_up_and_a_killed_worker_vanishes(cluster):
    a, b, c = cluster(3)
    layout = {a: ["ann", "ann", "bob"], b: ["bob", "cat"], c: ["dan", "dan", "eve", "ann"]}
    clients = {}
    for s, users in layout.items():  # not a nested comprehension: Python 3.10 refuses an await there
        clients[s] = [await WsClient.open(s.ws_url(), user=u) for u in users]
    await clients[c][2].command(type="join", channel="room")
    await clients[a][2].command(type="join", channel="room")

    async def cluster_view():
        return await get_json(a, "/cluster")

    deadline = time.monotonic() + 5
    while (stats := await cluster_view())["total_connections"] != 9:
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.1)
    assert stats["nodes"] == 3
    assert stats["total_users"] == 5
    assert stats["connections_by_user"] == {"ann": 3, "bob": 2, "cat": 1, "dan": 2, "eve": 1}
    local = [await get_json(s, "/stats") for s in (a, b, c)]
    assert sum(s["total_connections"] for s in local) == 9
    presence = await get_json(b, "/presence?channel=room")
    assert presence == {"online": ["ann", "bob", "cat", "dan", "eve"], "channel": ["bob", "eve"]}

    c.kill()
    killed_at = time.monotonic()
    while True:
        stats = await cluster_view()
        presence = await get_json(b, "/presence?channel=room")
        if stats["nodes"] == 2 and stats["total_connections"] == 5 and \
                presence["online"] == ["ann", "bob", "cat"]:
            break
        # Bound: the TTL, plus one heartbeat to notice and one to refresh the snapshot.
        assert time.monotonic() - killed_at < NODE_TTL + 1.5, (stats, presence)
        await asyncio.sleep(0.05)
    assert presence["channel"] == ["bob"]
    assert stats["connections_by_user"] == {"ann": 2, "bob": 2, "cat": 1}
    for s in (a, b):
        for cl in clients[s]:
            await cl.close()
    assert_clean_logs(a, b)


async def test_redis_killed_mid_traffic_and_restarted(cluster, own_redis):
    a, b = cluster(2, redis=own_redis)
    sender = await WsClient.open(a.ws_url(), user="s")
    local = await WsClient.open(a.ws_url(), user="l")
    remote = await WsClient.open(b.ws_url(), user="r")
    sent: list[str] = []

    async def send(tag: str) -> None:
        sent.append(tag)
        ack = await sender.command(type="broadcast", content=tag, exclude_self=True, timeout=3)
        assert ack is not None, "the endpoint stopped answering"

    for i in range(10):
        await send(f"before{i}")
    await remote.wait(lambda: len(remote.contents()) >= 10)

    own_redis.kill()
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < 1.5:  # traffic keeps flowing while Redis is gone
        await send(f"during{i}")
        i += 1
        await asyncio.sleep(0.02)
    await local.wait(lambda: local.contents()[-1:] == [sent[-1]])
    backend = (await get_json(a, "/stats"))["backend"]
    assert backend["state"] == "down" and backend["publish_dropped"] > 0

    own_redis.start()
    t1 = time.monotonic()
    j = 0
    while True:
        await send(f"after{j}")
        j += 1
        if any(x.startswith("after") for x in remote.contents()):
            break
        assert time.monotonic() - t1 < 10, "cross-process delivery did not resume"
        await asyncio.sleep(0.05)
    await send("last")
    await remote.wait(lambda: "last" in remote.contents())
    await settle([local, remote])

    assert local.contents() == sent  # every message, local delivery never stopped
    got = remote.contents()
    assert len(got) == len(set(got))  # nothing twice
    assert got[:10] == sent[:10] and got[-1] == "last"
    assert all(x.startswith(("before", "during", "after")) or x == "last" for x in got)
    assert sender.contents() == []
    for s in (a, b):
        out = s.log()
        assert out.count("connection to") == 1 and out.count(" lost (") == 1, out[-3000:]
        assert out.count("reconnected to") == 1, out[-3000:]
        assert (await get_json(s, "/stats"))["backend"]["state"] == "up"
    for cl in (sender, local, remote):
        await cl.close()
    assert_clean_logs(a, b)


async def test_a_stopped_worker_leaves_at_once(cluster):
    a, b = cluster(2, WSMANAGER_REDIS_NODE_TTL="30", WSMANAGER_REDIS_HEARTBEAT="0.25")
    stay = await WsClient.open(a.ws_url(), user="amy")
    going = [await WsClient.open(b.ws_url(), user="zed") for _ in range(2)]
    deadline = time.monotonic() + 5
    while (await get_json(a, "/cluster"))["total_connections"] != 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    b.stop(signal.SIGTERM)  # uvicorn shuts down, the app's lifespan calls ws_manager.stop()
    t0 = time.monotonic()
    while True:
        stats = await get_json(a, "/cluster")
        presence = await get_json(a, "/presence")
        if stats["nodes"] == 1 and presence["online"] == ["amy"]:
            break
        assert time.monotonic() - t0 < 5, (stats, presence)  # far below the 30 s TTL
        await asyncio.sleep(0.05)
    assert stats["total_connections"] == 1
    for c in [stay, *going]:
        await c.close()
    assert_clean_logs(a)
