"""Pure logic with fast unit tests: frames, forwarding, GCRA on a Clock, interfaces."""

import os
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from wsgate import frames
from wsgate.forwarding import client_origin, forwarded_headers, parse_networks
from wsgate.http import parse_head
from wsgate.interfaces import IBroker, IPolicy, IPolicyFactory, IPolicySession, ISubscriber
from wsgate.policies import PolicyContext, discovered_factories
from wsgate.policies.ratelimit import Gcra


def client_frame(opcode, payload, fin=True):
    """A masked frame as a client sends it."""
    mask = os.urandom(4)
    head = bytes((0x80 * fin | opcode,))
    n = len(payload)
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 65536:
        head += bytes((0x80 | 126,)) + struct.pack("!H", n)
    else:
        head += bytes((0x80 | 127,)) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


# ------------------------------------------------------------- frames


def test_scanner_passes_data_and_extracts_control_frames():
    scanner = frames.FrameScanner(1 << 20)
    text, ping = client_frame(1, b"hello"), client_frame(9, b"ping!")
    binary, close = client_frame(2, b"x" * 300), client_frame(8, struct.pack("!H", 4001) + b"bye")
    out = scanner.feed(text + ping + binary + close)
    passed = b"".join(item for item in out if isinstance(item, bytes))
    controls = [item for item in out if isinstance(item, frames.ControlFrame)]
    assert passed == text + binary
    assert [c.raw for c in controls] == [ping, close]
    assert [c.opcode for c in controls] == [9, 8]
    assert controls[0].payload == b"ping!"
    assert controls[1].close_code_reason() == (4001, "bye")
    assert scanner.messages == 2 and scanner.payload_bytes == 305 and scanner.at_boundary


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=400), min_size=1, max_size=8),
       st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30))
def test_scanner_output_is_independent_of_chunking(payloads, cuts):
    stream = b"".join(client_frame(2, p) for p in payloads)
    scanner = frames.FrameScanner(1 << 20)
    out, pos, i = [], 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        out.extend(scanner.feed(stream[pos:pos + step]))
        pos += step
        i += 1
    assert b"".join(out) == stream
    assert scanner.messages == len(payloads) and scanner.at_boundary


def test_scanner_refuses_oversize_before_forwarding_it():
    scanner = frames.FrameScanner(10)
    fits = client_frame(1, b"0123456789")
    out = scanner.feed(fits + client_frame(1, b"0123456789X"))
    assert out[0] == fits and len(out) == 2  # not a byte of the oversize frame
    assert isinstance(out[1], frames.Violation) and out[1].code == 1009


def test_scanner_counts_fragments_as_one_message_and_limits_their_sum():
    scanner = frames.FrameScanner(8)
    out = scanner.feed(client_frame(1, b"abcd", fin=False) + client_frame(0, b"efgh"))
    assert scanner.messages == 1 and not any(isinstance(i, frames.Violation) for i in out)
    out = scanner.feed(client_frame(1, b"abcd", fin=False) + client_frame(0, b"efghi"))
    assert out[-1].code == 1009


def test_scanner_drops_a_whole_message_when_told():
    verdicts = iter([None, frames.DROP_MESSAGE, None])
    scanner = frames.FrameScanner(1 << 20, on_message=lambda op, size: next(verdicts))
    keep1, drop_a, drop_b, keep2 = (client_frame(1, b"one"), client_frame(1, b"dr", fin=False),
                                    client_frame(0, b"op"), client_frame(1, b"two"))
    ping = client_frame(9, b"p")
    stream = keep1 + drop_a + ping + drop_b + keep2
    out = []
    for i in range(0, len(stream), 3):
        out.extend(scanner.feed(stream[i:i + 3]))
    passed = b"".join(item for item in out if isinstance(item, bytes))
    assert passed == keep1 + keep2
    assert [c.opcode for c in out if isinstance(c, frames.ControlFrame)] == [9]


@pytest.mark.parametrize("bad", [
    bytes((0x83, 0x80)) + b"\0" * 4,  # reserved opcode
    bytes((0x09, 0x80)) + b"\0" * 4,  # fragmented ping
    bytes((0x80, 0x80)) + b"\0" * 4,  # continuation without a message
])
def test_scanner_flags_protocol_errors(bad):
    out = frames.FrameScanner(100).feed(bad)
    assert isinstance(out[-1], frames.Violation) and out[-1].code == 1002


