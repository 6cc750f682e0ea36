"""The proxy relay driven in memory: a :class:`wsgate.targets.relay.Relay` between two
``StringTransport`` legs on the gateway's ``Clock``, no sockets, so a failure points at
the line (the real-socket twins are in test_proxy and test_hostile_proxy).

Frames from the client are masked, frames from the upstream are not; the gateway's own
frames follow the same rule. Every test ends with both legs gone, and then no timer of
the relay may be left in the clock (the ``splice`` fixture checks).
"""

import struct
from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from rawws import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, deflate_bomb, frame
from wsgate import config, gateway as gateway_module
from wsgate.pubsub.memory import MemoryBroker
from wsgate.routing import build_router
from wsgate.targets import relay as relay_module
from wsgate.targets.relay import CLOSE_RECEIVED, CLOSE_SENT, CLOSED, LOST, OPEN, Relay

PING_INTERVAL, PING_TIMEOUT, IDLE_TIMEOUT = 10, 5, 30

CONFIG = f"""
[wsgate]
node_id = memory

[listen:main]
endpoint = tcp:0:interface=127.0.0.1
ping_interval = {PING_INTERVAL}
ping_timeout = {PING_TIMEOUT}
max_message_size = 1000
max_fragments = 4

[listen:quiet]
endpoint = tcp:0:interface=127.0.0.1
ping_interval = 0

[route:app]
path = /app
upstream = ws://127.0.0.1:9/app

[route:idle]
path = /idle
upstream = ws://127.0.0.1:9/idle
idle_timeout = {IDLE_TIMEOUT}
"""


def load_gateway(tmp_path, text):
    """A real Gateway on a Clock from the config *text*; ``gateway.closed`` collects the
    arguments of every ``unregister`` call (the ``closed`` event's fields)."""
    path = tmp_path / "wsgate.ini"
    path.write_text(text)
    cfg = config.load(str(path))
    gateway = gateway_module.Gateway(cfg, build_router(cfg), MemoryBroker(), Clock())
    gateway.closed = []
    unregister = gateway.unregister

    def recording_unregister(connection, close_code, close_reason, closed_by,
                             close_code_reply=None):
        gateway.closed.append({"close_code": close_code, "close_reason": close_reason,
                               "close_code_reply": close_code_reply, "closed_by": closed_by})
        unregister(connection, close_code, close_reason, closed_by, close_code_reply)
    gateway.unregister = recording_unregister
    return gateway


def read_frames(data):
    """Whole frames in *data*: ``[(opcode, payload unmasked, fin, masked)]``."""
    out = []
    while data:
        assert len(data) >= 2, f"a partial frame: {data!r}"
        b0, b1 = data[0], data[1]
        length, pos = b1 & 0x7F, 2
        if length == 126:
            length, pos = struct.unpack("!H", data[2:4])[0], 4
        elif length == 127:
            length, pos = struct.unpack("!Q", data[2:10])[0], 10
        key = None
        if b1 & 0x80:
            key, pos = data[pos:pos + 4], pos + 4
        payload = data[pos:pos + length]
        assert len(payload) == length, f"a partial frame: {data!r}"
        if key is not None:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        out.append((b0 & 0x0F, payload, bool(b0 & 0x80), key is not None))
        data = data[pos + length:]
    return out


def close_of(payload):
    """``(code, reason)`` of a close frame's payload."""
    if not payload:
        return None, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8")


def close_frame(code, reason=b"", mask=True):
    return frame(OP_CLOSE, struct.pack("!H", code) + reason, mask=mask)


