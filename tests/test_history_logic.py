"""History, positions, channel settings and the Redis envelope, in memory (no sockets).

The wire tests are tests/test_history.py and tests/test_presence.py.
"""

import base64
import json
import textwrap

import pytest
from twisted.internet.task import Clock

from wsgate.config import ConfigError, load
from wsgate.pubsub import Message, json_delivery
from wsgate.pubsub.history import (
    NOTHING_YET,
    NO_POLICY,
    ChannelPolicy,
    ChannelSettings,
    MemoryHistory,
    check_routes,
    parse_position,
    templates_overlap,
)
from wsgate.pubsub.memory import MemoryBroker
from wsgate.pubsub.redis import decode, encode


def history(policy=ChannelPolicy(history=5), max_channels=10000, clock=None):
    clock = clock or Clock()
    settings = ChannelSettings([("room:{r}", policy)], max_history_channels=max_channels)
    return MemoryHistory(clock, settings), clock


def text(n):
    return Message(f"m{n}".encode(), False, "node", "conn")


def payloads(recovery):
    return [message.payload.decode() for _, message in recovery.entries]


def seq(position):
    return parse_position(position)[1]


def ep(h, channel="room:a"):
    """The epoch of *channel*'s history in *h* (each channel's history has its own)."""
    return parse_position(h.position(channel))[0]


# ------------------------------------------------------------------ MemoryHistory


def test_positions_are_epoch_and_a_counter_and_messages_carry_them():
    h, _ = history()
    assert h.position("room:a") == NOTHING_YET  # before any message
    positions = [h.append("room:a", text(n)) for n in range(1, 4)]
    e = ep(h)
    assert e.startswith(h.epoch)
    assert positions == [f"{e}:{n}" for n in (1, 2, 3)]
    assert h.position("room:a") == f"{e}:3"
    assert h.since("room:a", NOTHING_YET).ok  # "seen nothing" gets everything
    h.append("room:b", text(1))
    assert seq(h.position("room:b")) == 1  # each channel counts its own,
    assert ep(h, "room:b") != e  # in an epoch of its own
    recovery = h.since("room:a", None)
    assert recovery.ok and recovery.position == f"{e}:3"
    assert [(pos, m.pos, m.payload) for pos, m in recovery.entries] == [
        (p, p, f"m{n}".encode()) for n, p in zip((1, 2, 3), positions)]


def test_a_channel_without_history_gets_no_position():
    h, _ = history()
    assert h.append("chat:a", text(1)) is None
    assert h.position("chat:a") is None
    recovery = h.since("chat:a", None)
    assert (recovery.position, recovery.ok, recovery.entries) == (None, False, ())
    assert h.channels() == 0


def test_ring_keeps_the_last_n_and_refuses_a_position_whose_successor_is_gone():
    h, _ = history(ChannelPolicy(history=5))
    for n in range(1, 9):
        h.append("room:a", text(n))
    e = ep(h)
    assert payloads(h.since("room:a", None)) == ["m4", "m5", "m6", "m7", "m8"]
    assert payloads(h.since("room:a", f"{e}:3")) == ["m4", "m5", "m6", "m7", "m8"]
    assert payloads(h.since("room:a", f"{e}:6")) == ["m7", "m8"]
    for gone in (f"{e}:2", f"{e}:0"):  # m3 (resp. m1) was trimmed: a gap
        recovery = h.since("room:a", gone)
        assert not recovery.ok and recovery.entries == ()
        assert recovery.position == f"{e}:8"
    at_head = h.since("room:a", f"{e}:8")
    assert at_head.ok and at_head.entries == ()
    assert not h.since("room:a", f"{e}:9").ok  # a position this store never gave


def test_limit_cuts_the_oldest_first():
    h, _ = history(ChannelPolicy(history=10))
    for n in range(1, 8):
        h.append("room:a", text(n))
    assert payloads(h.since("room:a", None, limit=2)) == ["m1", "m2"]
    assert payloads(h.since("room:a", f"{ep(h)}:4", limit=2)) == ["m5", "m6"]


