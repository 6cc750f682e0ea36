"""Terminated WebSockets: Autobahn speaks the protocol, an application object behaves.

:class:`ApplicationTarget` is the :class:`~wsgate.interfaces.ITarget` of every
route wsgate terminates itself (echo, broadcast, a plugin's): its ``accept``
builds a :class:`TerminatedProtocol` bound to a fresh
:class:`~wsgate.interfaces.IWebSocketApp`. The protocol class is thin: it
enforces the limits (``max_message_size``, ``max_fragments``, control frames
per second, ``max_send_buffer``), runs the per-message policies, counts, and
turns WebSocket events into calls on the app. Autobahn's defaults that a
gateway does not want are overridden in :func:`make_websocket_factory`: no
HTML status page (and its open redirect), version 13 only, real message
limits (Autobahn's 0 is unlimited), a close frame rather than a dropped
connection on errors, and the peer's close code echoed, not 1000.
"""

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)
from twisted.logger import Logger
from zope.interface import implementer

from wsgate import fastpath, frames, http, observe
from wsgate.flow import ControlFrameRate, SendBuffer
from wsgate.idle import IdleTimer, idle_timeout
from wsgate.interfaces import ITarget, IWebSocketConnection
from wsgate.policies import DROP, apply_sessions

_log = Logger()

DEFAULT_MAX_SEND_BUFFER = 1024 * 1024  # the route key max_send_buffer's default

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009

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
        # The gateway decided on Origin already (wsgate.sameorigin, origin policies);
        # setProtocolOptions would otherwise reset this to refuse Origin: null with 400.
        allowNullOrigin=True,
        perMessageCompressionAccept=(
            _accept_permessage_deflate if listener.compression else None),
    )
    if not listener.compression:
        factory.perMessageCompressionAccept = lambda offers: None
    return factory


@implementer(IWebSocketConnection)
class TerminatedProtocol(WebSocketServerProtocol):
    """Autobahn's server protocol, bounded against hostile clients, running an
    :class:`~wsgate.interfaces.IWebSocketApp` (it is the app's connection)."""

    max_fragments = 1024  # continuation frames per message ([listen:NAME] max_fragments)

    def bind(self, request, app):
        """Serve *request* (a :class:`wsgate.targets.Accepted`) with *app*."""
        gateway = self.gateway = request.gateway
        connection = self.connection = request.connection
        self.app = app
        # an app that coalesces its output (a broadcast subscriber: pending + flush), so
        # the fast protocol writes what it holds before any other frame; else None
        self.coalescing = app if hasattr(app, "flush") and hasattr(app, "pending") else None
        self.params = dict(request.match.params)
        self.broker = gateway.broker
        self.idle = IdleTimer(gateway.clock, idle_timeout(request.route, request.listener),
                              self._idle)
        self._opened = False
        self.send_buffer = SendBuffer(None, app.max_send_buffer)  # registered on open
        self.control_rate = ControlFrameRate(self.max_fragments, gateway.clock)
        self._fragments = 0
        self._parse_budget = None  # bytes still parsed after a limit closed the connection
        self._close_received = False
        outcome = connection.outcome
        self.policy_sessions = outcome.sessions if outcome is not None else ()
        self.log_messages = gateway.config.core.log_messages
        connection.protocol = self

    # -- handshake: the gateway already decided; Autobahn only completes it.

    def onConnect(self, request):
        """The subprotocol of the 101: the app's choice among the client's offers (an app
        with ``choose_subprotocol``), else none."""
        choose = getattr(self.app, "choose_subprotocol", None)
        return choose(request.protocols) if choose is not None else None

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
        self.app.opened(self)
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
        if self.policy_sessions and self._refused_by_policy("in", isBinary, len(payload)):
            return
        if self.log_messages:
            observe.log_message(connection, "received", len(payload), isBinary)
        self.app.message(self, payload, isBinary)

    def _refused_by_policy(self, direction, is_binary, size):
        """Apply the policies' verdict on one message; True when it must not pass."""
        verdict = apply_sessions(self.policy_sessions, direction, is_binary, size)
        if verdict is None:
            return False
        if verdict != DROP:
            self.close_with(verdict.code, verdict.reason)
        return True

    def send(self, payload, is_binary):
        """Send one message to the client (counted, subject to per-message policies)."""
        if self._may_send(len(payload), is_binary):
            self.sendMessage(payload, is_binary)

    def send_prepared(self, prepared, size, is_binary):
        """Send a message framed once for many subscribers (a broadcast delivery)."""
        if self._may_send(size, is_binary):
            self.sendPreparedMessage(prepared)

    def _may_send(self, size, is_binary):
        """Whether a message of *size* bytes may go to the client now; if so it is
        counted, logged (``log_messages``) and keeps the connection from idling."""
        if self.policy_sessions and self._refused_by_policy("out", is_binary, size):
            return False
        if self.state != self.STATE_OPEN:
            return False
        self.connection.messages_out += 1
        self.connection.bytes_out += size
        self.idle.touch()
        if self.log_messages:
            observe.log_message(self.connection, "sent", size, is_binary)
        return True

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
        self.app.closed(self)
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


@implementer(ITarget)
class ApplicationTarget:
    """A route wsgate terminates: each accepted request gets ``make_app(request)``.

    *make_app* returns an :class:`~wsgate.interfaces.IWebSocketApp`; *type*
    and *description* are what ``wsgate check`` and the metrics show;
    *max_send_buffer* is the route's key of that name (what apps normally
    use as theirs). Plugins build their targets with this class (see README
    "Write your own target").
    """

    websocket = True

    def __init__(self, type, description, make_app, needs_shared_broker=False,
                 max_send_buffer=DEFAULT_MAX_SEND_BUFFER):
        self.type = type
        self.description = description
        self.make_app = make_app
        self.needs_shared_broker = needs_shared_broker
        self.max_send_buffer = max_send_buffer

    def describe(self):
        return self.description

    def accept(self, request):
        """The terminated protocol for *request*, bound to a new app."""
        listener, route = request.listener, request.route
        protocol = request.gateway.websocket_protocol(listener)
        if route.max_message_size is not None:
            protocol.maxMessagePayloadSize = route.max_message_size
            protocol.maxFramePayloadSize = min(listener.max_frame_size, route.max_message_size)
        protocol.max_fragments = listener.max_fragments
        protocol.bind(request, self.make_app(request))
        return protocol
