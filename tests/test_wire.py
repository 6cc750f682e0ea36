"""The spine on the wire: a real ``twistd -n wsgate`` and real clients over loopback."""

import asyncio
import socket
import ssl
import struct
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from harness import (
    parse_response,
    raw_request,
    read_until_closed,
    run,
    start_gateway,
    upgrade_request,
)

ROUTES = """
[route:echo]
path = /echo
echo = yes

[route:small]
path = /small
echo = yes
max_message_size = 1KiB

[route:chat]
path = /chat/{room}
broadcast = room:{room}
# The burst test reads its subscribers one after another, so a whole 5 MB burst may
# wait for the last one: with the default 1MiB that subscriber is a slow consumer
# and loses messages (counted drops, by design; seen in about half the runs).
max_send_buffer = 16MiB

[route:chat-self]
path = /loud/{room}
broadcast = loud:{room}
include_sender = yes

[route:feed]
path = /feed/{name}
broadcast = feed:{name}
client_publish = no

[route:api]
host = *.example.com
path = /api/*
echo = yes
"""


DEFLATE_LISTENER = """
[listen:deflate]
endpoint = tcp:0:interface=127.0.0.1
compression = permessage-deflate
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("wire"), DEFLATE_LISTENER + ROUTES,
                       listeners=("main", "deflate"))
    yield gw
    assert gw.stop() == 0


# ------------------------------------------------------------------ echo


def test_echo_returns_text_as_text_and_binary_as_binary(gateway):
    async def scenario():
        async with connect(gateway.url("/echo")) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send(b"\x00\xffbinary")
            assert await ws.recv() == b"\x00\xffbinary"
            big = bytes(range(256)) * 2048  # 512 KiB, under the 1 MiB default
            await ws.send(big)
            assert await ws.recv() == big
    run(scenario())


def test_wildcard_host_prefix_route_matches_subdomains_only(gateway):
    async def scenario():
        sock = socket.create_connection(("127.0.0.1", gateway.port()))
        async with connect("ws://a.example.com/api/v1/x", sock=sock) as ws:
            await ws.send("via api")
            assert await ws.recv() == "via api"
    run(scenario())
    status, _, _ = parse_response(raw_request(
        gateway.port(), upgrade_request("/api/v1/x", host="example.com")))
    assert status == 404


# ---------------------------------------------------------------- broadcast


def test_broadcast_reaches_other_subscribers_of_the_same_room_only(gateway):
    async def scenario():
        a1 = await connect(gateway.url("/chat/a"))
        a2 = await connect(gateway.url("/chat/a"))
        a3 = await connect(gateway.url("/chat/a"))
        b1 = await connect(gateway.url("/chat/b"))
        try:
            await a1.send("from a1")
            assert await a2.recv() == "from a1"
            assert await a3.recv() == "from a1"
            await a2.send(b"\x01bin from a2")
            # a1 never got its own message: the next thing it sees is a2's.
            assert await a1.recv() == b"\x01bin from a2"
            assert await a3.recv() == b"\x01bin from a2"
            await b1.send("from b1")
            # room b's subscriber saw nothing of room a: its first message is none,
            # and room a's clients do not see room b's message.
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(a1.recv(), 0.3)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(b1.recv(), 0.3)
        finally:
            for ws in (a1, a2, a3, b1):
                await ws.close()
    run(scenario())


def test_include_sender_delivers_own_messages_back(gateway):
    async def scenario():
        async with connect(gateway.url("/loud/r")) as a, connect(gateway.url("/loud/r")) as b:
            await a.send("shout")
            assert await a.recv() == "shout"
            assert await b.recv() == "shout"
    run(scenario())


def test_client_publish_no_closes_publisher_with_1008(gateway):
    async def scenario():
        async with connect(gateway.url("/feed/x")) as ws:
            await ws.send("not allowed")
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1008
    run(scenario())


def _masked(opcode, payload, key=b"\x11\x22\x33\x44"):
    """One client frame (FIN, masked)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def test_a_burst_in_one_write_reaches_every_subscriber_whole_and_in_order(gateway):
    """Deliveries are coalesced per reactor iteration (fast paths) or not: same result.

    The publisher writes 300 messages in one send (text and binary, 1 B to
    70 KiB, so some writes outgrow the socket buffer), then a final marker.
    Every subscriber, compressed or not, gets each one once, in order, as
    the type it was sent as.
    """
    messages = []
    for i in range(300):
        size = (1, 64, 1000, 70000)[i % 4]
        body = (b"%05d" % i + b"x" * size)[:max(size, 5)]
        messages.append(body if i % 3 else body.decode())

    async def scenario():
        plain = [await connect(gateway.url("/chat/burst"), compression=None) for _ in range(3)]
        deflate = await connect(gateway.url("/chat/burst", name="deflate"))
        assert "permessage-deflate" in (deflate.response.headers.get(
            "Sec-WebSocket-Extensions") or "")
        subscribers = plain + [deflate]
        try:
            with socket.create_connection(("127.0.0.1", gateway.port()), timeout=10) as pub:
                pub.sendall(upgrade_request("/chat/burst"))
                assert pub.recv(4096).startswith(b"HTTP/1.1 101")
                burst = b"".join(_masked(1 if isinstance(m, str) else 2,
                                         m.encode() if isinstance(m, str) else m)
                                 for m in messages)
                pub.sendall(burst + _masked(1, b"end"))
                for ws in subscribers:
                    got = []
                    while True:
                        message = await asyncio.wait_for(ws.recv(), 20)
                        if message == "end":
                            break
                        got.append(message)
                    assert len(got) == len(messages)
                    assert got == messages
        finally:
            for ws in subscribers:
                await ws.close()
    run(scenario())


