"""Type stubs for the C extension ``wsmanager._core``.

Handles are ints ``(generation << 32) | slot``: a handle kept after its connection was removed
is recognised as stale (methods return ``None``/``False``/``0`` for it) even once the slot is
reused. Every loop over connections runs with the GIL released, under the registry's mutex.
"""
from array import array
from typing import Iterable, Iterator

STATE_FREE: int
STATE_CONNECTING: int
STATE_OPEN: int
STATE_DISCONNECTING: int
STATE_CLOSED: int

REASONS: tuple[str, ...]

class ConnectionRow(tuple):
    """Registry.info()'s row, read by name."""
    connection_id: str
    user_id: str | None
    state: int
    connected_at: int
    last_seen: int
    last_ping: int
    messages_in: int
    messages_out: int
    bytes_in: int
    bytes_out: int
    native: int
"""Disconnect reasons, index = reason code: normal, abrupt, stale, limit, slow_consumer,
protocol_error, shutdown."""

class LimitReached(Exception):
    """Raised by :meth:`Registry.add` when a per-user or global limit is full."""
    scope: str  # "user" or "total"

def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in ns, the clock of every registry timestamp."""

def set_thread_slice(ns: int) -> int:
    """Asks the kernel for a scheduler slice of ``ns`` for the calling thread (Linux >= 6.12,
    EEVDF; clamped by the kernel to 0.1-100 ms; 0 restores the default). Returns the slice now
    in effect, or 0 when the kernel or the thread's scheduling class has no per-thread slice."""

class Targets:
    """Receivers of one delivery, resolved in C. Iterating yields portable handles."""
    @property
    def portable_count(self) -> int: ...
    @property
    def native_count(self) -> int: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[int]: ...

class Registry:
    def __init__(self, capacity: int = 1024, stale_after: float = 0.0) -> None: ...
    stale_after: float
    """Seconds of silence after which :meth:`sweep` reports a connection; 0 disables."""
    def __len__(self) -> int: ...
    def add(self, connection_id: str, user_id: str | None = None, *, max_per_user: int = 0,
            max_total: int = 0) -> int:
        """Registers a connection (state CONNECTING). ValueError on a duplicate id,
        LimitReached when a limit (0 = none) is full; the check and insert are atomic."""
    def remove(self, handle: int) -> bool: ...
    def find(self, connection_id: str) -> int | None: ...
    def connection_id(self, handle: int) -> str | None: ...
    def user_id(self, handle: int) -> str | None: ...
    def state(self, handle: int) -> int: ...
    def set_state(self, handle: int, state: int) -> bool: ...
    def set_native(self, handle: int, native: int) -> bool: ...
    def native(self, handle: int) -> int: ...
    def touch(self, handle: int, nbytes: int = -1) -> bool:
        """Inbound traffic: refresh last_seen; with nbytes >= 0 also count one message in."""
    def set_last_ping(self, handle: int, when_ns: int) -> bool:
        """A heartbeat answer at ``when_ns`` (monotonic): sets last_ping, refreshes last_seen."""
    def record_sent(self, handle: int, nbytes: int) -> bool: ...
    def record_sent_many(self, targets: Targets, nbytes: int) -> None:
        """Counts one message of nbytes out for every receiver in targets (both planes)."""
    def record_failure(self, count: int = 1) -> None: ...
    def record_disconnect(self, reason: int) -> None: ...
    def expire(self, handle: int) -> bool:
        """Makes the next sweep report this connection."""
    def join(self, handle: int, channel: str) -> bool: ...
    def leave(self, handle: int, channel: str) -> bool: ...
    def channels_of(self, handle: int) -> list[str]: ...
    def resolve_all(self, exclude: Iterable[str] | None = None) -> Targets: ...
    def resolve_user(self, user_id: str, exclude: Iterable[str] | None = None) -> Targets: ...
    def resolve_channel(self, channel: str, exclude: Iterable[str] | None = None) -> Targets: ...
    def sweep(self, now_ns: int | None = None, max: int = 65536) -> array[int]:
        """Handles whose deadline (last_seen + stale_after) has passed, as ``array('Q')``: one
        buffer, not one int object per handle. O(expired) while few are due; one linear pass
        when many are."""
    def info(self, handle: int) -> ConnectionRow | None:
        """(connection_id, user_id, state, connected_at, last_seen, last_ping, msgs_in, msgs_out,
        bytes_in, bytes_out, native) or None for a stale handle."""
    def ids(self) -> list[str]: ...
    def users(self) -> dict[str, int]: ...
    def user_ids(self, user_id: str) -> list[str]: ...
    def user_count(self, user_id: str) -> int: ...
    def channels(self) -> dict[str, int]: ...
    def channel_ids(self, channel: str) -> list[str]: ...
    def stats(self) -> dict[str, object]:
        """total_connections, open_connections, total_users, total_channels, connections_by_user,
        total_connects, messages_sent, messages_received, bytes_sent, bytes_received,
        send_failures, sweep_heap_entries, native_connections, disconnects (reason -> count)."""

