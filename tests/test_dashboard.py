"""The dashboard example (examples/dashboard/: the detached shape, ``ws_manager.serve``).

Part 1 under Starlette's TestClient: the HTTP routes and their token check, the WebSocket's
dependency, a subscribe / ``POST /notify`` round trip, the producer's snapshots, the presence
from the hooks, and that the app leaves the shared ``ws_manager`` as it found it. Part 2 on real
servers on 127.0.0.1 (stock uvicorn, and ``python -m wsmanager``: the native plane, where the
endpoint returns at once): a POST reaches the subscribed pages only, the snapshots tick, the
online count follows connects and disconnects. Part 3 in a headless Chromium (as
tests/test_browser.py): a phone and a desktop open the page, see the metrics tick and the
online count, post through the form, see the notification arrive (or not, unsubscribed), and
leave a screenshot each in the test's tmp dir.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from examples.dashboard import app as dashboard
from tests.conftest import UVICORN_SERVER_PLANES, unless_installed
from tests.servers import AppServer, native_available
from wsmanager import ws_manager

TOKEN = dashboard.TOKEN  # the token of the in-process app (the development token)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SERVER_TOKEN = "dashboard-test-token"
WAIT = 10.0


def skip_to(ws: Any, kind: str, **match: Any) -> dict:
    """The next message of ``kind`` (with the fields of ``match``), skipping the others (a
    presence message or a snapshot may come in between). TestClient's receive has no timeout:
    the tests' timeout marks bound it."""
    while True:
        msg = ws.receive_json() if hasattr(ws, "receive_json") else json.loads(ws.recv(timeout=WAIT))
        if msg.get("type") == kind and all(msg.get(k) == v for k, v in match.items()):
            return msg


def subscribe(ws: Any, *topics: str) -> None:
    send = ws.send_json if hasattr(ws, "send_json") else (lambda m: ws.send(json.dumps(m)))
    for topic in topics:
        send({"type": "subscribe", "topic": topic})
        skip_to(ws, "subscribed", topic=topic)


# ================================================================== part 1: TestClient

@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("DASHBOARD_INTERVAL", "0.1")
    with TestClient(dashboard.app) as c:
        yield c


def ws_path(name: str, token: str | None = TOKEN) -> str:
    return f"/ws?name={name}" + (f"&token={token}" if token is not None else "")


