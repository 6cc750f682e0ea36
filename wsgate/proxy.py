"""Proxy routes: the upstream-first handshake and the frame-aware splice relay.

Handshake: the gateway sends the upstream its own upgrade request carrying the
client's key, subprotocols and (when the listener allows compression)
extension offers plus the forwarded headers, and answers the client only once
the upstream has answered: its 101 (subprotocol, extensions, Accept) goes to
the client unchanged; a refused, unreachable or slow upstream is a 503, an
upstream that answers with an HTTP error or breaks the handshake is a 502.

Relay: bytes pass unchanged both ways while :class:`wsgate.frames.FrameScanner`
reads frame headers (message counts, ``max_message_size``, frame boundaries).
The gateway injects its own control frames only at frame boundaries: keepalive
pings (their pongs are swallowed), 1001 to the upstream when the client is
gone, 1014 to the client when the upstream is lost, 1009 for oversize
messages. Each transport is the other's streaming producer (backpressure).
"""

import base64
import hashlib
import os

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from wsgate import frames, http
from wsgate.forwarding import HOP_BY_HOP, forwarded_headers
from wsgate.idle import IdleTimer, idle_timeout
from wsgate.policies import DROP, apply_sessions
from wsgate.terminated import log_message

_log = Logger()

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_CLOSE_TIMEOUT = 5.0
RETRY_AFTER_SECONDS = 5


def accept_value(key):
    return base64.b64encode(hashlib.sha1(key.strip().encode() + _WS_GUID).digest()).decode()


# --------------------------------------------------------------------- handshake


class UpstreamUnavailable(Exception):
    """The upstream could not be reached in time (→ 503)."""


class UpstreamRejected(Exception):
    """The upstream answered, but not with a usable 101 (→ 502)."""


