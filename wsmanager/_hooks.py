"""Lifecycle hooks: what a manager tells the application when a connection comes, goes, joins
or leaves a channel.

The API is four decorators on the manager -- ``@ws_manager.on_connect``, ``on_disconnect``,
``on_join``, ``on_leave`` -- because that is how FastAPI registers callbacks (``@app.websocket``,
``@app.exception_handler``), and because ``ws_manager`` is one object imported by many modules:
each module registers the hooks it needs next to the code that needs them, with no central
``hooks=`` object to assemble before the manager exists. Several hooks per event are called in
the order they were registered; a hook takes one argument, the event (a frozen dataclass of this
module), and may be a plain function or a coroutine function.

When hooks run. The manager fires an event from its own paths -- the end of ``connect()``, the
one place a connection is unregistered (``WebSocketManager._drop``: a peer's close, ``disconnect()``,
a failed or blocked send, the stale sweep, ``stop()``), ``join()`` / ``leave()``, and an envelope
of another node (``join`` / ``leave`` kinds) -- and runs the hooks on a task of its own, so none
needs the endpoint's coroutine: ``stop()``, the stale sweep or a failed send fire them whatever
the endpoint is doing (a peer's close is noticed where the manager notices it, in the receive it
observes, ``_Conn.receive``). The event is queued, and one task per
event loop (a :class:`Lanes` lane, a background task of the manager: ``stop()`` waits for it)
calls the hooks one event at a time, in the order the events happened. Hence:

* a hook never runs inside the call that caused its event (a ``join()``, a send that failed, the
  heartbeat): it cannot slow that call down, re-enter it, or break it;
* the state a hook reads is at least as new as its event: a disconnect hook finds the connection
  gone from ``get_stats()``, the registry and (with Redis) presence; a join hook finds the member
  (unless it left since);
* the events of one connection arrive in order (connect, joins and leaves, its leaves from the
  channels it was still in, disconnect), and a slow hook delays the hooks after it: a hook with
  long work to do starts a task of its own.

A hook's exception is logged (ERROR, ``wsmanager`` logger, with the traceback) and the next hook
runs: a broken hook never breaks delivery or the disconnect path.

The queue is bounded (``hook_queue_limit``, ``WSMANAGER_HOOK_QUEUE_LIMIT``: events waiting per
event loop). Peers decide how fast connections come and go, and so how fast events are made; a
hook stuck on a slow database must not turn that into memory without bound. Past the limit new
events are dropped, counted (``get_stats()["hooks"]["dropped"]``) and announced by one WARNING
per burst; the manager's own state (registry, presence, stats) never depends on a hook, so it
stays right.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any, Awaitable, Callable, Hashable

from .errors import describe

__all__ = ["ConnectEvent", "DisconnectEvent", "JoinEvent", "LeaveEvent", "Hooks", "Lanes", "EVENTS"]

logger = logging.getLogger("wsmanager")

#: The events, in the order of a connection's life; ``on_<event>`` registers a hook.
EVENTS = ("connect", "disconnect", "join", "leave")


@dataclass(frozen=True)
class ConnectEvent:
    """A connection was accepted and registered: ``connect()`` is about to return True."""

    connection_id: str
    user_id: str | None


@dataclass(frozen=True)
class DisconnectEvent:
    """A connection is gone: unregistered already, so ``get_stats()`` and presence no longer
    count it. ``reason`` is one of the disconnect reasons of ``get_stats()["disconnects"]``
    (``wsmanager._core.REASONS``); ``code`` the close code the peer sent or the manager closed
    with (None when the server did not report one)."""

    connection_id: str
    user_id: str | None
    channels: tuple[str, ...]
    reason: str
    code: int | None


@dataclass(frozen=True)
class JoinEvent:
    """A connection joined a channel. ``local``: it is held by this manager (else by the node
    ``node_id``, and the event came through the backend)."""

    connection_id: str
    user_id: str | None
    channel: str
    node_id: str
    local: bool


@dataclass(frozen=True)
class LeaveEvent:
    """A connection left a channel: by ``leave()`` (``reason`` None) or because it disconnected
    (``reason``: its disconnect reason, as in :class:`DisconnectEvent`)."""

    connection_id: str
    user_id: str | None
    channel: str
    reason: str | None
    node_id: str
    local: bool


class Lanes:
    """Background work in order: what is queued under one key runs one item after the other,
    each once the previous one finished; different keys run concurrently.

    A lane is a deque and one task (started by ``spawn``, the manager's tracked
    ``WebSocketManager._spawn``, so ``stop()`` waits for it) that ends when the deque is empty:
    nothing is kept for an idle key. The manager orders each connection's backend calls and
    announcements this way (key: the connection id), so a node never announces a leave before
    the join it undoes; :class:`Hooks` orders every event of one event loop (key: the loop).
    An item is a callable returning an awaitable; its exception is logged, and the lane goes on.
    Call :meth:`add` on the loop the lane is to run on.
    """

    __slots__ = ("_spawn", "_lanes")

    def __init__(self, spawn: Callable[[Any], None]) -> None:
        self._spawn = spawn
        self._lanes: dict[Hashable, deque] = {}

    def pending(self, key: Hashable) -> int:
        """Items queued under ``key`` and not started yet."""
        lane = self._lanes.get(key)
        return len(lane) if lane is not None else 0

    def pending_total(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def add(self, key: Hashable, item: Callable[[], Awaitable[Any]]) -> None:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = deque()
            self._spawn(self._run(key, lane))
        lane.append(item)

    async def _run(self, key: Hashable, lane: deque) -> None:
        try:
            while lane:
                try:
                    await lane.popleft()()
                except Exception as exc:  # noqa: BLE001 - one item must not stop its lane
                    logger.warning("background task failed: %s", describe(exc))
        finally:
            if self._lanes.get(key) is lane:
                del self._lanes[key]


class Hooks:
    """The hooks of one manager and the lanes that call them (one per event loop).

    ``connect``, ``disconnect``, ``join`` and ``leave`` are tuples of hooks, replaced (never
    changed in place) on registration, so the manager's paths test them for free and a hook may
    register another while an event is being dispatched. ``spawn`` starts a tracked background
    task of the manager (``WebSocketManager._spawn``); ``limit()`` is the manager's
    ``hook_queue_limit`` (read per event, so ``configure()`` changes it live).
    """

    __slots__ = (*EVENTS, "_lanes", "_limit", "_dropping", "dropped_events", "loop")

    def __init__(self, spawn: Callable[[Any], None], limit: Callable[[], int] = lambda: 0) -> None:
        for event in EVENTS:
            setattr(self, event, ())
        self._lanes = Lanes(spawn)
        self._limit = limit
        self._dropping = False  # in a burst of drops: its WARNING is out
        self.dropped_events = 0
        #: The loop events from a thread without one go to (the manager's, set by connect()).
        self.loop: asyncio.AbstractEventLoop | None = None

    # ---- registration -----------------------------------------------------------------------

    def register(self, event: str, hook: Any = None) -> Any:
        """``on_<event>``'s body: adds ``hook`` and returns it (a decorator), or, called with no
        hook (``@ws_manager.on_connect()``), returns the decorator."""
        if hook is None:
            return lambda func: self.register(event, func)
        where = f"on_{event}"
        if not callable(hook):
            raise TypeError(f"{where}: hook must be callable, not {type(hook).__name__}")
        _check_signature(where, hook)
        hooks = getattr(self, event)
        if hook in hooks:
            raise ValueError(f"{where}: hook {_name(hook)} is registered already")
        setattr(self, event, (*hooks, hook))
        return hook

    def remove(self, hook: Any) -> bool:
        """Takes ``hook`` off every event it was registered for; False when it was on none."""
        found = False
        for event in EVENTS:
            hooks = getattr(self, event)
            if hook in hooks:
                setattr(self, event, tuple(h for h in hooks if h != hook))
                found = True
        return found

    @property
    def on_drop(self) -> bool:
        """Someone listens to what unregistering a connection fires (disconnect, leave)."""
        return bool(self.disconnect or self.leave)

    # ---- firing -----------------------------------------------------------------------------

    def connected(self, cid: str, user: str | None) -> None:
        if self.connect:
            self.fire(self.connect, ConnectEvent(cid, user))

    def dropped(self, cid: str, user: str | None, channels: tuple[str, ...], reason: str,
                code: int | None, node_id: str) -> None:
        """A connection was unregistered: a leave per channel it was in, then its disconnect."""
        if self.leave:
            for channel in channels:
                self.fire(self.leave, LeaveEvent(cid, user, channel, reason, node_id, True))
        if self.disconnect:
            self.fire(self.disconnect, DisconnectEvent(cid, user, channels, reason, code))

    def membership(self, kind: str, cid: str, user: str | None, channel: str, node_id: str,
                   local: bool, reason: str | None = None) -> None:
        """A join or leave (``kind``), of this manager's connection or another node's."""
        if kind == "join" and self.join:
            self.fire(self.join, JoinEvent(cid, user, channel, node_id, local))
        elif kind == "leave" and self.leave:
            self.fire(self.leave, LeaveEvent(cid, user, channel, reason, node_id, local))

    def stats(self) -> dict[str, int]:
        """``get_stats()["hooks"]``: events waiting for their hooks, and dropped at the limit."""
        return {"waiting": self._lanes.pending_total(), "dropped": self.dropped_events}

    def fire(self, hooks: tuple, event: Any) -> None:
        """Queues ``event`` for ``hooks`` on the running loop; from a thread without a loop (a
        plain ``def`` route calling ``join()``) on the manager's."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = self.loop
            if loop is None or loop.is_closed():
                logger.warning("%s dropped: no event loop to run its hooks on", type(event).__name__)
                return
            if self._admit(loop, event):
                loop.call_soon_threadsafe(self._lanes.add, loop, partial(_dispatch, hooks, event))
            return
        if self._admit(loop, event):
            self._lanes.add(loop, partial(_dispatch, hooks, event))

    def _admit(self, loop: asyncio.AbstractEventLoop, event: Any) -> bool:
        """False, the event counted as dropped, when ``limit()`` events wait on ``loop``."""
        limit = self._limit()
        if not limit or self._lanes.pending(loop) < limit:
            self._dropping = False
            return True
        self.dropped_events += 1
        if not self._dropping:
            self._dropping = True
            logger.warning("lifecycle hooks are %d events behind (hook_queue_limit): new events "
                           "are dropped until they catch up, the first %s of connection %s",
                           limit, type(event).__name__, event.connection_id)
        return False


async def _dispatch(hooks: tuple, event: Any) -> None:
    """Every hook of one event, in registration order."""
    for hook in hooks:
        await _call(hook, event)


async def _call(hook: Callable[[Any], Any], event: Any) -> None:
    """One hook on one event; its exception is logged, never raised."""
    try:
        result = hook(event)
        if inspect.isawaitable(result):
            await result
    except Exception:  # noqa: BLE001 - contained: the next hook and the manager go on
        logger.error("%s hook %s failed on connection %s", type(event).__name__, _name(hook),
                     event.connection_id, exc_info=True)


def _check_signature(where: str, hook: Callable[..., Any]) -> None:
    """A hook is called with one positional argument: say so at registration, not per event."""
    try:
        signature = inspect.signature(hook)
    except (TypeError, ValueError):  # some builtins have none to inspect
        return
    try:
        signature.bind(None)
    except TypeError:
        raise TypeError(f"{where}: hook {_name(hook)} must take one argument, the event "
                        f"(its signature is {signature})") from None


def _name(hook: Any) -> str:
    return getattr(hook, "__qualname__", None) or repr(hook)
