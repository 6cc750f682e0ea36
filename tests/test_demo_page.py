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


# A page that opens a WebSocket to the chat route of the gateway port its query names,
# and writes what became of it on <body>.
PROBE_PAGE = """<!doctype html>
<meta charset="utf-8"><title>probe</title>
<script>
const port = new URLSearchParams(location.search).get('port');
const ws = new WebSocket(`ws://127.0.0.1:${port}/chat/kitchen`);
ws.onopen = () => { document.body.dataset.result = 'open'; ws.close(1000); };
ws.onerror = () => { document.body.dataset.error = 'yes'; };
ws.onclose = (e) => {
  if (!document.body.dataset.result) document.body.dataset.result = `closed ${e.code}`;
};
</script>
<body></body>
"""


def test_a_page_from_another_origin_cannot_open_the_gateways_websockets(tmp_path):
    """The same page, served by the gateway (same origin: it connects) and by a second
    listener on another port (another origin: refused with 403, logged)."""
    require_peer(CHROMIUM, "Debian's chromium")
    playwright_api = pytest.importorskip("playwright.sync_api") if not os.environ.get("CI") \
        else __import__("playwright.sync_api", fromlist=["sync_playwright"])
    pages = tmp_path / "probe"
    pages.mkdir()
    (pages / "index.html").write_text(PROBE_PAGE)
    config = open(os.path.join(os.path.dirname(__file__), "..", "etc", "wsgate.ini")).read()
    config = config.replace("tcp:8080:interface=127.0.0.1", "tcp:0:interface=127.0.0.1")
    config = config.replace("tcp:8081:interface=127.0.0.1", "tcp:0:interface=127.0.0.1")
    config = config.replace("log_format = text", "log_format = json")
    extra = f"""
[listen:elsewhere]
endpoint = tcp:0:interface=127.0.0.1

[route:probe]
path = /probe/*
static = {pages}
"""
    gw = start_gateway(tmp_path, extra, base=config, listeners=("main", "admin", "elsewhere"))
    try:
        port = gw.port()
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                # the demo page still works (same origin)
                demo = browser.new_page()
                demo.goto(f"http://127.0.0.1:{port}/demo/?room=kitchen&name=carol")
                demo.wait_for_selector("body[data-connected=yes]", timeout=10000)
                # the probe from the gateway's own origin connects
                own = browser.new_page()
                own.goto(f"http://127.0.0.1:{port}/probe/?port={port}")
                own.wait_for_selector("body[data-result]", state="attached",
                                            timeout=10000)
                assert own.get_attribute("body", "data-result") == "open"
                # the very same page from another origin (another port) is refused
                foreign = browser.new_page()
                foreign_origin = f"http://127.0.0.1:{gw.port('elsewhere')}"
                foreign.goto(f"{foreign_origin}/probe/?port={port}")
                foreign.wait_for_selector("body[data-result]", state="attached",
                                            timeout=10000)
                assert foreign.get_attribute("body", "data-result") == "closed 1006"
                assert foreign.get_attribute("body", "data-error") == "yes"
                event = gw.wait_event(
                    lambda e: e.get("event") == "websocket.connection.rejected"
                    and e.get("route") == "chat")
                assert (event["status"], event["reason"]) == (403, "cross_origin")
                assert "Chrome" in (event["user_agent"] or "")
                assert event["path"] == "/chat/kitchen"
            finally:
                browser.close()
    finally:
        assert gw.stop() == 0