def test_history_ttl_forgets_old_messages():
    h, clock = history(ChannelPolicy(history=100, history_ttl=10))
    h.append("room:a", text(1))  # t = 0
    e = ep(h)
    clock.advance(5)
    h.append("room:a", text(2))  # t = 5
    clock.advance(6)  # t = 11: m1 is older than 10 s
    assert payloads(h.since("room:a", None)) == ["m2"]
    assert not h.since("room:a", f"{e}:0").ok  # m1 cannot be had
    assert payloads(h.since("room:a", f"{e}:1")) == ["m2"]
    clock.advance(5)  # t = 16: m2 too
    assert h.since("room:a", None).entries == ()
    assert not h.since("room:a", f"{e}:1").ok
    assert h.since("room:a", f"{e}:2").ok  # nothing was missed
    assert h.position("room:a") == f"{e}:2"  # the counter outlives its messages


def test_history_ttl_alone_is_bounded_by_age_only():
    h, clock = history(ChannelPolicy(history=0, history_ttl=60))
    for n in range(1, 501):
        h.append("room:a", text(n))
    assert len(h.since("room:a", None).entries) == 500
    clock.advance(61)
    assert h.since("room:a", None).entries == ()


@pytest.mark.parametrize("since", [
    "", "garbage", "zz:3", "EPOCH:abc", ":5", "E:-1", "E:1.5", "E:+1", "E:1:x", "x" * 300 + ":1",
])
def test_a_garbage_position_is_refused(since):
    h, _ = history()
    h.append("room:a", text(1))
    recovery = h.since("room:a", since)
    assert not recovery.ok and recovery.entries == ()
    assert recovery.position == f"{ep(h)}:1"


def test_a_position_of_another_epoch_is_refused():
    one, _ = history()
    two, _ = history()  # another process start
    assert one.epoch != two.epoch
    for n in range(1, 4):
        one.append("room:a", text(n))
        two.append("room:a", text(n))
    assert one.since("room:a", f"{ep(one)}:1").ok
    refused = one.since("room:a", f"{ep(two)}:1")  # same counter, other store
    assert not refused.ok and refused.entries == ()


def test_max_history_channels_forgets_the_least_recently_published():
    h, _ = history(ChannelPolicy(history=10), max_channels=2)
    for n in range(1, 4):
        h.append("room:a", text(n))
    a = ep(h)
    h.append("room:b", text(1))
    b = ep(h, "room:b")
    h.append("room:a", text(4))  # a is now more recent than b
    h.append("room:c", text(1))  # over the bound: b goes
    assert h.channels() == 2
    assert payloads(h.since("room:a", f"{a}:2")) == ["m3", "m4"]
    assert not h.since("room:b", f"{b}:1").ok  # what b had is gone, and said so
    assert seq(h.position("room:b")) == 0 and ep(h, "room:b") != b  # b anew; c goes
    assert h.channels() == 2
    h.append("room:d", text(1))  # a goes now
    assert h.channels() == 2
    assert not h.since("room:a", f"{a}:2").ok


def test_a_position_from_before_an_eviction_is_not_misread():
    h, _ = history(ChannelPolicy(history=100), max_channels=1)
    for n in range(1, 6):
        h.append("room:a", text(n))
    old = h.position("room:a")  # E:5, the client's last position
    h.append("room:b", text(1))  # room:a is evicted
    for n in range(1, 11):
        h.append("room:a", text(100 + n))  # room:a again: m101..m110
    recovery = h.since("room:a", old)
    # Either all of m101..m110 (what followed, as far as the store knows) or a refusal;
    # never m106..m110 as if m101..m105 had come before the client's position.
    assert not recovery.ok or payloads(recovery) == [f"m{100 + n}" for n in range(1, 11)]


# ------------------------------------------------------------------ memory broker


