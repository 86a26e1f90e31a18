"""permessage-deflate (RFC 7692) on the native plane: the negotiation (wsmanager/_deflate.py),
the handshake's answer, and the engine's compression (csrc/deflate.c) against a real server on
127.0.0.1: round trips with the websockets client, a broadcast compressed once for deflate and
plain receivers, a deflate bomb (1009, bounded memory), invalid UTF-8 after inflate (1007), RSV1
where it is not allowed (1002)."""
from __future__ import annotations

import contextlib
import time
import zlib
from typing import Any

import pytest

from tests.deflate_support import payload
from tests.native_support import RawClient, frame
from tests.servers import AppServer, native_available
from wsmanager import _deflate

APP = "tests.deflate_support:app"
OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
RESPONSE = b"permessage-deflate; client_no_context_takeover"  # to an offer without server_no_...
NO_TAKEOVER = "permessage-deflate; server_no_context_takeover"


# ---- negotiation: every parameter, with and without values, malformed offers -----------------

def agree(*values: str) -> _deflate.Agreement | None:
    return _deflate.negotiate([v.encode("latin-1") for v in values])


@pytest.mark.parametrize("offer, bits, extra", [
    ("permessage-deflate", 15, b""),
    ("permessage-deflate; server_no_context_takeover", 15, b""),
    ("permessage-deflate; client_no_context_takeover", 15, b""),
    ("permessage-deflate; client_max_window_bits", 15, b""),
    ("permessage-deflate; client_max_window_bits=10", 15, b""),
    ("permessage-deflate; client_max_window_bits=\"12\"", 15, b""),
    ("permessage-deflate; server_max_window_bits=8", 8, b"; server_max_window_bits=8"),
    ("permessage-deflate; server_max_window_bits=15", 15, b"; server_max_window_bits=15"),
    ("permessage-deflate; server_max_window_bits=\"11\"", 11, b"; server_max_window_bits=11"),
    ("Permessage-Deflate;Server_No_Context_Takeover ; client_no_context_takeover ;"
     "server_max_window_bits = 9;client_max_window_bits=9", 9, b"; server_max_window_bits=9"),
])
def test_every_parameter_is_accepted_and_answered(offer: str, bits: int, extra: bytes) -> None:
    a = agree(offer)
    assert a is not None
    # client_no_context_takeover always; server_no_context_takeover when the client asked for it
    takeover = "server_no_context_takeover" not in offer.lower()
    want = b"permessage-deflate" + (b"" if takeover else b"; server_no_context_takeover")
    assert a.response == want + b"; client_no_context_takeover" + extra
    assert a.window_bits == bits and a.takeover is takeover


@pytest.mark.parametrize("offer", [
    "permessage-deflate; server_no_context_takeover=1",    # no value allowed
    "permessage-deflate; client_no_context_takeover=yes",
    "permessage-deflate; server_max_window_bits",           # a value is required
    "permessage-deflate; server_max_window_bits=7",         # 8-15
    "permessage-deflate; server_max_window_bits=16",
    "permessage-deflate; server_max_window_bits=08",        # no leading zero
    "permessage-deflate; client_max_window_bits=0",
    "permessage-deflate; client_max_window_bits=abc",
    "permessage-deflate; server_no_context_takeover; server_no_context_takeover",  # twice
    "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
    "permessage-deflate; unknown_parameter",
    "permessage-deflate; x=1",
])
def test_an_offer_rfc_7692_says_to_decline_is_declined(offer: str) -> None:
    assert agree(offer) is None


def test_the_first_acceptable_offer_wins() -> None:
    a = agree("x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=20, "
              "permessage-deflate; server_max_window_bits=10, permessage-deflate")
    assert a is not None and a.window_bits == 10
    # offers split over several header lines are one list
    a = agree("permessage-deflate; bogus", "permessage-deflate; server_max_window_bits=12")
    assert a is not None and a.window_bits == 12
    assert agree("permessage-deflate; server_max_window_bits=9, permessage-deflate").window_bits == 9
    assert agree() is None and agree("") is None and agree("x-other; a=1") is None


