"""Hostile clients against the terminated routes (echo, broadcast) and the listeners.

Each test sends what an attacker would, over real sockets, and prints the
gateway's RSS, fd and CPU figures (``-s`` shows them) before asserting bounds.
Proxy routes have their own module (test_hostile_proxy.py).
"""

import json
import socket
import struct
import time
import urllib.parse
import urllib.request

import pytest

from harness import parse_response, start_gateway
from rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Figures,
    RawClient,
    close_frame,
    deflate_bomb,
    frame,
    open_fds,
    rss_mib,
)

MiB = 1024 * 1024

CONFIG = """
[wsgate]
node_id = hostile
log_format = json

[listen:main]
endpoint = tcp:0:interface=127.0.0.1
handshake_timeout = 2s
ping_interval = 0

[listen:deflate]
endpoint = tcp:0:interface=127.0.0.1
compression = permessage-deflate
ping_interval = 0

[admin]
endpoint = tcp:0:interface=127.0.0.1

[route:echo]
path = /echo
echo = yes

[route:hoard]
path = /hoard
echo = yes
max_send_buffer = 512MiB

[route:room]
path = /room/{name}
broadcast = room:{name}
include_sender = yes
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("hostile"), "", base=CONFIG,
                       listeners=("main", "deflate", "admin"))
    yield gw
    assert gw.stop() == 0


def _echo_round_trip(port, payload=b"still here"):
    client = RawClient(port, "/echo")
    client.send_message(payload)
    opcode, data, _ = client.recv_frame()
    client.send(close_frame(1000))
    client.close()
    return data


def _offer_without_reading(client, total, deadline_s, message=MiB):
    """Send *message*-byte binary messages without reading, until *total* bytes are
    offered, *deadline_s* passes, or the gateway stops taking them (2 s without progress).
    Returns the bytes the gateway accepted and the rest of the frame it was in the
    middle of (to be sent before any other frame)."""
    payload = frame(OP_BINARY, bytes(message))
    client.sock.setblocking(False)
    sent = 0
    view = memoryview(payload)
    offset = 0
    last_progress = time.monotonic()
    deadline = time.monotonic() + deadline_s
    while sent < total and time.monotonic() < deadline:
        try:
            n = client.sock.send(view[offset:])
        except BlockingIOError:
            if time.monotonic() - last_progress > 2:
                break  # the gateway stopped reading this client
            time.sleep(0.01)
            continue
        sent += n
        offset += n
        last_progress = time.monotonic()
        if offset == len(payload):
            offset = 0
    client.sock.setblocking(True)
    return sent, bytes(view[offset:]) if offset else b""


# ----------------------------------------------------------------- non-reading clients


def test_echo_client_that_never_reads_is_not_read_beyond_max_send_buffer(gateway):
    """Issue 16, item 1: 1.2 GiB offered used to grow RSS 59 -> 1,358 MiB."""
    figures = Figures(gateway.proc.pid, "echo, 1 MiB messages never read")
    client = RawClient(gateway.port(), "/echo", rcvbuf=64 * 1024)
    accepted, rest = _offer_without_reading(client, 600 * MiB, deadline_s=30)
    figures.report(accepted_mib=round(accepted / MiB, 1))
    assert accepted < 64 * MiB, "the gateway kept reading a client that never reads"
    assert figures.rss_growth < 16
    # The client reads again: every accepted message comes back, and it still works.
    for _ in range(accepted // (MiB + 14)):
        opcode, data, _ = client.recv_frame(timeout=20)
        assert opcode == OP_BINARY and len(data) == MiB
    if rest:  # the gateway reads again once its buffer drained: finish the cut message
        client.send(rest)
        opcode, data, _ = client.recv_frame(timeout=20)
        assert opcode == OP_BINARY and len(data) == MiB
    client.send_message(b"after the flood")
    assert client.recv_frame(timeout=20)[1] == b"after the flood"
    client.send(close_frame(1000))
    assert client.recv_until_close()[0] == 1000
    client.close()


def test_memory_a_closed_non_reader_held_is_released_at_once(gateway):
    """Issue 16, item 1: closed connections kept 609 MB of write buffer in reference
    cycles until gc.collect(). A route with a huge max_send_buffer lets the buffer grow."""
    pid = gateway.proc.pid
    before = rss_mib(pid)
    client = RawClient(gateway.port(), "/hoard", rcvbuf=64 * 1024)
    accepted, _ = _offer_without_reading(client, 160 * MiB, deadline_s=30)
    time.sleep(0.5)
    peak = rss_mib(pid)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # RST: the gateway's connection is lost with its buffer full
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and rss_mib(pid) - before > 32:
        time.sleep(0.2)
    after = rss_mib(pid)
    print(f"\n[hostile] non-reader on a 512 MiB max_send_buffer route: accepted "
          f"{accepted / MiB:.0f} MiB, RSS {before:.1f} -> peak {peak:.1f} -> after close "
          f"{after:.1f} MiB")
    assert peak - before > 64, "the test did not make the gateway buffer anything"
    assert after - before < 32, "a closed connection's write buffer stayed in memory"


def test_ping_flood_never_read_is_closed_and_bounded(gateway):
    """Issue 16, items 1 and 4: pongs nobody reads grew RSS byte for byte."""
    figures = Figures(gateway.proc.pid, "ping flood, pongs never read")
    client = RawClient(gateway.port(), "/echo", rcvbuf=64 * 1024)
    ping = frame(OP_PING, bytes(125))
    burst = ping * 512
    client.sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + 10
    while time.monotonic() < deadline and sent < 200 * MiB:
        try:
            sent += client.sock.send(burst)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            time.sleep(0.01)
    client.sock.setblocking(True)
    figures.report(offered_mib=round(sent / MiB, 1))
    assert figures.rss_growth < 16
    # The pongs before the close may never reach a client that does not read: the
    # gateway drops it after the close handshake timeout. The event says what happened.
    code, reason, before = client.recv_until_close(timeout=20)
    assert code in (1008, None) and all(op == OP_PONG for op, _, _ in before)
    client.close()
    event = gateway.wait_event(lambda e: e.get("event") == "websocket.connection.closed"
                               and e.get("close_reason") == "too many control frames")
    assert event["close_code"] == 1008 and event["closed_by"] == "gateway"
    assert _echo_round_trip(gateway.port()) == b"still here"


def test_broadcast_sender_that_never_reads_its_own_messages_is_bounded(gateway):
    """Issue 16, item 1: broadcast with include_sender, the client publishes and never reads."""
    figures = Figures(gateway.proc.pid, "broadcast include_sender, never read")
    client = RawClient(gateway.port(), "/room/flood", rcvbuf=64 * 1024)
    accepted, _ = _offer_without_reading(client, 300 * MiB, deadline_s=20, message=256 * 1024)
    figures.report(accepted_mib=round(accepted / MiB, 1))
    assert figures.rss_growth < 16
    client.close()


# ----------------------------------------------------------------- frames


def test_a_million_empty_fragments_is_1009_and_cheap(gateway):
    """Issue 16, item 4: 1,000,000 empty continuation frames cost 7.9 CPU seconds and were
    never counted; beyond max_fragments (1024) the message is closed with 1009."""
    figures = Figures(gateway.proc.pid, "1,000,000 empty fragments in one message")
    client = RawClient(gateway.port(), "/echo")
    client.send(frame(OP_TEXT, b"", fin=False))
    empty = frame(OP_CONT, b"", fin=False)
    block = empty * 10000
    sent = 0
    try:
        for _ in range(100):  # 100 × 10,000 frames, 6 MB
            client.sock.sendall(block)
            sent += 10000
    except (BrokenPipeError, ConnectionResetError):
        pass
    code, reason, _ = client.recv_until_close(timeout=20)
    figures.report(frames_sent=sent)
    assert code == 1009 and reason == b"too many fragments"
    assert figures.cpu < 3.0, "closing the flood cost the gateway too much CPU"
    client.close()
    assert _echo_round_trip(gateway.port()) == b"still here"


def test_a_message_in_many_fragments_under_the_limit_is_echoed_whole(gateway):
    """1,000 one-byte fragments (under max_fragments) are one message, reassembled."""
    client = RawClient(gateway.port(), "/echo")
    body = bytes(range(256)) * 4
    parts = [frame(OP_BINARY, body[:1], fin=False)]
    parts += [frame(OP_CONT, body[i:i + 1], fin=False) for i in range(1, 999)]
    parts.append(frame(OP_CONT, body[999:1000], fin=True))
    client.send(b"".join(parts))
    opcode, data, _ = client.recv_frame()
    assert opcode == OP_BINARY and data == body[:1000]
    client.send(close_frame(1000))
    client.close()


def test_deflate_bomb_on_echo_is_1009_with_bounded_memory(gateway):
    """Compressed size against inflated size: 100 MiB of zeros in ~100 KB."""
    figures = Figures(gateway.proc.pid, "deflate bomb, 100 MiB inflated, echo")
    bomb = deflate_bomb(100 * MiB)
    client = RawClient(gateway.port("deflate"), "/echo", extensions="permessage-deflate")
    assert "permessage-deflate" in client.head
    client.send(frame(OP_BINARY, bomb, rsv1=True))
    code, _, _ = client.recv_until_close(timeout=20)
    figures.report(compressed_kib=len(bomb) // 1024)
    assert code == 1009
    assert figures.rss_growth < 16
    client.close()


def test_forbidden_close_codes_are_answered_with_1002(gateway):
    """Issue 16, item 5 (terminated side): codes RFC 6455 §7.4 forbids on the wire get
    1002; a reason that is not UTF-8 gets 1007 (invalid payload data)."""
    for payload, answer in ((struct.pack("!H", 1005), 1002), (struct.pack("!H", 1006), 1002),
                            (struct.pack("!H", 999), 1002), (struct.pack("!H", 1016), 1002),
                            (struct.pack("!H", 5000), 1002), (b"\x03", 1002),
                            (struct.pack("!H", 1000) + b"\xff\xfe", 1007)):
        client = RawClient(gateway.port(), "/echo")
        client.send(frame(OP_CLOSE, payload))
        code, _, _ = client.recv_until_close()
        assert code == answer, payload
        client.close()


# ----------------------------------------------------------------- heads


def _head_answer(port, chunks, pause=0.0):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
                if pause:
                    time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                got = sock.recv(65536)
                if not got:
                    break
                data += got
        except ConnectionResetError:
            pass
    return data


def _upgrade(path, extra):
    return (b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n")


@pytest.mark.parametrize("size", [20 * 1024, 60 * 1024, 81_000])
@pytest.mark.parametrize("writes", [1, 2])
def test_oversize_head_in_one_or_two_writes_is_431(gateway, size, writes):
    """Issue 16, item 3: a 20 KiB, 60 KiB or 81 KB head in one or two writes got a 101."""
    head = _upgrade(b"/echo", b"X-Pad: " + b"a" * size + b"\r\n")
    cut = len(head) // 2
    chunks = [head] if writes == 1 else [head[:cut], head[cut:]]
    assert parse_response(_head_answer(gateway.port(), chunks))[0] == 431


def test_oversize_head_byte_by_byte_is_431(gateway):
    head = _upgrade(b"/echo", b"X-Pad: " + b"a" * (17 * 1024) + b"\r\n")
    chunks = [head[i:i + 1] for i in range(16 * 1024)] + [head[16 * 1024:]]
    assert parse_response(_head_answer(gateway.port(), chunks))[0] == 431


def test_header_line_bound_holds_however_the_head_is_split(gateway):
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
    for chunks in ([_upgrade(b"/echo", many)], [_upgrade(b"/echo", many)[:40],
                                               _upgrade(b"/echo", many)[40:]]):
        assert parse_response(_head_answer(gateway.port(), chunks))[0] == 431
    enough = b"".join(b"X-H%d: v\r\n" % i for i in range(100 - 5))  # + 5 upgrade headers
    assert parse_response(_head_answer(gateway.port(), [_upgrade(b"/echo", enough)]))[0] == 101


def test_slowloris_on_the_main_listener_is_cut_at_the_handshake_timeout(gateway):
    pid = gateway.proc.pid
    fds_before = open_fds(pid)
    socks = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", gateway.port()), timeout=5)
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        socks.append(sock)
    started = time.monotonic()
    for sock in socks:
        try:
            sock.sendall(b"X-Slow: 1\r\n")
        except OSError:
            pass
    closed = 0
    for sock in socks:
        sock.settimeout(max(0.1, 6 - (time.monotonic() - started)))
        try:
            if sock.recv(100) == b"":
                closed += 1
        except ConnectionResetError:
            closed += 1
        except socket.timeout:
            pass
        sock.close()
    time.sleep(0.5)
    print(f"\n[hostile] slowloris on main: 200 slow heads, {closed} cut within the 2 s "
          f"handshake_timeout (+margin); fds {fds_before} -> {open_fds(pid)}")
    assert closed == 200
    assert open_fds(pid) <= fds_before + 2


# ----------------------------------------------------------------- closes and events


def _admin(gw, method, path):
    request = urllib.request.Request(f"http://127.0.0.1:{gw.port('admin')}{path}",
                                     method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read().decode() or "null")


def _conn_id(gw, route):
    for _ in range(50):
        _, listing = _admin(gw, "GET", "/connections")
        ids = [c["id"] for c in listing["connections"] if c["route"] == route]
        if ids:
            return ids[-1]
        time.sleep(0.05)
    raise AssertionError("connection not listed")


def test_kick_reason_is_cut_to_123_bytes_on_a_character_boundary_and_logged(gateway):
    """Issue 16, items 6 and 15: 100 × "é" sent a 202-byte close frame; the closed event
    logged the client's reply instead of what the gateway sent."""
    client = RawClient(gateway.port(), "/room/kick")
    conn_id = _conn_id(gateway, "room")
    reason = urllib.parse.quote("é" * 100)
    status, _ = _admin(gateway, "DELETE", f"/connections/{conn_id}?code=4003&reason={reason}")
    assert status == 200
    code, sent_reason, _ = client.recv_until_close()
    assert code == 4003
    assert len(sent_reason) <= 123 and sent_reason.decode("utf-8") == "é" * 61
    client.send(close_frame(1000))  # a client that does not echo the code
    assert client.wait_closed(5)
    client.close()
    event = gateway.wait_event(lambda e: e.get("event") == "websocket.connection.closed"
                               and e.get("conn_id") == conn_id)
    assert (event["close_code"], event["close_code_reply"], event["closed_by"]) == \
        (4003, 1000, "gateway")
    assert event["close_reason"] == "é" * 61


def test_closed_event_when_the_client_closes_first(gateway):
    client = RawClient(gateway.port(), "/echo")
    conn_id = _conn_id(gateway, "echo")
    client.send(close_frame(4000, b"done"))
    assert client.recv_until_close()[0] == 4000
    client.close()
    event = gateway.wait_event(lambda e: e.get("event") == "websocket.connection.closed"
                               and e.get("conn_id") == conn_id)
    assert (event["close_code"], event["close_reason"], event["close_code_reply"],
            event["closed_by"]) == (4000, "done", 4000, "client")


def test_closed_event_without_any_close_frame_has_a_null_code(gateway):
    client = RawClient(gateway.port(), "/echo")
    conn_id = _conn_id(gateway, "echo")
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    event = gateway.wait_event(lambda e: e.get("event") == "websocket.connection.closed"
                               and e.get("conn_id") == conn_id)
    assert event["close_code"] is None and event["close_code_reply"] is None
    assert event["closed_by"] == "client"
