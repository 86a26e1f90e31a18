"""Cross-process broadcast through the Redis backend: deliveries/s with 1 worker vs 2 (or N).

Starts its own redis-server and N uvicorn processes running tests/redis_app.py (the seed's
endpoint with ``from wsmanager import ws_manager``, ``WSMANAGER_REDIS_URL`` set), spreads the
receivers evenly over the processes, and has one sender on process 0 broadcast ``--messages``
messages in batches of ``--batch``: a batch is sent, then the sender waits until every receiver
has the batch's last message (closed loop, bounded in flight). Every delivery is checked: each
receiver must get each message exactly once.

    .venv/bin/python benchmarks/redis_fanout.py                      # 1 and 2 processes
    .venv/bin/python benchmarks/redis_fanout.py --procs 1 2 4 --receivers 400 --messages 2000
    .venv/bin/python benchmarks/redis_fanout.py --ws wsmanager.uvicorn:WebSocketProtocol
    .venv/bin/python benchmarks/redis_fanout.py --backend-only 20000   # the backend alone

The load client runs on the same machine and shares its CPU, so next to deliveries/s the
script reports server CPU per delivery (user+system time of the uvicorn processes and of
redis-server, from /proc), which does not depend on how fast the client is.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.redis_helpers import RedisServer, start_all  # noqa: E402
from tests.servers import AppServer  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


async def run(procs: int, args: argparse.Namespace, redis: RedisServer) -> dict:
    from websockets.asyncio.client import connect

    env = {"WSMANAGER_REDIS_URL": redis.url, "WSMANAGER_REDIS_PREFIX": f"bench{procs}",
           "WSMANAGER_MAX_CONNECTIONS_PER_USER": "1000000"}
    servers = start_all([AppServer(args.app, "uvicorn", env=env, lifespan="on", own_session=True,
                                   extra=["--ws", args.ws] if args.ws else [], start=False)
                         for _ in range(procs)])
    try:
        n = args.messages
        receivers = []
        counts: list[list[int]] = []
        progress = [0] * args.receivers
        arrived = asyncio.Event()
        target = 0

        async def receive(idx: int, ws) -> None:
            seen = counts[idx]
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("type") != "broadcast":
                    continue
                k = msg["content"]["i"]
                seen[k] += 1
                progress[idx] = k + 1
                if k + 1 >= target:
                    arrived.set()

        for i in range(args.receivers):
            server = servers[i % procs]
            ws = await connect(server.ws_url(f"/ws?user=r{i}"), max_queue=None, ping_interval=None,
                               compression=None)
            json.loads(await ws.recv())  # hello
            counts.append([0] * n)
            receivers.append((ws, asyncio.create_task(receive(i, ws))))
        sender = await connect(servers[0].ws_url("/ws?user=sender"), ping_interval=None,
                               compression=None)
        json.loads(await sender.recv())
        pad = "x" * max(0, args.size - 40)

        # Warm-up: one message everywhere (also proves every process is subscribed).
        cpu0 = sum(cpu_seconds(s.proc.pid) for s in servers) + cpu_seconds(redis.proc.pid)
        t0 = time.perf_counter()
        for start in range(0, n, args.batch):
            end = min(n, start + args.batch)
            target = end
            arrived.clear()
            for k in range(start, end):
                await sender.send(json.dumps({"type": "broadcast", "ack": False,
                                              "exclude_self": True,
                                              "content": {"i": k, "p": pad}}))
            deadline = time.perf_counter() + 30
            while min(progress) < end:
                arrived.clear()
                if min(progress) >= end:
                    break
                try:
                    await asyncio.wait_for(arrived.wait(), max(0.01, deadline - time.perf_counter()))
                except asyncio.TimeoutError:
                    pass
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"stalled at {min(progress)}/{end} with {procs} procs")
        elapsed = time.perf_counter() - t0
        cpu = sum(cpu_seconds(s.proc.pid) for s in servers) + cpu_seconds(redis.proc.pid) - cpu0
        await asyncio.sleep(0.2)  # a duplicate would arrive now
        bad = sum(1 for c in counts for v in c if v != 1)
        deliveries = n * args.receivers
        remote = sum(1 for i in range(args.receivers) if i % procs != 0) * n
        for ws, task in receivers:
            task.cancel()
            await ws.close()
        await sender.close()
        return {"procs": procs, "receivers": args.receivers, "messages": n,
                "seconds": round(elapsed, 3), "deliveries_per_s": round(deliveries / elapsed),
                "cross_process_deliveries_per_s": round(remote / elapsed),
                "server_cpu_us_per_delivery": round(cpu / deliveries * 1e6, 2),
                "not_exactly_once": bad}
    finally:
        for s in servers:
            s.kill()


async def backend_only(redis: RedisServer, n: int, raw: bool) -> dict:
    """Two RedisBackends in this process: envelopes/s from one to the other, and the CPU per
    envelope of both ends together (publish, the receiver's decode, the sender's own echo)."""
    import uuid

    from wsmanager.backends.redis import RedisBackend

    class Stub:  # a wsmanager.backends.BackendHost that counts deliveries
        def __init__(self) -> None:
            self.node_id = uuid.uuid4().hex
            self.count = 0
            self.done = asyncio.Event()

        async def deliver(self, envelope: dict) -> int:
            self.count += 1
            if self.count == n:
                self.done.set()
            return 1

        def local_stats(self) -> dict:
            return {}

        def local_users(self) -> set[str]:
            return set()

        def local_channel_users(self, channel: str) -> set[str]:
            return set()

    prefix = f"micro{uuid.uuid4().hex[:6]}"
    pairs = [(RedisBackend(redis.url, prefix=prefix, raw_subscriber=raw), Stub()) for _ in range(2)]
    for backend, stub in pairs:
        await backend.start(stub)
    (sender, _), (_, receiver) = pairs
    text = json.dumps({"type": "broadcast", "content": "x" * 40})
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        await sender.publish({"kind": "all", "target": None, "text": text, "exclude": ["c1"]})
    await asyncio.wait_for(receiver.done.wait(), 60)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    for backend, _ in pairs:
        await backend.stop()
    return {"subscriber": "hiredis socket" if raw else "redis-py PubSub",
            "envelopes_per_s": round(n / elapsed), "cpu_us_per_envelope": round(cpu / n * 1e6, 1)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--receivers", type=int, default=200)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="approximate message bytes")
    parser.add_argument("--app", default="tests.redis_app:app")
    parser.add_argument("--ws", default=None, help="uvicorn --ws (e.g. the native protocol)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--backend-only", type=int, metavar="N", default=0,
                        help="instead: N envelopes between two backends in this process")
    args = parser.parse_args()
    redis = RedisServer().start()
    if args.backend_only:
        try:
            for raw in (True, False):
                print(await backend_only(redis, args.backend_only, raw))
        finally:
            redis.cleanup()
        return
    try:
        results = [await run(p, args, redis) for p in args.procs]
    finally:
        redis.cleanup()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'procs':>5} {'deliv/s':>10} {'cross-proc/s':>13} {'srv CPU us/deliv':>17} "
          f"{'seconds':>8} {'dup/lost':>8}")
    for r in results:
        print(f"{r['procs']:>5} {r['deliveries_per_s']:>10} "
              f"{r['cross_process_deliveries_per_s']:>13} {r['server_cpu_us_per_delivery']:>17} "
              f"{r['seconds']:>8} {r['not_exactly_once']:>8}")
    print(f"({args.receivers} receivers, {args.messages} broadcasts of ~{args.size} B, "
          f"batches of {args.batch}; client on the same machine)")


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