def test_control_frame_builders():
    assert frames.control_frame(frames.OP_PING, b"ab") == b"\x89\x02ab"
    masked = frames.control_frame(frames.OP_CLOSE, frames.close_payload(1001, "bye"), True)
    scanner = frames.FrameScanner(10)
    (frame,) = scanner.feed(masked)
    assert frame.close_code_reason() == (1001, "bye")
    assert frames.close_payload(None) == b""


# ---------------------------------------------------------- forwarding


HEAD = parse_head(b"GET /x HTTP/1.1\r\nHost: gw.example:8443\r\n"
                  b"X-Forwarded-For: 198.51.100.1, 10.1.2.3\r\nForwarded: for=198.51.100.1\r\n"
                  b"Cookie: a=b\r\nX-Other: o\r\n\r\n")


def test_untrusted_peer_xff_is_replaced_not_appended():
    origin = client_origin("203.0.113.5", HEAD, parse_networks(["10.0.0.0/8"]))
    assert origin.ip == "203.0.113.5" and origin.forwarded_for == "203.0.113.5"
    headers = dict(forwarded_headers(origin, HEAD, "cid", True))
    assert headers["X-Forwarded-For"] == "203.0.113.5"
    assert headers["Forwarded"] == 'for=203.0.113.5;proto=https;host="gw.example:8443"'
    assert headers["Cookie"] == "a=b" and "X-Other" not in headers
    assert headers["X-Request-Id"] == "cid"


def test_trusted_peer_chain_is_kept_and_walked_from_the_right():
    trusted = parse_networks(["10.0.0.0/8", "127.0.0.1/32"])
    origin = client_origin("127.0.0.1", HEAD, trusted)
    assert origin.ip == "198.51.100.1"  # 10.1.2.3 is a trusted proxy too
    assert origin.forwarded_for == "198.51.100.1, 10.1.2.3, 127.0.0.1"
    headers = dict(forwarded_headers(origin, HEAD, "cid", False))
    assert headers["Forwarded"].startswith("for=198.51.100.1, for=127.0.0.1;proto=http")


def test_default_trusts_nobody_not_even_loopback():
    assert client_origin("127.0.0.1", HEAD, ()).ip == "127.0.0.1"


# ----------------------------------------------------------------- GCRA


def test_gcra_allows_burst_then_paces():
    clock = Clock()
    limit = Gcra(rate=2.0, burst=2, clock=clock)
    assert [limit.take("k") for _ in range(2)] == [0, 0]
    wait = limit.take("k")
    assert wait == pytest.approx(0.5)
    assert limit.take("other") == 0  # keys are independent
    clock.advance(0.5)
    assert limit.take("k") == 0
    assert limit.take("k") > 0


def test_gcra_forgets_idle_keys():
    clock = Clock()
    limit = Gcra(rate=100.0, burst=1, clock=clock)
    for i in range(2048):
        limit.take(f"k{i}")
        clock.advance(0.02)
    assert len(limit.tats) < 1100


# ------------------------------------------------------------ interfaces


