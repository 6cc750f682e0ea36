"""FrameScanner and close-frame helpers in memory: the proxy's limits, each pointing at a line.

The real-socket counterparts are in test_hostile_proxy.py.
"""

import struct
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from rawws import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, deflate_bomb, frame
from wsgate import frames
from wsgate.flow import ControlFrameRate


def feed_all(scanner, stream, step=None):
    """Feed *stream* whole or in chunks of *step* bytes; return every item."""
    if step is None:
        return scanner.feed(stream)
    out = []
    for i in range(0, len(stream), step):
        out.extend(scanner.feed(stream[i:i + step]))
    return out


def passed(out):
    return b"".join(item for item in out if isinstance(item, bytes))


def violations(out):
    return [item for item in out if isinstance(item, frames.Violation)]


def fragmented(count, payload=b""):
    """One text message of *count* frames (masked, as a client sends them)."""
    parts = [frame(OP_TEXT, payload, fin=count == 1)]
    parts += [frame(OP_CONT, payload, fin=False) for _ in range(count - 2)]
    if count > 1:
        parts.append(frame(OP_CONT, payload))
    return b"".join(parts)


def compressed(data, compressor=None):
    """*data* as a permessage-deflate payload (RFC 7692 §7.2.1: trailing 00 00 ff ff removed)."""
    compressor = compressor or zlib.compressobj(6, zlib.DEFLATED, -15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def close(code, reason=b"", mask=True):
    return frame(OP_CLOSE, struct.pack("!H", code) + reason, mask=mask)


# ------------------------------------------------------------- max_fragments


def test_the_first_frame_and_max_fragments_continuation_frames_pass():
    """The testsuite's 65,536 fragments (cases 9.3.1, 9.4.1) are 65,537 frames: the
    first, 65,535 more and an empty last one; max_fragments = 65536 lets them through."""
    scanner = frames.FrameScanner(1 << 20, max_fragments=4)
    stream = fragmented(5, b"ab") + fragmented(1, b"x")
    out = scanner.feed(stream)
    assert passed(out) == stream and not violations(out)
    assert scanner.messages == 2


def test_one_frame_beyond_max_fragments_is_1009_and_not_forwarded():
    scanner = frames.FrameScanner(1 << 20, max_fragments=4)
    stream = fragmented(6)
    out = scanner.feed(stream)
    assert passed(out) == stream[:5 * 6]  # empty masked frames are 6 bytes each
    (violation,) = violations(out)
    assert (violation.code, violation.reason) == (1009, "too many fragments")
    assert scanner.at_boundary


def test_fragments_are_counted_per_message_across_feeds():
    scanner = frames.FrameScanner(1 << 20, max_fragments=3)
    out = feed_all(scanner, fragmented(3, b"q") * 50, step=5)
    assert not violations(out) and scanner.messages == 50


def test_a_million_empty_fragments_cost_a_bounded_number_of_parsed_frames():
    """After the violation at most CLOSE_REPLY_FRAMES frames are parsed; the rest is ignored."""
    scanner = frames.FrameScanner(1 << 20, max_fragments=1024)
    stream = frame(OP_TEXT, fin=False) + frame(OP_CONT, fin=False) * 999_998 + frame(OP_CONT)
    items = 0
    for i in range(0, len(stream), 65536):
        out = scanner.feed(stream[i:i + 65536])
        items += len(out)
        if scanner.broken:
            break
    assert scanner.broken, "still parsing after the budget"
    assert i < 3 * 65536  # gave up within the first few reads
    assert scanner.feed(b"\xff" * 1000) == []  # unparsed from now on, even garbage


# ------------------------------------------------------------- after a violation


def test_close_reply_within_the_budget_is_found_after_a_violation():
    scanner = frames.FrameScanner(4)
    out = scanner.feed(frame(OP_TEXT, b"12345"))
    assert violations(out)[0].code == 1009
    noise = frame(OP_BINARY, b"xy") * (frames.CLOSE_REPLY_FRAMES - 2)
    out = scanner.feed(noise + close(1009))
    assert [type(item) for item in out] == [frames.ControlFrame]  # data discarded
    assert out[0].close_code_reason() == (1009, "")


@pytest.mark.parametrize("bad", [
    frame(0x3, b"reserved opcode"), frame(OP_PING, b"fragmented ping", fin=False),
    frame(OP_PING, b"p" * 126), frame(OP_CONT, b"continuation without a message"),
])
def test_close_reply_after_a_protocol_error_is_found(bad):
    """The offending frame's length is known: it is skipped, and the close reply read
    (else the gateway waits out the close timeout: "FAILED BY CLIENT" in the testsuite)."""
    scanner = frames.FrameScanner(1 << 20)
    out = scanner.feed(bad + frame(OP_TEXT, b"more"))
    assert violations(out)[0].code == 1002 and passed(out) == b""
    out = scanner.feed(close(1002))
    assert [item.close_code_reason() for item in out] == [(1002, "")]


def test_oversize_close_is_1002_and_ends_parsing():
    """Its sender has closed: no reply will come (testsuite case 7.3.6)."""
    scanner = frames.FrameScanner(1 << 20)
    (violation,) = violations(scanner.feed(close(1000, b"r" * 124)))
    assert (violation.code, violation.closed) == (1002, (None, ""))
    assert scanner.broken


def test_impossible_frame_length_stops_parsing():
    bad = bytes((0x82, 0xFF)) + struct.pack("!Q", 1 << 63) + b"\0" * 4
    scanner = frames.FrameScanner(1 << 20)
    assert violations(scanner.feed(bad))[0].code == 1002
    assert scanner.broken and scanner.feed(close(1002)) == []


def test_close_reply_after_the_budget_is_not_looked_for():
    scanner = frames.FrameScanner(4)
    scanner.feed(frame(OP_TEXT, b"12345"))
    out = scanner.feed(frame(OP_BINARY, b"xy") * frames.CLOSE_REPLY_FRAMES + close(1000))
    assert out == [] and scanner.broken


# ------------------------------------------------------------- control frames


def test_control_frames_beyond_the_rate_are_1008():
    clock = Clock()
    scanner = frames.FrameScanner(1 << 20, control_rate=ControlFrameRate(3, clock))
    out = scanner.feed(frame(OP_PING, b"1") * 3)
    assert [item.opcode for item in out] == [OP_PING] * 3
    clock.advance(1.0)  # a new one-second window
    out = scanner.feed(frame(OP_PING, b"2") * 3 + frame(OP_PING, b"3") + frame(OP_TEXT, b"x"))
    assert [type(item) for item in out] == [frames.ControlFrame] * 3 + [frames.Violation]
    assert (out[-1].code, out[-1].reason) == (1008, "too many control frames")


def test_control_frames_are_unlimited_without_a_rate():
    out = frames.FrameScanner(1 << 20).feed(frame(OP_PING) * 5000)
    assert len(out) == 5000 and not violations(out)


# ------------------------------------------------------------- close codes


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
@pytest.mark.parametrize("mask", [True, False], ids=["from-client", "from-upstream"])
def test_close_code_forbidden_on_the_wire_is_1002_and_not_handed_on(code, mask):
    scanner = frames.FrameScanner(1 << 20)
    data = frame(OP_TEXT, b"hi", mask=mask)
    out = scanner.feed(data + close(code, b"why", mask=mask) + frame(OP_TEXT, b"after", mask=mask))
    assert passed(out) == data
    (violation,) = violations(out)
    assert violation.code == 1002 and violation.closed == (code, "why")
    assert scanner.broken  # the sender closed: nothing after its close is read


@pytest.mark.parametrize("payload, answer", [
    (b"\x03", 1002), (struct.pack("!H", 1000) + b"\xff\xfe", 1007),
    (struct.pack("!H", 4000) + b"caf\xc3", 1007)], ids=["one-byte", "invalid-utf8", "cut-utf8"])
def test_malformed_close_payload_is_1002_or_1007_for_a_reason_not_utf8(payload, answer):
    """1007 for a reason that is not UTF-8, as Autobahn answers on the terminated routes."""
    (violation,) = violations(frames.FrameScanner(100).feed(frame(OP_CLOSE, payload)))
    assert violation.code == answer and violation.closed is not None


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012,
                                  1013, 1014, 3000, 4000, 4999])
