"""Routes the gateway terminates itself: echo and broadcast, on Autobahn.

The Autobahn protocol class is thin: it turns WebSocket events into calls on a
*session* (:class:`EchoSession`, :class:`BroadcastSession`), plain objects that
hold the route's behaviour. Autobahn's defaults that a gateway does not want
are overridden in :func:`make_websocket_factory` (see CONVENTIONS.md).
"""

import types
from collections import deque

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from wsgate import fastpath, frames, http, observe
from wsgate.flow import ControlFrameRate, SendBuffer
from wsgate.idle import IdleTimer, idle_timeout
from wsgate.interfaces import ISubscriber
from wsgate.policies import DROP, apply_sessions
from wsgate.pubsub import Message
from wsgate.utf8 import Utf8Validator

_log = Logger()

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013

# Input is handed to Autobahn in pieces of at most this size: its parser
# copies the rest of its buffer at every frame, so a read full of tiny frames
# would cost (read size)^2; with pieces the copy per frame is bounded.
PARSE_CHUNK = 16 * 1024
# After a limit closed the connection, this much more input is parsed (the
# client's close reply is normally in it); the rest is discarded unparsed
# until the close handshake timeout drops the connection.
PARSE_AFTER_LIMIT = 64 * 1024
# Fragments of one message kept as a list of pieces up to this count; beyond
# it one growing buffer, so reassembly memory stays near the payload size.
FRAGMENT_PIECES = 32


def _accept_permessage_deflate(offers):
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


class _ReactorTimer:
    """Autobahn's timer API on plain ``callLater``.

    Autobahn schedules pings, ping timeouts and close timeouts on a txaio
    "batched timer" that truncates every deadline down to a whole second, so a
    1s ping_timeout can fire at once. A gateway needs the configured times.
    """

    def __init__(self, clock):
        self.clock = clock

    def call_later(self, delay, func, *args, **kwargs):
        return self.clock.callLater(delay, func, *args, **kwargs)


def make_websocket_factory(listener, clock):
    """An Autobahn server factory carrying *listener*'s limits.

    The gateway reads the request head and enforces ``handshake_timeout``
    itself, so Autobahn's own opening-handshake timeout is off.
    """
    factory = WebSocketServerFactory(server=None)  # no Server header naming the library
    factory._batched_timer = _ReactorTimer(clock)
    factory.protocol = TerminatedProtocol
    factory.setProtocolOptions(
        versions=[13],
        webStatus=False,
        maxFramePayloadSize=listener.max_frame_size,
        maxMessagePayloadSize=listener.max_message_size,
        failByDrop=False,
        echoCloseCodeReason=True,
        openHandshakeTimeout=0,
        closeHandshakeTimeout=5,
        autoPingInterval=listener.ping_interval,
        autoPingTimeout=listener.ping_timeout,
        perMessageCompressionAccept=(
            _accept_permessage_deflate if listener.compression else None),
    )
    if not listener.compression:
        factory.perMessageCompressionAccept = lambda offers: None
    return factory


def log_message(connection, verb, size, is_binary):
    """``websocket.message.received`` / ``.sent`` (only with ``log_messages = yes``)."""
    observe.emit(f"websocket.message.{verb}", f"message {verb} on {{route}}: {{size}} bytes",
                 size=size, binary=is_binary, **connection.fields())


def protocol_class(factory, fast):
    """The protocol class for *factory*'s connections (built once, kept on the factory).

    With ``fast``, a subclass of :class:`FastTerminatedProtocol` that holds
    the factory's Autobahn options (``CONFIG_ATTRS``) as class attributes.
    Autobahn's ``_connectionMade`` otherwise copies its 29 options into
    every connection's ``__dict__`` (memory per idle connection) and
    ``pformat``s all of them for a debug line, logged or not: 0.46 ms per
    handshake here, the largest single cost of one. The options are the
    factory's values either way; a route's own limits are still set on the
    instance.
    """
    classes = factory.__dict__.setdefault("_wsgate_protocol_classes", {})
    cls = classes.get(fast)
    if cls is None:
        if fast:
            options = {attr: getattr(factory, attr) for attr in FastTerminatedProtocol.CONFIG_ATTRS}
            for attr, value in options.items():
                if isinstance(value, types.FunctionType):  # a class attribute would bind
                    options[attr] = staticmethod(value)   # (perMessageCompressionAccept)
            cls = type("ListenerProtocol", (FastTerminatedProtocol,),
                       dict(options, CONFIG_ATTRS=()))
        else:
            cls = TerminatedProtocol
        classes[fast] = cls
    return cls


