"""The frame-aware splice between a client and its upstream WebSocket (proxy routes).

Bytes pass unchanged both ways while :class:`wsgate.frames.FrameScanner`
reads frame headers (message counts, the client's limits, close codes, frame
boundaries). The gateway injects its own control frames only at frame
boundaries: keepalive pings (their pongs are swallowed), 1001 to the upstream
when the client is gone, 1014 to the client when the upstream is lost, 1009,
1008 or 1002 when a limit or a rule is broken. Each transport is the other's
streaming producer (backpressure).
"""

import os

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from wsgate import fastpath, frames
from wsgate.flow import ControlFrameRate
from wsgate.idle import IdleTimer, idle_timeout
from wsgate.policies import DROP, apply_sessions
from wsgate.targets.websocket import log_message

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


class _Leg:
    """One side of the relay: its transport, its inbound scanner, its close state."""

    def __init__(self, name, transport, scanner, masked_out):
        self.name = name
        self.transport = transport
        self.scanner = scanner  # frames arriving *from* this side
        self.masked_out = masked_out  # frames the gateway writes *to* this side
        self.producer = None  # the _PauseReading registered on this transport
        self.pending = []  # gateway frames waiting for a frame boundary
        self.close_sent = False  # a close frame went to this side
        self.close_by_gateway = False  # ... and the gateway wrote it
        self.close_out = None  # (code, reason) of that close frame
        self.close_received = None  # (code, reason) this side sent
        self.received_first = False  # its close came before any close went to it
        self.lost = False
        self.ping_payload = None
        self.ping_timer = None
        self.close_timer = None

    @property
    def handshake_done(self):
        """A close frame went each way: the TCP connection may be closed."""
        return self.close_sent and self.close_received is not None

    def closed_by_peer(self, code, reason):
        """Record the close frame (*code*, *reason*) this side sent."""
        self.close_received = (code, reason)
        self.received_first = not self.close_sent

    def closed_by_relay(self, code, reason, by_gateway):
        """Record the close frame (*code*, *reason*) written to this side."""
        self.close_sent = True
        self.close_by_gateway = by_gateway
        self.close_out = (code, reason)

    def close_frames(self):
        """``(code, reason, reply code)``: the first close frame on this connection,
        whoever sent it, and the code of the answer; ``(None, "", None)`` without one."""
        first, reply = self.close_out, self.close_received
        if self.received_first:
            first, reply = reply, first
        if first is None:
            return None, "", None
        return first[0], first[1], None if reply is None else reply[0]


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

    Closing: a side whose close handshake is over is ended (the client: TCP
    closed by the gateway; the upstream: it closes TCP itself), and every side
    the gateway waits on is dropped after ``_CLOSE_TIMEOUT``. Producers are
    unregistered before a transport is closed: a TLS transport's
    ``loseConnection`` waits for its producer.
    """

    def __init__(self, gateway, listener, route, connection, client_transport, upstream_leg,
                 compressed=False):
        self.gateway = gateway
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
        self._closed_by = None
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
                if not sink.lost and not (sink.close_sent and sink.close_by_gateway):
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
        if sink.close_sent and sink.close_by_gateway:
            return  # the gateway closed that side: nothing more goes to it
        if not sink.lost:
            sink.transport.write(frame.raw)

    def _close_frame(self, source, sink, frame):
        """*source* sent a (valid) close frame: relay it, or answer it ourselves."""
        source.closed_by_peer(*frame.close_code_reason())
        if source.close_by_gateway:  # the answer to the gateway's own close
            self._end(source)
            return
        if self._closed_by is None:
            self._closed_by = source.name
        if sink.lost or sink.close_sent:
            # Nobody to relay to: answer the close ourselves, then end this side.
            code, reason = source.close_received
            self._send_close(source, code, reason)
            self._end(source)
            return
        sink.closed_by_relay(*frame.close_code_reason(), by_gateway=False)
        if not sink.lost:
            sink.transport.write(frame.raw)
        for leg in (source, sink):  # a reply ends both handshakes; a first close neither
            if leg.handshake_done:
                self._end(leg)

    def _violation(self, source, sink, violation):
        """*source* broke a rule: it gets *violation*'s close, *sink* 1001."""
        if violation.closed is not None:  # its own close frame was the offence
            source.closed_by_peer(*violation.closed)
            if self._closed_by is None:
                self._closed_by = source.name
        elif self._closed_by is None:
            self._closed_by = "gateway"
        self._send_close(source, violation.code, violation.reason)
        self._send_close(sink, 1001, "going away")
        if not source.scanner.at_boundary:
            self._hang_up(sink, abort=True)  # cut inside a frame: no close frame possible
        for leg in (source, sink):
            if leg.handshake_done:
                self._end(leg)
            else:
                self._end_later(leg)

    # -- gateway frames

    def _send(self, leg, opcode, payload):
        """Write a gateway frame to *leg* now if the stream is at a frame boundary."""
        if leg.lost:
            return
        frame = frames.control_frame(opcode, payload, masked=leg.masked_out)
        other = self.upstream if leg is self.client else self.client
        if other.scanner.at_boundary:
            leg.transport.write(frame)
        else:
            leg.pending.append(frame)

    def _send_close(self, leg, code, reason):
        """The gateway's close frame to *leg* (once per side; none to a lost side)."""
        if leg.lost or leg.close_sent:
            return
        payload = frames.close_payload(code, reason)
        leg.closed_by_relay(code, payload[2:].decode("utf-8"), by_gateway=True)  # as sent
        self._send(leg, frames.OP_CLOSE, payload)

    def _flush(self, leg):
        pending, leg.pending = leg.pending, []
        if not leg.lost:
            leg.transport.write(b"".join(pending))

    def close_with(self, code, reason):
        """Close both sides from the gateway (idle timeout, kick, drain)."""
        if self._closed_by is None:
            self._closed_by = "gateway"
        for leg in (self.client, self.upstream):
            self._send_close(leg, code, reason)
            self._end_later(leg)

    # -- keepalive per leg

    def _schedule_ping(self, leg):
        if self.ping_interval and not leg.lost:
            leg.ping_timer = self.clock.callLater(self.ping_interval, self._ping, leg)

    def _ping(self, leg):
        leg.ping_timer = None
        if leg.close_sent:
            return  # no frame after a close; the close timer ends the leg
        leg.ping_payload = os.urandom(8)
        self._send(leg, frames.OP_PING, leg.ping_payload)
        leg.ping_timer = self.clock.callLater(self.ping_timeout, self._ping_unanswered, leg)

    def _pong(self, leg):
        leg.ping_payload = None
        self._cancel(leg, "ping_timer")
        self._schedule_ping(leg)

    def _ping_unanswered(self, leg):
        leg.ping_timer = None
        if self._closed_by is None:
            self._closed_by = "gateway"
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
        if leg.lost or leg.close_timer is not None:
            return
        leg.close_timer = self.clock.callLater(_CLOSE_TIMEOUT, self._drop, leg)

    def _drop(self, leg):
        leg.close_timer = None
        self._hang_up(leg, abort=True)

    def _hang_up(self, leg, abort=False):
        """Close *leg*'s connection; its producer is unregistered first (TLS waits for it)."""
        if leg.lost:
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
        if self._closed_by is None:
            self._closed_by = "client"
        self._send_close(upstream, 1001, "going away")
        if upstream.pending and not client.scanner.at_boundary:
            self._hang_up(upstream, abort=True)  # cut mid-frame: nothing to finish
        else:
            self._end_later(upstream)
        self._maybe_finish()

    def upstream_lost(self):
        client, upstream = self.client, self.upstream
        self._leg_lost(upstream)
        if self._closed_by is None:
            self._closed_by = "upstream"
        self._send_close(client, 1014, "upstream lost")
        if client.pending and not upstream.scanner.at_boundary:
            self._hang_up(client, abort=True)  # cut mid-frame: no close frame possible
        elif client.handshake_done:
            self._end(client)
        else:
            self._end_later(client)  # wait for the client's answer
        self._maybe_finish()

    def _leg_lost(self, leg):
        """*leg*'s connection is gone: no producer refers to it, no timer runs for it."""
        leg.lost = True
        self._release(leg)
        self._release(self.upstream if leg is self.client else self.client)  # pauses *leg*
        self._cancel(leg, "ping_timer")
        self._cancel(leg, "close_timer")
        fastpath.release(leg.transport)

    @staticmethod
    def _cancel(leg, attr):
        timer = getattr(leg, attr)
        if timer is not None and timer.active():
            timer.cancel()
        setattr(leg, attr, None)

    def _maybe_finish(self):
        if self._finished or not (self.client.lost and self.upstream.lost):
            return
        self._finished = True
        self.idle.cancel()
        code, reason, reply = self.client.close_frames()
        self.gateway.unregister(self.connection, code, reason, self._closed_by or "gateway",
                                reply)
