"""Plain RESP sockets parsed by hiredis: the Redis backend's two hot paths (PUBLISH, SUBSCRIBE).

redis-py runs every command and every pub/sub message through its retry, timeout, telemetry and
dict-building layers; writing packed commands ourselves and draining every complete reply of a
read costs a fraction of that. Every process receives every envelope and publishes one per
cross-process delivery, so both ends matter. Used for ``redis://`` URLs when hiredis is
installed; everything else goes through redis-py.
"""
from __future__ import annotations

import asyncio
from typing import Any

from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

try:
    import hiredis
except ImportError:  # pragma: no cover - redis[hiredis] is the documented requirement
    hiredis = None

__all__ = ["hiredis", "pack_command", "RawConnection", "quiet_close", "READ_SIZE"]

#: Bytes asked of the socket per read; every complete reply in them is parsed at once.
READ_SIZE = 262144


def pack_command(*args: str | bytes) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RawConnection:
    """One TCP connection to Redis: a stream pair and a hiredis reader."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = hiredis.Reader()

    @classmethod
    async def open(cls, url: str, timeout: float, *commands: tuple[str, ...]
                   ) -> tuple["RawConnection", list[Any]]:
        """Connect, authenticate (credentials from the URL), send ``commands``; the connection
        and the replies to ``commands`` (not to AUTH). Closed again if anything fails."""
        params = parse_url(url)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            params.get("host") or "localhost", params.get("port") or 6379), timeout)
        conn = cls(reader, writer)
        password = params.get("password")
        if password is not None:
            user = params.get("username")
            auth = ("AUTH", user, password) if user else ("AUTH", password)
            commands = (auth, *commands)
        try:
            replies = []
            if commands:
                writer.write(b"".join(pack_command(*command) for command in commands))
                replies = await asyncio.wait_for(conn.read_replies(len(commands)), timeout)
        except BaseException:
            await conn.aclose()
            raise
        return conn, replies[1:] if password is not None else replies

    async def read_replies(self, n: int) -> list[Any]:
        """The next ``n`` replies; an error reply raises ResponseError, EOF a ConnectionError."""
        replies: list[Any] = []
        parser = self.parser
        while len(replies) < n:
            reply = parser.gets()
            if reply is False:
                chunk = await self.reader.read(READ_SIZE)
                if not chunk:
                    raise RedisConnectionError("Redis closed the connection")
                parser.feed(chunk)
            elif isinstance(reply, hiredis.ReplyError):
                raise ResponseError(str(reply))
            else:
                replies.append(reply)
        return replies

    async def aclose(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass


async def quiet_close(conn: Any) -> None:
    """Close a RawConnection or a redis-py PubSub, ignoring whatever a dead one raises."""
    try:
        await asyncio.wait_for(conn.aclose(), 1.0)
    except Exception:  # noqa: BLE001 - closing a dead connection
        pass