@pytest.mark.parametrize("header", [
    "permessage-deflate; server_max_window_bits=\"10",     # unterminated quoted string
    "permessage-deflate; client_max_window_bits=\"1 0\"",  # quoted value not a token
    "permessage-deflate server_no_context_takeover",       # a space is not a separator
    "permessage-deflate; =10",
    "permessage-deflate;; client_no_context_takeover",
    "permessage-deflate, ;",
    "perm\u00e9ssage-deflate",
])
def test_a_header_that_does_not_parse_declines_the_extension(header: str) -> None:
    with pytest.raises(_deflate.Malformed):
        _deflate.parse_extensions([header.encode("latin-1")])
    assert agree(header) is None
    # the handshake itself goes on without compression (tested against the server below)


def test_parse_extensions_keeps_order_and_values() -> None:
    got = _deflate.parse_extensions([b"a; b=1; c=\"d\", , e", b"f;g"])
    assert got == [("a", [("b", "1"), ("c", "d")]), ("e", []), ("f", [("g", None)])]


# ---- against a server ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def server() -> Any:
    if not native_available():
        pytest.skip("the native plane is not built")
    with AppServer(APP, "native", env={"WSMANAGER_MAX_MESSAGE_SIZE": str(1 << 20)}) as srv:
        yield srv


def stats(srv: AppServer) -> dict[str, Any]:
    return srv.get("/stats")


def port(srv: AppServer) -> int:
    assert srv.port is not None
    return srv.port


def peak_rss_kib(srv: AppServer) -> int:
    with open(f"/proc/{srv.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def settled(srv: AppServer, key: str, want: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = stats(srv)[key]
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def deflate_raw(data: bytes, level: int = 6) -> bytes:
    """A message's compressed payload as a client sends it (RFC 7692 7.2.1)."""
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate_raw(data: bytes, window: Any = None) -> bytes:
    """A compressed payload the server sent, as a client inflates it: on its own, or with the
    client's window kept from message to message (``window``: its zlib decompressobj)."""
    return (window or zlib.decompressobj(-15)).decompress(data + b"\x00\x00\xff\xff")


def test_the_101_answers_the_agreed_parameters(server: AppServer) -> None:
    c = RawClient(port(server), headers={"Sec-WebSocket-Extensions":
                                         "permessage-deflate; server_max_window_bits=10"})
    assert c.status == 101
    assert c.header("Sec-WebSocket-Extensions") == (RESPONSE + b"; server_max_window_bits=10").decode()
    c.close()
    for header in ("permessage-deflate; server_max_window_bits", "permessage-deflate; a=\"b",
                   None):
        c = RawClient(port(server), headers={"Sec-WebSocket-Extensions": header})
        assert c.status == 101  # declined, not failed
        assert c.header("Sec-WebSocket-Extensions") is None
        c.close()


def test_text_and_binary_round_trips_with_websockets(server: AppServer) -> None:
    from websockets.sync.client import connect

    before = stats(server)
    with connect(server.ws_url("/ws"), max_size=None) as ws:
        assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]
        ext = ws.protocol.extensions[0]
        # the client inflates with its window kept; the server keeps no inflate state
        assert not ext.remote_no_context_takeover and ext.local_no_context_takeover
        for msg in ("", "é", "x" * 100, "chat " * 140, "snapshot " * 1000, "z" * (1 << 20)):
            ws.send(msg)
            assert ws.recv() == msg
        for msg in (b"", b"\x00\xff" * 100, bytes(range(256)) * 40, b"\x00" * (1 << 20)):
            ws.send(msg)
            assert ws.recv() == msg
    after = stats(server)
    assert after["messages_inflated"] - before["messages_inflated"] == 10  # websockets compresses all
    # the 5 of 256 B and more went compressed; the empty, 1-2, 100 and 200 byte ones did not
    assert after["messages_deflated"] - before["messages_deflated"] == 5


