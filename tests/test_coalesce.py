"""Coalesced broadcast deliveries (wsgate.coalesce), as plain logic on a Clock.

The wire-level counterpart is test_wire's burst test; these pin down the
promises the module states: one write per connection per iteration, order
kept against control frames, nothing after a close frame, counters.
"""

import txredisapi
from twisted.internet.task import Clock

from wsgate.coalesce import IterationFlusher
from wsgate.flow import SendBuffer
from wsgate.gateway import Connection
from wsgate.idle import IdleTimer
from wsgate.pubsub import LocalFanout, Message
from wsgate.pubsub.redis import _ProtocolFactory
from wsgate.fastpath_autobahn import FastTerminatedProtocol
from wsgate.pubsub.history import ChannelPolicy
from wsgate.targets.broadcast import BroadcastSubscriber


class RecordingTransport:
    """Records writes; registers the producer like a Twisted transport."""

    def __init__(self):
        self.writes = []
        self.producer = None
        self.disconnecting = False

    def write(self, data):
        self.writes.append(data)

    def writeSequence(self, seq):
        self.writes.append(b"".join(seq))

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def loseConnection(self):
        self.disconnecting = True


class Target:
    include_sender = False
    client_publish = True
    max_send_buffer = 1 << 20
    slow_consumer = "drop"
    policy = ChannelPolicy()  # no history, presence or join/leave


class NullBroker:
    def subscribe(self, channel, subscriber):
        pass

    def unsubscribe(self, channel, subscriber):
        pass


class ServerFactory:
    isServer = True


class Gateway:
    def __init__(self, clock):
        self.clock = clock
        self.flusher = IterationFlusher(clock)


def subscriber(gateway, fanout, n):
    protocol = FastTerminatedProtocol()
    protocol.gateway = gateway
    protocol.connection = Connection(f"c{n}", "r", None, 0)
    protocol.policy_sessions = ()
    protocol.log_messages = False
    protocol.idle = IdleTimer(gateway.clock, 0, None)
    protocol.state = protocol.STATE_OPEN
    protocol._perMessageCompress = None
    protocol.transport = RecordingTransport()
    protocol.send_buffer = SendBuffer(protocol.transport, Target.max_send_buffer)
    protocol.trackedTimings = None
    protocol.factory = ServerFactory()
    protocol.maskServerFrames = False
    protocol.logFrames = False
    protocol.closeHandshakeTimeout = 0
    protocol.send_queue = []
    session = BroadcastSubscriber(NullBroker(), "ch", Target(), "node", None, "r",
                               flusher=gateway.flusher)
    protocol.app = protocol.coalescing = session
    session.opened(protocol)
    fanout.add("ch", session)
    return protocol, session


def frame(payload):
    return bytes([0x82, len(payload)]) + payload


def setup(n=3):
    clock = Clock()
    gateway = Gateway(clock)
    fanout = LocalFanout()
    subs = [subscriber(gateway, fanout, i) for i in range(n)]
    return clock, fanout, subs


def test_flusher_flushes_each_marked_object_once_per_iteration():
    clock = Clock()
    flusher = IterationFlusher(clock)
    flushed = []

    class Obj:
        def flush(self):
            flushed.append(self)

    a, b = Obj(), Obj()
    flusher.mark(a)
    flusher.mark(b)
    assert flushed == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert flushed == [a, b] and clock.getDelayedCalls() == []
    flusher.mark(a)  # a new iteration: a new call
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert flushed == [a, b, a] and clock.getDelayedCalls() == []


def test_a_burst_leaves_in_one_write_per_connection_in_order_and_counted():
    clock, fanout, subs = setup()
    for i in range(5):
        fanout.fan_out("ch", Message(b"m%d" % i, True))
    assert all(p.transport.writes == [] for p, _ in subs)  # nothing before the iteration ends
    clock.advance(0)
    want = b"".join(frame(b"m%d" % i) for i in range(5))
    for protocol, _ in subs:
        assert protocol.transport.writes == [want]
        assert protocol.connection.messages_out == 5
        assert protocol.connection.bytes_out == 10
    fanout.fan_out("ch", Message(b"again", True))
    clock.advance(0)
    assert subs[0][0].transport.writes == [want, frame(b"again")]


def test_the_sender_is_skipped():
    clock, fanout, subs = setup()
    fanout.fan_out("ch", Message(b"mine", True, "node", "c1"))
    clock.advance(0)
    assert [len(p.transport.writes) for p, _ in subs] == [1, 0, 1]


def test_a_control_frame_goes_after_the_frames_queued_before_it():
    clock, fanout, subs = setup(1)
    protocol, _ = subs[0]
    fanout.fan_out("ch", Message(b"first", True))
    protocol.sendPing(b"p")
    fanout.fan_out("ch", Message(b"second", True))
    clock.advance(0)
    writes = protocol.transport.writes
    assert writes[0] == frame(b"first")
    assert writes[1][:1] == b"\x89"  # the ping
    assert writes[2] == frame(b"second")


def test_nothing_follows_the_close_frame():
    clock, fanout, subs = setup(1)
    protocol, _ = subs[0]
    fanout.fan_out("ch", Message(b"before", True))
    protocol.close_with(1001, "going away")
    fanout.fan_out("ch", Message(b"after", True))
    clock.advance(0)
    writes = protocol.transport.writes
    assert writes[0] == frame(b"before")
    assert writes[1][:1] == b"\x88"
    assert len(writes) == 2
    assert protocol.connection.messages_out == 1


def test_a_paused_subscriber_queues_then_resumes_in_order():
    clock, fanout, subs = setup(1)
    protocol, session = subs[0]
    fanout.fan_out("ch", Message(b"a", True))
    clock.advance(0)
    session.pauseProducing()  # Twisted: the socket's buffer is full
    fanout.fan_out("ch", Message(b"b", True))
    fanout.fan_out("ch", Message(b"c", True))
    clock.advance(0)
    assert protocol.transport.writes == [frame(b"a")]
    assert session.queued_bytes == 2
    session.resumeProducing()
    fanout.fan_out("ch", Message(b"d", True))
    clock.advance(0)
    assert protocol.transport.writes == [frame(b"a"), frame(b"b") + frame(b"c") + frame(b"d")]
    assert session.direct  # back on the hot path once the queue is empty


def test_redis_subscriber_hands_over_every_message_of_one_read_at_once():
    """txredisapi's own parser spreads a read's replies over reactor iterations
    (one callLater(0) per bulk string), which defeats coalescing and made the
    Redis path queue at 100 msgs/s; with hiredis it parses them all at once."""
    got = []
    factory = _ProtocolFactory(txredisapi.SubscriberProtocol,
                               {"timeout": 5, "password": None, "db": None, "username": None},
                               failed=lambda error: None, on_message=lambda pattern, channel, data: got.append(data))
    protocol = factory.buildProtocol(None)
    protocol.transport = RecordingTransport()
    read = b"".join(b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$%d\r\n%s\r\n" % (len(p), p)
                    for p in (b"one", b"two\r\nlines", b"three"))
    protocol.dataReceived(read)
    assert got == [b"one", b"two\r\nlines", b"three"]
