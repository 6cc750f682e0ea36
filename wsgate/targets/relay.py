"""The frame-aware splice between a client and its upstream WebSocket (proxy routes).

Bytes pass unchanged both ways while :class:`wsgate.frames.FrameScanner`
reads frame headers (message counts, the client's limits, close codes, frame
boundaries). The gateway injects its own control frames only at frame
boundaries: keepalive pings (their pongs are swallowed), 1001 to the upstream
when the client is gone, 1014 to the client when the upstream is lost, 1009,
1008 or 1002 when a limit or a rule is broken. Each transport is the other's
streaming producer (backpressure).
"""

import enum
import os

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from wsgate import fastpath, frames
from wsgate.observe import log_message
from wsgate.flow import ControlFrameRate
from wsgate.idle import IdleTimer, idle_timeout
from wsgate.policies import DROP, apply_sessions

_CLOSE_TIMEOUT = 5.0


@implementer(IPushProducer)
class _PauseReading:
    """Pauses one transport's reading for the other's write buffer.

    Registered instead of the transport itself so that a lost connection does
    not stop the other one through ``stopProducing``: the relay ends each leg
    with the right close frame.
    """

    def __init__(self, transport):
        self.transport = transport
        self.paused = False

    def pauseProducing(self):
        self.paused = True
        self.transport.pauseProducing()

    def resumeProducing(self):
        self.paused = False
        self.transport.resumeProducing()

    def stopProducing(self):
        pass

    def release(self):
        """No longer hold the transport back: resume it if this producer paused it."""
        if self.paused:
            self.resumeProducing()


class LegState(enum.Enum):
    """Where one leg's close handshake stands. States only move forward::

        OPEN ──close written──▶ CLOSE_SENT ──close read───▶ CLOSED
        OPEN ──close read─────▶ CLOSE_RECEIVED ──close written──▶ CLOSED
        any ──connection lost──▶ LOST

    A close frame is "written" to a leg by the gateway or relayed from the
    other leg (:attr:`_Leg.close_from` says which); "read" means the leg's
    peer sent it. ``CLOSED`` is the close handshake done: the TCP connection
    may end. ``LOST`` is final: nothing is written to a lost leg.
    """

    OPEN = "open"
    CLOSE_SENT = "close sent"  # a close frame went to this side; its answer is awaited
    CLOSE_RECEIVED = "close received"  # this side closed; no close frame went to it yet
    CLOSED = "closed"  # a close frame went each way
    LOST = "lost"  # its connection is gone


# Module-level names for the per-frame checks (an Enum member lookup through its class
# costs more than a global).
OPEN, CLOSE_SENT, CLOSE_RECEIVED, CLOSED, LOST = LegState

GATEWAY = "gateway"  # _Leg.close_from: the gateway wrote the close frame itself


class _Leg:
    """One side of the relay: its transport, its inbound scanner, where its close
    handshake stands (:class:`LegState`) and its own two timers (keepalive, close)."""

    def __init__(self, name, transport, scanner, masked_out):
        self.name = name
        self.transport = transport
        self.scanner = scanner  # frames arriving *from* this side
        self.masked_out = masked_out  # frames the gateway writes *to* this side
        self.producer = None  # the _PauseReading registered on this transport
        self.pending = []  # gateway frames waiting for a frame boundary
        self.state = OPEN
        self.close_from = None  # who wrote the close frame to this side: GATEWAY, or the
        #                         other leg's name when its peer's close was relayed
        self.first_close = None  # (code, reason) of the first close frame on this
        #                          connection, whichever way it went
        self.reply_code = None  # the code of the close frame that answered it
        self.ping_payload = None
        self.ping_timer = None  # the next ping, or the deadline of the unanswered one
        self.close_timer = None  # the deadline of the close handshake (then dropped)

    def __repr__(self):
        return f"<_Leg {self.name} {self.state.value}>"

    def can_take_close(self):
        """Whether a close frame may still go to this side (none went yet, not lost)."""
        return self.state is OPEN or self.state is CLOSE_RECEIVED

    def takes_frames(self):
        """Whether frames from the other side still go to this one: not once it is lost
        nor once the gateway closed it (nothing follows the gateway's close frame)."""
        return self.state is not LOST and self.close_from != GATEWAY

    def close_read(self, code, reason):
        """This side's peer sent the close frame (*code*, *reason*).

        OPEN → CLOSE_RECEIVED (it is the first close frame on the connection),
        CLOSE_SENT → CLOSED (it answers the one written). A second close frame
        from the same peer changes nothing.
        """
        if self.state is OPEN:
            self.state, self.first_close = CLOSE_RECEIVED, (code, reason)
        elif self.state is CLOSE_SENT:
            self.state, self.reply_code = CLOSED, code

    def close_written(self, code, reason, writer):
        """The close frame (*code*, *reason*) went to this side, written by *writer*
        (:data:`GATEWAY` or the other leg's name): OPEN → CLOSE_SENT,
        CLOSE_RECEIVED → CLOSED. Callers check :meth:`can_take_close` first."""
        if self.state is OPEN:
            self.state, self.first_close = CLOSE_SENT, (code, reason)
        elif self.state is CLOSE_RECEIVED:
            self.state, self.reply_code = CLOSED, code
        else:
            raise RuntimeError(f"a close frame written to the {self.name} leg in state "
                               f"{self.state.value}")
        self.close_from = writer

    def connection_lost(self):
        """Any state → LOST; neither of its timers runs any more."""
        self.state = LOST
        self.ping_timer = _cancelled(self.ping_timer)
        self.close_timer = _cancelled(self.close_timer)

    def close_frames(self):
        """``(code, reason, reply code)``: the first close frame on this connection,
        whoever sent it, and the code of the answer; ``(None, "", None)`` without one."""
        if self.first_close is None:
            return None, "", None
        code, reason = self.first_close
        return code, reason, self.reply_code


