"""The chat demo page, driven in Debian's headless Chromium through Playwright."""

import datetime
import json
import os
import threading
import time

import pytest

from harness import admin_text, free_port, require_peer, start_gateway

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def demo_config(main_port=0):
    """etc/wsgate.ini as shipped (the chat route keeps history, presence, join/leave), on
    *main_port* (0: any), the admin endpoint on any port, JSON logs, a short drain."""
    config = open(os.path.join(os.path.dirname(__file__), "..", "etc", "wsgate.ini")).read()
    for key, value in (("history", "100"), ("presence", "yes"), ("join_leave", "yes")):
        assert f"\n{key} = {value}\n" in config, f"[route:chat] should set {key} = {value}"
    config = config.replace("tcp:8080:interface=127.0.0.1", f"tcp:{main_port}:interface=127.0.0.1")
    config = config.replace("tcp:8081:interface=127.0.0.1", "tcp:0:interface=127.0.0.1")
    config = config.replace("log_format = text", "log_format = json")
    config = config.replace("\nfast_paths = yes\n", "\n")  # WSGATE_TEST_FAST_PATHS may set it
    return config.replace("drain_timeout = 30s", "drain_timeout = 2s")


def test_two_pages_in_one_room_see_each_others_messages(tmp_path):
    require_peer(CHROMIUM, "Debian's chromium")
    playwright_api = pytest.importorskip("playwright.sync_api") if not os.environ.get("CI") \
        else __import__("playwright.sync_api", fromlist=["sync_playwright"])
    config = demo_config()
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
    config = demo_config()
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


# ------------------------------------------------- reconnecting, recovery, presence


def chat_ids(gw):
    """The ids of the gateway's connections on the chat route (admin GET /connections)."""
    status, body = admin_text(gw, "GET", "/connections")
    assert status == 200, body
    return {c["id"] for c in json.loads(body)["connections"] if c["route"] == "chat"}


def publish(gw, text, channel="room:kitchen"):
    status, body = admin_text(gw, "POST", f"/publish/{channel}", body=text.encode())
    assert status == 202, body


def lines(page, selector="#messages li"):
    return page.eval_on_selector_all(selector, "items => items.map(li => li.textContent)")


def wait_line(page, text, selector="#messages li", count=1, timeout=15000):
    """Wait until *count* items of *selector* read exactly *text*."""
    page.wait_for_function(
        "([selector, text, count]) => [...document.querySelectorAll(selector)]"
        ".filter(li => li.textContent === text).length >= count",
        arg=[selector, text, count], timeout=timeout)


def wait_online(page, ids, timeout=10000):
    page.wait_for_function(
        "ids => { const shown = [...document.querySelectorAll('#online li')]"
        ".map(li => li.dataset.id).sort(); return JSON.stringify(shown) === JSON.stringify(ids); }",
        arg=sorted(ids), timeout=timeout)


def guest(conn_id):
    return "guest " + conn_id[:6]  # how the page names a member without an identity


def news(page):
    return [line for line in lines(page) if line.startswith("news ")]