def test_every_builtin_policy_type_is_a_plugin_and_builds_an_ipolicy(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("k1 label\n")
    settings = {
        "apikey": {"keys_file": str(keys)}, "jwt": {"secret": "s" * 32},
        "ratelimit": {"rate": "1/s", "messages": "5/s"}, "firewall": {"deny": "10.0.0.0/8"},
        "origin": {"allow": "https://a.example"}, "connlimit": {"max": "2"},
    }
    factories = discovered_factories()
    assert set(settings) <= set(factories)
    context = PolicyContext(Clock(), str(tmp_path))
    for name, factory_settings in settings.items():
        factory = factories[name]
        verifyObject(IPolicyFactory, factory)
        policy = factory(name, factory_settings, context)
        verifyObject(IPolicy, policy)


def test_sessions_subscribers_and_brokers_provide_their_interfaces():
    from wsgate.config import BrokerSettings
    from wsgate.metrics import Stats
    from wsgate.policies.connlimit import _Slot
    from wsgate.policies.ratelimit import MessageLimit
    from wsgate.pubsub.memory import MemoryBroker
    from wsgate.pubsub.redis import RedisBroker
    from wsgate.targets.broadcast import BroadcastSubscriber, BroadcastTarget

    verifyObject(IPolicySession, _Slot({}, "k"))
    verifyObject(IPolicySession, MessageLimit(Gcra(1.0, 1, Clock()), "close"))
    from wsgate.interfaces import IChannelHistory

    for broker in (MemoryBroker(), RedisBroker(
            BrokerSettings("r", "redis", url="redis://127.0.0.1:1/0"), Clock())):
        verifyObject(IBroker, broker)
        verifyObject(IChannelHistory, broker)
    session = BroadcastSubscriber(MemoryBroker(), "c", BroadcastTarget("c"), "node", Stats(),
                                  "r")
    session.conn_id = "x"
    verifyObject(ISubscriber, session)


def test_fast_paths_apply_to_the_installed_twisted():
    """If a Twisted upgrade silently disabled them, this says so."""
    from wsgate import fastpath

    assert fastpath.twisted_supported()


def test_idle_timer_fires_only_after_a_quiet_period():
    from wsgate.idle import IdleTimer

    clock, fired = Clock(), []
    timer = IdleTimer(clock, 10, lambda: fired.append(clock.seconds()))
    timer.touch()
    clock.advance(9)
    timer.touch()  # activity resets it
    clock.advance(9)
    assert fired == []
    clock.advance(1)
    assert fired == [19]
    timer.touch()
    timer.cancel()
    clock.advance(100)
    assert fired == [19] and not clock.getDelayedCalls()
    off = IdleTimer(clock, 0, lambda: fired.append("never"))
    off.touch()
    assert not clock.getDelayedCalls()


def test_after_a_message_level_violation_control_frames_are_still_read():
    scanner = frames.FrameScanner(4)
    too_big, more = client_frame(1, b"12345"), client_frame(2, b"xy")
    close = client_frame(8, struct.pack("!H", 1000))
    out = scanner.feed(too_big + more)
    assert isinstance(out[-1], frames.Violation) and out[-1].code == 1009
    out = scanner.feed(close)  # the data is discarded; the close reply is found
    assert [type(item) for item in out] == [frames.ControlFrame]
    assert out[0].close_code_reason() == (1000, "")


# ------------------------------------------------------------ UTF-8 validation

_utf8_samples = st.one_of(
    st.text().map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=40),
    st.lists(st.sampled_from([b"a", b"\xce\xba", b"\xe1\xbd\xb9", b"\xf0\x9f\x98\x80", b"\xed",
                              b"\xa0", b"\x80", b"\xf4\x90", b"\xf4\x8f\xbf\xbf", b"\xc0",
                              b"\xe0\x80", b"\xed\x9f\xbf", b"\xed\xa0\x80", b"\xff"]),
             max_size=12).map(b"".join),
)


@settings(max_examples=400, deadline=None)
@given(_utf8_samples, st.lists(st.integers(min_value=0, max_value=40), max_size=6))
@example(b"a\xed\xa0\x80", [2, 3])  # a surrogate, its lead byte alone in a chunk
@example(b"\xce\xba\xf4\x90\x80\x80", [3])  # past U+10FFFF, split (case 6.4.1)
@example(b"\xe1\xbd\xb9" * 3, [1, 4, 8])  # valid, split inside code points
def test_utf8_validator_gives_autobahns_fail_fast_verdicts(data, cuts):
    """wsgate.utf8 against Autobahn's own validator, chunk by chunk."""
    from autobahn.websocket.utf8validator import Utf8Validator as AutobahnValidator

    from wsgate.utf8 import Utf8Validator

    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
    ours, theirs = Utf8Validator(), AutobahnValidator()
    ours.reset()
    theirs.reset()
    for chunk in chunks:
        mine, ref = ours.validate(chunk), theirs.validate(chunk)
        assert mine[:2] == ref[:2], (chunks, chunk, mine, ref)
        if not ref[0]:
            break
    try:
        data.decode("utf-8")
        whole_valid = True
    except UnicodeDecodeError:
        whole_valid = False
    assert (ref[0] and ref[1]) == whole_valid