def test_close_codes_allowed_on_the_wire_are_handed_on(code):
    (item,) = frames.FrameScanner(100).feed(close(code, "bientôt".encode()))
    assert item.close_code_reason() == (code, "bientôt")


def test_empty_close_is_handed_on():
    (item,) = frames.FrameScanner(100).feed(frame(OP_CLOSE))
    assert item.close_code_reason() == (None, "")


# ------------------------------------------------------------- reasons


@pytest.mark.parametrize("reason,expected", [
    ("é" * 100, "é" * 61),  # 2-byte characters: 122 bytes, not a half character
    ("x" * 200, "x" * 123),
    ("ab" + "😀" * 40, "ab" + "😀" * 30),  # 4-byte characters: 122 bytes
    ("€" * 41, "€" * 41),  # exactly 123 bytes
    ("short", "short"),
])
def test_reason_bytes_cut_on_a_character_boundary(reason, expected):
    data = frames.reason_bytes(reason)
    assert len(data) <= 123 and data.decode("utf-8") == expected


def test_close_payload_fits_a_control_frame():
    payload = frames.close_payload(4003, "é" * 100)
    assert len(payload) <= 125 and payload[:2] == struct.pack("!H", 4003)
    assert frames.close_frame_error(payload) is None  # what the gateway sends is valid
    frames.control_frame(OP_CLOSE, payload)  # no ValueError


# ------------------------------------------------------------- inflated size


def deflating_scanner(limit):
    return frames.FrameScanner(limit, inflate=frames.InflateLimit(limit))


