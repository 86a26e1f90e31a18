"""The chat example in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright
for Python; no browser download): two pages, one room, messages both ways, a direct message, and
a server kill + restart that both pages survive, every message compressed (permessage-deflate)
where the server compresses."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import UVICORN_SERVER_PLANES, unless_installed
from tests.servers import AppServer

# The browser must not inherit a sanitizer runtime preloaded for our extension (make test-asan).
BROWSER_ENV = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
CHROMIUM = os.environ.get("WSMANAGER_CHROMIUM", "/usr/bin/chromium")
from playwright import sync_api  # noqa: E402 - a test dependency

pytestmark = unless_installed(not shutil.which(CHROMIUM), CHROMIUM)

WAIT_MS = 15_000

# Before any page script: every WebSocket the page makes is kept in window.__sockets, so a test
# can read what was negotiated (ws.extensions) on the sockets the chat's client opened itself.
_RECORD_SOCKETS = """(() => {
    const Native = window.WebSocket;
    window.__sockets = [];
    window.WebSocket = class extends Native {
        constructor(...args) { super(...args); window.__sockets.push(this); }
    };
})();"""
_OPEN_EXTENSIONS = "window.__sockets.filter(s => s.readyState === 1).map(s => s.extensions)"
# What the native plane answers Chromium's offer ("permessage-deflate; client_max_window_bits")
NATIVE_DEFLATE = "permessage-deflate; client_no_context_takeover"


@contextlib.contextmanager
def chat(plane: str, tmp_path: Path, *viewports: tuple[int, int]):
    """The chat example on ``plane`` and a page per viewport, each in a browser context of its
    own (separate sessionStorage, like two people or two tabs): (server, pages, the pages'
    errors)."""
    # threshold 0: the native plane compresses every message that deflate makes smaller
    with AppServer("examples.chat.app:app", plane, log_path=tmp_path / "server.log", graceful=2,
                   own_session=True, env={"WSMANAGER_COMPRESS_THRESHOLD": "0"}) as server, \
            sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, chromium_sandbox=False, headless=True,
                                     env=BROWSER_ENV)
        try:
            pages = [browser.new_context(viewport={"width": w, "height": h}).new_page()
                     for w, h in viewports]
            for page in pages:
                page.add_init_script(_RECORD_SOCKETS)
            errors: list[str] = []
            for page in pages:
                page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield server, pages, errors
        finally:
            browser.close()


def login(page, base_url: str, name: str) -> None:
    page.goto(base_url + "/")
    page.fill("#name", name)
    page.click("#login")
    sync_api.expect(page.locator("#status")).to_have_attribute("data-state", "online", timeout=WAIT_MS)


def say(page, text: str, mode: str = "room", to: str | None = None) -> None:
    page.select_option("#mode", mode)
    if to is not None:
        page.fill("#dm-to", to)
    page.fill("#text", text)
    page.click("#send")


def expect_line(page, text: str) -> None:
    sync_api.expect(page.locator("#messages li", has_text=text)).to_have_count(1, timeout=WAIT_MS)


def expect_presence(page, *users: str) -> None:
    sync_api.expect(page.locator("#presence li")).to_have_text(list(users), timeout=WAIT_MS)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plane", UVICORN_SERVER_PLANES)
def test_two_pages_chat_and_survive_a_server_restart(plane, tmp_path):
    with chat(plane, tmp_path, (1100, 700), (1100, 700)) as (server, (alice, bob), errors):
        login(alice, server.url(), "alice")
        login(bob, server.url(), "bob")
        # Both joined the default room "lobby"; presence lists both, in both pages.
        expect_presence(alice, "alice", "bob")
        expect_presence(bob, "alice", "bob")

        say(alice, "hello bob")
        expect_line(bob, "hello bob")
        say(bob, "hi alice")
        expect_line(alice, "hi alice")
        # Chromium negotiated compression on both pages (the native plane: what it answers), and
        # a long message goes compressed through the room's shared context to both
        for page in (alice, bob):
            extensions = page.evaluate(_OPEN_EXTENSIONS)
            assert len(extensions) == 1 and extensions[0].startswith("permessage-deflate"), extensions
            if plane == "native":
                assert extensions == [NATIVE_DEFLATE]
        long_line = "a long line to compress " * 40
        say(alice, long_line)
        expect_line(bob, long_line.strip())
        say(alice, long_line + "again")
        expect_line(bob, "again")
        say(bob, "psst", mode="dm", to="alice")
        expect_line(alice, "psst")
        sync_api.expect(alice.locator("#messages li.dm")).to_have_count(1, timeout=WAIT_MS)
        sync_api.expect(alice.locator("#stats")).to_have_attribute("data-connections", "2",
                                                                   timeout=WAIT_MS)

        server.kill()  # a crash: both pages lose their TCP connection
        for page in (alice, bob):
            sync_api.expect(page.locator("#status")).not_to_have_attribute(
                "data-state", "online", timeout=WAIT_MS)
        server.start()
        for page in (alice, bob):
            sync_api.expect(page.locator("#status")).to_have_attribute(
                "data-state", "online", timeout=WAIT_MS)
            expect_line(page, "reconnected after")
        # The new server knows nothing: the pages re-joined "lobby" by themselves.
        expect_presence(alice, "alice", "bob")
        expect_presence(bob, "alice", "bob")
        say(bob, "still here after the restart")
        expect_line(alice, "still here after the restart")
        say(alice, "me too", mode="broadcast")
        expect_line(bob, "me too")

        shot = tmp_path / "chat.png"
        alice.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        assert errors == []


def message_boxes(page) -> list[dict]:
    """Every chat message on the page: its classes, sender, time elements and geometry."""
    return page.evaluate("""() => {
        const pane = document.getElementById("messages").getBoundingClientRect();
        return [...document.querySelectorAll("#messages li.msg")].map((li) => {
            const r = li.getBoundingClientRect();
            const times = [...li.querySelectorAll("time")];
            return {
                mine: li.classList.contains("mine"), from: li.dataset.from,
                text: li.querySelector(".text").textContent,
                times: times.map((t) => ({ datetime: t.dateTime, source: t.dataset.source,
                                           shown: t.textContent })),
                left: r.left - pane.left, right: pane.right - r.right,
                background: getComputedStyle(li).backgroundColor,
            };
        });
    }""")


@pytest.mark.timeout(60)
def test_phone_width_times_and_own_messages(tmp_path):
    """The chat as two people see it, one on a phone (390x844), one on a desktop (1280x800):
    the message pane is usable at phone width, every message shows the time the server
    stamped it with, and your own messages stand apart (right-aligned, their own colour)."""
    import time

    plane = UVICORN_SERVER_PLANES[-1]  # the native plane where it exists
    with chat(plane, tmp_path, (390, 844), (1280, 800)) as (server, (phone, desk), errors):
        login(phone, server.url(), "alice")
        login(desk, server.url(), "bob")
        # Presence lives in the side panel, behind "Rooms" on the phone.
        expect_presence(desk, "alice", "bob")
        started = time.time()
        say(phone, "hi from the phone")
        expect_line(desk, "hi from the phone")
        say(desk, "hi from the desk")
        say(desk, "psst", mode="dm", to="alice")
        say(phone, "to everyone", mode="broadcast")
        for page in (phone, desk):
            sync_api.expect(page.locator("#messages li.msg")).to_have_count(4, timeout=WAIT_MS)
        finished = time.time()

        # 1. The pane at phone width: (nearly) the whole screen, nothing wider than it.
        pane = phone.locator("#messages").bounding_box()
        assert pane is not None and pane["width"] >= 300, pane
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390
        composer = phone.locator("#composer").bounding_box()
        assert composer is not None and composer["y"] + composer["height"] <= 844
        assert desk.locator("#messages").bounding_box()["width"] >= 600
        assert desk.locator("#presence").is_visible()  # the desktop keeps its side panels

        for page, me in ((phone, "alice"), (desk, "bob")):
            boxes = message_boxes(page)
            assert [b["text"] for b in boxes] == ["hi from the phone", "hi from the desk", "psst",
                                                  "to everyone"]
            for box in boxes:
                # 2. One time per message, from the server's timestamp.
                assert len(box["times"]) == 1, box
                stamp = box["times"][0]
                assert stamp["source"] == "server" and re.search(r"\d:\d\d", stamp["shown"]), box
                when = datetime.fromisoformat(stamp["datetime"].replace("Z", "+00:00")).timestamp()
                assert started - 2 <= when <= finished + 2, (box, started, finished)
                # 3. Own messages: marked, on the right; the others' on the left.
                assert box["mine"] == (box["from"] == me), box
                if box["mine"]:
                    assert box["right"] < 20 < box["left"], box
                else:
                    assert box["left"] < 20 < box["right"], box
            mine_room = next(b for b in boxes if b["mine"] and b["text"].startswith("hi from"))
            theirs_room = next(b for b in boxes if not b["mine"] and b["text"].startswith("hi from"))
            assert mine_room["background"] != theirs_room["background"]

        # The side panels on the phone: one tap away, and picking a person brings the chat back.
        phone.click("#panels-toggle")
        expect_presence(phone, "alice", "bob")
        assert not phone.locator("#messages").is_visible()
        phone.click("#users li:has-text('bob')")
        assert phone.locator("#messages").is_visible()
        assert phone.input_value("#dm-to") == "bob"

        for page, name in ((phone, "phone-390x844"), (desk, "desktop-1280x800")):
            shot = tmp_path / f"chat-{name}.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
        assert errors == []


_DEFLATE_JS = """async (url) => {
    const open = () => new Promise((ok, no) => {
        const ws = new WebSocket(url); ws.onopen = () => ok(ws); ws.onerror = no; });
    const next = ws => new Promise(ok => { ws.onmessage = e => ok(e.data); });
    const a = await open(), b = await open();
    const msg = "chat message ".repeat(60);
    let got = next(a); a.send(msg); const echo = await got;
    // fan-outs to both sockets: a shared context; a direct message to a in between
    const fans = [];
    for (const step of ["fanout:9000:text", "fanout:700:text", "direct", "fanout:700:text",
                        "fanout:700:text"]) {
        if (step === "direct") { got = next(a); a.send(msg + "!"); fans.push((await got).length); continue; }
        const both = [next(a), next(b)]; a.send(step);
        fans.push(...(await Promise.all(both)).map(m => m.length));
    }
    a.close(); b.close();
    return {extensions: [a.extensions, b.extensions], echoed: echo === msg, fans};
}"""


@pytest.mark.timeout(60)
def test_chromium_negotiates_permessage_deflate_with_the_native_plane(tmp_path):
    """Chromium offers permessage-deflate and accepts the native plane's answer
    (client_no_context_takeover); its compressed message is inflated, ours to it compressed, and
    it follows a fan-out's shared context, also after a direct message took one socket out."""
    from tests.servers import native_available

    if not native_available():
        pytest.skip("the native plane is not built")
    with AppServer("tests.deflate_support:app", "native", log_path=tmp_path / "server.log") as server, \
            sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, chromium_sandbox=False, headless=True,
                                     env=BROWSER_ENV)
        try:
            before = server.get("/stats")
            page = browser.new_page()
            page.goto(server.url("/"))
            got = page.evaluate(_DEFLATE_JS, server.ws_url("/ws"))
        finally:
            browser.close()
        after = server.get("/stats")
    assert got == {"extensions": [NATIVE_DEFLATE] * 2, "echoed": True,
                   "fans": [9000, 9000, 700, 700, 781, 700, 700, 700, 700]}
    assert after["messages_inflated"] - before["messages_inflated"] >= 2  # Chromium compressed
    # both sockets in sync for the first two fan-outs (the first a keyframe), one for the third
    # (the other took the direct message: it got its copy compressed on its own), both again
    # for the fourth (the stream started afresh, more than a quarter having been left out)
    assert after["deflate_shared"] - before["deflate_shared"] == 2 + 2 + 1 + 2
    # deflate runs: two echoes, four fan-outs, the lone copy of the third
    assert after["messages_deflated"] - before["messages_deflated"] == 2 + 4 + 1