def test_memory_broker_records_publishes_but_not_control_messages():
    clock = Clock()
    broker = MemoryBroker(clock, ChannelSettings([("room:{r}", ChannelPolicy(history=10))]))
    got = []

    class Sub:
        wants_json = True

        def deliver(self, message, prepared):
            got.append((message, json.loads(prepared.payload)))

    broker.subscribe("room:a", Sub())
    broker.publish("room:a", Message(b"one", False))
    broker.publish("room:a", Message(b'{"type":"join"}', False, control=True))
    broker.publish("room:a", Message(b"\x00\xff", True))
    epoch = parse_position(got[0][1]["pos"])[0]
    assert epoch.startswith(broker.history.epoch)
    assert [body for _, body in got] == [
        {"pos": f"{epoch}:1", "data": "one"}, {"type": "join"},
        {"pos": f"{epoch}:2", "b64": base64.b64encode(b"\x00\xff").decode()}]
    assert got[1][0].pos is None
    recovered = []
    broker.recover("room:a", f"{epoch}:0").addCallback(recovered.append)
    assert [m.payload for _, m in recovered[0].entries] == [b"one", b"\x00\xff"]
    positions = []
    broker.position("room:a").addCallback(positions.append)
    broker.position("chat:a").addCallback(positions.append)
    assert positions == [f"{epoch}:2", None]


# ------------------------------------------------------------------ templates, settings


@pytest.mark.parametrize("a,b,overlap", [
    ("room:{r}", "room:{x}", True),
    ("room:{r}", "chat:{r}", False),
    ("room:{r}", "room:lobby", True),
    ("room:lobby", "room:lobby", True),
    ("room:lobby", "room:lobbyx", False),
    ("room:lobby", "room:{r}x", False),
    ("room:{a}:{b}", "room:x", False),  # needs a second ':'
    ("room:{a}:{b}", "room:{c}", True),  # room:x:y
    ("{a}", "anything", True),
    ("a{x}", "{y}b", True),  # "ab"
    ("user:{u}", "user:", False),  # a placeholder stands for at least one character
    ("x{a}", "x", False),
    ("{a}{b}", "x", False),
    ("{a}{b}", "xy", True),
    ("{a}:{b}", "x", False),
    ("a:{x}", "{y}:b", True),
    ("p{x}q", "p{y}r", False),
    ("", "", True),
    ("", "{a}", False),
])
def test_templates_overlap(a, b, overlap):
    assert templates_overlap(a, b) is overlap
    assert templates_overlap(b, a) is overlap


def test_channel_policy_keeps_history_with_a_count_or_an_age():
    assert not ChannelPolicy().keeps_history
    assert not ChannelPolicy(presence=True, join_leave=True).keeps_history
    assert ChannelPolicy(history=1).keeps_history
    assert ChannelPolicy(history_ttl=0.5).keeps_history


def test_channel_settings_answers_from_the_matching_route():
    lobby = ChannelPolicy(history=10)
    rooms = ChannelPolicy(history=10)
    users = ChannelPolicy(presence=True)
    settings = ChannelSettings([("room:lobby", lobby), ("room:{r}", rooms),
                                ("user:{u}", users), ("quiet:{q}", NO_POLICY)],
                               max_history_channels=7)
    assert settings.max_history_channels == 7
    assert settings("room:lobby") is lobby
    assert settings("room:dev") is rooms
    assert settings("user:alice") is users
    assert settings("quiet:x") == NO_POLICY
    assert settings("room:") == NO_POLICY  # a placeholder is never empty
    assert settings("other") == NO_POLICY
    assert settings("xroom:dev") == NO_POLICY  # anchored at both ends
    assert settings("room:dev") is rooms  # cached answers are the same
    assert ChannelSettings().max_history_channels == 10000


def test_check_routes_names_two_overlapping_routes_that_disagree():
    a = ChannelPolicy(history=10)
    assert check_routes([("a", "room:{r}", a), ("b", "room:{x}", ChannelPolicy(history=10))]) \
        is None
    assert check_routes([("a", "room:{r}", a), ("b", "chat:{r}", ChannelPolicy())]) is None
    assert check_routes([("a", "room:{r}", a), ("b", "chat:{r}", ChannelPolicy()),
                         ("c", "room:lobby", ChannelPolicy(history=10, presence=True))]) \
        == ("a", "c")


# ------------------------------------------------------------------ wire formats