def test_a_broadcast_is_compressed_once_for_every_deflate_receiver(server: AppServer) -> None:
    from websockets.sync.client import connect

    stack = contextlib.ExitStack()
    clients = [stack.enter_context(connect(server.ws_url("/ws"),
                                           compression="deflate" if i % 2 else None))
               for i in range(6)]
    raw = RawClient(port(server), headers=OFFER)  # sees the frames as they are on the wire
    window = zlib.decompressobj(-15)  # raw's, kept: it did not ask for server_no_context_takeover
    plain = RawClient(port(server))
    with stack:
        for n, kind in ((9000, "text"), (700, "binary"), (100, "text")):
            before = stats(server)["messages_deflated"]
            clients[0].send(f"fanout:{n}:{kind}")
            want = payload(n, kind)
            for ws in clients:
                assert ws.recv(timeout=5) == want
            op, data = raw.recv_data()
            if n >= 256:
                assert raw.last_rsv == 4 and len(data) < n / 2
                assert inflate_raw(data, window) == (
                    want.encode() if kind == "text" else want)
            else:
                assert raw.last_rsv == 0 and len(data) == n  # under the threshold: plain
            op, data = plain.recv_data()
            assert plain.last_rsv == 0 and data == (want.encode() if kind == "text" else want)
            # deflate ran once for the 3 deflate clients and the raw one (the receiver set's
            # shared context: all of them are in sync), or not at all
            assert settled(server, "messages_deflated", before + (n >= 256)) == before + (n >= 256)
        raw.close()
        plain.close()


def test_broadcasts_share_a_context_with_every_receiver_in_sync(server: AppServer) -> None:
    """A receiver set's broadcasts go through one shared context (csrc/deflate.h): a message
    like the previous one costs a few bytes to every receiver in sync; a receiver that took a
    direct compressed message in between, or asked for server_no_context_takeover, gets it
    compressed on its own; every real client decodes every message."""
    from websockets.sync.client import connect

    stack = contextlib.ExitStack()
    with stack:
        clients = [stack.enter_context(connect(server.ws_url("/ws"), max_size=None)) for _ in range(3)]
        keeps = RawClient(port(server), headers=OFFER)  # keeps its window, like the three
        window = zlib.decompressobj(-15)
        alone = RawClient(port(server), headers={"Sec-WebSocket-Extensions": NO_TAKEOVER})
        assert alone.header("Sec-WebSocket-Extensions") == NO_TAKEOVER + "; client_no_context_takeover"
        stack.callback(keeps.close)
        stack.callback(alone.close)
        want = payload(700)
        sizes: dict[str, list[int]] = {"keeps": [], "alone": []}
        for i in range(5):
            if i == 2:  # a direct compressed message: client 0's window leaves the stream
                clients[0].send("direct " * 300)
                assert clients[0].recv(timeout=5) == "direct " * 300
            before = stats(server)["messages_deflated"]
            clients[1].send("fanout:700:text")
            for ws in clients:
                assert ws.recv(timeout=5) == want  # websockets inflates with its kept window
            op, data = keeps.recv_data()
            assert keeps.last_rsv == 4 and inflate_raw(data, window) == want.encode()
            sizes["keeps"].append(len(data))
            op, data = alone.recv_data()
            assert alone.last_rsv == 4 and inflate_raw(data) == want.encode()  # on its own
            sizes["alone"].append(len(data))
            # the keyframe serves both kinds; then the stream's encoding and the lone one
            assert settled(server, "messages_deflated", before + (1 if i == 0 else 2)) == \
                before + (1 if i == 0 else 2)
        assert sizes["keeps"][0] == sizes["alone"][0]  # the first is the same bytes for all
        # the same 700 bytes again: a back-reference of a few bytes, against ~300 on its own
        assert all(k < 30 for k in sizes["keeps"][1:]), sizes
        assert all(a == sizes["alone"][0] for a in sizes["alone"]), sizes