class Splice:
    """A started Relay between a client and an upstream ``StringTransport``."""

    def __init__(self, gateway, route="app", listener="main", compressed=False):
        self.gateway = gateway
        self.clock = gateway.clock
        route = next(r for r in gateway.config.routes if r.name == route)
        self.connection = gateway_module.Connection(
            gateway.new_conn_id(), route.name, "192.0.2.1:5000", self.clock.seconds())
        self.client, self.upstream = StringTransport(), StringTransport()
        upstream_leg = SimpleNamespace(transport=self.upstream, relay=None)
        self.relay = Relay(gateway, gateway.listener(listener), route, self.connection,
                           self.client, upstream_leg, compressed=compressed)
        self.relay.start(b"", b"")

    # what each side sends
    def client_sends(self, *chunks):
        for chunk in chunks:
            self.relay.from_client(chunk)

    def upstream_sends(self, *chunks):
        for chunk in chunks:
            self.relay.from_upstream(chunk)

    # what each side got since the last look
    def to_client(self):
        data = self.client.value()
        self.client.clear()
        return read_frames(data)

    def to_upstream(self):
        data = self.upstream.value()
        self.upstream.clear()
        return read_frames(data)

    # the transports' ends, as Twisted reports them
    def client_gone(self):
        if self.relay.client.state is not LOST:
            self.relay.client_lost()

    def upstream_gone(self):
        if self.relay.upstream.state is not LOST:
            self.relay.upstream_lost()

    @property
    def closed(self):
        """The one ``closed`` event's fields (fails unless exactly one was emitted)."""
        assert len(self.gateway.closed) == 1, self.gateway.closed
        return self.gateway.closed[0]


def closes(written):
    """``(code, reason)`` of each close frame among *written* frames."""
    return [close_of(payload) for opcode, payload, _, _ in written if opcode == OP_CLOSE]


@pytest.fixture
def gateway(tmp_path):
    return load_gateway(tmp_path, CONFIG)


@pytest.fixture
def splice(gateway):
    """A relay on route ``app``; after the test both legs go and no timer may be left."""
    splice = Splice(gateway)
    yield splice
    splice.client_gone()
    splice.upstream_gone()
    assert gateway.clock.getDelayedCalls() == []
    assert len(gateway.closed) == 1
    assert splice.connection.conn_id not in gateway.connections


# ------------------------------------------------------------------ data both ways


def test_messages_pass_unchanged_both_ways(splice):
    from_client = (frame(OP_TEXT, b"hello") + frame(OP_BINARY, b"a", fin=False)
                   + frame(OP_PING, b"theirs") + frame(OP_CONT, b"b"))
    splice.client_sends(from_client)
    assert splice.upstream.value() == from_client  # masked as the client masked it
    from_upstream = frame(OP_BINARY, bytes(300), mask=False) + frame(OP_PONG, b"x", mask=False)
    splice.upstream_sends(from_upstream)
    assert splice.client.value() == from_upstream
    connection = splice.connection
    assert (connection.messages_in, connection.bytes_in) == (2, 7)
    assert (connection.messages_out, connection.bytes_out) == (1, 300)


def test_bytes_split_anywhere_pass_unchanged(splice):
    data = frame(OP_TEXT, b"x" * 200) + frame(OP_PING, b"p") + frame(OP_BINARY, b"y" * 70)
    splice.client_sends(*[data[i:i + 1] for i in range(len(data))])
    assert splice.upstream.value() == data
    assert splice.connection.messages_in == 2


def test_the_connection_is_registered_while_relaying(splice, gateway):
    assert gateway.connections[splice.connection.conn_id] is splice.connection
    assert splice.connection.protocol is splice.relay  # kicks and drains close through it


# ------------------------------------------------------------------ flow control


def test_a_client_that_does_not_read_pauses_reading_the_upstream(splice):
    splice.client.producer.pauseProducing()  # what Twisted does when the socket is full
    assert splice.upstream.producerState == "paused"
    assert splice.client.producerState == "producing"
    splice.client.producer.resumeProducing()
    assert splice.upstream.producerState == "producing"


def test_an_upstream_that_does_not_read_pauses_reading_the_client(splice):
    splice.upstream.producer.pauseProducing()
    assert splice.client.producerState == "paused"
    assert splice.upstream.producerState == "producing"
    splice.upstream.producer.resumeProducing()
    assert splice.client.producerState == "producing"


def test_each_transport_is_a_streaming_producer_of_the_other(splice):
    assert splice.client.streaming and splice.upstream.streaming


def test_a_lost_client_lets_the_upstream_be_read_again(splice):
    splice.client.producer.pauseProducing()
    splice.client_gone()
    assert splice.upstream.producerState == "producing"
    assert splice.client.producer is None and splice.upstream.producer is None