def build_terminated_protocol(gateway, listener, match, connection, fast=False):
    """The WebSocket protocol (with its session) for an accepted terminated route."""
    factory = gateway.websocket_factory(listener)
    protocol = protocol_class(factory, fast)()
    protocol.factory = factory
    route = match.route
    if route.max_message_size is not None:
        protocol.maxMessagePayloadSize = route.max_message_size
        protocol.maxFramePayloadSize = min(listener.max_frame_size, route.max_message_size)
    protocol.max_fragments = listener.max_fragments
    idle = idle_timeout(route, listener)
    if route.target.kind == "echo":
        session = EchoSession(route.target.max_send_buffer)
    else:
        session = BroadcastSession(
            gateway.broker, route.target.channel_for(match.params), route.target,
            gateway.node_id, gateway.stats, route.name,
            flusher=gateway.flusher if fast else None)
    protocol.bind(gateway, connection, session, idle)
    return protocol


class TerminatedProtocol(WebSocketServerProtocol):
    """An Autobahn server protocol that delegates to a session object."""

    max_fragments = 1024  # continuation frames per message ([listen:NAME] max_fragments)

    def bind(self, gateway, connection, session, idle_seconds):
        self.gateway = gateway
        self.connection = connection
        self.session = session
        self.idle = IdleTimer(gateway.clock, idle_seconds, self._idle)
        self._opened = False
        self.send_buffer = SendBuffer(None, session.max_send_buffer)  # registered on open
        self.control_rate = ControlFrameRate(self.max_fragments, gateway.clock)
        self._fragments = 0
        self._parse_budget = None  # bytes still parsed after a limit closed the connection
        self._close_received = False
        outcome = connection.outcome
        self.sessions = outcome.sessions if outcome is not None else ()
        self.log_messages = gateway.config.core.log_messages
        connection.protocol = self

    # -- handshake: the gateway already decided; Autobahn only completes it.

    def onConnect(self, request):
        return None

    def failHandshake(self, reason, code=400, responseHeaders=None):
        """Autobahn found the request invalid: answer without its exception text."""
        refusal = http.HttpRefusal(code, "bad_handshake", "Bad WebSocket handshake",
                                   route=self.connection.route)
        self.gateway.rejected(refusal, self.connection.client, self.connection.identity,
                              self.connection.conn_id)
        self.sendData(http.render_refusal(refusal))
        self.dropConnection(abort=False)

    # -- open connection

    def _connectionMade(self):
        WebSocketServerProtocol._connectionMade(self)
        fastpath.set_no_delay(self.transport)  # small frames must not wait for Nagle

    def onOpen(self):
        self._opened = True
        self.send_buffer.transport = self.transport
        self.transport.registerProducer(self.send_buffer, True)
        self.gateway.register(self.connection)
        self.session.opened(self)
        self.idle.touch()

    # -- input: bounded whatever the client sends

    def dataReceived(self, data):
        """Hand *data* to Autobahn in bounded pieces; after a limit, discard it."""
        start, end = 0, len(data)
        while start < end:
            budget = self._parse_budget
            if budget is not None:
                if budget <= 0:
                    return  # discarded unparsed: the close handshake timeout ends it
                end = min(end, start + budget)
                self._parse_budget = budget - (end - start)
            stop = min(end, start + PARSE_CHUNK)
            self._dataReceived(data if start == 0 and stop == len(data) else data[start:stop])
            start = stop

    def limit_exceeded(self, code, reason):
        """Close for a broken limit (1008, 1009); further input costs next to nothing."""
        if self._parse_budget is None:
            self._parse_budget = PARSE_AFTER_LIMIT
        self._fail_connection(code, reason)

    def _max_message_size_exceeded(self, msg_size, max_msg_size, reason):
        self.limit_exceeded(CLOSE_MESSAGE_TOO_BIG, "message too big")

    def onMessageBegin(self, isBinary):
        WebSocketServerProtocol.onMessageBegin(self, isBinary)
        self._fragments = 0

    def onMessageFrameBegin(self, length):
        # self._fragments: the frames before this one, i.e. continuation frames so
        # far; a message is at most 1 + max_fragments frames (the testsuite's 65,536
        # fragments are 65,537 frames: the first and an empty last one)
        if self._fragments > self.max_fragments and not self.failedByMe:
            self.limit_exceeded(CLOSE_MESSAGE_TOO_BIG, "too many fragments")
        self._fragments += 1
        WebSocketServerProtocol.onMessageFrameBegin(self, length)

    def onMessageFrame(self, payload):
        """Collect one frame's pieces; past FRAGMENT_PIECES pieces, in one bytearray
        (a list of one-byte pieces costs ~46 bytes per payload byte)."""
        if self.failedByMe:
            return
        data = self.message_data
        if type(data) is list:
            data.extend(payload)
            if len(data) > FRAGMENT_PIECES:
                self.message_data = bytearray().join(data)
        else:
            for piece in payload:
                data += piece

    def onMessageEnd(self):
        if type(self.message_data) is bytearray:
            self.message_data = [bytes(self.message_data)]
        WebSocketServerProtocol.onMessageEnd(self)

    def processControlFrame(self):
        if not self.control_rate.allow() and not self.failedByMe:
            self.limit_exceeded(CLOSE_POLICY_VIOLATION, "too many control frames")
        return WebSocketServerProtocol.processControlFrame(self)

    def onCloseFrame(self, code, reasonRaw):
        self._close_received = True
        return WebSocketServerProtocol.onCloseFrame(self, code, reasonRaw)

    def onMessage(self, payload, isBinary):
        connection = self.connection
        connection.messages_in += 1
        connection.bytes_in += len(payload)
        self.idle.touch()
        if self.sessions and self._refused_by_policy("in", isBinary, len(payload)):
            return
        if self.log_messages:
            log_message(connection, "received", len(payload), isBinary)
        self.session.message(self, payload, isBinary)

    def _refused_by_policy(self, direction, is_binary, size):
        """Apply the policies' verdict on one message; True when it must not pass."""
        verdict = apply_sessions(self.sessions, direction, is_binary, size)
        if verdict is None:
            return False
        if verdict != DROP:
            self.close_with(verdict.code, verdict.reason)
        return True

    def send(self, payload, is_binary):
        """Send one message to the client (counted)."""
        if self.sessions and self._refused_by_policy("out", is_binary, len(payload)):
            return
        if self.state == self.STATE_OPEN:
            self.connection.messages_out += 1
            self.connection.bytes_out += len(payload)
            if self.log_messages:
                log_message(self.connection, "sent", len(payload), is_binary)
            self.sendMessage(payload, is_binary)

    def send_prepared(self, prepared, size, is_binary):
        if self.sessions and self._refused_by_policy("out", is_binary, size):
            return
        if self.state == self.STATE_OPEN:
            self.connection.messages_out += 1
            self.connection.bytes_out += size
            self.idle.touch()
            if self.log_messages:
                log_message(self.connection, "sent", size, is_binary)
            self.sendPreparedMessage(prepared)

    def sendData(self, data, sync=False, chopsize=None):
        WebSocketServerProtocol.sendData(self, data, sync, chopsize)
        self.send_buffer.wrote(len(data))

    def close_with(self, code, reason):
        """Close with any valid code (Autobahn's ``sendClose`` refuses 1001, 1008, ...);
        the reason is cut to 123 bytes on a character boundary."""
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=frames.reason_bytes(reason),
                                isReply=False)

    def _invalid_payload(self, reason):
        """Fail with 1007; inside a data frame, also close the TCP connection.

        Autobahn keeps reading the failed frame to its declared end, expecting
        the peer's close reply after it. A peer that gets our close in the
        middle of its frame answers at once instead: its close frame is read
        as the rest of the failed frame, and nothing ends the connection until
        the close handshake timeout (5 s; the testsuite's case 6.4.4). The
        bytes after the failure cannot be parsed reliably either way, so, as
        RFC 6455 §7.1.7 says, none are: the close frame goes out, then the
        connection is closed.
        """
        frame = self.current_frame
        inside_frame = (frame is not None and frame.opcode < 8
                        and self.current_frame_masker.pointer() < frame.length)
        stop = WebSocketServerProtocol._invalid_payload(self, reason)
        if inside_frame and self.state == self.STATE_CLOSING:
            self.wasNotCleanReason = f"failed inside a frame: {reason}"
            self.dropConnection(abort=False)
            return True
        return stop

    def onClose(self, wasClean, code, reason):
        self.idle.cancel()
        if self.connection.outcome is not None:
            self.connection.outcome.release()  # idempotent
        if not self._opened:
            return
        self._opened = False
        self.session.closed(self)
        by_gateway = self.closedByMe or self.failedByMe or (self.droppedByMe and not wasClean)
        first, reply = self._close_frames()
        self.gateway.unregister(self.connection, first[0], first[1],
                                "gateway" if by_gateway else "client", reply)

    def _close_frames(self):
        """``((code, reason) of the first close frame on this connection, the reply's code)``:
        ``(None, "")`` and None where there was no such frame (never 1006)."""
        local = (self.localCloseCode, _text(self.localCloseReason))
        remote = (self.remoteCloseCode, _text(self.remoteCloseReason))
        if self.closedByMe:  # the gateway's close frame came first
            return local, (remote[0] if self._close_received else None)
        if self._close_received:
            return remote, local[0]
        return (None, ""), None

    def connectionLost(self, reason):
        try:
            WebSocketServerProtocol.connectionLost(self, reason)
        finally:
            # Whatever the client never read is garbage now; objects in reference
            # cycles would otherwise keep the transport's write buffer until the
            # cyclic collector runs.
            fastpath.release(self.transport)

    # -- idle timeout: no message in either direction for idle_timeout seconds

    def _idle(self):
        self.close_with(CLOSE_GOING_AWAY, "idle timeout")