def test_compressed_message_at_the_limit_passes_and_one_byte_more_is_1009():
    scanner = deflating_scanner(1000)
    fits = frame(OP_TEXT, compressed(b"a" * 1000), rsv1=True)
    out = scanner.feed(fits)
    assert passed(out) == fits and not violations(out)
    over = frame(OP_TEXT, compressed(b"a" * 1001), rsv1=True)
    out = scanner.feed(over)
    assert passed(out) == b""  # not a byte of the offending frame
    assert [(v.code, v.reason) for v in violations(out)] == [(1009, "message too big")]
    assert scanner.at_boundary


def test_inflated_size_sums_fragments_and_counts_the_wire_size():
    scanner = deflating_scanner(1000)
    payload = compressed(b"b" * 900 + b"c" * 100)
    half = len(payload) // 2
    stream = frame(OP_BINARY, payload[:half], fin=False, rsv1=True) + frame(OP_CONT, payload[half:])
    out = feed_all(scanner, stream, step=3)
    assert passed(out) == stream and not violations(out)
    assert scanner.messages == 1 and scanner.payload_bytes == len(payload)  # wire bytes
    more = compressed(b"b" * 1001)
    half = len(more) // 2
    out = scanner.feed(frame(OP_BINARY, more[:half], fin=False, rsv1=True)
                       + frame(OP_CONT, more[half:]))
    assert violations(out)[0].code == 1009


def test_bomb_split_across_feeds_is_cut_mid_frame():
    """Known only once the payload inflates: earlier bytes of the frame went out already."""
    scanner = deflating_scanner(1 << 20)
    bomb = frame(OP_BINARY, deflate_bomb(100 << 20), rsv1=True)
    out = scanner.feed(bomb[:20])  # the header and a few bytes: still under the limit
    assert passed(out) == bomb[:20] and not violations(out)
    out = feed_all(scanner, bomb[20:], step=65536)
    assert violations(out)[0].code == 1009 and passed(out) == b""
    assert not scanner.at_boundary  # the relay must drop the upstream, not send it a close


def test_bomb_memory_stays_bounded_and_later_messages_are_not_inflated():
    scanner = deflating_scanner(1 << 20)
    bomb = frame(OP_BINARY, deflate_bomb(100 << 20), rsv1=True)
    tracemalloc.start()
    try:
        out = feed_all(scanner, bomb + frame(OP_BINARY, deflate_bomb(100 << 20), rsv1=True),
                       step=65536)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [v.code for v in violations(out)] == [1009]
    assert scanner.inflate._inflater is None  # the decompressor was dropped
    assert peak < 2 << 20, f"inflating took {peak} bytes"


def test_message_using_the_previous_context_is_1007():
    """The client was told client_no_context_takeover; a context it kept cannot be read."""
    scanner = deflating_scanner(1 << 20)
    shared = zlib.compressobj(6, zlib.DEFLATED, -15)
    text = b"the same sentence, sent twice over " * 4
    out = scanner.feed(frame(OP_TEXT, compressed(text, shared), rsv1=True))
    assert not violations(out)
    out = scanner.feed(frame(OP_TEXT, compressed(text, shared), rsv1=True))
    assert [(v.code, v.reason) for v in violations(out)] == [(1007, "invalid compressed data")]


def test_uncompressed_messages_are_not_inflated_and_rsv1_is_ignored_without_deflate():
    scanner = deflating_scanner(10)
    out = scanner.feed(frame(OP_TEXT, b"0123456789"))
    assert not violations(out)
    plain = frames.FrameScanner(100)
    data = frame(OP_TEXT, b"not deflate at all", rsv1=True)
    assert plain.feed(data) == [data]  # passed on unchanged: the upstream judges it


def test_final_deflate_block_then_the_tail_is_read():
    """RFC 7692 §7.2.3.4 allows BFINAL blocks; the appended 00 00 ff ff follows one."""
    scanner = deflating_scanner(100)
    payload = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = payload.compress(b"z" * 100) + payload.flush(zlib.Z_FINISH)
    out = scanner.feed(frame(OP_TEXT, data, rsv1=True))
    assert not violations(out)
    data = zlib.compressobj(6, zlib.DEFLATED, -15)
    out = scanner.feed(frame(OP_TEXT, data.compress(b"z" * 101) + data.flush(zlib.Z_FINISH),
                             rsv1=True))
    assert violations(out)[0].code == 1009


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=6),
       st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=20))
def test_compressed_stream_passes_unchanged_whatever_the_chunking(payloads, cuts):
    stream = b"".join(frame(OP_BINARY, compressed(p), rsv1=True) + frame(OP_PING, b"p")
                      for p in payloads)
    scanner = deflating_scanner(300)
    out, pos, i = [], 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        out.extend(scanner.feed(stream[pos:pos + step]))
        pos += step
        i += 1
    assert not violations(out)
    assert b"".join(item if isinstance(item, bytes) else item.raw for item in out) == stream
    assert scanner.messages == len(payloads) and scanner.at_boundary