def _cancelled(call):
    """Cancel the DelayedCall *call* if it is still pending; None, to store in its place."""
    if call is not None and call.active():
        call.cancel()
    return None


def _message_hook(connection, sessions, direction, log_messages):
    """The scanner's per-message callback: policies' sessions and ``log_messages``
    (None when neither is configured: the message path stays free of calls)."""
    if not sessions and not log_messages:
        return None
    verb = "received" if direction == "in" else "sent"

    def on_message(opcode, size):
        if log_messages:
            log_message(connection, verb, size, opcode == frames.OP_BINARY)
        if not sessions:
            return None
        verdict = apply_sessions(sessions, direction, opcode == frames.OP_BINARY, size)
        if verdict is None:
            return None
        if verdict == DROP:
            return frames.DROP_MESSAGE
        return frames.Violation(verdict.code, verdict.reason)
    return on_message


class Relay:
    """Splices a client and an upstream WebSocket, frame-aware (see the module docstring).

    Limits on what the client sends (its scanner): the route's (or listener's)
    ``max_message_size`` — on the inflated size too when permessage-deflate
    was negotiated —, ``max_fragments`` frames per message, and at most
    ``max_fragments`` control frames per second. A close frame with a code
    forbidden on the wire, from either side, gets 1002 and is not relayed;
    the other side gets 1001.

    Each leg's close handshake is a :class:`LegState`. Closing: a leg in
    ``CLOSED`` is ended (the client: TCP closed by the gateway; the upstream:
    it closes TCP itself), and every leg the gateway waits on is dropped after
    ``_CLOSE_TIMEOUT`` (its own close timer). Producers are unregistered
    before a transport is closed: a TLS transport's ``loseConnection`` waits
    for its producer. Once both legs are ``LOST`` the connection is
    unregistered with the client leg's close frames and who closed first.
    """

    def __init__(self, gateway, listener, route, connection, client_transport, upstream_leg,
                 compressed=False, on_finish=None):
        self.gateway = gateway
        self.on_finish = on_finish  # called once, when both legs are gone
        self.clock = gateway.clock
        self.connection = connection
        self.route = route
        limit = route.max_message_size or listener.max_message_size
        sessions = connection.outcome.sessions if connection.outcome is not None else ()
        log_messages = gateway.config.core.log_messages
        inflate = frames.InflateLimit(limit) if compressed else None
        self.client = _Leg("client", client_transport, frames.FrameScanner(
            limit, _message_hook(connection, sessions, "in", log_messages),
            max_fragments=listener.max_fragments,
            control_rate=ControlFrameRate(listener.max_fragments, self.clock),
            inflate=inflate), False)
        self.upstream = _Leg("upstream", upstream_leg.transport, frames.FrameScanner(
            frames.UNLIMITED, _message_hook(connection, sessions, "out", log_messages)), True)
        self.ping_interval = listener.ping_interval
        self.ping_timeout = listener.ping_timeout
        self.idle = IdleTimer(self.clock, idle_timeout(route, listener), self._idle)
        self._finished = False
        self._closed_by = None  # who closed first: "client", "upstream" or "gateway"
        upstream_leg.relay = self
        connection.protocol = self  # the admin API's kick and the drain close through it
        for leg, other in ((self.client, self.upstream), (self.upstream, self.client)):
            fastpath.set_no_delay(leg.transport)  # small frames must not wait for Nagle
            leg.producer = _PauseReading(other.transport)
            leg.transport.registerProducer(leg.producer, True)

    def start(self, client_bytes, upstream_bytes):
        """Begin relaying, replaying bytes that arrived during the handshake."""
        self.gateway.register(self.connection)
        for leg in (self.client, self.upstream):
            self._schedule_ping(leg)
        self.idle.touch()
        if upstream_bytes:
            self.from_upstream(upstream_bytes)
        if client_bytes:
            self.from_client(client_bytes)

    def _closing(self, who):
        """*who* (a leg's name, or ``gateway``) started closing, unless someone did first."""
        if self._closed_by is None:
            self._closed_by = who

    # -- data in

    def from_client(self, data):
        self._relay(self.client, self.upstream, data)

    def from_upstream(self, data):
        self._relay(self.upstream, self.client, data)

    def _relay(self, source, sink, data):
        scanner = source.scanner
        before_messages, before_bytes = scanner.messages, scanner.payload_bytes
        for item in scanner.feed(data):
            if type(item) is bytes:
                if sink.state is OPEN or sink.takes_frames():
                    sink.transport.write(item)
            elif type(item) is frames.ControlFrame:
                self._control(source, sink, item)
            else:
                self._violation(source, sink, item)
                return
        if scanner.messages != before_messages:
            self._count(source, scanner.messages - before_messages,
                        scanner.payload_bytes - before_bytes)
            self.idle.touch()
        if scanner.at_boundary and sink.pending:
            self._flush(sink)

    def _count(self, source, messages, size):
        connection = self.connection
        if source is self.client:
            connection.messages_in += messages
            connection.bytes_in += size
        else:
            connection.messages_out += messages
            connection.bytes_out += size

    def _control(self, source, sink, frame):
        opcode = frame.opcode
        if opcode == frames.OP_PONG and source.ping_payload is not None \
                and frame.payload == source.ping_payload:
            self._pong(source)
            return
        if opcode == frames.OP_CLOSE:
            self._close_frame(source, sink, frame)
            return
        if sink.takes_frames():
            sink.transport.write(frame.raw)

    def _close_frame(self, source, sink, frame):
        """*source* sent a (valid) close frame: relay it, or answer it ourselves."""
        code, reason = frame.close_code_reason()
        source.close_read(code, reason)
        if source.close_from == GATEWAY:  # the answer to the gateway's own close
            self._end(source)
            return
        self._closing(source.name)
        if not sink.can_take_close():
            # Nobody to relay to: answer the close ourselves, then end this side.
            self._send_close(source, code, reason)
            self._end(source)
            return
        sink.close_written(code, reason, source.name)
        sink.transport.write(frame.raw)
        for leg in (source, sink):  # a reply ends both handshakes; a first close neither
            if leg.state is CLOSED:
                self._end(leg)
        # A first close relayed: the side it went to has _CLOSE_TIMEOUT to answer, or
        # it is dropped (a silent upstream must not hold the client for ever).
        self._end_later(sink)

    def _violation(self, source, sink, violation):
        """*source* broke a rule: it gets *violation*'s close, *sink* 1001."""
        if violation.closed is not None:  # its own close frame was the offence
            source.close_read(*violation.closed)
            self._closing(source.name)
        else:
            self._closing(GATEWAY)
        self._send_close(source, violation.code, violation.reason)
        self._send_close(sink, 1001, "going away")
        if not source.scanner.at_boundary:
            self._hang_up(sink, abort=True)  # cut inside a frame: no close frame possible
        for leg in (source, sink):
            if leg.state is CLOSED:
                self._end(leg)
            else:
                self._end_later(leg)

    # -- gateway frames

    def _send(self, leg, opcode, payload):
        """Write a gateway frame to *leg* now if the stream is at a frame boundary."""
        if leg.state is LOST:
            return
        frame = frames.control_frame(opcode, payload, masked=leg.masked_out)
        other = self.upstream if leg is self.client else self.client
        if other.scanner.at_boundary:
            leg.transport.write(frame)
        else:
            leg.pending.append(frame)

    def _send_close(self, leg, code, reason):
        """The gateway's close frame to *leg* (once per side; none to a lost side)."""
        if not leg.can_take_close():
            return
        payload = frames.close_payload(code, reason)
        leg.close_written(code, payload[2:].decode("utf-8"), GATEWAY)  # the reason as sent
        self._send(leg, frames.OP_CLOSE, payload)

    def _flush(self, leg):
        pending, leg.pending = leg.pending, []
        if leg.state is not LOST:
            leg.transport.write(b"".join(pending))

    def close_with(self, code, reason, upstream_code=None, upstream_reason=None):
        """Close both sides from the gateway (idle timeout, kick, drain); the upstream
        gets *upstream_code* and *upstream_reason* when given (a client moved off its
        server gets 1012 while the server gets 1001)."""
        self._closing(GATEWAY)
        if upstream_code is None:
            upstream_code, upstream_reason = code, reason
        self._send_close(self.client, code, reason)
        self._end_later(self.client)
        self._send_close(self.upstream, upstream_code, upstream_reason)
        self._end_later(self.upstream)

    # -- keepalive per leg

    def _schedule_ping(self, leg):
        if self.ping_interval and leg.state is not LOST:
            leg.ping_timer = self.clock.callLater(self.ping_interval, self._ping, leg)

    def _ping(self, leg):
        leg.ping_timer = None
        if not leg.can_take_close():
            return  # no frame after a close; the close timer ends the leg
        leg.ping_payload = os.urandom(8)
        self._send(leg, frames.OP_PING, leg.ping_payload)
        leg.ping_timer = self.clock.callLater(self.ping_timeout, self._ping_unanswered, leg)

    def _pong(self, leg):
        leg.ping_payload = None
        leg.ping_timer = _cancelled(leg.ping_timer)
        self._schedule_ping(leg)

    def _ping_unanswered(self, leg):
        leg.ping_timer = None
        self._closing(GATEWAY)
        self._hang_up(leg, abort=True)  # the peer is gone

    # -- idle timeout

    def _idle(self):
        self.close_with(1001, "idle timeout")

    # -- ending

    def _end(self, leg):
        """The close handshake with *leg* is over. The server side closes TCP: the
        gateway for the client, the upstream for its leg; either is dropped if it
        has not gone after ``_CLOSE_TIMEOUT`` (a client that does not read)."""
        if leg is self.client:
            self._hang_up(leg)
        self._end_later(leg)

    def _end_later(self, leg):
        """Give *leg* time to finish its close handshake, then drop it."""
        if leg.state is LOST or leg.close_timer is not None:
            return
        leg.close_timer = self.clock.callLater(_CLOSE_TIMEOUT, self._drop, leg)

    def _drop(self, leg):
        leg.close_timer = None
        self._hang_up(leg, abort=True)

    def _hang_up(self, leg, abort=False):
        """Close *leg*'s connection; its producer is unregistered first (TLS waits for it)."""
        if leg.state is LOST:
            return
        self._release(leg)
        if abort:
            leg.transport.abortConnection()
        else:
            leg.transport.loseConnection()

    @staticmethod
    def _release(leg):
        """Unregister the producer on *leg*'s transport and let the other side read again."""
        producer, leg.producer = leg.producer, None
        if producer is not None:
            leg.transport.unregisterProducer()
            producer.release()

    def client_lost(self):
        client, upstream = self.client, self.upstream
        self._leg_lost(client)
        self._closing(client.name)
        self._send_close(upstream, 1001, "going away")
        if upstream.pending and not client.scanner.at_boundary:
            self._hang_up(upstream, abort=True)  # cut mid-frame: nothing to finish
        else:
            self._end_later(upstream)
        self._maybe_finish()

    def upstream_lost(self):
        client, upstream = self.client, self.upstream
        self._leg_lost(upstream)
        self._closing(upstream.name)
        self._send_close(client, 1014, "upstream lost")
        if client.pending and not upstream.scanner.at_boundary:
            self._hang_up(client, abort=True)  # cut mid-frame: no close frame possible
        elif client.state is CLOSED:
            self._end(client)
        else:
            self._end_later(client)  # wait for the client's answer
        self._maybe_finish()

    def _leg_lost(self, leg):
        """*leg*'s connection is gone: no producer refers to it, no timer runs for it."""
        leg.connection_lost()
        self._release(leg)
        self._release(self.upstream if leg is self.client else self.client)  # pauses *leg*
        fastpath.release(leg.transport)

    def _maybe_finish(self):
        if self._finished or not (self.client.state is LOST and self.upstream.state is LOST):
            return
        self._finished = True
        self.idle.cancel()
        if self.on_finish is not None:
            self.on_finish()
        code, reason, reply = self.client.close_frames()
        self.gateway.unregister(self.connection, code, reason, self._closed_by or GATEWAY,
                                reply)
