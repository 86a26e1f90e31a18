"""The call signaling example (seed 004) on a real uvicorn: a full offer/answer/ICE exchange
between two users, a call to an offline user, bad input, and a peer vanishing mid-call."""
from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
import websockets

from tests.conftest import UVICORN_SERVER_PLANES
from tests.servers import AppServer

TIMEOUT = 5


@pytest.fixture(scope="module", params=UVICORN_SERVER_PLANES)
def server(request, tmp_path_factory):
    log = tmp_path_factory.mktemp("signaling") / "server.log"
    with AppServer("examples.signaling.app:app", request.param, log_path=log, graceful=2,
                   own_session=True) as s:
        yield s
        assert s.proc.poll() is None, "the server died:\n" + s.log_tail()


class Peer:
    def __init__(self, ws, user_id):
        self.ws = ws
        self.user_id = user_id

    async def send(self, **message):
        await self.ws.send(json.dumps(message))

    async def recv(self):
        return json.loads(await asyncio.wait_for(self.ws.recv(), TIMEOUT))

    async def alive(self):
        await self.send(type="ping")
        assert (await self.recv())["type"] == "pong"


async def connect(server, user_id) -> Peer:
    ws = await websockets.connect(server.ws_url(f"/ws?user_id={user_id}"), open_timeout=TIMEOUT)
    peer = Peer(ws, user_id)
    greeting = await peer.recv()
    assert greeting["type"] == "connection_established"
    assert greeting.get("user_id") == user_id
    return peer


async def test_full_call_with_offer_answer_and_ice(server):
    alice, bob = await connect(server, "alice"), await connect(server, "bob")
    try:
        await alice.send(type="call_incoming", target_user_id="bob", call_id="c1", media="video")
        ring = await bob.recv()
        assert ring == {"type": "call_incoming", "target_user_id": "bob", "from_user_id": "alice",
                        "call_id": "c1", "media": "video"}

        await bob.send(type="call_accepted", target_user_id="alice", call_id="c1")
        assert (await alice.recv())["type"] == "call_accepted"

        offer = {"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n" + "a=x\r\n" * 200}
        await alice.send(type="webrtc_offer", target_user_id="bob", call_id="c1", sdp=offer)
        got = await bob.recv()
        assert got["type"] == "webrtc_offer" and got["sdp"] == offer and got["from_user_id"] == "alice"

        answer = {"type": "answer", "sdp": "v=0\r\no=- 3 4 IN IP4 127.0.0.1\r\n"}
        await bob.send(type="webrtc_answer", target_user_id="alice", call_id="c1", sdp=answer)
        got = await alice.recv()
        assert got["type"] == "webrtc_answer" and got["sdp"] == answer and got["from_user_id"] == "bob"

        candidates = [{"candidate": f"candidate:{i} 1 udp 2122260223 127.0.0.1 {50000 + i} typ host",
                       "sdpMid": "0", "sdpMLineIndex": 0} for i in range(3)]
        for c in candidates:
            await alice.send(type="webrtc_ice_candidate", target_user_id="bob", call_id="c1",
                             candidate=c)
        await bob.send(type="webrtc_ice_candidate", target_user_id="alice", call_id="c1",
                       candidate=candidates[0])
        assert [(await bob.recv())["candidate"] for _ in candidates] == candidates  # in order
        assert (await alice.recv())["candidate"] == candidates[0]

        await alice.send(type="call_ended", target_user_id="bob", call_id="c1")
        ended = await bob.recv()
        assert ended["type"] == "call_ended" and ended["from_user_id"] == "alice"
    finally:
        await alice.ws.close()
        await bob.ws.close()


async def test_call_rejected_reaches_the_caller(server):
    alice, bob = await connect(server, "alice2"), await connect(server, "bob2")
    try:
        await alice.send(type="call_incoming", target_user_id="bob2", call_id="c2")
        await bob.recv()
        await bob.send(type="call_rejected", target_user_id="alice2", call_id="c2", reason="busy")
        got = await alice.recv()
        assert (got["type"], got["reason"], got["from_user_id"]) == ("call_rejected", "busy", "bob2")
    finally:
        await alice.ws.close()
        await bob.ws.close()


async def test_calling_an_offline_user_is_an_error_to_the_caller(server):
    alice = await connect(server, "alice3")
    try:
        await alice.send(type="call_incoming", target_user_id="carol", call_id="c3")
        error = await alice.recv()
        assert error["type"] == "error"
        assert error["error"] == "user_offline"
        assert error["target_user_id"] == "carol"
        assert error["original_type"] == "call_incoming"
        await alice.send(type="webrtc_offer", target_user_id="carol", sdp={})
        assert (await alice.recv())["error"] == "user_offline"
        await alice.alive()
    finally:
        await alice.ws.close()


async def test_bad_messages_get_errors_and_the_connection_lives_on(server):
    alice = await connect(server, "alice4")
    try:
        await alice.ws.send("{not json")
        assert (await alice.recv())["error"] == "bad_request"
        await alice.ws.send("[1, 2]")
        assert (await alice.recv())["error"] == "bad_request"
        await alice.ws.send(b"\x00\x01")
        assert (await alice.recv())["error"] == "bad_request"
        await alice.send(type="webrtc_offer", sdp={})
        assert (await alice.recv())["error"] == "missing_target"
        await alice.send(type="teleport", target_user_id="bob")
        assert (await alice.recv())["error"] == "unknown_type"
        await alice.alive()
    finally:
        await alice.ws.close()
    with urllib.request.urlopen(server.url("/healthz"), timeout=TIMEOUT) as response:
        assert response.status == 200


async def test_peer_vanishing_mid_call_ends_the_call(server):
    alice, bob = await connect(server, "alice5"), await connect(server, "bob5")
    try:
        await alice.send(type="call_incoming", target_user_id="bob5", call_id="c5")
        await bob.recv()
        await bob.send(type="call_accepted", target_user_id="alice5", call_id="c5")
        await alice.recv()
        bob.ws.transport.abort()  # no close frame: the way a crashed tab goes
        ended = await alice.recv()
        assert ended == {"type": "call_ended", "from_user_id": "bob5", "target_user_id": "alice5",
                         "reason": "peer_disconnected"}
    finally:
        await alice.ws.close()


async def test_a_connection_without_a_user_is_refused(server):
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(server.ws_url("/ws"), open_timeout=TIMEOUT)
    assert refused.value.response.status_code == 403