def test_json_delivery_of_text_and_binary():
    assert json.loads(json_delivery(Message("héllo \"x\"".encode(), False, pos="e1:3"))) == {
        "pos": "e1:3", "data": "héllo \"x\""}
    raw = bytes(range(256))
    body = json.loads(json_delivery(Message(raw, True, pos="e1:4")))
    assert body == {"pos": "e1:4", "b64": base64.b64encode(raw).decode()}
    assert base64.b64decode(body["b64"]) == raw
    assert json.loads(json_delivery(Message(b"plain", False))) == {"pos": None, "data": "plain"}


@pytest.mark.parametrize("message,wire", [
    (Message(b"hi\nthere", False, "n1", "c1", "ab12:7"), b"wsg1 t n1 c1 ab12:7\nhi\nthere"),
    (Message(b"hi", False, "n1", "c1"), b"wsg1 t n1 c1\nhi"),
    (Message(b"\x00\xff", True, "n1", "c1", "ab12:8"), b"wsg1 b n1 c1 ab12:8\n\x00\xff"),
    (Message(b"\x00\xff", True, "n1", "c1"), b"wsg1 b n1 c1\n\x00\xff"),
    (Message(b'{"type":"join"}', False, "n1", "c1", control=True),
     b'wsg1 j n1 c1\n{"type":"join"}'),
])
def test_redis_envelope_round_trip(message, wire):
    assert encode(message) == wire
    assert decode(wire) == message
    assert decode(wire.decode("latin-1").encode("latin-1")) == message


def test_redis_messages_without_an_envelope():
    assert decode(b"plain text") == Message(b"plain text", False)
    assert decode(b"\xff\xfe") == Message(b"\xff\xfe", True)
    assert decode(b"wsg1 x n c\nodd kind").payload == b"wsg1 x n c\nodd kind"
    assert decode(b"wsg1 t n c 1:2 extra\nbody").pos is None  # not an envelope: all payload


# ------------------------------------------------------------------ config


def write(tmp_path, text):
    path = tmp_path / "gw.ini"
    path.write_text("[listen:main]\nendpoint = tcp:0:interface=127.0.0.1\n"
                    + textwrap.dedent(text))
    return str(path)


def routes(*specs, start=0):
    text = ""
    for i, (template, keys) in enumerate(specs, start):
        text += f"\n[route:r{i}]\npath = /p{i}/{{x}}\nbroadcast = {template}\n{keys}\n"
    return text


@pytest.mark.parametrize("specs", [
    [("room:{x}", "history = 10"), ("room:{x}", "history = 20")],
    [("room:{x}", "history = 10"), ("room:lobby", "history = 10\nhistory_ttl = 1m")],
    [("room:{x}", "presence = yes"), ("{x}:dev", "")],
    [("room:{x}", "join_leave = yes"), ("room:{x}", "")],
])
def test_overlapping_routes_with_different_channel_settings_are_a_config_error(
        tmp_path, specs):
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, routes(*specs)))
    assert info.value.section == "route:r1" and info.value.key == "history"
    assert "[route:r0]" in str(info.value)


@pytest.mark.parametrize("specs", [
    [("room:{x}", "history = 10"), ("room:{x}", "history = 10")],
    [("room:{x}", "history = 10"), ("chat:{x}", "")],
    [("room:{x}", "history = 10\nhistory_ttl = 10s\npresence = yes\njoin_leave = yes"),
     ("user:{x}", "history = 3")],
])
def test_routes_that_agree_or_cannot_meet_load(tmp_path, specs):
    config = load(write(tmp_path, routes(*specs)))
    policies = [route.target.policy for route in config.routes]
    assert policies[0].history == 10


def test_channel_keys_are_parsed(tmp_path):
    config = load(write(tmp_path, "[wsgate]\nmax_history_channels = 50\n" + routes(
        ("room:{x}", "history = 7\nhistory_ttl = 1500ms\npresence = yes\njoin_leave = on"),
        ("plain:{x}", ""))))
    assert config.core.max_history_channels == 50
    rooms, plain = (route.target.policy for route in config.routes)
    assert rooms == ChannelPolicy(history=7, history_ttl=1.5, presence=True, join_leave=True)
    assert plain == ChannelPolicy()  # all off by default
    assert load(write(tmp_path, routes(("a:{x}", "")))).core.max_history_channels == 10000