def test_a_lost_client_does_not_stop_the_upstream(splice):
    """The producer registered is a pause-only wrapper: Twisted's stopProducing on a lost
    connection must not end the other leg, which still gets its close frame."""
    splice.client.producer.stopProducing()
    assert splice.upstream.producerState == "producing"


# ------------------------------------------------------------------ keepalive


def test_each_leg_is_pinged_and_its_pongs_are_swallowed(splice):
    splice.clock.advance(PING_INTERVAL)
    (op, ping_client, _, masked), = splice.to_client()
    assert op == OP_PING and not masked
    (op, ping_upstream, _, masked), = splice.to_upstream()
    assert op == OP_PING and masked  # the gateway is the upstream's client
    splice.client_sends(frame(OP_PONG, ping_client))
    splice.upstream_sends(frame(OP_PONG, ping_upstream, mask=False))
    assert splice.to_upstream() == [] and splice.to_client() == []
    splice.clock.advance(PING_TIMEOUT)  # answered: nobody is dropped
    assert not splice.client.disconnecting and not splice.upstream.disconnecting
    splice.clock.advance(PING_INTERVAL - PING_TIMEOUT)  # the next round
    assert [f[0] for f in splice.to_client()] == [OP_PING]
    assert [f[0] for f in splice.to_upstream()] == [OP_PING]


def test_a_pong_that_answers_no_gateway_ping_is_relayed(splice):
    splice.clock.advance(PING_INTERVAL)
    splice.to_upstream()
    (_, payload, _, _), = splice.to_client()
    splice.client_sends(frame(OP_PONG, b"not-" + payload))
    assert [f[:2] for f in splice.to_upstream()] == [(OP_PONG, b"not-" + payload)]


def test_a_ping_to_the_client_waits_for_the_frame_in_flight(splice):
    data = frame(OP_BINARY, bytes(100), mask=False)
    splice.upstream_sends(data[:50])
    splice.clock.advance(PING_INTERVAL)
    assert splice.client.value() == data[:50]  # no ping inside the upstream's frame
    splice.upstream_sends(data[50:])
    assert [f[0] for f in splice.to_client()] == [OP_BINARY, OP_PING]


def test_a_ping_to_the_upstream_waits_for_the_frame_in_flight(splice):
    data = frame(OP_TEXT, b"z" * 100)
    splice.client_sends(data[:60])
    splice.clock.advance(PING_INTERVAL)
    assert splice.upstream.value() == data[:60]
    splice.client_sends(data[60:])
    assert [f[0] for f in splice.to_upstream()] == [OP_TEXT, OP_PING]


def test_a_split_frame_header_is_held_so_a_ping_goes_first(splice):
    data = frame(OP_TEXT, b"z" * 100)
    splice.client_sends(data[:3])  # not even the whole header: nothing forwarded yet
    splice.clock.advance(PING_INTERVAL)
    splice.client_sends(data[3:])
    assert [f[0] for f in splice.to_upstream()] == [OP_PING, OP_TEXT]


def test_an_unanswered_ping_aborts_that_leg_only(splice):
    splice.clock.advance(PING_INTERVAL)
    (_, payload, _, _), = splice.to_upstream()
    splice.upstream_sends(frame(OP_PONG, payload, mask=False))
    splice.clock.advance(PING_TIMEOUT)
    assert splice.client.disconnected  # aborted: a peer that does not answer is gone
    assert splice.client.producer is None  # unregistered before closing (TLS waits on it)
    assert not splice.upstream.disconnecting
    splice.client_gone()
    assert closes(splice.to_upstream()) == [(1001, "going away")]
    splice.upstream_sends(close_frame(1001, b"going away", mask=False))
    splice.upstream_gone()
    assert splice.closed == {"close_code": None, "close_reason": "", "close_code_reply": None,
                             "closed_by": "gateway"}


# ------------------------------------------------------------------ closing


