"""Redis scale-out backend: cross-process fan-out, cluster-wide limits, presence and stats.

Every process ("node") publishes the envelopes it has already delivered locally to one pub/sub
channel per cluster prefix and fans out what the *other* nodes publish through its own registry.
Every entry of the cluster state names the node that owns it and stops counting when that node
stops heart-beating, so a crashed process disappears on its own within ``node_ttl``:

    {p}:bus                 pub/sub channel carrying envelopes
    {p}:nodes               set of node ids that have ever heart-beaten (garbage-collected)
    {p}:node:{n}            the node's heartbeat: JSON stats summary, PX node_ttl
    {p}:conns:{n}           hash connection id -> user id ("" = anonymous)       (index_ttl)
    {p}:users:{n}           set of users with a connection on the node            (index_ttl)
    {p}:chans:{n}           set of channels with a member on the node             (index_ttl)
    {p}:chan:{c}:{n}        set of users in channel c on the node                 (index_ttl)
    {p}:user:{u}            hash connection id -> node id: the per-user limit, cluster-wide
                            (no TTL: dead nodes' fields are removed by the scripts)

A ``{p}:user:{u}`` entry counts only while its node's heartbeat key exists: the admission script
skips (and deletes) entries of dead nodes, and live nodes garbage-collect a dead node's indexes
when they notice its heartbeat is gone. Multi-key scripts name keys they compute, so this runs
on a single Redis (or a primary with replicas), not on Redis Cluster.

Faults: one supervisor task owns the connection state. Any failing Redis call marks the backend
down (one WARNING per outage on the ``wsmanager`` logger) and the supervisor reconnects with
exponential backoff and full jitter, resubscribes, rewrites this node's entries from its local
mirror (Redis may have restarted empty) and logs one INFO on recovery. While down nothing waits
on Redis: publishes are dropped and counted, admissions fall back to the local limit, presence
answers from the local mirror.

The backend knows the manager only as its :class:`~wsmanager.backends.BackendHost`: the node id,
``deliver`` for what other nodes publish, ``local_stats`` for the heartbeat's summary. Beside
this module: the Lua scripts (``_redis_scripts``), the hiredis sockets (``_redis_transport``),
the envelope bytes (``_codec``) and the summary / cluster view (``_cluster_stats``).
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import random
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.utils import HIREDIS_AVAILABLE

from .. import config as _config
from ..config import ConfigError, redact_url
from . import Backend, BackendHost, Envelope
from . import _redis_scripts as scripts
from ._cluster_stats import encode_summary, merge_summaries
from ._codec import decode_envelope, encode_envelope, own_prefix
from ._redis_transport import READ_SIZE, RawConnection, hiredis, quiet_close

__all__ = ["RedisBackend", "encode_envelope", "decode_envelope"]

logger = logging.getLogger("wsmanager")

# Failures that mean "Redis is unreachable or misbehaving", as opposed to bugs in our code.
_REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

_PUBLISH_BATCH = 256

_redact = redact_url  # the URL without its password, for logs and stats


def _cancel_pending() -> None:
    """Re-raise a cancellation that redis-py swallowed.

    redis-py 8.1's asyncio ``execute_command`` can eat a ``Task.cancel()`` that lands at the
    wrong moment: the task is left "cancelling" but runs on. Our own loops check after each
    Redis call so that stop() can always end them."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _end_tasks(tasks: list[asyncio.Task | None]) -> None:
    """Cancel and reap; cancel again if a cancellation was swallowed (see _cancel_pending)."""
    pending = {t for t in tasks if t is not None and t is not asyncio.current_task()}
    for _ in range(20):
        pending = {t for t in pending if not t.done()}
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for task in pending:
        logger.warning("Redis backend: task %s did not stop", task.get_name())
    for task in tasks:
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved: nothing logged as "never retrieved"