def _text(reason):
    """A close reason as Autobahn keeps it (UTF-8 bytes, str or None) → str."""
    if reason is None:
        return ""
    return reason.decode("utf-8", "replace") if isinstance(reason, bytes) else reason


class FastTerminatedProtocol(TerminatedProtocol):
    """Autobahn-level savings (``fast_paths = yes``), each measured.

    Autobahn's ``sendData`` builds debug log arguments (``hltype``/``hlval``
    formatting) on every call even with debug logging off; this override
    skips them and keeps the behaviour: when nothing is queued for chopped or
    synced sending, a plain ``transport.write`` (``dataReceived`` skips them
    for both classes: see :meth:`TerminatedProtocol.dataReceived`). ``onMessageEnd`` also fires a txaio
    "message" event (a Deferred per message) that nothing here listens to.
    Text messages are validated with CPython's UTF-8 decoder
    (:mod:`wsgate.utf8`, same fail-fast verdicts). Broadcast deliveries are
    coalesced (:mod:`wsgate.coalesce`); ``sendData`` writes them first.
    """

    def _connectionMade(self):
        TerminatedProtocol._connectionMade(self)
        self.utf8validator = Utf8Validator()  # CPython's decoder: see wsgate.utf8

    def onMessageEnd(self):
        if not self.failedByMe:
            data = self.message_data
            self._onMessage(bytes(data) if type(data) is bytearray else b"".join(data),
                            self.message_is_binary)
        self.message_data = None

    def sendData(self, data, sync=False, chopsize=None):
        if self.session.pending:  # broadcast frames queued this iteration go first
            self.session.flush()
        if sync or chopsize or self.send_queue:
            return TerminatedProtocol.sendData(self, data, sync, chopsize)
        self.transport.write(data)
        if self.send_buffer.blocked:
            self.send_buffer.wrote(len(data))

    def send_prepared(self, prepared, size, is_binary):
        """A broadcast delivery, coalesced per reactor iteration (see wsgate.coalesce).

        The session counts it when it writes it. With permessage-deflate
        negotiated each subscriber compresses on its own, as Autobahn's
        ``sendPreparedMessage`` does.
        """
        if self.sessions and self._refused_by_policy("out", is_binary, size):
            return
        if self.state == self.STATE_OPEN:
            if self.log_messages:
                log_message(self.connection, "sent", size, is_binary)
            if self._perMessageCompress is None:
                self.session.enqueue(prepared.payloadHybi, size)
            else:
                self.connection.messages_out += 1
                self.connection.bytes_out += size
                self.idle.touch()
                self.sendPreparedMessage(prepared)