def test_a_room_gets_its_shared_context_back_after_a_visitor(server: AppServer) -> None:
    """Three clients share a set's stream; a fourth joins for one broadcast (a new set: its
    stream, which the three then follow) and leaves: the room's own stream, which no member
    follows any more, starts afresh after the next broadcast and they share it again (it once
    never started again: every later broadcast went compressed on its own)."""
    from websockets.sync.client import connect

    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(server.ws_url("/ws"), max_size=None)) for _ in range(3)]

        def broadcasts(n: int, extra: list[Any] = ()) -> int:
            before = stats(server)["deflate_shared"]
            for _ in range(n):
                clients[0].send("fanout:700:text")
                for ws in (*clients, *extra):
                    assert ws.recv(timeout=5) == payload(700)
            return settled(server, "deflate_shared", before + n * (3 + len(extra))) - before

        assert broadcasts(10) == 30
        with connect(server.ws_url("/ws"), max_size=None) as visitor:
            assert broadcasts(1, [visitor]) == 4
        deadline = time.monotonic() + 5
        while stats(server)["connections"] > 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        # the first goes to the three compressed on its own (they follow the visited set's
        # stream, not the room's), which starts the room's stream afresh: the rest is shared
        assert broadcasts(30) == 29 * 3


def test_a_smaller_window_gets_long_messages_plain(server: AppServer) -> None:
    c = RawClient(port(server), headers={"Sec-WebSocket-Extensions":
                                         "permessage-deflate; server_max_window_bits=9"})
    for n, rsv in ((400, 4), (600, 0)):  # 2^9 = 512
        c.send(frame(1, f"fanout:{n}:text".encode()))
        op, data = c.recv_data()
        assert c.last_rsv == rsv
    c.close()


def test_a_deflate_bomb_gets_1009_with_bounded_memory(server: AppServer) -> None:
    bomb = deflate_raw(b"\x00" * (128 << 20), level=9)  # 128 MiB in about 125 KiB
    assert len(bomb) < 150_000
    hwm = peak_rss_kib(server)
    c = RawClient(port(server), headers=OFFER, timeout=20)
    c.send(frame(2, bomb, rsv=4))
    code, _ = c.expect_close()
    assert code == 1009
    assert c.at_eof()
    assert settled(server, "inbound_bytes", 0) < 64 * 1024
    # the server's peak RSS never saw the 128 MiB: at most max_message_size (1 MiB) and change
    assert peak_rss_kib(server) - hwm < 16 * 1024, "peak RSS grew by more than 16 MiB"
    # and a bomb in many small frames, watched while it is being sent
    c = RawClient(port(server), headers=OFFER, timeout=20)
    c.send(frame(2, bomb[:1000], fin=False, rsv=4))
    seen = 0
    for i in range(1000, len(bomb), 4000):
        c.send(frame(0, bomb[i:i + 4000], fin=i + 4000 >= len(bomb)))
        if i % 40000 == 1000:
            seen = max(seen, stats(server)["inbound_bytes"])
    assert c.expect_close()[0] == 1009
    assert seen <= (1 << 20) + 64 * 1024 + 64 * 1024  # the reassembly buffer + an inflater
    # at exactly the limit a compressed message is delivered
    ok = RawClient(port(server), headers=OFFER)
    ok.send(frame(2, deflate_raw(b"\x01" * (1 << 20)), rsv=4))
    op, data = ok.recv_data()
    assert ok.last_rsv == 4 and inflate_raw(data) == b"\x01" * (1 << 20)
    ok.send(frame(2, deflate_raw(b"\x01" * ((1 << 20) + 1)), rsv=4))
    assert ok.expect_close()[0] == 1009
    ok.close()


