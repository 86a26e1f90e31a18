"""Backends: what a manager shares with other processes, and the contract between the two.

A backend carries deliveries, the per-user limit, presence and stats between processes; each
process still fans out locally through its own registry (and engine). Every manager has exactly
one backend: :class:`LocalBackend` (nothing leaves the process) unless it was given another one
(``WebSocketManager(backend=...)``, or ``redis_url=...`` for :class:`~wsmanager.backends.redis.
RedisBackend`). A backend is written against two things only: :class:`Backend`, the methods the
manager calls, and :class:`BackendHost`, what the manager offers in return.

The host (what the backend may use of the manager)
    ``host.node_id``
        this manager's id, fixed for its life; the origin ``node`` of every envelope it
        publishes.
    ``await host.deliver(envelope)``
        local delivery of an envelope another process published: a fan-out through this
        process's registry (or a local ``disconnect``); returns how many connections got it.
        It raises only for programming errors (a broken envelope); a dead peer is the
        manager's business, never the backend's.
    ``host.local_stats()``
        this process's ``get_stats()`` -- the dict the manager returns, its ``"backend"`` entry
        (the backend's own :meth:`Backend.stats`) included: drop it before sharing the figures.
    ``host.local_users()`` / ``host.local_channel_users(channel)``
        presence in this process alone: users with a connection, users with a connection in
        ``channel`` (anonymous connections have no user and do not appear).

    The host is handed over by :meth:`Backend.start` and is nothing else of the manager: a
    backend holds no reference to the manager and uses none of its attributes.

What the manager guarantees
    * One event loop: ``start(host)`` is awaited on the loop the manager runs on (the loop of
      ``manager.start()``, its lifespan or its first ``connect``), and every later call comes
      from that loop's thread; the host's methods are for that loop too. Calls interleave only
      at ``await`` points.
    * Order: ``start`` once before ``reserve``, ``release``, ``joined``, ``left``,
      ``publish``, ``online_users`` and ``channel_members``, which are called only between
      ``start`` and ``stop``; ``stop`` once, after the manager closed its connections and
      its own background tasks (the ``release`` calls of those connections among them)
      finished. ``stats()`` and ``cluster_stats()`` may be called at any time, before
      ``start`` and after ``stop`` too. A stopped manager may be started again.
    * ``reserve(cid, user, limit)`` comes after this process's registry admitted the
      connection (the local per-user and process-wide limits are checked already); False makes
      the manager close it with 1008. Every connection ``reserve`` admitted gets one
      ``release`` when it goes away, which also ends its channel memberships (no ``left`` per
      channel). ``release``, ``joined`` and ``left`` run in the background, after the call
      that caused them returned; those of one connection one after the other, in the order of
      its changes, each once the previous one returned (so its ``release`` comes last). A
      change that undoes one still waiting its turn (a join, then a leave of the same channel,
      while the backend is behind) cancels it: neither call is made nor either envelope
      published, so a peer that joins and leaves faster than the backend answers leaves at
      most one waiting call per channel.
    * ``publish(envelope)`` comes after the local delivery of the same message: the backend
      takes it to every *other* process, whose backend hands it to its ``host.deliver``.
    * Presence events travel the same way, for the other processes' ``on_join`` / ``on_leave``
      hooks: a ``join`` or ``leave`` envelope is published after the ``joined`` / ``left``
      call of the same change returned (and a ``leave`` per channel after the ``release`` of a
      connection that was in channels), so a hook that asks ``channel_members`` there finds the
      change recorded. ``host.deliver`` fires those hooks and delivers nothing (it returns 0).
    * Backends whose :attr:`Backend.spans_processes` is False are told nothing per message or
      per membership change (no envelope is even built, no task spawned): ``reserve``,
      ``online_users``, ``channel_members``, the stats and the lifecycle calls are all they get.

What a backend must not do
    * Hand an envelope back to the process that published it (its ``node`` is ``host.node_id``):
      the origin has delivered locally already, so every receiver gets each message once.
    * Call the host from another thread: a backend with threads of its own (or another event
      loop) hops onto the manager's loop first (``loop.call_soon_threadsafe``,
      ``asyncio.run_coroutine_threadsafe``).
    * Block the loop: no synchronous network I/O in any method; ``stats()`` and
      ``cluster_stats()`` are synchronous and cheap (``get_stats()`` is called from route
      handlers), so a backend answers them from a snapshot it refreshes in the background.
    * Raise into the manager for an infrastructure failure (a lost Redis connection): it
      degrades to process-local behaviour, counts what it could not do, and says so in
      :meth:`Backend.stats`. Only programming errors propagate.
    * Use anything of the manager the host does not offer.

Envelope (:class:`Envelope`, a dict; a backend serializes it as it likes, e.g.
:func:`wsmanager.backends._codec.encode_envelope`):
    ``{"node": <origin node id>, "kind": "all" | "user" | "channel" | "conn" | "disconnect" |
       "join" | "leave", "target": <user id / channel / connection id / None>,
       "text": str | None, "data": bytes | None, "exclude": [connection ids], "code": int,
       "reason": str, "connection_id": str, "user_id": str | None}``
    ``join`` / ``leave``: ``target`` is the channel, ``connection_id`` and ``user_id`` the
    member, ``reason`` empty for a ``leave()`` and the disconnect reason (``_core.REASONS``)
    for a connection that went away.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Protocol, TypedDict, get_args, runtime_checkable

__all__ = ["Backend", "BackendHost", "Envelope", "LocalBackend", "ENVELOPE_KINDS"]

EnvelopeKind = Literal["all", "user", "channel", "conn", "disconnect", "join", "leave"]
ENVELOPE_KINDS: tuple[str, ...] = get_args(EnvelopeKind)


class Envelope(TypedDict, total=False):
    """One delivery as it travels between processes (see the module docstring)."""

    node: str                 # the publishing process (its host's node_id)
    kind: EnvelopeKind
    target: str | None        # user id, channel or connection id; None for "all"
    text: str | None          # a text message ...
    data: bytes | None        # ... or a binary one (neither for "disconnect")
    exclude: list[str]        # connection ids that do not get it ("all", "channel")
    code: int                 # "disconnect": the close code ...
    reason: str               # ... and reason; "leave": the disconnect reason, or ""
    connection_id: str        # "join" / "leave": the member's connection ...
    user_id: str | None       # ... and user


@runtime_checkable
class BackendHost(Protocol):
    """What a manager offers the backend it starts (see the module docstring)."""

    @property
    def node_id(self) -> str:
        """This manager's id: the origin of the envelopes it publishes."""
        ...

    async def deliver(self, envelope: Envelope) -> int:
        """Local delivery of an envelope another process published; how many got it."""
        ...

    def local_stats(self) -> dict[str, Any]:
        """This process's ``get_stats()`` (its ``"backend"`` entry included)."""
        ...

    def local_users(self) -> set[str]:
        """Users with at least one connection in this process."""
        ...

    def local_channel_users(self, channel: str) -> set[str]:
        """Users with at least one connection in ``channel`` in this process."""
        ...


