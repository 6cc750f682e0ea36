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

from wsgate import http, observe
from wsgate.idle import IdleTimer, idle_timeout
from wsgate.interfaces import ISubscriber
from wsgate.policies import DROP, apply_sessions
from wsgate.pubsub import Message
from wsgate.utf8 import Utf8Validator

_log = Logger()

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013


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
    idle = idle_timeout(route, listener)
    if route.target.kind == "echo":
        session = EchoSession()
    else:
        session = BroadcastSession(
            gateway.broker, route.target.channel_for(match.params), route.target,
            gateway.node_id, gateway.stats, route.name,
            flusher=gateway.flusher if fast else None)
    protocol.bind(gateway, connection, session, idle)
    return protocol


class TerminatedProtocol(WebSocketServerProtocol):
    """An Autobahn server protocol that delegates to a session object."""

    def bind(self, gateway, connection, session, idle_seconds):
        self.gateway = gateway
        self.connection = connection
        self.session = session
        self.idle = IdleTimer(gateway.clock, idle_seconds, self._idle)
        self._opened = False
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

    def onOpen(self):
        self._opened = True
        self.gateway.register(self.connection)
        self.session.opened(self)
        self.idle.touch()

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

    def close_with(self, code, reason):
        """Close with any valid code (Autobahn's ``sendClose`` refuses 1001, 1008, ...)."""
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"), isReply=False)

    def onClose(self, wasClean, code, reason):
        self.idle.cancel()
        if self.connection.outcome is not None:
            self.connection.outcome.release()  # idempotent
        if not self._opened:
            return
        self._opened = False
        self.session.closed(self)
        by_gateway = self.closedByMe or self.failedByMe or (self.droppedByMe and not wasClean)
        self.gateway.unregister(self.connection, code, reason,
                                "gateway" if by_gateway else "client")

    # -- idle timeout: no message in either direction for idle_timeout seconds

    def _idle(self):
        self.close_with(CLOSE_GOING_AWAY, "idle timeout")


class FastTerminatedProtocol(TerminatedProtocol):
    """Autobahn-level savings (``fast_paths = yes``), each measured.

    Autobahn's ``dataReceived`` and ``sendData`` build debug log arguments
    (``hltype``/``hlval`` formatting) on every call even with debug logging
    off; these overrides skip them and keep the behaviour: the same
    ``_dataReceived`` and, when nothing is queued for chopped or synced
    sending, a plain ``transport.write``. ``onMessageEnd`` also fires a txaio
    "message" event (a Deferred per message) that nothing here listens to.
    Text messages are validated with CPython's UTF-8 decoder
    (:mod:`wsgate.utf8`, same fail-fast verdicts). Broadcast deliveries are
    coalesced (:mod:`wsgate.coalesce`); ``sendData`` writes them first.
    """

    def _connectionMade(self):
        TerminatedProtocol._connectionMade(self)
        self.utf8validator = Utf8Validator()  # CPython's decoder: see wsgate.utf8

    def dataReceived(self, data):
        self._dataReceived(data)

    def onMessageEnd(self):
        if not self.failedByMe:
            self._onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = None

    def sendData(self, data, sync=False, chopsize=None):
        if self.session.pending:  # broadcast frames queued this iteration go first
            self.session.flush()
        if sync or chopsize or self.send_queue:
            return TerminatedProtocol.sendData(self, data, sync, chopsize)
        self.transport.write(data)

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
    """Sends every message back, text as text and binary as binary."""

    pending = ()  # nothing is ever coalesced (see BroadcastSession)

    def opened(self, protocol):
        pass

    def message(self, protocol, payload, is_binary):
        protocol.send(payload, is_binary)

    def closed(self, protocol):
        pass


@implementer(ISubscriber, IPushProducer)
class BroadcastSession:
    """A subscriber of one channel; publishes what its client sends (if allowed).

    Slow consumers: the session is its transport's streaming producer, so
    Twisted tells it when the socket's write buffer is full
    (``pauseProducing``). While paused, deliveries wait in a queue bounded by
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

    def opened(self, protocol):
        self.protocol = protocol
        self.conn_id = protocol.connection.conn_id
        self.may_be_direct = (
            self.flusher is not None and isinstance(protocol, FastTerminatedProtocol)
            and not protocol.sessions and not protocol.log_messages
            and protocol._perMessageCompress is None)
        self.direct = self.may_be_direct
        protocol.transport.registerProducer(self, True)
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