@pytest.mark.parametrize("text,section,key", [
    ("[wsgate]\nmax_history_channels = 0\n", "wsgate", "max_history_channels"),
    ("[wsgate]\nbroker = r\n[broker:r]\ntype = redis\nurl = redis://127.0.0.1:1/0\n"
     "presence_ttl = 500ms\n", "broker:r", "presence_ttl"),
    (routes(("a:{x}", "history = -1")), "route:r0", "history"),
    (routes(("a:{x}", "history_ttl = soon")), "route:r0", "history_ttl"),
    (routes(("a:{x}", "presence = maybe")), "route:r0", "presence"),
])
def test_bad_channel_values_are_config_errors(tmp_path, text, section, key):
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text + routes(("b:{x}", ""), start=5)))
    assert (info.value.section, info.value.key) == (section, key)


def test_presence_ttl_default_and_minimum(tmp_path):
    base = "[wsgate]\nbroker = r\n[broker:r]\ntype = redis\nurl = redis://127.0.0.1:1/0\n"
    assert load(write(tmp_path, base + routes(("a:{x}", "")))).brokers["r"].presence_ttl == 30
    config = load(write(tmp_path, base + "presence_ttl = 1s\n" + routes(("a:{x}", ""))))
    assert config.brokers["r"].presence_ttl == 1


def test_deliveries_held_during_a_slow_history_read_are_bounded():
    """While the history is read, live deliveries are held back, at most max_send_buffer
    bytes of them: past that the client gets 1013 instead of the gateway's memory."""
    from types import SimpleNamespace

    from twisted.internet import defer

    from wsgate.metrics import Stats
    from wsgate.pubsub import LocalFanout
    from wsgate.targets.broadcast import BroadcastSubscriber, BroadcastTarget

    class SlowBroker:
        def __init__(self):
            self.local = LocalFanout()

        def subscribe(self, channel, subscriber):
            self.local.add(channel, subscriber)

        def unsubscribe(self, channel, subscriber):
            self.local.remove(channel, subscriber)

        def position(self, channel):
            return defer.Deferred()  # never answers

    closes = []
    protocol = SimpleNamespace(
        connection=SimpleNamespace(conn_id="c1", identity=None, since=0.0),
        send_buffer=SimpleNamespace(listener=None), state="open", STATE_OPEN="open",
        close_with=lambda code, reason: closes.append((code, reason)))
    broker = SlowBroker()
    stats = Stats()
    subscriber = BroadcastSubscriber(broker, "room:a", BroadcastTarget(
        "room:a", max_send_buffer=10_000), "node", stats, "chat")
    subscriber.choose_subprotocol(["wsgate.v1.json"])
    subscriber.opened(protocol)
    for n in range(99):
        broker.local.fan_out("room:a", Message(b"x" * 100, False, pos=f"e:{n}"))
    assert closes == [] and len(subscriber.catching_up) == 99
    broker.local.fan_out("room:a", Message(b"x" * 200, False, pos="e:99"))
    assert closes == [(1013, "slow consumer")]
    assert subscriber.catching_up is None
    assert stats.dropped[("chat", "slow_consumer_closed")] == 1


def test_a_recovery_joining_a_redis_read_sent_before_it_misses_no_live_message():
    """Concurrent recoveries of a channel share one Redis read; a recovery that joins the
    read late, after a message past the read's answer was delivered live (so before
    this subscriber could receive it), gets that message too: no gap, no second read."""
    from twisted.internet import defer

    from wsgate.config.model import BrokerSettings
    from wsgate.pubsub.redis import RedisBroker

    class FakeRedis:
        def __init__(self):
            self.reads = []

        def eval(self, script, keys, args):
            self.reads.append(defer.Deferred())
            return self.reads[-1]

    def answer(d, last):  # READ_SCRIPT's answer: epoch, seq, entries 1..last
        d.callback([b"e", str(last).encode(), [
            (f"{n}-1".encode(), [b"t", b"0", b"h", b"wsg1 t n c", b"p", f"m{n}".encode()])
            for n in range(1, last + 1)]])

    broker = RedisBroker(BrokerSettings("r", "redis", url="redis://127.0.0.1:1/0"), Clock())
    broker.configure(ChannelSettings([("room:{r}", ChannelPolicy(history=10))]))
    redis = FakeRedis()
    broker.command = lambda: redis
    got = []
    broker.recover("room:a", "e:0").addCallback(got.append)  # reads up to e:1
    broker.recover("room:a", "e:0").addCallback(got.append)  # joins: nothing came live
    broker._received(None, b"wsgate:room:a", encode(Message(b"m2", False, pos="e:2")))
    broker.recover("room:a", "e:0").addCallback(got.append)  # joins after e:2 went by
    assert len(redis.reads) == 1
    answer(redis.reads[0], 1)
    assert [payloads(r) for r in got[:2]] == [["m1"], ["m1"]]
    assert payloads(got[2]) == ["m1", "m2"] and got[2].position == "e:2"
    assert len(redis.reads) == 1  # one read for all three


