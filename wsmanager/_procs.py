"""Is this process one of several serving the same app? (Linux; elsewhere: "don't know").

A manager without a backend keeps its registry in its own process. Under a pre-fork server --
``uvicorn --workers N``, ``gunicorn -w N``, ``hypercorn --workers N``, ``granian --workers N`` --
each worker has its own manager, and nothing says so: a broadcast reaches the clients of one
worker, a user gets ``max_connections_per_user`` connections *per worker*, and ``get_stats()``
counts one worker. ``serving_processes()`` finds out, once per process at start-up.

How: every one of those servers binds the listening socket *once*, in the supervisor, and
hands the same socket to each worker (gunicorn and hypercorn by ``fork``, uvicorn and granian
by passing the descriptor to spawned children): the workers hold one open socket -- one inode
-- between them. So

1. this process's listening TCP sockets are its socket descriptors that ``SO_ACCEPTCONN``
   says listen, or that are bound and unconnected (uvicorn's workers listen on the socket
   their supervisor bound only after their lifespan start-up): a few ``fstat``/``getsockopt``
   calls on ``/proc/self/fd``;
2. the other serving processes are the *siblings* -- the other children of this process's
   parent (``/proc/<ppid>/task/*/children``) -- that hold one of those inodes. The supervisor
   itself holds the socket too but serves nothing, so it is not counted: ``gunicorn -w 1``
   and ``uvicorn --reload`` (supervisor + one worker) are one serving process;
3. a listening socket with ``SO_REUSEPORT`` may have twins bound separately by other
   processes (one socket per worker); for those, ``/proc/net/tcp*`` is read for the other
   listening inodes on the same port, and siblings holding one count too.

Why not the other signals: the supervisor's command line or ``WEB_CONCURRENCY`` miss
``uvicorn.run(workers=...)`` and gunicorn config files; "my parent is a uvicorn/gunicorn
arbiter" is also true with one worker; environment variables are not set by uvicorn's
supervisor. The shared inode is what makes several processes serve one port, whatever started
them. It is read when the manager starts (lifespan, or its first connection) and, if this
process looked alone, once more ``RECHECK_AFTER`` seconds later (a sibling started a moment
after it; a lone uvicorn binds only after its lifespan start-up) -- never per request.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable

__all__ = ["serving_processes", "schedule_check"]

_log = logging.getLogger("wsmanager")


def _socket_inodes(pid: str) -> set[int]:
    """Inodes of the sockets ``pid`` has open (readlink of /proc/<pid>/fd/*)."""
    inodes = set()
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"{base}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _own_listeners() -> dict[int, tuple[str, int, bool]]:
    """inode -> (host, port, SO_REUSEPORT) of this process's listening TCP sockets."""
    found: dict[int, tuple[str, int, bool]] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for name in names:
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:["):
                continue
            st = os.fstat(fd)
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            host, port = sock.getsockname()[:2]
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                # Bound but not listening yet (uvicorn's supervisor binds, each worker listens
                # after its lifespan start-up): a server socket too, unless it is connected.
                if not port or _connected(sock):
                    continue
            reuse = bool(sock.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_REUSEPORT", 15)))
            found[st.st_ino] = (host, port, reuse)
        except OSError:
            continue
        finally:
            sock.close()  # the duplicate only
    return found


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _siblings() -> list[str]:
    """The other children of this process's parent."""
    me, parent = str(os.getpid()), os.getppid()
    if parent <= 1:  # no supervisor (or it died): nobody to share with
        return []
    pids: set[str] = set()
    try:
        for tid in os.listdir(f"/proc/{parent}/task"):
            with open(f"/proc/{parent}/task/{tid}/children") as f:
                pids.update(f.read().split())
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: scan every process's parent
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == parent:
                        pids.add(pid)
            except (OSError, ValueError, IndexError):
                continue
    pids.discard(me)
    return sorted(pids)


def _listening_inodes_on(port: int) -> set[int]:
    """Inodes of every listening TCP socket on ``port`` (any process), from /proc/net/tcp*."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    # local_address is HEX_IP:HEX_PORT; state 0A is LISTEN; inode is field 9
                    if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                        inodes.add(int(fields[9]))
        except (OSError, ValueError):
            continue
    return inodes


def serving_processes() -> tuple[int, list[str]]:
    """(how many processes serve this process's listening sockets, counting this one; those
    addresses as "host:port"). (1, []) when this process listens on nothing (TestClient, a
    socket-activated server) or ``/proc`` cannot tell."""
    listeners = _own_listeners()
    if not listeners:
        return 1, []
    siblings = _siblings()
    if not siblings:
        return 1, _addresses(listeners.values())
    wanted = set(listeners)
    for host, port, reuse in listeners.values():
        if reuse:
            wanted |= _listening_inodes_on(port)
    sharing = sum(1 for pid in siblings if _socket_inodes(pid) & wanted)
    return 1 + sharing, _addresses(listeners.values())


def _addresses(listeners: Iterable[tuple[str, int, bool]]) -> list[str]:
    return sorted({f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p, _ in listeners})


# ---- the start-up warning ---------------------------------------------------------------------

#: True until a manager without a backend has started in this process (reset in a forked child).
check_due = True
#: A worker started a moment before its siblings may not see them yet, and a lone uvicorn binds
#: its socket after the lifespan start-up: a second look this many seconds later, when the first
#: found this process serving alone.
RECHECK_AFTER = 3.0


def _reset_after_fork() -> None:
    global check_due
    check_due = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def schedule_check(loop) -> None:
    """Called when a manager without a backend starts on ``loop``: looks (soon, off the
    caller's path) and warns once if several processes serve this app."""
    global check_due
    check_due = False
    loop.call_soon(_check, loop, True)


def _check(loop, first: bool) -> None:
    try:
        count, addresses = serving_processes()
    except Exception:  # noqa: BLE001 - a diagnosis must never break a server
        _log.debug("could not tell how many processes serve this app", exc_info=True)
        return
    _log.debug("%d process(es) serve %s", count, ", ".join(addresses) or "no listening socket of this process")
    if count > 1:
        warn_multiprocess(count, addresses)
    elif first and not loop.is_closed():
        # A sibling started a moment later, or (one uvicorn process) the socket is bound
        # only after the lifespan start-up: one more look.
        loop.call_later(RECHECK_AFTER, _check, loop, False)


def warn_multiprocess(count: int, addresses: list[str]) -> None:
    _log.warning(
        "wsmanager: %d processes serve this app (pid %d is one; they share the listening socket %s) "
        "and no backend is configured, so nothing spans them: broadcast(), send_to_user(), "
        "broadcast_to_channel(), send_message() and disconnect() reach only this process's "
        "connections, max_connections_per_user and max_connections are enforced per process, "
        "and get_stats() counts this process only. Set WSMANAGER_REDIS_URL=redis://HOST:6379/0 "
        "(or WebSocketManager(redis_url=...)) to share them across processes, or serve with "
        "one worker.", count, os.getpid(), ", ".join(addresses))