class EchoSession:
    """Sends every message back, text as text and binary as binary.

    A client that sends and never reads is not read beyond *max_send_buffer*
    bytes of unsent echoes (the protocol's :class:`wsgate.flow.SendBuffer`).
    """

    pending = ()  # nothing is ever coalesced (see BroadcastSession)

    def __init__(self, max_send_buffer):
        self.max_send_buffer = max_send_buffer

    def opened(self, protocol):
        pass

    def message(self, protocol, payload, is_binary):
        protocol.send(payload, is_binary)

    def closed(self, protocol):
        pass


@implementer(ISubscriber, IPushProducer)
class BroadcastSession:
    """A subscriber of one channel; publishes what its client sends (if allowed).

    Slow consumers: the protocol's :class:`wsgate.flow.SendBuffer` tells the
    session when the socket's write buffer is full (``pauseProducing``). While paused, deliveries wait in a queue bounded by
    the route's ``max_send_buffer`` bytes; past that the route's
    ``slow_consumer`` applies: ``drop`` the message for this subscriber
    (counted) or ``close`` it with 1013. Fan-out never waits for anyone.

    Coalescing (wsgate's fast protocol, ``fast_paths = yes``): deliveries are
    pre-framed bytes collected in ``pending`` and written once per reactor
    iteration by :meth:`flush` (see :mod:`wsgate.coalesce`). ``direct`` says
    that a delivery may skip every per-message check and go straight to
    ``pending``: no per-message policy, no message log, no compression, not
    paused, nothing queued. Queued bytes are written only while the
    connection is open, so nothing follows a close frame.
    """

    def __init__(self, broker, channel, target, node_id, stats, route, flusher=None):
        self.broker = broker
        self.channel = channel
        self.target = target
        self.node_id = node_id
        self.stats, self.route = stats, route
        self.flusher = flusher
        self.protocol = None
        self.conn_id = None
        self.paused = False
        self.queue = deque()
        self.queued_bytes = 0
        self.pending = []
        self.pending_bytes = 0
        self.may_be_direct = False
        self.direct = False

    @property
    def max_send_buffer(self):
        return self.target.max_send_buffer

    def opened(self, protocol):
        self.protocol = protocol
        self.conn_id = protocol.connection.conn_id
        self.may_be_direct = (
            self.flusher is not None and isinstance(protocol, FastTerminatedProtocol)
            and not protocol.sessions and not protocol.log_messages
            and protocol._perMessageCompress is None)
        self.direct = self.may_be_direct
        protocol.send_buffer.listener = self  # told when the client's socket is full
        self.broker.subscribe(self.channel, self)

    def message(self, protocol, payload, is_binary):
        if not self.target.client_publish:
            protocol.close_with(CLOSE_POLICY_VIOLATION, "publishing is not allowed here")
            return
        message = Message(payload, is_binary, self.node_id, self.conn_id)
        d = self.broker.publish(self.channel, message)
        d.addErrback(self._publish_failed, protocol)

    def _publish_failed(self, failure, protocol):
        _log.warn("wsgate: publish to {channel} failed: {error}", channel=self.channel,
                  error=failure.getErrorMessage())
        self.stats.drop(self.route, "broker_down")
        protocol.close_with(CLOSE_TRY_AGAIN_LATER, "broker unavailable")

    def deliver(self, message, prepared):
        if message.origin_conn == self.conn_id and not self.target.include_sender:
            return
        if self.direct:  # the hot path, 1,000s per message: enqueue() inlined
            if not self.pending:
                self.flusher.mark(self)
            self.pending.append(prepared.payloadHybi)
            self.pending_bytes += len(message.payload)
            return
        size = len(message.payload)
        if not self.paused and not self.queue:
            self.protocol.send_prepared(prepared, size, message.is_binary)
            return
        if self.queued_bytes + size > self.target.max_send_buffer:
            self._too_slow()
            return
        self.queue.append((prepared, size, message.is_binary))
        self.queued_bytes += size

    def enqueue(self, frame, size):
        """Coalesce one pre-framed delivery (the fast protocol's ``send_prepared``)."""
        if not self.pending:
            self.flusher.mark(self)
        self.pending.append(frame)
        self.pending_bytes += size

    def flush(self):
        """Write the pending frames in one write, counted, if the connection is still open."""
        pending = self.pending
        if not pending:
            return
        self.pending = []
        size, self.pending_bytes = self.pending_bytes, 0
        protocol = self.protocol
        if protocol.state != protocol.STATE_OPEN:
            return  # closing: no data frame may follow the close frame
        connection = protocol.connection
        connection.messages_out += len(pending)
        connection.bytes_out += size
        protocol.idle.touch()
        protocol.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        protocol.send_buffer.wrote(size)

    def _too_slow(self):
        if self.target.slow_consumer == "drop":
            self.stats.drop(self.route, "slow_consumer")
            return
        if self.protocol.state == self.protocol.STATE_OPEN:
            self.stats.drop(self.route, "slow_consumer_closed")
            self.queue.clear()
            self.queued_bytes = 0
            self.protocol.close_with(CLOSE_TRY_AGAIN_LATER, "slow consumer")

    # IPushProducer: Twisted's verdict on the socket's write buffer

    def pauseProducing(self):
        self.paused = True
        self.direct = False

    def resumeProducing(self):
        self.paused = False
        while self.queue and not self.paused:
            prepared, size, is_binary = self.queue.popleft()
            self.queued_bytes -= size
            self.protocol.send_prepared(prepared, size, is_binary)
        self.direct = self.may_be_direct and not self.paused and not self.queue

    def stopProducing(self):
        self.direct = self.may_be_direct = False
        self.queue.clear()
        self.queued_bytes = 0
        self.pending = []
        self.pending_bytes = 0

    def closed(self, protocol):
        self.broker.unsubscribe(self.channel, self)
        self.stopProducing()