def test_a_fragmented_compressed_message_and_its_window(server: AppServer) -> None:
    c = RawClient(port(server), headers=OFFER)
    body = ("fragmented " * 500).encode()
    z = deflate_raw(body)
    parts = [z[:10], z[10:11], z[11:200], z[200:]]
    c.send(frame(1, parts[0], fin=False, rsv=4))
    c.send(frame(9, b"ping"))  # a control frame between fragments
    for p in parts[1:-1]:
        c.send(frame(0, p, fin=False))
    c.send(frame(0, parts[-1]))
    while True:
        op, data = c.recv_data()
        if op == 1:
            break
    assert inflate_raw(data) == body
    # a message ending its DEFLATE stream (BFINAL), then a plain one, on the same connection
    fin = zlib.compressobj(6, zlib.DEFLATED, -15)
    c.send(frame(1, fin.compress(b"final block") + fin.flush(zlib.Z_FINISH), rsv=4))
    assert c.recv_data() == (1, b"final block")
    c.send(frame(1, b"plain too"))
    assert c.recv_data() == (1, b"plain too")
    c.close()


@pytest.mark.parametrize("name, frames, code", [
    ("invalid UTF-8 after inflate", [frame(1, deflate_raw(b"ok \xff\xfe"), rsv=4)], 1007),
    ("UTF-8 cut at the message's end", [frame(1, deflate_raw("é".encode()[:1]), rsv=4)], 1007),
    ("not a DEFLATE stream", [frame(2, b"\xff\xff\xff\xff\xff", rsv=4)], 1007),
    ("RSV1 on a continuation frame", [frame(1, deflate_raw(b"a"), fin=False, rsv=4),
                                      frame(0, deflate_raw(b"b"), rsv=4)], 1002),
    ("RSV1 on a ping", [frame(9, b"p", rsv=4)], 1002),
    ("RSV2", [frame(1, b"a", rsv=2)], 1002),
])
def test_bad_compressed_frames_have_their_close_code(server: AppServer, name: str,
                                                     frames: list[bytes], code: int) -> None:
    c = RawClient(port(server), headers=OFFER)
    c.send(b"".join(frames))
    assert c.expect_close()[0] == code, name
    c.close()


def test_rsv1_without_negotiation_is_1002(server: AppServer) -> None:
    c = RawClient(port(server))  # offers nothing
    assert c.header("Sec-WebSocket-Extensions") is None
    c.send(frame(1, deflate_raw(b"hello"), rsv=4))
    assert c.expect_close()[0] == 1002
    c.close()


@pytest.mark.parametrize("env, extra", [
    ({"WSMANAGER_PER_MESSAGE_DEFLATE": "0"}, []),
    ({}, ["--ws-per-message-deflate", "false"]),
])
def test_it_can_be_turned_off(env: dict[str, str], extra: list[str]) -> None:
    if not native_available():
        pytest.skip("the native plane is not built")
    with AppServer(APP, "native", env=env, extra=extra) as srv:
        c = RawClient(port(srv), headers=OFFER)
        assert c.status == 101 and c.header("Sec-WebSocket-Extensions") is None
        c.send(frame(1, deflate_raw(b"hello"), rsv=4))
        assert c.expect_close()[0] == 1002
        c.close()


def test_the_variable_wins_over_uvicorns_flag_and_sets_the_threshold() -> None:
    if not native_available():
        pytest.skip("the native plane is not built")
    env = {"WSMANAGER_PER_MESSAGE_DEFLATE": "1", "WSMANAGER_COMPRESS_THRESHOLD": "0"}
    with AppServer(APP, "native", env=env, extra=["--ws-per-message-deflate", "false"]) as srv:
        c = RawClient(port(srv), headers=OFFER)
        assert c.header("Sec-WebSocket-Extensions") == RESPONSE.decode()
        c.send(frame(1, b"fanout:40:text"))
        op, data = c.recv_data()
        assert c.last_rsv == 4  # threshold 0: 40 bytes of JSON-like text got smaller
        c.close()