# ---- native engine (csrc/engine*.c, conn.c, frame.c, fanout.c, timer.c) -------------------

EV_TEXT: int
EV_BINARY: int
EV_DISCONNECT: int
EV_WRITE_PAUSED: int
EV_WRITE_RESUMED: int
EV_READ_PAUSED: int

class Engine:
    """The native plane's I/O thread (one per process; Linux only). Engine handles are ints
    ``(generation << 32) | slot``; a stale handle is refused (False / 0), never an error.
    Methods are thread-safe and only queue work for the I/O thread."""
    def __init__(self, *, ping_interval: float = 30.0, ping_timeout: float = 10.0,
                 max_message_size: int = 16 << 20, high_water: int = 1 << 20,
                 max_queue_bytes: int = 16 << 20, send_timeout: float = 5.0,
                 close_timeout: float = 2.0, read_limit: int = 1 << 20,
                 event_queue_limit: int = 64 << 20, compress_threshold: int = 256) -> None: ...
    @property
    def options(self) -> dict[str, float | int]: ...
    def register(self, fd: int, response: bytes = b"", data: bytes = b"", *, deflate: int = 0,
                 takeover: bool = False) -> int:
        """Takes a duplicate of fd; writes ``response`` (the 101) first and parses ``data`` as
        already received; ``deflate``: permessage-deflate was negotiated with that
        server_max_window_bits (8-15), 0 if not; ``takeover``: the peer keeps its inflate window
        between messages (server_no_context_takeover not answered), so fan-outs may reach it
        through a shared compression context. RuntimeError once the engine is stopped."""
    def send(self, handle: int, data: str | bytes) -> bool:
        """str → text frame, bytes-like → binary frame; same out-queue as the ASGI send."""
    def fanout(self, targets: Targets | Iterable[int], data: str | bytes) -> int:
        """One frame, encoded once, queued for every native receiver (GIL released); returns
        how many were alive."""
    def close(self, handle: int, code: int = 1000, reason: str = "", why: int = 0) -> bool:
        """Starts the closing handshake; ``why`` is the disconnect reason index (REASONS)."""
    def ack(self, handle: int, nbytes: int) -> None:
        """Inbound bytes the app consumed (reading resumes below read_limit / 2)."""
    def drain(self) -> list[tuple[int, int, object, int]]:
        """Events since the last call: (kind, handle, payload, nbytes). TEXT: str, BINARY: bytes,
        DISCONNECT: (code, reason, reason_name), flow-control kinds: None."""
    def fileno(self) -> int:
        """The eventfd that becomes readable when events are waiting."""
    def stats(self) -> dict[str, object]:
        """connections, total_connections, bytes_in/out, messages_in/out, frames_dropped,
        queued_bytes, pings_sent, write_syscalls, inbound_bytes, inbound_bound, read_pauses,
        event_queue_bytes, event_queue_pauses, message_charge, messages_deflated (compressed
        encodings made), messages_inflated (compressed messages received), deflate_shared
        (deliveries that took a fan-out's shared-context encoding), wslay_contexts (connections
        holding a wslay context now: only those with a frame or message in flight), disconnects
        (reason -> count), running."""
    def shutdown(self) -> None:
        """Closes every connection with 1012 and joins the I/O thread (idempotent)."""