def test_a_client_close_is_relayed_and_the_answer_ends_both_legs(splice):
    close = close_frame(4000, b"bye")
    splice.client_sends(close)
    assert splice.upstream.value() == close  # relayed as it came
    splice.upstream.clear()
    reply = close_frame(4000, b"bye", mask=False)
    splice.upstream_sends(reply)
    assert splice.client.value() == reply
    assert splice.relay.client.state is CLOSED and splice.relay.upstream.state is CLOSED
    assert splice.client.disconnecting and splice.client.producer is None  # the server side
    assert not splice.upstream.disconnecting  # the upstream closes its TCP itself
    splice.upstream_gone()
    splice.client_gone()
    assert splice.closed == {"close_code": 4000, "close_reason": "bye",
                             "close_code_reply": 4000, "closed_by": "client"}


def test_an_upstream_that_never_answers_a_relayed_close_is_dropped(splice):
    """A silent upstream must not hold the client: it gets _CLOSE_TIMEOUT to answer."""
    splice.client_sends(close_frame(1000))
    splice.clock.advance(4.9)
    assert not splice.upstream.disconnected
    splice.clock.advance(0.2)
    assert splice.upstream.disconnected  # dropped: the relay then ends the client too


def test_each_leg_moves_through_its_close_states(splice):
    client, upstream = splice.relay.client, splice.relay.upstream
    assert (client.state, upstream.state) == (OPEN, OPEN)
    splice.client_sends(close_frame(1000))
    assert (client.state, upstream.state) == (CLOSE_RECEIVED, CLOSE_SENT)
    assert client.close_timer is None  # the client's close is answered by the upstream,
    assert upstream.close_timer is not None  # which has _CLOSE_TIMEOUT to do so
    splice.upstream_sends(close_frame(1000, mask=False))
    assert (client.state, upstream.state) == (CLOSED, CLOSED)
    assert client.close_timer is not None and upstream.close_timer is not None  # each its own
    with pytest.raises(RuntimeError):
        client.close_written(1000, "", "upstream")  # one close frame per direction
    splice.client_gone()
    assert (client.state, upstream.state) == (LOST, CLOSED)
    assert client.close_timer is None and client.ping_timer is None
    splice.upstream_gone()
    assert upstream.state is LOST and splice.clock.getDelayedCalls() == []


def test_an_upstream_close_is_relayed_and_the_clients_answer_too(splice):
    splice.upstream_sends(close_frame(4001, b"done", mask=False))
    assert closes(splice.to_client()) == [(4001, "done")]
    splice.client_sends(close_frame(4001, b"done"))
    assert closes(splice.to_upstream()) == [(4001, "done")]
    assert splice.client.disconnecting
    splice.client_gone()
    splice.upstream_gone()
    assert splice.closed == {"close_code": 4001, "close_reason": "done",
                             "close_code_reply": 4001, "closed_by": "upstream"}


def test_a_close_without_status_is_relayed_empty(splice):
    splice.client_sends(frame(OP_CLOSE))
    assert splice.to_upstream() == [(OP_CLOSE, b"", True, True)]
    splice.upstream_sends(frame(OP_CLOSE, mask=False))
    assert splice.to_client() == [(OP_CLOSE, b"", True, False)]
    splice.client_gone()
    splice.upstream_gone()
    assert splice.closed == {"close_code": None, "close_reason": "", "close_code_reply": None,
                             "closed_by": "client"}


def test_upstream_lost_gives_the_client_1014(splice):
    splice.upstream_gone()
    assert closes(splice.to_client()) == [(1014, "upstream lost")]
    assert not splice.client.disconnecting  # its answer is awaited
    splice.client_sends(close_frame(1014, b"upstream lost"))
    assert splice.client.disconnecting
    splice.client_gone()
    assert splice.closed == {"close_code": 1014, "close_reason": "upstream lost",
                             "close_code_reply": 1014, "closed_by": "upstream"}


def test_upstream_lost_inside_a_frame_aborts_the_client(splice):
    data = frame(OP_BINARY, bytes(100), mask=False)
    splice.upstream_sends(data[:40])
    splice.upstream_gone()
    assert splice.client.value() == data[:40]  # no close frame inside a frame
    assert splice.client.disconnected
    splice.client_gone()
    assert splice.closed["closed_by"] == "upstream"