# ------------------------------------------------------- answers before 101


def test_plain_get_on_a_route_gets_426_with_upgrade_header(gateway):
    data = raw_request(gateway.port(), b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = parse_response(data)
    assert status == 426
    assert headers["upgrade"] == "websocket"
    assert body.strip() == b"Expected Upgrade: websocket"


def test_unknown_path_gets_404(gateway):
    status, _, _ = parse_response(raw_request(gateway.port(), upgrade_request("/nowhere")))
    assert status == 404


def test_malformed_handshakes_get_400(gateway):
    bad_key = upgrade_request("/echo").replace(
        b"dGhlIHNhbXBsZSBub25jZQ==", b"short")
    no_host = b"GET /echo HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"
    garbage = b"\x16\x03\x01 not http at all\r\n\r\n"
    for request in (bad_key, no_host, garbage):
        status, _, _ = parse_response(raw_request(gateway.port(), request))
        assert status == 400, request


def test_wrong_version_gets_426_with_supported_version(gateway):
    status, headers, _ = parse_response(
        raw_request(gateway.port(), upgrade_request("/echo", version=b"8")))
    assert status == 426
    assert headers["sec-websocket-version"] == "13"


def test_post_gets_405_with_allow_get(gateway):
    status, headers, _ = parse_response(
        raw_request(gateway.port(), upgrade_request("/echo", method=b"POST")))
    assert status == 405
    assert headers["allow"] == "GET"


def test_rejections_are_logged_as_events(gateway):
    raw_request(gateway.port(), upgrade_request("/not-here"))
    event = gateway.wait_event(
        lambda e: e.get("event") == "websocket.connection.rejected"
        and e.get("reason") == "no_route")
    assert event["status"] == 404
    assert event["node_id"] == "test-node"
    assert event["client"].startswith("127.0.0.1:")


# ---------------------------------------------------------------- limits


def test_message_over_route_limit_closes_with_1009(gateway):
    async def scenario():
        async with connect(gateway.url("/small")) as ws:
            await ws.send("x" * 1024)  # exactly the limit: fine
            assert await ws.recv() == "x" * 1024
            await ws.send("x" * 1025)
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1009
    run(scenario())


def test_garbage_frames_do_not_hurt_the_gateway(gateway):
    """A client that sends nonsense after the handshake is closed; others carry on."""
    with socket.create_connection(("127.0.0.1", gateway.port()), timeout=5) as sock:
        sock.sendall(upgrade_request("/echo"))
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")
        sock.sendall(b"\x0f\x80" + b"\x00" * 4 + b"\xff" * 64)  # reserved opcode, masked
        data = read_until_closed(sock)
        assert data[:1] == b"\x88"  # a close frame
        assert struct.unpack("!H", data[2:4])[0] == 1002
    test_echo_returns_text_as_text_and_binary_as_binary(gateway)


# ------------------------------------------------- timeouts and the limit


def test_handshake_not_finished_in_time_is_dropped(tmp_path):
    gw = start_gateway(tmp_path, "[route:echo]\npath = /echo\necho = yes\n",
                       base=_base(handshake_timeout="300ms"))
    try:
        with socket.create_connection(("127.0.0.1", gw.port()), timeout=5) as sock:
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n")  # never finished
            started = time.monotonic()
            assert read_until_closed(sock) == b""  # dropped, no answer
            assert time.monotonic() - started < 4
    finally:
        assert gw.stop() == 0


def test_unanswered_ping_drops_connection(tmp_path):
    gw = start_gateway(tmp_path, "[route:echo]\npath = /echo\necho = yes\n",
                       base=_base(ping_interval="200ms", ping_timeout="300ms"))
    try:
        with socket.create_connection(("127.0.0.1", gw.port()), timeout=5) as sock:
            sock.sendall(upgrade_request("/echo"))
            response = sock.recv(4096)
            assert response.startswith(b"HTTP/1.1 101")
            received = read_until_closed(sock)  # never answer: pinged, then dropped
            assert received[:1] == b"\x89"  # it did ping us first

        async def answering_client_stays():
            async with connect(gw.url("/echo")) as ws:  # websockets answers pings
                await asyncio.sleep(1.2)
                await ws.send("still here")
                assert await ws.recv() == "still here"
        run(answering_client_stays())
    finally:
        assert gw.stop() == 0


def test_idle_connection_closed_with_1001(tmp_path):
    gw = start_gateway(tmp_path, "[route:echo]\npath = /echo\necho = yes\n",
                       base=_base(idle_timeout="400ms"))
    try:
        async def scenario():
            async with connect(gw.url("/echo")) as ws:
                for _ in range(3):  # activity keeps it open past the timeout
                    await asyncio.sleep(0.2)
                    await ws.send("tick")
                    assert await ws.recv() == "tick"
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 5)
                assert info.value.rcvd.code == 1001
                assert info.value.rcvd.reason == "idle timeout"
        run(scenario())
    finally:
        assert gw.stop() == 0