def test_the_page_reconnects_and_recovers_every_message_it_missed(tmp_path):
    """Alice is kicked (1001) while messages keep coming: 20 are published while her page
    waits to reconnect (its clock paused, so the gap is certain), more while it reconnects;
    she sees every one exactly once, in order, and not her own line twice. Presence and
    join/leave follow, long lines wrap; after the gateway restarts (1001, then refused
    connections: 1006) her position is of another epoch and the page says so, once."""
    require_peer(CHROMIUM, "Debian's chromium")
    playwright_api = pytest.importorskip("playwright.sync_api") if not os.environ.get("CI") \
        else __import__("playwright.sync_api", fromlist=["sync_playwright"])
    port = free_port()  # the same port after the restart: the page comes back to it
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    gw = start_gateway(tmp_path / "first", "", base=demo_config(port), listeners=("main", "admin"))
    url = f"http://127.0.0.1:{port}/demo/?room=kitchen"
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                alice = browser.new_page()
                # a clock the test can stop, to hold the page's reconnect back (below)
                alice.clock.install(time=datetime.datetime(2030, 1, 1, 8, 0, 0))
                alice.goto(url + "&name=alice")
                alice.wait_for_selector("body[data-connected=yes]", timeout=10000)
                (alice_id,) = chat_ids(gw)
                bob = browser.new_page()
                bob.goto(url + "&name=bob")
                bob.wait_for_selector("body[data-connected=yes]", timeout=10000)
                (bob_id,) = chat_ids(gw) - {alice_id}

                # who is online: bob from the members in "subscribed", alice from his join
                wait_online(bob, {alice_id, bob_id})
                wait_online(alice, {alice_id, bob_id})
                wait_line(alice, f"{guest(bob_id)} joined")
                assert f"{guest(alice_id)} joined" not in lines(bob)  # she was there before

                for i in range(1, 4):
                    publish(gw, f"news {i}")
                wait_line(alice, "news 3")
                # a line of hers after the last position she received: the recovery
                # gives it back (include_sender = no applied to her old connection only)
                alice.fill("#text", "after my last position")
                alice.press("#text", "Enter")
                wait_line(bob, "alice: after my last position")

                # kicked with 1001 (as a drain does); her page may not reconnect yet
                alice.clock.pause_at(datetime.datetime(2030, 1, 1, 9, 0, 0))
                status, body = admin_text(gw, "DELETE", f"/connections/{alice_id}?code=1001")
                assert status == 200, body
                alice.wait_for_selector("body[data-connected=no]", state="attached",
                                        timeout=10000)
                assert "reconnecting in" in alice.text_content("#status")
                for i in range(4, 24):
                    publish(gw, f"news {i}")
                assert chat_ids(gw) == {bob_id}  # all 20 while she was away

                # more while she reconnects, until a little after she is back
                back = threading.Event()
                published = [23]

                def keep_publishing():
                    deadline = None
                    while published[0] < 90:  # the room keeps 100: none is lost
                        publish(gw, f"news {published[0] + 1}")
                        published[0] += 1
                        if back.is_set():
                            deadline = deadline or time.monotonic() + 0.2
                            if time.monotonic() > deadline:
                                return
                        time.sleep(0.03)

                publisher = threading.Thread(target=keep_publishing)
                publisher.start()
                try:
                    time.sleep(0.05)
                    alice.clock.resume()
                    alice.wait_for_selector("body[data-connected=yes]", timeout=15000)
                    back.set()
                finally:
                    publisher.join(30)
                total = published[0]
                wait_line(alice, f"news {total}")
                wait_line(bob, f"news {total}")
                expected = [f"news {i}" for i in range(1, total + 1)]
                assert news(alice) == expected
                assert news(bob) == expected
                assert lines(alice).count("alice: after my last position") == 1
                assert lines(alice).count("reconnected") == 1
                assert not alice.query_selector_all("#messages li.notice")

                # bob saw her old connection leave and her new one join
                (alice_again,) = chat_ids(gw) - {bob_id}
                wait_line(bob, f"{guest(alice_id)} left")
                wait_line(bob, f"{guest(alice_again)} joined")
                wait_online(bob, {alice_again, bob_id})
                wait_online(alice, {alice_again, bob_id})  # the members when she came back

                # long lines wrap: nothing scrolls sideways
                bob.fill("#text", "x" * 600)
                bob.click("#send")
                wait_line(alice, "bob: " + "x" * 600)
                for page in (alice, bob):
                    assert page.evaluate(
                        "() => document.documentElement.scrollWidth <= innerWidth && "
                        "[...document.querySelectorAll('#messages li')]"
                        ".every(li => li.scrollWidth <= li.clientWidth)")

                # bob closes his page: alice sees him leave
                bob.close()
                wait_line(alice, f"{guest(bob_id)} left")
                wait_online(alice, {alice_again})

                # the gateway restarts: the page comes back, and its position is of the
                # old process's epoch: a notice, then live messages
                assert gw.stop() == 0
                gw = start_gateway(tmp_path / "second", "", base=demo_config(port),
                                   listeners=("main", "admin"))
                alice.wait_for_selector("#messages li.notice", timeout=30000)
                wait_line(alice, "reconnected", count=2)
                alice.wait_for_selector("body[data-connected=yes]", timeout=10000)
                (alice_third,) = chat_ids(gw)
                wait_online(alice, {alice_third})
                # from now on she resumes from the new position: kicked again, she
                # recovers (nothing was missed) without a second notice
                status, body = admin_text(gw, "DELETE", f"/connections/{alice_third}?code=1001")
                assert status == 200, body
                wait_line(alice, "reconnected", count=3)
                publish(gw, "after the restart")
                wait_line(alice, "after the restart")
                assert len(alice.query_selector_all("#messages li.notice")) == 1
                assert lines(alice).count("after the restart") == 1
                shot = tmp_path / "demo-reconnect.png"
                alice.screenshot(path=str(shot), full_page=True)
                print(f"\nscreenshot: {shot}")
            finally:
                browser.close()
    finally:
        assert gw.stop() == 0
