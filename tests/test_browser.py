"""The chat example in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright
for Python; no browser download): two pages, one room, messages both ways, a direct message, and
a server kill + restart that both pages survive."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import unless_installed
from tests.kit_servers import UvicornServer, planes

# The browser must not inherit a sanitizer runtime preloaded for our extension (make test-asan).
BROWSER_ENV = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
CHROMIUM = os.environ.get("WSMANAGER_CHROMIUM", "/usr/bin/chromium")
from playwright import sync_api  # noqa: E402 - a test dependency

pytestmark = unless_installed(not shutil.which(CHROMIUM), CHROMIUM)

WAIT_MS = 15_000


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
@pytest.mark.parametrize("plane", planes())
def test_two_pages_chat_and_survive_a_server_restart(plane, tmp_path):
    server = UvicornServer("examples.chat.app:app", plane=plane, log_path=tmp_path / "server.log")
    with server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, chromium_sandbox=False, headless=True,
                                         env=BROWSER_ENV)
        try:
            # Two contexts: separate sessionStorage, like two people (or two tabs).
            alice = browser.new_context(viewport={"width": 1100, "height": 700}).new_page()
            bob = browser.new_context(viewport={"width": 1100, "height": 700}).new_page()
            errors: list[str] = []
            for page in (alice, bob):
                page.on("pageerror", lambda exc: errors.append(str(exc)))

            login(alice, server.url, "alice")
            login(bob, server.url, "bob")
            # Both joined the default room "lobby"; presence lists both, in both pages.
            expect_presence(alice, "alice", "bob")
            expect_presence(bob, "alice", "bob")

            say(alice, "hello bob")
            expect_line(bob, "hello bob")
            say(bob, "hi alice")
            expect_line(alice, "hi alice")
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
        finally:
            browser.close()