def test_page_and_client_script(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('src="/wsmanager/wsmanager.js"', 'id="notify-form"', 'id="metrics"',
                   'id="notifications"', 'id="online-count"', 'name="viewport"'):
        assert needle in page.text, needle
    assert client.get("/wsmanager/wsmanager.js").status_code == 200


def test_token_check(client):
    assert client.get("/api/topics").status_code == 401
    assert client.get("/api/topics", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.get("/api/topics", headers=AUTH).json() == {
        "topics": list(dashboard.TOPICS), "metrics": "metrics", "interval": 0.1}
    note = {"topic": "alerts", "message": "hi"}
    missing = client.post("/notify", json=note)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert client.post("/notify", json=note, headers={"Authorization": "Bearer nope"}).status_code == 403


@pytest.mark.parametrize("body, status", [
    ({"topic": "nope", "message": "x"}, 404),
    ({"topic": "metrics", "message": "x"}, 404),  # the producer's channel: not for posts
    ({"topic": "alerts", "message": ""}, 422),
    ({"topic": "alerts", "message": "   "}, 422),
    ({"topic": "alerts", "message": "x" * 501}, 422),
    ({"topic": "alerts", "message": "x", "level": "panic"}, 422),
    ({"message": "x"}, 422),
])
def test_notify_rejects(client, body, status):
    assert client.post("/notify", json=body, headers=AUTH).status_code == status


def test_notify_without_subscribers(client):
    answer = client.post("/notify", json={"topic": "general", "message": "anyone?"}, headers=AUTH)
    assert answer.status_code == 200
    assert answer.json()["delivered"] == 0 and answer.json()["topic"] == "general"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("path", [ws_path("alice", None), ws_path("alice", "nope"),
                                  ws_path("no spaces"), "/ws?token=" + TOKEN])
def test_socket_refused_without_credentials(client, path):
    with pytest.raises(WebSocketDisconnect) as refused:
        with client.websocket_connect(path) as ws:
            ws.receive_json()
    assert refused.value.code == 1008
    assert ws_manager.get_stats()["total_connections"] == 0


@pytest.mark.timeout(20)
def test_subscribe_notify_round_trip(client):
    with client.websocket_connect(ws_path("alice")) as alice, \
         client.websocket_connect(ws_path("bob")) as bob:
        hello = skip_to(alice, "hello")
        assert hello["user"] == "alice" and hello["interval"] == 0.1
        subscribe(alice, "alerts", "deploys")
        subscribe(bob, "deploys")

        sent = client.post("/notify", json={"topic": "alerts", "message": " disk 91% ",
                                            "level": "warning", "source": "ci"}, headers=AUTH).json()
        assert sent["delivered"] == 1
        got = skip_to(alice, "notification")
        assert {k: got[k] for k in ("id", "topic", "level", "message", "source")} == {
            "id": sent["id"], "topic": "alerts", "level": "warning", "message": "disk 91%", "source": "ci"}
        assert abs(got["ts"] - time.time()) < 5

        sent = client.post("/notify", json={"topic": "deploys", "message": "v2 is out"}, headers=AUTH).json()
        assert sent["delivered"] == 2
        for ws in (alice, bob):  # bob's first notification: he never got the alert
            got = skip_to(ws, "notification")
            assert (got["id"], got["level"], got["source"]) == (sent["id"], "info", None)

        alice.send_json({"type": "unsubscribe", "topic": "alerts"})
        skip_to(alice, "unsubscribed", topic="alerts")
        assert client.post("/notify", json={"topic": "alerts", "message": "x"},
                           headers=AUTH).json()["delivered"] == 0

        # Bad messages are answered; the connection goes on.
        for message, error in (({"type": "subscribe", "topic": "nope"}, "unknown_topic"),
                               ({"type": "join", "channel": "alerts"}, "unknown_type"),
                               ([1, 2], "bad_request")):
            alice.send_json(message)
            assert skip_to(alice, "error")["error"] == error
        subscribe(alice, "general")
        assert sorted(ws_manager.get_stats()["channels"]) == ["deploys", "general"]  # alerts: none left


@pytest.mark.timeout(20)
def test_metrics_snapshots_and_presence(client):
    with client.websocket_connect(ws_path("alice")) as alice:
        subscribe(alice, "metrics", "alerts")
        seen = skip_to(alice, "presence", subscribers={"alerts": 1, "deploys": 0, "general": 0,
                                                       "metrics": 1})
        assert (seen["online"], seen["users"], seen["connections"]) == (1, ["alice"], 1)
        first = skip_to(alice, "metrics")
        second = skip_to(alice, "metrics")
        assert second["seq"] == first["seq"] + 1 and second["ts"] >= first["ts"]
        assert first["connections"] == 1 and first["users"] == 1
        for key in ("messages_sent", "messages_received", "bytes_sent", "bytes_received",
                    "uptime_seconds", "notifications", "lag_ms"):
            assert isinstance(first[key], (int, float)), key
        client.post("/notify", json={"topic": "alerts", "message": "x"}, headers=AUTH)
        counted = skip_to(alice, "metrics")
        while counted["notifications"] != first["notifications"] + 1:
            counted = skip_to(alice, "metrics")

        with client.websocket_connect(ws_path("bob")) as bob:
            seen = skip_to(alice, "presence", online=2)
            assert seen["users"] == ["alice", "bob"] and seen["connections"] == 2
            skip_to(bob, "presence", online=2)
            subscribe(bob, "alerts")
            assert skip_to(alice, "presence", subscribers={"alerts": 2, "deploys": 0,
                                                           "general": 0, "metrics": 1})
        # bob's page closed: the disconnect hook's presence says so
        seen = skip_to(alice, "presence", online=1)
        assert seen["subscribers"]["alerts"] == 1 and seen["connections"] == 1


def test_the_shared_manager_is_left_as_found(monkeypatch):
    """The hooks live as long as the app's lifespan: importing the module (this test module
    does, next to the other apps of the suite on the same ws_manager) registers nothing."""
    monkeypatch.setenv("DASHBOARD_INTERVAL", "0.1")
    assert not ws_manager.remove_hook(dashboard.greet)
    with TestClient(dashboard.app):
        pass
    assert not ws_manager.remove_hook(dashboard.greet)
    assert not ws_manager.remove_hook(dashboard.membership_changed)
    with TestClient(dashboard.app) as again:  # and it starts again (new hooks, new producer)
        with again.websocket_connect(ws_path("carol")) as carol:
            skip_to(carol, "hello")


# ================================================================== part 2: real servers

@contextlib.contextmanager
def served(plane: str, tmp_path: Path, interval: float = 0.2) -> Iterator[AppServer]:
    """The dashboard on ``plane``: stock uvicorn, or ``python -m wsmanager`` (what
    ``make run-dashboard`` runs) for the native plane; its lifespan on."""
    with AppServer("examples.dashboard.app:app", plane, via_main=plane == "native",
                   env={"DASHBOARD_TOKEN": SERVER_TOKEN, "DASHBOARD_INTERVAL": str(interval)},
                   log_path=tmp_path / "server.log", graceful=2, own_session=True) as server:
        yield server


def open_page(pages: contextlib.ExitStack, server: AppServer, name: str, *topics: str) -> Any:
    ws = pages.enter_context(ws_connect(server.ws_url(f"/ws?token={SERVER_TOKEN}&name={name}"),
                                        open_timeout=WAIT))
    skip_to(ws, "hello", user=name)
    subscribe(ws, *topics)
    return ws


def post(server: AppServer, topic: str, message: str, token: str = SERVER_TOKEN) -> httpx.Response:
    return httpx.post(server.url("/notify"), json={"topic": topic, "message": message},
                      headers={"Authorization": f"Bearer {token}"}, timeout=WAIT)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plane", UVICORN_SERVER_PLANES)
def test_real_server_posts_snapshots_and_presence(plane, tmp_path):
    with served(plane, tmp_path) as server:
        assert post(server, "alerts", "x", token="nope").status_code == 403
        with pytest.raises(InvalidStatus) as refused:  # the dependency refused the handshake
            ws_connect(server.ws_url("/ws?token=nope&name=eve"), open_timeout=WAIT)
        assert refused.value.response.status_code == 403
        with contextlib.ExitStack() as pages:
            alice = open_page(pages, server, "alice", "metrics", "alerts")
            bob = open_page(pages, server, "bob", "alerts")
            carol = open_page(pages, server, "carol", "deploys")
            seen = skip_to(alice, "presence", online=3, subscribers={
                "alerts": 2, "deploys": 1, "general": 0, "metrics": 1})
            assert seen["users"] == ["alice", "bob", "carol"] and seen["connections"] == 3

            answer = post(server, "alerts", "db failover")
            assert answer.status_code == 200 and answer.json()["delivered"] == 2
            for ws in (alice, bob):
                assert skip_to(ws, "notification")["id"] == answer.json()["id"]
            deploy = post(server, "deploys", "v3").json()
            assert deploy["delivered"] == 1
            assert skip_to(carol, "notification")["id"] == deploy["id"]  # not the alert

            snaps = [skip_to(alice, "metrics") for _ in range(4)]
            assert [s["seq"] for s in snaps] == list(range(snaps[0]["seq"], snaps[0]["seq"] + 4))
            gaps = [b["ts"] - a["ts"] for a, b in zip(snaps, snaps[1:])]
            assert all(0.05 < g < 1.0 for g in gaps), gaps
            assert snaps[-1]["connections"] == 3 and snaps[-1]["notifications"] == 2
            if plane == "native":  # all three held by the C engine
                assert snaps[-1]["native_connections"] == 3

            carol.close()
            seen = skip_to(alice, "presence", online=2)
            assert seen["users"] == ["alice", "bob"] and seen["subscribers"]["deploys"] == 0
            assert post(server, "deploys", "v4").json()["delivered"] == 0
        assert "Traceback" not in server.log(), server.log_tail()


# ================================================================== part 3: the page in Chromium

BROWSER_ENV = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
CHROMIUM = os.environ.get("WSMANAGER_CHROMIUM", "/usr/bin/chromium")
WAIT_MS = 15_000


def post_form(page: Any, topic: str, message: str, level: str = "info") -> None:
    page.select_option("#topic", topic)
    page.select_option("#level", level)
    page.fill("#message", message)
    page.click("#post")


@pytest.mark.timeout(90)
@unless_installed(not shutil.which(CHROMIUM), CHROMIUM)
def test_page_on_a_phone_and_a_desktop(tmp_path):
    from playwright import sync_api
    expect = sync_api.expect

    plane = "native" if native_available() else "uvicorn"
    with served(plane, tmp_path, interval=0.5) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, chromium_sandbox=False, headless=True,
                                     env=BROWSER_ENV)
        try:
            errors: list[str] = []
            pages = []
            for (width, height), name in (((390, 844), "phone"), ((1280, 800), "desk")):
                page = browser.new_context(viewport={"width": width, "height": height}).new_page()
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(server.url(f"/?token={SERVER_TOKEN}"))
                assert page.input_value("#token") == SERVER_TOKEN and "token" not in page.url
                page.fill("#name", name)
                if name == "desk":  # a wrong token is told on the sign-in form
                    page.fill("#token", "nope")
                    page.click("#signin-button")
                    expect(page.locator("#signin-error")).to_have_text("wrong access token", timeout=WAIT_MS)
                    page.fill("#token", SERVER_TOKEN)
                else:
                    page.screenshot(path=str(tmp_path / "dashboard-signin-390x844.png"))
                page.click("#signin-button")
                expect(page.locator("#status")).to_have_attribute("data-state", "online", timeout=WAIT_MS)
                pages.append(page)
            phone, desk = pages

            # Metrics tick (one snapshot every 0.5 s) and name both pages' connections.
            for page in pages:
                expect(page.locator("#metrics")).not_to_have_attribute("data-seq", "0", timeout=WAIT_MS)
                expect(page.locator("#m-connections")).to_have_text("2", timeout=WAIT_MS)
                expect(page.locator("#online-count")).to_have_text("2", timeout=WAIT_MS)
                expect(page.locator("#users li")).to_have_text(["desk", "phone"], timeout=WAIT_MS)
                expect(page.locator("#m-out-rate")).not_to_have_text("–", timeout=WAIT_MS)
            seq = int(phone.locator("#metrics").get_attribute("data-seq"))
            phone.wait_for_function(f"+document.getElementById('metrics').dataset.seq >= {seq + 2}",
                                    timeout=WAIT_MS)
            expect(desk.locator("#topic-list li[data-topic=alerts] .count")).to_have_text("2", timeout=WAIT_MS)

            # The phone posts through the form: both pages show it, newest first.
            post_form(phone, "alerts", "disk 91% on db-1", "warning")
            expect(phone.locator("#post-result")).to_have_text("delivered to 2 pages of #alerts", timeout=WAIT_MS)
            for page in pages:
                item = page.locator("#notifications li").first
                expect(item).to_contain_text("disk 91% on db-1", timeout=WAIT_MS)
                expect(item).to_have_attribute("data-level", "warning")
                expect(item).to_contain_text("from phone")
                expect(page.locator("#feed-empty")).to_be_hidden()
            assert phone.input_value("#message") == ""

            # The desktop unsubscribes from deploys: a deploy reaches the phone only.
            desk.locator("#topic-list li[data-topic=deploys] input").uncheck()
            expect(phone.locator("#topic-list li[data-topic=deploys] .count")).to_have_text("1", timeout=WAIT_MS)
            post_form(phone, "deploys", "v3 rolled out")
            expect(phone.locator("#post-result")).to_have_text("delivered to 1 page of #deploys", timeout=WAIT_MS)
            expect(phone.locator("#notifications li").first).to_contain_text("v3 rolled out", timeout=WAIT_MS)
            # A notification by curl (no page involved) reaches both again.
            assert post(server, "alerts", "from a script").json()["delivered"] == 2
            for page in pages:
                expect(page.locator("#notifications li").first).to_contain_text("from a script", timeout=WAIT_MS)
            expect(desk.locator("#notifications li")).to_have_count(2)
            expect(phone.locator("#notifications li")).to_have_count(3)
            expect(desk.locator("#m-notifications")).to_have_text("3", timeout=WAIT_MS)

            # Layout. The phone: one column, nothing wider than the screen, the metrics two
            # cards a row, the form within reach right below them.
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390
            cards = [phone.locator(f"#{i}").bounding_box() for i in ("m-connections", "m-users")]
            assert abs(cards[0]["y"] - cards[1]["y"]) < 2 and cards[1]["x"] > cards[0]["x"]
            for sel in ("#metrics", "#compose", "#feed", "#topics", "#people"):
                box = phone.locator(sel).bounding_box()
                assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, (sel, box)
                assert box["width"] >= 340, (sel, box)
            post_button = phone.locator("#post").bounding_box()  # on the first screen
            assert post_button["y"] + post_button["height"] < 844, post_button
            # The desktop: the feed and the form side by side under the metrics.
            feed, compose = desk.locator("#feed").bounding_box(), desk.locator("#compose").bounding_box()
            assert compose["x"] > feed["x"] + feed["width"] - 1 and feed["width"] >= 600
            assert abs(feed["y"] - compose["y"]) < 2
            assert desk.locator("#me").is_visible() and not phone.locator("#me").is_visible()

            for page, name in ((phone, "phone-390x844"), (desk, "desktop-1280x800")):
                shot = tmp_path / f"dashboard-{name}.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
            assert errors == []
        finally:
            browser.close()