def test_max_connections_reached_gets_503_with_retry_after(tmp_path):
    gw = start_gateway(tmp_path, "[route:echo]\npath = /echo\necho = yes\n",
                       base=_base(core="max_connections = 2\n"))
    try:
        async def scenario():
            first = await connect(gw.url("/echo"))
            second = await connect(gw.url("/echo"))
            with pytest.raises(InvalidStatus) as info:
                await connect(gw.url("/echo"))
            assert info.value.response.status_code == 503
            assert info.value.response.headers["Retry-After"].isdigit()
            await first.close()
            await asyncio.sleep(0.2)
            third = await connect(gw.url("/echo"))  # room again once one left
            await third.send("ok")
            assert await third.recv() == "ok"
            await second.close()
            await third.close()
        run(scenario())
    finally:
        assert gw.stop() == 0


# ---------------------------------------------------------------- TLS


def test_tls_listener_with_sni_picks_the_second_certificate(tmp_path):
    from certs import TestCA

    ca = TestCA()
    cert, key = ca.write_leaf(tmp_path, "default", "localhost", "127.0.0.1")
    sni = tmp_path / "sni"
    sni.mkdir()
    ca.write_combined(sni / "second.test.pem", "second.test")
    gw = start_gateway(tmp_path, "[route:echo]\npath = /echo\necho = yes\n",
                       base=_base(tls=f"tls_cert = {cert}\ntls_key = {key}\n"
                                  f"tls_sni_dir = {sni}\n"))
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    try:
        async def common_name(server_hostname):
            async with connect(gw.url("/echo", scheme="wss"), ssl=client_ctx,
                               server_hostname=server_hostname) as ws:
                await ws.send("over tls")
                assert await ws.recv() == "over tls"
                cert = ws.transport.get_extra_info("peercert")
                return dict(item[0] for item in cert["subject"])["commonName"]
        assert run(common_name("localhost")) == "localhost"
        assert run(common_name("second.test")) == "second.test"
    finally:
        assert gw.stop() == 0


def test_haproxy_endpoint_takes_client_address_from_proxy_header(tmp_path):
    gw = start_gateway(tmp_path, "[route:echo]\npath = /echo\necho = yes\n",
                       base=_base(endpoint="haproxy:tcp:0:interface=127.0.0.1"))
    try:
        header = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n"
        with socket.create_connection(("127.0.0.1", gw.port()), timeout=5) as sock:
            sock.sendall(header + upgrade_request("/echo"))
            assert sock.recv(4096).startswith(b"HTTP/1.1 101")
        event = gw.wait_event(lambda e: e.get("event") == "websocket.connection.accepted")
        assert event["client"] == "203.0.113.7:40000"
    finally:
        assert gw.stop() == 0


def _base(endpoint="tcp:0:interface=127.0.0.1", tls="", core="", **limits):
    lines = "".join(f"{key} = {value}\n" for key, value in limits.items())
    return (f"[wsgate]\nnode_id = test-node\nlog_format = json\n{core}\n"
            f"[listen:main]\nendpoint = {endpoint}\n{tls}{lines}\n")


def test_haproxy_header_comes_before_tls(tmp_path):
    from certs import TestCA

    ca = TestCA()
    cert, key = ca.write_leaf(tmp_path, "default", "localhost")
    gw = start_gateway(tmp_path, "[route:echo]\npath = /echo\necho = yes\n",
                       base=_base(endpoint="haproxy:tcp:0:interface=127.0.0.1",
                                  tls=f"tls_cert = {cert}\ntls_key = {key}\n"))
    try:
        ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
        raw = socket.create_connection(("127.0.0.1", gw.port()), timeout=5)
        raw.sendall(b"PROXY TCP6 2001:db8::5 ::1 40001 443\r\n")
        with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(upgrade_request("/echo", host="localhost"))
            assert sock.recv(4096).startswith(b"HTTP/1.1 101")
        event = gw.wait_event(lambda e: e.get("event") == "websocket.connection.accepted")
        assert event["client"] == "[2001:db8::5]:40001"
    finally:
        assert gw.stop() == 0