def test_client_lost_gives_the_upstream_1001(splice):
    splice.client_gone()
    assert closes(splice.to_upstream()) == [(1001, "going away")]
    splice.upstream_sends(close_frame(1001, b"going away", mask=False))
    splice.upstream_gone()
    assert splice.closed == {"close_code": None, "close_reason": "", "close_code_reply": None,
                             "closed_by": "client"}


def test_an_upstream_that_never_answers_the_close_is_dropped_after_the_close_timeout(splice):
    splice.client_gone()
    assert closes(splice.to_upstream()) == [(1001, "going away")]
    splice.clock.advance(relay_module._CLOSE_TIMEOUT - 0.1)
    assert not splice.upstream.disconnected
    splice.clock.advance(0.1)
    assert splice.upstream.disconnected


def test_a_client_that_never_answers_the_1014_is_dropped_after_the_close_timeout(splice):
    splice.upstream_gone()
    splice.clock.advance(relay_module._CLOSE_TIMEOUT)
    assert splice.client.disconnected


@pytest.mark.parametrize("code", [1005, 1006, 1015, 999, 2000, 5000])
def test_a_client_close_with_a_forbidden_code_gets_1002_and_the_upstream_1001(splice, code):
    splice.client_sends(close_frame(code))
    assert closes(splice.to_client()) == [(1002, f"close code {code} is not allowed on the wire")]
    assert closes(splice.to_upstream()) == [(1001, "going away")]  # never the client's code
    assert splice.client.disconnecting  # its close came first: the handshake is done
    splice.upstream_sends(close_frame(1001, mask=False))
    splice.client_gone()
    splice.upstream_gone()
    assert (splice.closed["close_code"], splice.closed["close_code_reply"],
            splice.closed["closed_by"]) == (code, 1002, "client")


def test_an_upstream_close_with_a_forbidden_code_gets_1002_and_the_client_1001(splice):
    splice.upstream_sends(close_frame(1005, mask=False))
    assert closes(splice.to_upstream()) == [(1002, "close code 1005 is not allowed on the wire")]
    assert closes(splice.to_client()) == [(1001, "going away")]
    splice.client_sends(close_frame(1001))
    assert splice.to_upstream() == []  # the answer to the gateway's close stays here
    assert splice.client.disconnecting
    splice.client_gone()
    splice.upstream_gone()
    assert splice.closed == {"close_code": 1001, "close_reason": "going away",
                             "close_code_reply": 1001, "closed_by": "upstream"}


def test_a_message_over_max_message_size_is_1009_and_never_forwarded(splice):
    splice.client_sends(frame(OP_BINARY, bytes(1000)))  # the limit itself passes
    assert len(splice.to_upstream()) == 1
    splice.client_sends(frame(OP_BINARY, bytes(1001)))
    assert closes(splice.to_client()) == [(1009, "message too big")]
    assert splice.to_upstream() == [(OP_CLOSE, struct.pack("!H", 1001) + b"going away",
                                     True, True)]
    splice.client_sends(frame(OP_TEXT, b"after"), close_frame(1009))
    assert splice.to_upstream() == []  # after a violation nothing more is relayed
    assert splice.client.disconnecting
    splice.client_gone()
    splice.upstream_gone()
    assert splice.closed == {"close_code": 1009, "close_reason": "message too big",
                             "close_code_reply": 1009, "closed_by": "gateway"}


def test_a_message_split_over_frames_counts_them_all_for_max_message_size(splice):
    splice.client_sends(frame(OP_BINARY, bytes(600), fin=False), frame(OP_CONT, bytes(401)))
    assert [f[0] for f in splice.to_upstream()] == [OP_BINARY, OP_CLOSE]
    assert closes(splice.to_client()) == [(1009, "message too big")]


