"""permessage-deflate (RFC 7692) negotiation for the native plane: the one owner of its parameters.

:func:`negotiate` reads a request's ``Sec-WebSocket-Extensions`` values and returns what the
server agrees to (:class:`Agreement`: the response header's value and the window the client
takes for what the server sends), or None: no compression on that connection.

What the server answers:

* ``server_no_context_takeover`` only when the client offered it. Otherwise the client keeps its
  inflate window between messages (as every browser does by default), and that is what lets
  a broadcast be compressed once for all its receivers *with* context: the engine compresses a
  fan-out's messages in one shared stream per receiver set and sends that stream's encoding to
  every receiver whose client inflated exactly that stream so far (csrc/deflate.h, "Shared
  contexts"); the others get the message compressed on its own, which any client decodes. A
  client that asked for server_no_context_takeover only ever gets the latter
  (``Agreement.takeover`` False).
* ``client_no_context_takeover`` always: the server keeps no inflate state between a client's messages
  (7.1.1.2 allows it in any response); the engine's inflaters are pooled, held only while a
  compressed message is being received. Chromium accepts it in a response whatever the offer
  (its ``IsCompatibleWith`` needs no check for it), websockets' client too.
* ``server_max_window_bits=N`` only when the offer had it (7.1.2.1: the server must then answer
  a value no larger; N itself is answered). A message longer than 2^N bytes then goes plain to
  that client. ``client_max_window_bits`` is never answered: the engine inflates with a 15-bit
  window, which decodes every window the client may use, and 7.1.2.2 lets the server leave it out.

Offers are taken in the client's order, the first acceptable one wins (RFC 7692 5). An offer
is declined, and the next one considered, when RFC 7692 7.1 says a server must decline it: an
unknown parameter, a parameter given twice, a value where none is allowed or a bad one (window
bits are a decimal 8-15 without leading zeros; ``server_max_window_bits`` needs one). A header
that does not parse as RFC 6455 9.1's grammar declines every offer in it: the handshake goes on
without compression, as for a client that offered none (RFC 6455 9.1 says a server accepts the
extensions it supports and lists them; it does not require failing the handshake).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

__all__ = ["Agreement", "NAME", "negotiate", "parse_extensions", "Malformed"]

NAME = "permessage-deflate"

_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_OWS = " \t"
_WINDOW_BITS = {str(n): n for n in range(8, 16)}  # "08" or "8.0" are not values


class Malformed(ValueError):
    """A ``Sec-WebSocket-Extensions`` value that is not RFC 6455 9.1's grammar."""


@dataclass(frozen=True)
class Agreement:
    """What the server agreed to: ``response`` is the ``Sec-WebSocket-Extensions`` value of the
    101, ``window_bits`` the client's window for what the server sends (8-15), ``takeover``
    whether the client keeps that window between messages (it did not ask for
    server_no_context_takeover)."""

    response: bytes
    window_bits: int
    takeover: bool = True


Param = tuple[str, "str | None"]


class _Reader:
    """A cursor over one header value, by RFC 6455 9.1 (tokens, quoted strings, OWS)."""

    def __init__(self, text: str) -> None:
        self.s, self.i = text, 0

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in _OWS:
            self.i += 1

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def token(self) -> str:
        start = self.i
        while self.i < len(self.s) and self.s[self.i] in _TCHAR:
            self.i += 1
        if self.i == start:
            raise Malformed(f"a token expected at {start}")
        return self.s[start:self.i]

    def quoted(self) -> str:
        self.i += 1  # the opening quote
        out = []
        while self.i < len(self.s):
            ch = self.s[self.i]
            self.i += 1
            if ch == '"':
                value = "".join(out)
                # RFC 6455 9.1: after unescaping, a quoted value must be a token too
                if not value or any(c not in _TCHAR for c in value):
                    raise Malformed(f"quoted value {value!r} is not a token")
                return value
            if ch == "\\":
                if self.i == len(self.s):
                    break
                ch = self.s[self.i]
                self.i += 1
            out.append(ch)
        raise Malformed("unterminated quoted string")


def parse_extensions(values: Iterable[bytes]) -> list[tuple[str, list[Param]]]:
    """Every extension offered in the header's values, in order: ``(name, [(param, value or
    None)])``. Raises :class:`Malformed` when a value does not parse."""
    out: list[tuple[str, list[Param]]] = []
    for raw in values:
        r = _Reader(raw.decode("latin-1"))
        while True:
            r.ws()
            if r.peek() == ",":  # empty list elements are allowed (RFC 7230 7)
                r.i += 1
                continue
            if r.peek() == "":
                break
            name = r.token()
            params: list[Param] = []
            r.ws()
            while r.peek() == ";":
                r.i += 1
                r.ws()
                key = r.token()
                r.ws()
                value = None
                if r.peek() == "=":
                    r.i += 1
                    r.ws()
                    value = r.quoted() if r.peek() == '"' else r.token()
                    r.ws()
                params.append((key, value))
            out.append((name, params))
            if r.peek() not in (",", ""):
                raise Malformed(f"unexpected {r.peek()!r} at {r.i}")
    return out


def _accept(params: list[Param]) -> Agreement | None:
    """The agreement for one offer, or None when RFC 7692 7.1 says to decline it."""
    seen: dict[str, str | None] = {}
    for key, value in params:
        key = key.lower()
        if key in seen:
            return None  # a parameter twice
        seen[key] = value
        if key in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return None
        elif key == "server_max_window_bits":
            if value not in _WINDOW_BITS:  # a value is required, 8-15
                return None
        elif key == "client_max_window_bits":
            if value is not None and value not in _WINDOW_BITS:
                return None
        else:
            return None  # not a parameter of this extension
    takeover = "server_no_context_takeover" not in seen
    response = NAME + ("" if takeover else "; server_no_context_takeover") + "; client_no_context_takeover"
    bits = 15
    if "server_max_window_bits" in seen:
        bits = _WINDOW_BITS[seen["server_max_window_bits"]]  # type: ignore[index]
        response += f"; server_max_window_bits={bits}"
    return Agreement(response.encode("ascii"), bits, takeover)


def negotiate(values: Iterable[bytes]) -> Agreement | None:
    """The first acceptable permessage-deflate offer among a request's
    ``Sec-WebSocket-Extensions`` values, or None (none offered, none acceptable, or a header
    that does not parse)."""
    try:
        offers = parse_extensions(values)
    except Malformed:
        return None
    for name, params in offers:
        if name.lower() == NAME:
            agreement = _accept(params)
            if agreement is not None:
                return agreement
    return None