def upstream_request(target, match, head, connection, origin, listener, extra_headers=()):
    """The bytes of the upgrade request the upstream gets."""
    path = target.request_target(match, head)
    lines = [f"GET {path} HTTP/1.1", f"Host: {target.host_header}",
             "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {head.get('sec-websocket-key').strip()}",
             "Sec-WebSocket-Version: 13"]
    protocols = head.get_all("sec-websocket-protocol")
    if protocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    extensions = head.get_all("sec-websocket-extensions")
    if extensions and listener.compression:
        lines.append("Sec-WebSocket-Extensions: " + ", ".join(extensions))
    for name, value in forwarded_headers(origin, head, connection.conn_id, listener.is_tls,
                                         target.forward_headers):
        lines.append(f"{name}: {value}")
    for name, value in extra_headers:  # from policies (e.g. the JWT identity)
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class UpstreamLeg(Protocol):
    """The gateway's client connection to the upstream: handshake, then relay."""

    def __init__(self, request, ready):
        self.request = request
        self.ready = ready  # fires with (self, status line, headers, extra bytes)
        self.relay = None
        self._buffer = b""

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        if self.relay is not None:
            self.relay.from_upstream(data)
            return
        self._buffer += data
        end = http.find_head_end(self._buffer)
        if end < 0:
            if len(self._buffer) > http.MAX_HEAD_BYTES:
                self._fail(UpstreamRejected("response head too large"))
            return
        head, extra = self._buffer[:end], self._buffer[end:]
        self._buffer = b""
        lines = head.decode("latin-1")[:-4].split("\r\n")
        parts = lines[0].split(" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            self._fail(UpstreamRejected("malformed response"))
            return
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers.append((name.strip(), value.strip()))
        if not self.ready.called:
            self.ready.callback((self, status, headers, extra))

    def _fail(self, exc):
        if not self.ready.called:
            self.ready.errback(exc)
        self.transport.abortConnection()

    def connectionLost(self, reason):
        if self.relay is not None:
            self.relay.upstream_lost()
        elif not self.ready.called:
            self.ready.errback(UpstreamRejected(_lost_reason(reason)))


def _lost_reason(reason):
    value = reason.value
    module = type(value).__module__
    if module.startswith(("OpenSSL", "service_identity")):
        return f"TLS verification failed: {value}"
    if isinstance(value, error.ConnectionDone):
        return "closed the connection without answering"
    return f"connection lost before answering: {value}"


def open_upstream(gateway, listener, match, head, connection, origin, extra_headers=()):
    """Connect and upgrade to the route's upstream before the client gets its 101.

    Returns a cancellable Deferred firing with ``(leg, response headers, extra
    bytes)`` or failing with :class:`wsgate.http.HttpRefusal` (503 or 502).
    Cancelling (the client left) closes whatever was opened.
    """
    target = match.route.target
    clock = gateway.clock
    endpoint = HostnameEndpoint(gateway.reactor, target.host, target.port,
                                timeout=max(1, int(target.timeout + 0.999)))
    if target.tls_options is not None:
        endpoint = wrapClientTLS(target.tls_options, endpoint)
    state = {}

    def give_up(reason):
        leg = state["leg"]
        if leg.transport is not None:
            leg.transport.abortConnection()
        if not state["connecting"].called:
            state["connecting"].cancel()
        if not ready.called:
            ready.errback(UpstreamUnavailable(reason))

    ready = defer.Deferred(lambda d: give_up("the client left"))
    leg = state["leg"] = UpstreamLeg(
        upstream_request(target, match, head, connection, origin, listener, extra_headers),
        ready)
    factory = Factory.forProtocol(lambda: leg)
    factory.noisy = False
    connecting = state["connecting"] = endpoint.connect(factory)

    def connect_failed(failure):
        if not ready.called:
            ready.errback(UpstreamUnavailable(failure.getErrorMessage()))
    connecting.addErrback(connect_failed)
    timer = clock.callLater(target.timeout, give_up, "timed out")

    def cancel_timer(result):
        if timer.active():
            timer.cancel()
        return result
    ready.addBoth(cancel_timer)
    ready.addCallback(_check_response, head, target)
    ready.addErrback(_as_refusal, target, match.route.name)
    return ready


def _check_response(result, head, target):
    leg, status, headers, extra = result
    if status != 101:
        leg.transport.abortConnection()
        raise UpstreamRejected(f"answered {status} instead of 101")
    by_name = {}
    for name, value in headers:
        by_name.setdefault(name.lower(), []).append(value)
    accept = by_name.get("sec-websocket-accept", [""])[0]
    if accept != accept_value(head.get("sec-websocket-key")):
        leg.transport.abortConnection()
        raise UpstreamRejected("answered with a wrong Sec-WebSocket-Accept")
    offered = {p.strip() for value in head.get_all("sec-websocket-protocol")
               for p in value.split(",") if p.strip()}
    chosen = by_name.get("sec-websocket-protocol", [None])[0]
    if chosen is not None and chosen not in offered:
        leg.transport.abortConnection()
        raise UpstreamRejected(f"chose subprotocol {chosen!r} the client did not offer")
    return leg, headers, extra


def _as_refusal(failure, target, route_name):
    if failure.check(http.HttpRefusal):
        return failure
    if failure.check(UpstreamUnavailable, defer.CancelledError):
        _log.warn("wsgate: upstream {url} unreachable for route {route}: {why}",
                  url=target.display_url, route=route_name, why=failure.getErrorMessage())
        refusal = http.HttpRefusal(503, "upstream_unreachable", "Upstream unavailable",
                                   [("Retry-After", str(RETRY_AFTER_SECONDS))],
                                   route=route_name)
    elif failure.check(UpstreamRejected):
        _log.warn("wsgate: upstream {url} rejected the upgrade for route {route}: {why}",
                  url=target.display_url, route=route_name, why=failure.getErrorMessage())
        refusal = http.HttpRefusal(502, "upstream_rejected", "Bad Gateway", route=route_name)
    else:
        return failure
    raise refusal


def client_response(headers):
    """The 101 for the client, built from the upstream's 101 (hop-by-hop headers dropped)."""
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade"]
    for name, value in headers:
        if name.lower() not in HOP_BY_HOP:
            lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# --------------------------------------------------------------------- relay


@implementer(IPushProducer)
class _PauseReading:
    """Pauses one transport's reading for the other's write buffer.

    Registered instead of the transport itself so that a lost connection does
    not stop the other one through ``stopProducing``: the relay ends each leg
    with the right close frame.
    """

    def __init__(self, transport):
        self.transport = transport

    def pauseProducing(self):
        self.transport.pauseProducing()

    def resumeProducing(self):
        self.transport.resumeProducing()

    def stopProducing(self):
        pass


class _Leg:
    """One side of the relay: its transport, its inbound scanner, its close state."""

    def __init__(self, name, transport, scanner, masked_out):
        self.name = name
        self.transport = transport
        self.scanner = scanner  # frames arriving *from* this side
        self.masked_out = masked_out  # frames the gateway writes *to* this side
        self.pending = []  # gateway frames waiting for a frame boundary
        self.close_sent = False  # a close frame went to this side
        self.close_by_gateway = False  # ... and the gateway wrote it
        self.close_received = None  # (code, reason) this side sent
        self.lost = False
        self.ping_payload = None
        self.ping_timer = None


class ClientLeg(Protocol):
    """The client's transport after the 101: everything goes to the relay."""

    def __init__(self, relay):
        self.relay = relay

    def dataReceived(self, data):
        self.relay.from_client(data)

    def connectionLost(self, reason):
        self.relay.client_lost()


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
    """Splices a client and an upstream WebSocket, frame-aware (see the module docstring)."""

    def __init__(self, gateway, listener, route, connection, client_transport, upstream_leg):
        self.gateway = gateway
        self.clock = gateway.clock
        self.connection = connection
        self.route = route
        limit = route.max_message_size or listener.max_message_size
        sessions = connection.outcome.sessions if connection.outcome is not None else ()
        log_messages = gateway.config.core.log_messages
        self.client = _Leg("client", client_transport, frames.FrameScanner(
            limit, _message_hook(connection, sessions, "in", log_messages)), False)
        self.upstream = _Leg("upstream", upstream_leg.transport, frames.FrameScanner(
            1 << 62, _message_hook(connection, sessions, "out", log_messages)), True)
        self.ping_interval = listener.ping_interval
        self.ping_timeout = listener.ping_timeout
        self.idle = IdleTimer(self.clock, idle_timeout(route, listener), self._idle)
        self._upstream_close_timer = None
        self._finished = False
        self._closed_by = None
        upstream_leg.relay = self
        connection.protocol = self  # the admin API's kick and the drain close through it
        client_transport.registerProducer(_PauseReading(upstream_leg.transport), True)
        upstream_leg.transport.registerProducer(_PauseReading(client_transport), True)

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
            source.close_received = frame.close_code_reason()
            if source.close_by_gateway:  # the answer to the gateway's own close
                self._end(source)
                return
            if self._closed_by is None:
                self._closed_by = source.name
            if sink.lost or sink.close_sent:
                # Nobody to relay to: answer the close ourselves, then end this side.
                code, reason = source.close_received
                self._send(source, frames.OP_CLOSE, frames.close_payload(code, reason),
                           by_gateway=True)
                self._end(source)
                return
            sink.close_sent = True
        elif sink.close_sent and sink.close_by_gateway:
            return  # the gateway closed that side: nothing more goes to it
        if not sink.lost:
            sink.transport.write(frame.raw)

    def _violation(self, source, sink, violation):
        self._closed_by = "gateway"
        self._send(source, frames.OP_CLOSE, frames.close_payload(violation.code,
                                                                 violation.reason),
                   by_gateway=True)
        self._send(sink, frames.OP_CLOSE, frames.close_payload(1001, "going away"),
                   by_gateway=True)
        for leg in (source, sink):
            self._end_later(leg)

    # -- gateway frames

    def _send(self, leg, opcode, payload, by_gateway=False):
        """Write a gateway frame to *leg* now if the stream is at a frame boundary."""
        if leg.lost or (opcode == frames.OP_CLOSE and leg.close_sent):
            return
        if opcode == frames.OP_CLOSE:
            leg.close_sent = True
            leg.close_by_gateway = by_gateway
        frame = frames.control_frame(opcode, payload, masked=leg.masked_out)
        other = self.upstream if leg is self.client else self.client
        if other.scanner.at_boundary or other.lost and not other.scanner.remaining:
            leg.transport.write(frame)
        else:
            leg.pending.append(frame)

    def _flush(self, leg):
        pending, leg.pending = leg.pending, []
        if not leg.lost:
            leg.transport.write(b"".join(pending))

    def close_with(self, code, reason):
        """Close both sides from the gateway (idle timeout, kick, drain)."""
        if self._closed_by is None:
            self._closed_by = "gateway"
        payload = frames.close_payload(code, reason)
        self._send(self.client, frames.OP_CLOSE, payload, by_gateway=True)
        self._send(self.upstream, frames.OP_CLOSE, payload, by_gateway=True)
        for leg in (self.client, self.upstream):
            self._end_later(leg)

    # -- keepalive per leg

    def _schedule_ping(self, leg):
        if self.ping_interval and not leg.lost:
            leg.ping_timer = self.clock.callLater(self.ping_interval, self._ping, leg)

    def _ping(self, leg):
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
        leg.transport.abortConnection()  # the peer is gone

    # -- idle timeout

    def _idle(self):
        self.close_with(1001, "idle timeout")

    # -- ending

    def _end(self, leg):
        """The close handshake with *leg* is over: the server side closes TCP."""
        if leg is self.client:
            leg.transport.loseConnection()
        else:
            self._end_later(leg)

    def _end_later(self, leg):
        """Give *leg* time to finish its close handshake, then drop it."""
        if leg is self.client:
            attr = "_client_close_timer"
        else:
            attr = "_upstream_close_timer"
        timer = getattr(self, attr, None)
        if leg.lost or (timer is not None and timer.active()):
            return
        setattr(self, attr, self.clock.callLater(_CLOSE_TIMEOUT, self._drop, leg))

    def _drop(self, leg):
        if not leg.lost:
            leg.transport.abortConnection()

    def client_lost(self):
        self.client.lost = True
        self._stop_timers(self.client)
        if self._closed_by is None:
            self._closed_by = "client"
        if not self.upstream.close_sent:
            code = 1001
            self._send(self.upstream, frames.OP_CLOSE, frames.close_payload(code, "going away"),
                       by_gateway=True)
        if not self.upstream.lost:
            if self.upstream.pending and not self.client.scanner.at_boundary:
                self.upstream.transport.abortConnection()  # cut mid-frame: nothing to finish
            else:
                self._end_later(self.upstream)
        self._maybe_finish()

    def upstream_lost(self):
        self.upstream.lost = True
        self._stop_timers(self.upstream)
        if self._closed_by is None:
            self._closed_by = "upstream"
        client = self.client
        if not client.lost:
            if not client.close_sent:
                self._send(client, frames.OP_CLOSE, frames.close_payload(1014, "upstream lost"),
                           by_gateway=True)
            if client.pending and not self.upstream.scanner.at_boundary:
                client.transport.abortConnection()  # cut mid-frame: no close frame possible
            else:
                client.transport.loseConnection()
        self._maybe_finish()

    def _stop_timers(self, leg):
        self._cancel(leg, "ping_timer")
        timer_attr = "_client_close_timer" if leg is self.client else "_upstream_close_timer"
        timer = getattr(self, timer_attr, None)
        if timer is not None and timer.active():
            timer.cancel()

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
        code, reason = self._reported_close()
        self.gateway.unregister(self.connection, code, reason, self._closed_by or "gateway")

    def _reported_close(self):
        for leg in ((self.client, self.upstream) if self._closed_by == "client"
                    else (self.upstream, self.client)):
            if leg.close_received is not None:
                return leg.close_received
        return 1006, ""