def test_fragments_beyond_max_fragments_are_1009(splice):
    splice.client_sends(frame(OP_TEXT, b"a", fin=False),
                        *[frame(OP_CONT, b"b", fin=False) for _ in range(3)],
                        frame(OP_CONT, b"c"))  # 1 + max_fragments frames: one message
    assert [f[0] for f in splice.to_upstream()] == [OP_TEXT] + [OP_CONT] * 4
    splice.client_sends(frame(OP_TEXT, b"a", fin=False),
                        *[frame(OP_CONT, b"b", fin=False) for _ in range(5)])
    assert closes(splice.to_client()) == [(1009, "too many fragments")]
    assert [f[0] for f in splice.to_upstream()] == [OP_TEXT] + [OP_CONT] * 4 + [OP_CLOSE]


def test_more_control_frames_than_the_rate_are_1008(splice):
    splice.client_sends(frame(OP_PING, b"p") * 5)  # the rate is max_fragments per second
    assert [f[0] for f in splice.to_upstream()] == [OP_PING] * 4 + [OP_CLOSE]
    assert closes(splice.to_client()) == [(1008, "too many control frames")]


def test_a_compressed_message_is_limited_on_its_inflated_size(gateway):
    splice = Splice(gateway, compressed=True)
    bomb = deflate_bomb(100_000)
    assert len(bomb) < 1000  # only its inflated size is over max_message_size
    splice.client_sends(frame(OP_BINARY, bomb, rsv1=True))
    assert closes(splice.to_client()) == [(1009, "message too big")]
    assert [f[0] for f in splice.to_upstream()] == [OP_CLOSE]
    splice.client_gone()
    splice.upstream_gone()
    assert gateway.clock.getDelayedCalls() == []


# ------------------------------------------------------------------ the gateway closes


def test_idle_timeout_closes_both_legs_1001(gateway):
    splice = Splice(gateway, route="idle", listener="quiet")  # no pings to answer
    splice.clock.advance(IDLE_TIMEOUT - 1)
    splice.client_sends(frame(OP_TEXT, b"still here"))  # a message resets the timer
    splice.upstream_sends(frame(OP_PONG, b"a pong is not activity", mask=False))
    splice.to_upstream()  # the message and the pong passed; look at what follows
    splice.to_client()
    splice.clock.advance(IDLE_TIMEOUT - 1)
    assert splice.client.value() == b"" and splice.upstream.value() == b""
    splice.clock.advance(1)
    to_client, to_upstream = splice.to_client(), splice.to_upstream()
    assert closes(to_client) == [(1001, "idle timeout")]
    assert closes(to_upstream) == [(1001, "idle timeout")]
    splice.client_sends(close_frame(1001, b"idle timeout"))
    assert splice.to_upstream() == []  # the client's answer is the gateway's, not relayed
    assert splice.client.disconnecting
    splice.upstream_sends(close_frame(1001, mask=False))
    assert splice.to_client() == []
    splice.client_gone()
    splice.upstream_gone()
    assert splice.closed == {"close_code": 1001, "close_reason": "idle timeout",
                             "close_code_reply": 1001, "closed_by": "gateway"}
    assert gateway.clock.getDelayedCalls() == []


def test_nothing_is_relayed_to_a_leg_the_gateway_closed(splice):
    splice.relay.close_with(4003, "kicked")
    assert closes(splice.to_client()) == [(4003, "kicked")]
    assert closes(splice.to_upstream()) == [(4003, "kicked")]
    splice.upstream_sends(frame(OP_TEXT, b"late", mask=False), frame(OP_PING, b"p", mask=False))
    splice.client_sends(frame(OP_TEXT, b"late too"))
    assert splice.to_client() == [] and splice.to_upstream() == []


def test_a_kick_reason_is_cut_on_a_character_boundary(splice):
    splice.relay.close_with(4003, "é" * 100)
    (code, reason), = closes(splice.to_client())
    assert code == 4003 and reason == "é" * 61
    splice.client_sends(close_frame(4003))
    splice.client_gone()
    splice.upstream_gone()
    assert splice.closed["close_reason"] == "é" * 61  # as sent


def test_legs_that_do_not_answer_the_gateways_close_are_dropped(splice):
    splice.relay.close_with(1001, "going away")
    assert splice.relay.client.state is not OPEN
    splice.clock.advance(relay_module._CLOSE_TIMEOUT)
    assert splice.client.disconnected and splice.upstream.disconnected