class Backend:
    """The methods a manager calls on its backend, with their defaults.

    A subclass overrides what it shares: a backend that only publishes overrides ``start``,
    ``stop`` and ``publish``. The defaults admit every connection, record nothing, publish
    nothing and know nobody."""

    #: Whether anything leaves this process. False (:class:`LocalBackend`) tells the manager not
    #: to build envelopes or spawn bookkeeping tasks for this backend (see the module docstring).
    spans_processes: ClassVar[bool] = True

    async def start(self, host: BackendHost) -> None:
        """Connect and subscribe; deliveries from other processes go to ``host.deliver``."""

    async def stop(self) -> None:
        """Unsubscribe, drop this process's entries, close connections."""

    async def reserve(self, connection_id: str, user_id: str | None, max_per_user: int | None
                      ) -> bool:
        """Cluster-wide admission: False when ``user_id`` already has ``max_per_user``
        connections anywhere (0 or None: no limit). Must be atomic across processes."""
        return True

    async def release(self, connection_id: str, user_id: str | None) -> None:
        """Undo :meth:`reserve` when the connection goes away (also forgets its channels)."""

    async def joined(self, connection_id: str, user_id: str | None, channel: str) -> None:
        """``connection_id`` joined ``channel``: record it for cluster-wide presence."""

    async def left(self, connection_id: str, user_id: str | None, channel: str) -> None:
        """Undo :meth:`joined`. Idempotent."""

    async def publish(self, envelope: Envelope) -> None:
        """Send an envelope to every other process."""

    async def online_users(self) -> set[str]:
        """Users with at least one connection on any live process."""
        return set()

    async def channel_members(self, channel: str) -> set[str]:
        """Users with at least one connection in ``channel`` on any live process."""
        return set()

    def stats(self) -> dict[str, Any]:
        """Backend state for ``get_stats()["backend"]``."""
        return {"type": "local"}

    def cluster_stats(self) -> dict[str, Any]:
        """Aggregated stats of every live process, for ``get_stats(scope="cluster")``.

        Synchronous and cheap: get_stats() is called from route handlers, so a backend keeps a
        snapshot refreshed in the background rather than asking its store on the caller's
        time."""
        return {}


class LocalBackend(Backend):
    """The backend of a manager that shares nothing: everything answers for this process.

    ``reserve`` admits (the manager has checked the local limits already, and there is no one
    else to count), ``release`` / ``joined`` / ``left`` / ``publish`` do nothing (there is no
    other process), presence is the host's local view and ``cluster_stats()`` is this
    process's ``get_stats()``: a cluster of one. Needing no I/O, it may be given its host when
    it is made, so that it answers before ``start()`` as well."""

    spans_processes: ClassVar[bool] = False

    def __init__(self, host: BackendHost | None = None) -> None:
        self._host = host

    async def start(self, host: BackendHost) -> None:
        self._host = host

    async def online_users(self) -> set[str]:
        return self._host.local_users() if self._host is not None else set()

    async def channel_members(self, channel: str) -> set[str]:
        return self._host.local_channel_users(channel) if self._host is not None else set()

    def stats(self) -> dict[str, Any]:
        return {"type": "local"}

    def cluster_stats(self) -> dict[str, Any]:
        return self._host.local_stats() if self._host is not None else {}