class RedisBackend(Backend):
    """Cross-process fan-out, limits, presence and stats through one Redis.

    Options (keyword; each one left out, or None, is read from its ``WSMANAGER_REDIS_*``
    variable, else its default: the ``redis`` rows of :data:`wsmanager.config.OPTIONS`, where
    ranges and defaults live; a bad value raises ``ConfigError`` naming the argument or the
    variable):
      ``url`` (``WSMANAGER_REDIS_URL``): ``redis://``, ``rediss://`` or ``unix://``.
      ``prefix`` (``_PREFIX``): key and channel namespace, one per cluster.
      ``node_ttl`` (``_NODE_TTL``): a node silent this long is dead; its entries stop
        counting and are collected.
      ``heartbeat_interval`` (``_HEARTBEAT``, shorter than node_ttl): heartbeat and
        cluster-stats refresh.
      ``op_timeout`` (``_TIMEOUT``): connect and per-command socket timeout.
      ``backoff_base`` / ``backoff_max`` (``_BACKOFF_BASE`` / ``_BACKOFF_MAX``): reconnect
        delays, uniform in [0, min(max, base * 2**attempt)] (full jitter).
      ``max_pending`` (``_MAX_PENDING``): publishes queued for the writer; a full queue
        makes ``publish`` wait up to ``op_timeout``, then drop (counted).
      ``node_id``: this node's id in Redis; by default the host's (the manager's ``node_id``).
      ``client_options``: extra keyword arguments for ``redis.asyncio.Redis.from_url``.
      ``raw_subscriber`` (True): subscribe and publish on sockets of our own, parsed by hiredis
        (redis:// URLs only); False uses redis-py's PubSub and pipelines, several times the CPU
        per message.
    """

    def __init__(self, url: str | None = None, *, prefix: str | None = None,
                 node_ttl: float | None = None, heartbeat_interval: float | None = None,
                 op_timeout: float | None = None, backoff_base: float | None = None,
                 backoff_max: float | None = None, max_pending: int | None = None,
                 node_id: str | None = None, client_options: dict[str, Any] | None = None,
                 raw_subscriber: bool = True) -> None:
        env = _config.from_env()  # every variable validated; these options' values when set
        given = {"redis_url": url or None, "prefix": prefix or None, "node_ttl": node_ttl,
                 "heartbeat_interval": heartbeat_interval, "op_timeout": op_timeout,
                 "backoff_base": backoff_base, "backoff_max": backoff_max,
                 "max_pending": max_pending}
        named = {"redis_url": "url"}
        opts = {name: _config.check(name, value, what=named.get(name)) if value is not None
                else env.get(name, _config.option(name).default) for name, value in given.items()}
        if opts["heartbeat_interval"] is None:
            opts["heartbeat_interval"] = _config.derived_default("heartbeat_interval", opts)
        _config.check_together(opts)
        if not opts["redis_url"]:
            raise ConfigError("RedisBackend needs a URL (or WSMANAGER_REDIS_URL)", argument="url")
        self.url: str = opts["redis_url"]
        self.prefix: str = opts["prefix"]
        self.node_ttl: float = opts["node_ttl"]
        self.heartbeat_interval: float = opts["heartbeat_interval"]
        self.op_timeout: float = opts["op_timeout"]
        self.backoff_base: float = opts["backoff_base"]
        self.backoff_max: float = opts["backoff_max"]
        self.max_pending: int = opts["max_pending"]
        # Index keys outlive the heartbeat so that a live node finds a dead one's indexes to
        # collect; they still expire on their own if the whole cluster is gone.
        self.index_ttl = max(60.0, 4 * self.node_ttl)
        self.node_id = node_id
        self._client_options = dict(client_options or {})
        # Plain redis:// without extra client options: subscribe on our own socket, parsed by
        # hiredis directly. Otherwise (TLS, unix sockets, custom options) redis-py's PubSub.
        self.raw_subscriber = bool(raw_subscriber and hiredis is not None and not client_options
                                   and urlsplit(self.url).scheme == "redis")

        self._host: BackendHost | None = None
        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._publisher: RawConnection | None = None
        self._state = "stopped"          # stopped | connecting | up | down
        self._broken: asyncio.Event | None = None  # events are created in start(), on the loop
        self._tasks: list[asyncio.Task] = []
        self._started = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self._stopping = False

        # Local mirror of this node's entries: the source of truth to rewrite after an outage.
        self._conns: dict[str, str | None] = {}
        self._user_count: dict[str, int] = {}
        self._conn_chans: dict[str, set[str]] = {}
        self._chan_users: dict[str, dict[str, int]] = {}
        self._mutations = 0

        self._pending: deque[bytes] = deque()
        self._inflight = 0
        self._bg: set[asyncio.Task] = set()
        self._pending_event: asyncio.Event | None = None
        self._space_event: asyncio.Event | None = None

        self._snapshot: dict[str, Any] = {}
        self._snapshot_at = 0.0
        self._down_since: float | None = None
        self._outage_dropped = 0
        self._last_error: str | None = None
        self._counters = {
            "published": 0, "publish_dropped": 0, "received": 0, "delivered": 0,
            "delivery_errors": 0, "reserve_rejected": 0, "reserve_unchecked": 0,
            "reconnects": 0, "outages": 0, "resyncs": 0, "collected_nodes": 0,
        }

    # --- keys -----------------------------------------------------------------------------------
    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def channel(self) -> str:
        return self._k("bus")

    def _node_keys(self, node: str) -> list[str]:
        """The keys the heartbeat and collect scripts take for ``node``, in their order."""
        return [self._k("node", node), self._k("nodes"), self._k("conns", node),
                self._k("users", node), self._k("chans", node)]

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self, host: BackendHost) -> None:
        if self._state != "stopped":
            await self._started.wait()  # a concurrent first call is still connecting
            return
        self._started = asyncio.Event()
        self._host = host
        self.node_id = self.node_id or host.node_id
        self._own = own_prefix(self.node_id)
        channel = self.channel.encode()
        self._publish_head = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (len(channel), channel)
        self._stopping = False
        self._broken = asyncio.Event()
        self._pending_event = asyncio.Event()
        self._space_event = asyncio.Event()
        options = {"socket_timeout": self.op_timeout, "socket_connect_timeout": self.op_timeout,
                   "retry": Retry(NoBackoff(), 0), "health_check_interval": 0,
                   "decode_responses": False}
        options.update(self._client_options)
        self._client = aioredis.Redis.from_url(self.url, **options)
        self._scripts = {name: self._client.register_script(source)
                         for name, source in scripts.ALL.items()}
        self._state = "connecting"
        # One synchronous attempt so that, when Redis is there, we are subscribed before the
        # first local delivery; when it is not, the app still starts and the supervisor retries.
        try:
            await self._connect_once()
        except Exception as exc:  # noqa: BLE001 - start() must not fail the first connect
            self._mark_down(exc)
        finally:
            self._started.set()
        # A process whose interpreter exits normally without manager.stop() still removes its
        # entries at once instead of leaving them to the TTL (death by signal cannot).
        atexit.register(self._remove_at_exit)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._supervise(), name="wsmanager-redis-supervisor"),
                       loop.create_task(self._heartbeat_loop(), name="wsmanager-redis-heartbeat"),
                       loop.create_task(self._writer_loop(), name="wsmanager-redis-writer")]

    async def stop(self) -> None:
        """Flush what is queued (briefly), end the tasks, leave the cluster (:meth:`_leave`),
        close the connections."""
        if self._state == "stopped":
            return
        atexit.unregister(self._remove_at_exit)
        was_up = self._state == "up"
        self._stopping = True
        # Flush what is queued, briefly: a clean shutdown should not lose its last broadcasts.
        if was_up and (self._pending or self._inflight):
            deadline = time.monotonic() + self.op_timeout
            while ((self._pending or self._inflight) and self._state == "up"
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.01)
        await _end_tasks([*self._tasks, self._reader])
        self._tasks, self._reader = [], None
        if self._state == "up":
            try:
                await asyncio.wait_for(self._leave(), self.op_timeout)
            except _REDIS_ERRORS as exc:
                logger.debug("Redis backend: could not remove node entries on stop (%s)",
                             _describe(exc))
        await self._close_pubsub()
        if self._client is not None:
            try:
                await self._client.aclose()
            except _REDIS_ERRORS:
                pass
        self._client = None
        self._state = "stopped"
        self._pending.clear()

    async def _leave(self) -> None:
        """Remove this node's entries from Redis at once, heartbeat included: the step of a
        node that goes away on purpose (:meth:`stop`, the loop torn down without it). Without
        it the entries stay until the TTL ends them, as a crashed node's do."""
        await self._collect(self.node_id, force=True)

    def _remove_at_exit(self) -> None:
        """Interpreter exit without stop(): the loop is gone, so one blocking call, bounded."""
        if self._state == "stopped" or self.node_id is None:
            return
        try:
            import redis as sync_redis
            client = sync_redis.Redis.from_url(self.url, socket_timeout=1.0,
                                               socket_connect_timeout=1.0)
            try:
                client.eval(scripts.COLLECT, 5, *self._node_keys(self.node_id), self.node_id,
                            self.prefix, "1")
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - best effort; the TTL still applies
            pass

    # --- connection supervision -----------------------------------------------------------------
    async def _connect_once(self) -> None:
        """Ping, subscribe, re-register this node; then mark up and start reading."""
        assert self._client is not None
        await self._client.ping()
        if self.raw_subscriber:
            pubsub, replies = await RawConnection.open(self.url, self.op_timeout,
                                                       ("SUBSCRIBE", self.channel))
            if not (isinstance(replies[0], list) and replies[0][:1] == [b"subscribe"]):
                await pubsub.aclose()
                raise ResponseError(f"unexpected reply to SUBSCRIBE: {replies[0]!r}")
            self._pubsub = pubsub
            self._publisher, _ = await RawConnection.open(self.url, self.op_timeout)
            read_loop = self._read_loop_raw(pubsub)
        else:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
            except BaseException:
                await quiet_close(pubsub)
                raise
            read_loop = self._read_loop(pubsub)
        self._pubsub = pubsub
        # Redis may have restarted empty, or our entries expired while we were away.
        try:
            await self._resync()
        except BaseException:
            read_loop.close()
            raise
        self._broken.clear()
        if self._down_since is not None:
            logger.info("Redis backend: reconnected to %s after %.1f s; %d publish(es) were "
                        "dropped during the outage; cross-process delivery resumed",
                        _redact(self.url), time.monotonic() - self._down_since,
                        self._outage_dropped)
            self._counters["reconnects"] += 1
        self._down_since = None
        self._outage_dropped = 0
        self._state = "up"
        self._reader = asyncio.get_running_loop().create_task(
            read_loop, name="wsmanager-redis-reader")
        self._pending_event.set()
        await self._refresh_snapshot()

    def _mark_down(self, exc: BaseException) -> None:
        """Record a Redis failure; the first one of an outage is logged at WARNING."""
        self._last_error = _describe(exc)
        if self._stopping:
            return
        if self._state in ("up", "connecting"):
            what = "connection to %s lost" if self._state == "up" else "cannot reach %s"
            self._state = "down"
            self._down_since = time.monotonic()
            self._counters["outages"] += 1
            logger.warning("Redis backend: " + what + " (%s); local delivery continues, "
                           "cross-process delivery is paused, reconnecting with backoff",
                           _redact(self.url), self._last_error)
        else:
            logger.debug("Redis backend: still down (%s)", self._last_error)
        if self._broken is not None:
            self._broken.set()
        if self._space_event is not None:
            self._space_event.set()
        if self._pending:
            self._drop(len(self._pending))
            self._pending.clear()

    def _drop(self, n: int) -> None:
        self._counters["publish_dropped"] += n
        self._outage_dropped += n

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.backoff_max, self.backoff_base * (2 ** min(attempt, 30))))

    async def _supervise(self) -> None:
        try:
            await self._supervise_loop()
        except asyncio.CancelledError:
            if not self._stopping:
                await self._abandoned()
            raise

    async def _abandoned(self) -> None:
        """The loop is being torn down without stop() (asyncio.run cancels every remaining task
        on its way out): leave the cluster now, not after the TTL."""
        self._stopping = True
        try:
            if self._state == "up":
                await asyncio.wait_for(self._leave(), 1.0)
            if self._client is not None:
                await asyncio.wait_for(self._client.aclose(), 1.0)
        except BaseException:  # noqa: BLE001 - best effort; the TTL still applies
            pass
        self._state = "stopped"

    async def _supervise_loop(self) -> None:
        attempt = 0
        while not self._stopping:
            if self._state == "up":
                await self._broken.wait()
                attempt = 0
                if self._stopping:
                    return
            # Down: drop the dead subscription and retry until Redis answers again.
            if self._reader is not None:
                await _end_tasks([self._reader])
                self._reader = None
            await self._close_pubsub()
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1
            try:
                await self._connect_once()
            except Exception as exc:  # noqa: BLE001 - whatever it is, retry with backoff
                await self._close_pubsub()
                self._mark_down(exc)
            _cancel_pending()

    async def _close_pubsub(self) -> None:
        """Close the subscription (and the raw publishing connection)."""
        pubsub, self._pubsub = self._pubsub, None
        publisher, self._publisher = self._publisher, None
        for conn in (pubsub, publisher):
            if conn is not None:
                await quiet_close(conn)

    # --- receiving ------------------------------------------------------------------------------
    async def _read_loop(self, pubsub: Any) -> None:
        """The subscription through redis-py's PubSub."""
        own = self._own
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                _cancel_pending()
                if message is None or message.get("type") != "message":
                    continue
                raw = message["data"]
                if not raw.startswith(own):
                    await self._handle(raw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis errors, or a dead pubsub object
            self._mark_down(exc)

    async def _read_loop_raw(self, sub: RawConnection) -> None:
        """The subscription on our own socket: one read, then every complete reply in it."""
        own = self._own
        parser = sub.parser
        try:
            while True:
                data = await sub.reader.read(READ_SIZE)
                if not data:
                    raise RedisConnectionError("Redis closed the subscription connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise ResponseError(str(reply))
                    if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
                        raw = reply[2]
                        if not raw.startswith(own):
                            await self._handle(raw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis errors, protocol errors
            self._mark_down(exc)

    async def _handle(self, raw: bytes) -> None:
        """One envelope of another node: decoded and handed to the host."""
        counters = self._counters
        counters["received"] += 1
        try:
            envelope = decode_envelope(raw)
        except (ValueError, KeyError, UnicodeDecodeError) as exc:
            counters["delivery_errors"] += 1
            logger.warning("Redis backend: undecodable envelope skipped (%s)", _describe(exc))
            return
        try:
            await self._host.deliver(envelope)
            counters["delivered"] += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad delivery must not stop the bus
            counters["delivery_errors"] += 1
            logger.warning("Redis backend: delivering a %s envelope failed (%s)",
                           envelope.get("kind"), _describe(exc), exc_info=True)

    # --- publishing -----------------------------------------------------------------------------
    async def publish(self, envelope: Envelope) -> None:
        if self._state == "connecting":
            await self._started.wait()
        if self._state != "up":
            self._drop(1)
            return
        raw = encode_envelope(envelope, self.node_id)
        if len(self._pending) >= self.max_pending:
            # Backpressure while Redis keeps up; a bounded wait, then drop: never unbounded.
            deadline = time.monotonic() + self.op_timeout
            while len(self._pending) >= self.max_pending and self._state == "up":
                self._space_event.clear()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._space_event.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            if len(self._pending) >= self.max_pending or self._state != "up":
                self._drop(1)
                return
        self._pending.append(raw)
        self._pending_event.set()

    async def _writer_loop(self) -> None:
        pending = self._pending
        while True:
            await self._pending_event.wait()
            self._pending_event.clear()
            while pending and self._state == "up":
                batch = [pending.popleft() for _ in range(min(len(pending), _PUBLISH_BATCH))]
                self._space_event.set()
                self._inflight = len(batch)
                try:
                    await self._publish_batch(batch)
                    self._counters["published"] += len(batch)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - keep the writer alive whatever
                    self._drop(len(batch))
                    self._mark_down(exc)
                finally:
                    self._inflight = 0
                _cancel_pending()

    async def _publish_batch(self, batch: list[bytes]) -> None:
        """PUBLISH every envelope of ``batch`` in one round trip."""
        publisher = self._publisher
        if publisher is not None:
            head = self._publish_head
            publisher.writer.write(b"".join(b"%s$%d\r\n%s\r\n" % (head, len(raw), raw)
                                            for raw in batch))
            await asyncio.wait_for(publisher.read_replies(len(batch)), self.op_timeout)
        elif len(batch) == 1:
            await self._client.publish(self.channel, batch[0])
        else:
            pipe = self._client.pipeline(transaction=False)
            for raw in batch:
                pipe.publish(self.channel, raw)
            await pipe.execute()

    # --- admission and presence -----------------------------------------------------------------
    async def reserve(self, connection_id: str, user_id: str | None, max_per_user: int | None
                      ) -> bool:
        user_id = None if user_id is None else str(user_id)
        if self._state == "connecting":
            await self._started.wait()
        if connection_id in self._conns:
            return True
        if user_id is not None and self._state == "up":
            # 0 or None means "no limit", as in WebSocketManager(max_connections_per_user=...).
            limit = int(max_per_user) if max_per_user and max_per_user > 0 else -1
            try:
                admitted = await self._scripts["reserve"](
                    keys=[self._k("user", user_id), self._k("conns", self.node_id),
                          self._k("users", self.node_id)],
                    args=[connection_id, self.node_id, limit, self._k("node", ""), user_id])
            except asyncio.CancelledError:
                # The script may have run before the cancellation: take the entry back.
                self._background(self._undo_reserve(connection_id, user_id))
                raise
            except _REDIS_ERRORS as exc:
                self._mark_down(exc)
                self._counters["reserve_unchecked"] += 1
            else:
                if not admitted:
                    self._counters["reserve_rejected"] += 1
                    return False
        elif user_id is not None:
            # Redis is down: the local limit (checked by the manager) is all we can enforce;
            # the entry is written when the connection comes back.
            self._counters["reserve_unchecked"] += 1
        self._conns[connection_id] = user_id
        if user_id is not None:
            self._user_count[user_id] = self._user_count.get(user_id, 0) + 1
        self._mutations += 1
        return True

    async def _undo_reserve(self, connection_id: str, user_id: str) -> None:
        if connection_id in self._conns:
            return
        ops: list[tuple[str, tuple[Any, ...]]] = [
            ("hdel", (self._k("user", user_id), connection_id)),
            ("hdel", (self._k("conns", self.node_id), connection_id))]
        if user_id not in self._user_count:
            ops.append(("srem", (self._k("users", self.node_id), user_id)))
        await self._run(ops)

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def release(self, connection_id: str, user_id: str | None = None) -> None:
        if connection_id not in self._conns:
            return
        user_id = self._conns.pop(connection_id)
        self._mutations += 1
        node = self.node_id
        ops: list[tuple[str, tuple[Any, ...]]] = []
        for channel in self._conn_chans.pop(connection_id, ()):
            ops.extend(self._forget_channel_member(channel, user_id))
        if user_id is not None:
            left = self._user_count.get(user_id, 1) - 1
            if left <= 0:
                self._user_count.pop(user_id, None)
                ops.append(("srem", (self._k("users", node), user_id)))
            else:
                self._user_count[user_id] = left
            ops.append(("hdel", (self._k("user", user_id), connection_id)))
        ops.append(("hdel", (self._k("conns", node), connection_id)))
        await self._run(ops)

    async def joined(self, connection_id: str, user_id: str | None, channel: str) -> None:
        if connection_id not in self._conns:
            return  # not reserved through us, or already released (a late join task)
        chans = self._conn_chans.setdefault(connection_id, set())
        if channel in chans:
            return
        chans.add(channel)
        self._mutations += 1
        user_id = self._conns[connection_id]
        members = self._chan_users.setdefault(channel, {})
        ops: list[tuple[str, tuple[Any, ...]]] = []
        if len(members) == 0:
            ops.append(("sadd", (self._k("chans", self.node_id), channel)))
        if user_id is not None:
            if user_id not in members:
                key = self._k("chan", channel, self.node_id)
                ops.append(("sadd", (key, user_id)))
                ops.append(("pexpire", (key, int(self.index_ttl * 1000))))
            members[user_id] = members.get(user_id, 0) + 1
        else:
            members[""] = members.get("", 0) + 1
        await self._run(ops)

    async def left(self, connection_id: str, user_id: str | None, channel: str) -> None:
        chans = self._conn_chans.get(connection_id)
        if not chans or channel not in chans:
            return
        chans.discard(channel)
        if not chans:
            self._conn_chans.pop(connection_id, None)
        self._mutations += 1
        await self._run(self._forget_channel_member(channel, self._conns.get(connection_id)))

    def _forget_channel_member(self, channel: str, user_id: str | None
                               ) -> list[tuple[str, tuple[Any, ...]]]:
        members = self._chan_users.get(channel)
        if members is None:
            return []
        ops: list[tuple[str, tuple[Any, ...]]] = []
        member = "" if user_id is None else user_id
        n = members.get(member, 0) - 1
        if n <= 0:
            members.pop(member, None)
            if user_id is not None:
                ops.append(("srem", (self._k("chan", channel, self.node_id), user_id)))
        else:
            members[member] = n
        if not members:
            del self._chan_users[channel]
            ops.append(("srem", (self._k("chans", self.node_id), channel)))
        return ops

    async def _run(self, ops: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Apply mirror changes to Redis in one round trip; while down they wait for resync."""
        if not ops or self._state != "up":
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for name, args in ops:
                getattr(pipe, name)(*args)
            await pipe.execute()
        except _REDIS_ERRORS as exc:
            self._mark_down(exc)

    async def _live_union(self, head: str, tail: str) -> set[str] | None:
        """The union of the sets ``{head}{n}{tail}`` over the live nodes ``n``; None while
        Redis is down (the caller answers from the mirror)."""
        if self._state == "up":
            try:
                found = await self._scripts["union"](
                    keys=[self._k("nodes")], args=[self._k("node", ""), head, tail])
                return {m.decode() for m in found}
            except _REDIS_ERRORS as exc:
                self._mark_down(exc)
        return None

    async def online_users(self) -> set[str]:
        found = await self._live_union(self._k("users", ""), "")
        return set(self._user_count) if found is None else found

    async def channel_members(self, channel: str) -> set[str]:
        found = await self._live_union(self._k("chan", channel, ""), "")
        return {u for u in self._chan_users.get(channel, {}) if u} if found is None else found

    # --- heartbeat, resync, cluster stats -------------------------------------------------------
    def _summary(self) -> bytes:
        stats: dict[str, Any] = {}
        if self._host is not None:
            try:
                stats = self._host.local_stats()
            except Exception as exc:  # noqa: BLE001 - stats must not kill the heartbeat
                logger.warning("Redis backend: local stats failed (%s)", _describe(exc))
        return encode_summary(self.node_id, stats, time.time())

    async def _heartbeat(self) -> int:
        node = self.node_id
        keys = self._node_keys(node)
        keys += [self._k("chan", c, node) for c in self._chan_users]
        return await self._scripts["heartbeat"](
            keys=keys, args=[self._summary(), int(self.node_ttl * 1000), node,
                             int(self.index_ttl * 1000)])

    async def _resync(self) -> None:
        """Rewrite this node's entries from the local mirror (after an outage or a lapse)."""
        for _ in range(3):
            mark = self._mutations
            node = self.node_id
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(self._k("conns", node), self._k("users", node), self._k("chans", node))
            conns = {cid: (user or "") for cid, user in self._conns.items()}
            if conns:
                pipe.hset(self._k("conns", node), mapping=conns)
            for cid, user in self._conns.items():
                if user is not None:
                    pipe.hset(self._k("user", user), cid, node)
            if self._user_count:
                pipe.sadd(self._k("users", node), *self._user_count)
            if self._chan_users:
                pipe.sadd(self._k("chans", node), *self._chan_users)
            for channel, members in self._chan_users.items():
                key = self._k("chan", channel, node)
                pipe.delete(key)
                users = [u for u in members if u]
                if users:
                    pipe.sadd(key, *users)
            await pipe.execute()
            await self._heartbeat()
            self._counters["resyncs"] += 1
            if self._mutations == mark:
                return

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if self._state != "up":
                continue
            try:
                existed = await self._heartbeat()
                if not existed:
                    logger.info("Redis backend: node %s had expired in Redis; re-registering "
                                "its connections", self.node_id)
                    await self._resync()
                await self._refresh_snapshot()
            except asyncio.CancelledError:
                raise
            except _REDIS_ERRORS as exc:
                self._mark_down(exc)
            except Exception:  # noqa: BLE001 - a bug must not stop the heartbeat
                logger.exception("Redis backend: heartbeat failed")
            _cancel_pending()

    async def _collect(self, node: str, force: bool = False) -> int:
        return await self._scripts["collect"](keys=self._node_keys(node),
                                              args=[node, self.prefix, "1" if force else "0"])

    async def _refresh_snapshot(self) -> dict[str, Any]:
        """Read every node's heartbeat, collect the dead ones, merge the live ones."""
        ids = sorted(m.decode() for m in await self._client.smembers(self._k("nodes")))
        raws = await self._client.mget([self._k("node", n) for n in ids]) if ids else []
        live: dict[str, bytes] = {}
        for node, raw in zip(ids, raws):
            if raw is not None:
                live[node] = raw
            elif await self._collect(node):
                self._counters["collected_nodes"] += 1
                logger.info("Redis backend: node %s stopped heart-beating; its entries were "
                            "removed", node)
        now = time.time()
        self._snapshot = merge_summaries(live, now)
        self._snapshot_at = now
        return self.cluster_stats()

    async def refresh_cluster_stats(self) -> dict[str, Any]:
        """A fresh :meth:`cluster_stats` (one Redis round trip or three); the cached one while
        Redis is down."""
        if self._state == "up":
            try:
                return await self._refresh_snapshot()
            except _REDIS_ERRORS as exc:
                self._mark_down(exc)
        return self.cluster_stats()

    def cluster_stats(self) -> dict[str, Any]:
        snapshot = dict(self._snapshot) if self._snapshot else {
            "total_connections": 0, "total_users": 0, "nodes": 0, "per_node": {}}
        snapshot["scope"] = "cluster"
        snapshot["updated_at"] = self._snapshot_at or None
        snapshot["stale"] = self._state != "up" or not self._snapshot_at
        return snapshot

    def stats(self) -> dict[str, Any]:
        return {
            "type": "redis",
            "url": _redact(self.url),
            "prefix": self.prefix,
            "node": self.node_id,
            "state": self._state,
            "connected": self._state == "up",
            "down_for": (round(time.monotonic() - self._down_since, 3)
                         if self._down_since is not None else None),
            "last_error": self._last_error,
            "pending": len(self._pending),
            "hiredis": HIREDIS_AVAILABLE,
            "transport": "hiredis-socket" if self.raw_subscriber else "redis-py",
            **self._counters,
        }
