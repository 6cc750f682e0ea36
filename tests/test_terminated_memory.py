"""The terminated routes' protocol driven in memory: ``StringTransport`` and a ``Clock``,
no sockets, so a failure points at the line (the real-socket twins are in test_hostile)."""

import struct

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from rawws import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, _parse, frame
from wsgate import config, gateway as gateway_module
from wsgate.pubsub.memory import MemoryBroker
from wsgate.routing import build_router

CONFIG = """
[wsgate]
node_id = memory

[listen:main]
endpoint = tcp:0:interface=127.0.0.1
ping_interval = 0
max_fragments = 8

[route:echo]
path = /echo
echo = yes
max_send_buffer = 1000
"""

UPGRADE = (b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


@pytest.fixture
def gateway(tmp_path):
    path = tmp_path / "wsgate.ini"
    path.write_text(CONFIG)
    cfg = config.load(str(path))
    return gateway_module.Gateway(cfg, build_router(cfg), MemoryBroker(), Clock())


def open_echo(gateway):
    """An open echo connection: ``(protocol, transport)``, the 101 already read."""
    handshake = gateway_module.GatewayFactory(gateway, "main").buildProtocol(None)
    transport = StringTransport()
    handshake.makeConnection(transport)
    handshake.dataReceived(UPGRADE)
    assert transport.value().startswith(b"HTTP/1.1 101")
    transport.clear()
    return transport.protocol, transport


def frames_written(transport):
    data, out = transport.value(), []
    while data:
        parsed = _parse(data)
        assert parsed is not None, "a partial frame was written"
        (opcode, payload, _), used = parsed
        out.append((opcode, payload))
        data = data[used:]
    return out


def close_code(frames):
    closes = [payload for opcode, payload in frames if opcode == OP_CLOSE]
    return struct.unpack("!H", closes[0][:2])[0] if closes else None


def test_echo_sends_the_message_back(gateway):
    protocol, transport = open_echo(gateway)
    protocol.dataReceived(frame(OP_TEXT, b"hello"))
    assert frames_written(transport) == [(OP_TEXT, b"hello")]


def test_fragments_beyond_max_fragments_close_1009_and_later_input_is_not_parsed(gateway):
    protocol, transport = open_echo(gateway)
    data = frame(OP_TEXT, b"a", fin=False) + frame(OP_CONT, b"b", fin=False) * 9
    protocol.dataReceived(data)
    assert close_code(frames_written(transport)) == 1009
    protocol.dataReceived(frame(OP_CONT, b"", fin=False) * 20_000)  # 120 KB more
    assert protocol._parse_budget <= 0  # what came past the budget was discarded
    protocol.dataReceived(b"\xff" * 100_000)  # garbage: never parsed, nothing sent
    assert len(frames_written(transport)) == 1


def test_fragments_up_to_the_limit_make_one_message(gateway):
    protocol, transport = open_echo(gateway)
    data = frame(OP_BINARY, b"0", fin=False)
    data += b"".join(frame(OP_CONT, b"%d" % i, fin=False) for i in range(1, 8))
    data += frame(OP_CONT, b"8")  # the first frame and max_fragments continuation frames
    protocol.dataReceived(data)
    assert frames_written(transport) == [(OP_BINARY, b"012345678")]


def test_more_control_frames_than_the_rate_close_1008(gateway):
    protocol, transport = open_echo(gateway)
    protocol.dataReceived(frame(OP_PING, b"p") * 9)  # the rate is max_fragments per second
    written = frames_written(transport)
    assert [op for op, _ in written].count(0xA) == 8 and close_code(written) == 1008


def test_control_frame_rate_is_per_second(gateway):
    protocol, transport = open_echo(gateway)
    protocol.dataReceived(frame(OP_PING, b"p") * 8)
    gateway.clock.advance(1)
    protocol.dataReceived(frame(OP_PING, b"p") * 8)
    assert close_code(frames_written(transport)) is None


def test_a_client_whose_echoes_pile_up_is_not_read(gateway):
    protocol, transport = open_echo(gateway)
    protocol.send_buffer.pauseProducing()  # what Twisted does when the socket is full
    protocol.dataReceived(frame(OP_BINARY, bytes(600)))
    assert transport.producerState == "producing"
    protocol.dataReceived(frame(OP_BINARY, bytes(600)))  # 1,200 > max_send_buffer 1,000
    assert transport.producerState == "paused"
    protocol.send_buffer.resumeProducing()  # drained
    assert transport.producerState == "producing"


def test_kick_reason_is_cut_on_a_character_boundary(gateway):
    protocol, transport = open_echo(gateway)
    protocol.close_with(4003, "é" * 100)
    (opcode, payload), = frames_written(transport)
    assert len(payload) <= 125 and payload[2:].decode("utf-8") == "é" * 61


# ----------------------------------------------------------------- the head limit


def handshake_answer(gateway, *chunks):
    handshake = gateway_module.GatewayFactory(gateway, "main").buildProtocol(None)
    transport = StringTransport()
    handshake.makeConnection(transport)
    for chunk in chunks:
        handshake.dataReceived(chunk)
    return transport.value().split(b"\r\n", 1)[0]


def _with_headers(extra):
    return UPGRADE[:-2] + extra + b"\r\n"


@pytest.mark.parametrize("size", [20 * 1024, 60 * 1024, 81_000])
def test_an_oversize_head_in_one_read_is_431(gateway, size):
    """Issue 16, item 3: the limit was checked only until the blank line arrived, so a
    head read at once was never measured."""
    head = _with_headers(b"X-Pad: " + b"a" * size + b"\r\n")
    assert handshake_answer(gateway, head) == b"HTTP/1.1 431 Request Header Fields Too Large"
    cut = len(head) - 100
    assert handshake_answer(gateway, head[:cut], head[cut:]).startswith(b"HTTP/1.1 431")


def test_an_oversize_head_byte_by_byte_is_431(gateway):
    head = _with_headers(b"X-Pad: " + b"a" * (17 * 1024) + b"\r\n")
    assert handshake_answer(gateway, *[head[i:i + 1] for i in range(len(head))]).startswith(
        b"HTTP/1.1 431")


def test_more_than_100_header_lines_is_431_however_split(gateway):
    many = _with_headers(b"".join(b"X-H%d: v\r\n" % i for i in range(100)))  # 105 in all
    assert handshake_answer(gateway, many).startswith(b"HTTP/1.1 431")
    assert handshake_answer(gateway, *[many[i:i + 7] for i in range(0, len(many), 7)]) \
        .startswith(b"HTTP/1.1 431")
    enough = _with_headers(b"".join(b"X-H%d: v\r\n" % i for i in range(95)))  # 100 in all
    assert handshake_answer(gateway, enough).startswith(b"HTTP/1.1 101")
