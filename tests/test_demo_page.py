"""The chat demo page, driven in Debian's headless Chromium through Playwright."""

import os

import pytest

from harness import require_peer, start_gateway

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_two_pages_in_one_room_see_each_others_messages(tmp_path):
    require_peer(CHROMIUM, "Debian's chromium")
    playwright_api = pytest.importorskip("playwright.sync_api") if not os.environ.get("CI") \
        else __import__("playwright.sync_api", fromlist=["sync_playwright"])
    config = open(os.path.join(os.path.dirname(__file__), "..", "etc", "wsgate.ini")).read()
    config = config.replace("tcp:8080:interface=127.0.0.1", "tcp:0:interface=127.0.0.1")
    config = config.replace("tcp:8081:interface=127.0.0.1", "tcp:0:interface=127.0.0.1")
    config = config.replace("log_format = text", "log_format = json")
    gw = start_gateway(tmp_path, "", base=config, listeners=("main", "admin"))
    try:
        url = f"http://127.0.0.1:{gw.port()}/demo/?room=kitchen"
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                alice = browser.new_page()
                bob = browser.new_page()
                alice.goto(url + "&name=alice")
                bob.goto(url + "&name=bob")
                for page in (alice, bob):
                    page.wait_for_selector("body[data-connected=yes]", timeout=10000)
                alice.fill("#text", "hello bob")
                alice.click("#send")
                bob.wait_for_selector("#messages li:has-text('alice: hello bob')", timeout=10000)
                bob.fill("#text", "hi alice")
                bob.press("#text", "Enter")
                alice.wait_for_selector("#messages li:has-text('bob: hi alice')", timeout=10000)
                shot = tmp_path / "demo-chat.png"
                alice.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 1000
                print(f"\nscreenshot: {shot}")
                # the other room heard nothing
                other = browser.new_page()
                other.goto(f"http://127.0.0.1:{gw.port()}/demo/?room=attic")
                other.wait_for_selector("body[data-connected=yes]", timeout=10000)
                alice.fill("#text", "only for the kitchen")
                alice.click("#send")
                bob.wait_for_selector("#messages li:has-text('only for the kitchen')")
                assert other.locator("#messages li").count() == 0
            finally:
                browser.close()
    finally:
        assert gw.stop() == 0