def test_recovered_frames_are_shared_per_channel_and_bounded_in_bytes():
    """A position is unique within one channel's history only (Redis epochs are random):
    the framing cache keys by channel too, and holds at most max_bytes of frames."""
    from wsgate.targets.broadcast import _FramedHistory

    frames = _FramedHistory(max_count=10, max_bytes=1000)
    a = frames.get("room:a", Message(b"for a", False, pos="e:1"))
    assert frames.get("room:a", Message(b"for a", False, pos="e:1")) is a
    b = frames.get("room:b", Message(b"for b", False, pos="e:1"))
    assert b is not a and b"for b" in b.payloadHybi
    frames.get("room:c", Message(b"x" * 990, False, pos="e:1"))
    assert frames.get("room:a", Message(b"for a", False, pos="e:1")) is not a  # evicted


def test_the_subscribed_message_lists_at_most_a_thousand_members():
    """Each join reads and sends the member list: in a crowded channel it is cut (and
    says so), so a flood of joins does not cost the whole membership each time."""
    from types import SimpleNamespace

    from wsgate.metrics import Stats
    from wsgate.pubsub.presence import member
    from wsgate.targets.broadcast import MEMBERS_IN_SUBSCRIBED, BroadcastSubscriber, \
        BroadcastTarget

    broker = MemoryBroker(Clock(), ChannelSettings([("room:{r}", ChannelPolicy(
        presence=True))]))
    for n in range(MEMBERS_IN_SUBSCRIBED + 500):
        broker.presence.join("room:a", member(f"c{n}", None, "node", float(n)))
    sent = []
    protocol = SimpleNamespace(
        connection=SimpleNamespace(conn_id="me", identity=None, since=1e9),
        send_buffer=SimpleNamespace(listener=None), state="open", STATE_OPEN="open",
        send=lambda payload, is_binary: sent.append(json.loads(payload)))
    subscriber = BroadcastSubscriber(broker, "room:a", BroadcastTarget(
        "room:a", policy=ChannelPolicy(presence=True)), "node", Stats(), "chat")
    subscriber.choose_subprotocol(["wsgate.v1.json"])
    subscriber.opened(protocol)
    (subscribed,) = sent
    assert subscribed["type"] == "subscribed"
    assert len(subscribed["members"]) == MEMBERS_IN_SUBSCRIBED
    assert subscribed["members_truncated"] is True
    assert subscribed["members"][0]["id"] == "c0"  # the oldest first


def test_reading_positions_of_made_up_channels_makes_no_history():
    """Subscribers name channels (``/chat/{room}``) and the admin API reads any: reading
    a position or recovering makes no history, so a client naming a million rooms
    neither grows the store nor pushes real channels out of max_history_channels."""
    h, _ = history(ChannelPolicy(history=10), max_channels=2)
    h.append("room:real", text(1))
    real = h.position("room:real")
    for n in range(5000):
        assert h.position(f"room:fake{n}") == NOTHING_YET
        assert h.since(f"room:fake{n}", NOTHING_YET).ok
        assert not h.since(f"room:fake{n}", real).ok  # another history's position
    assert h.channels() == 1
    assert payloads(h.since("room:real", NOTHING_YET)) == ["m1"]
    h.append("room:late", text(1))  # recorded after its subscriber's "nothing yet"
    assert payloads(h.since("room:late", NOTHING_YET)) == ["m1"]
