"""``upstream = URL``: proxy routes, the upstream-first handshake.

The gateway sends the upstream its own upgrade request carrying the client's
key, subprotocols and (when the listener allows compression) extension offers
plus the forwarded headers, and answers the client only once the upstream has
answered: its 101 (subprotocol, extensions, Accept) goes to the client
unchanged, except that a permessage-deflate answer gains
``client_no_context_takeover`` (see :func:`client_response`); a refused,
unreachable or slow upstream is a 503, an upstream that answers with an HTTP
error or breaks the handshake is a 502. Then :class:`ProxyHandover` hands
both connections to :class:`wsgate.targets.relay.Relay`.
"""

import base64
import hashlib
import re
from dataclasses import dataclass, field

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from wsgate import fastpath, http, units
from wsgate.forwarding import HOP_BY_HOP, forwarded_headers, query_without
from wsgate.interfaces import ITarget
from wsgate.settings import SettingError
from wsgate.targets import TargetType
from wsgate.targets.relay import Relay
from wsgate.units import fill_template, placeholders

_log = Logger()

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_value(key):
    return base64.b64encode(hashlib.sha1(key.strip().encode() + _WS_GUID).digest()).decode()


# --------------------------------------------------------------------- handshake


class UpstreamUnavailable(Exception):
    """The upstream could not be reached in time (→ 503)."""


class UpstreamRejected(Exception):
    """The upstream answered, but not with a usable 101 (→ 502)."""


def upstream_request(request):
    """The bytes of the upgrade request the upstream gets for *request* (an Accepted),
    without the client headers and query parameters the policies strip."""
    target, match, head, listener = request.route.target, request.match, request.head, \
        request.listener
    path = target.request_target(match, head, request.strip_query)
    headers = [("Host", target.host_header), ("Upgrade", "websocket"),
               ("Connection", "Upgrade"),
               ("Sec-WebSocket-Key", head.get("sec-websocket-key").strip()),
               ("Sec-WebSocket-Version", "13")]
    protocols = head.get_all("sec-websocket-protocol")
    if protocols:
        headers.append(("Sec-WebSocket-Protocol", ", ".join(protocols)))
    extensions = head.get_all("sec-websocket-extensions")
    if extensions and listener.compression:
        headers.append(("Sec-WebSocket-Extensions", ", ".join(extensions)))
    headers.extend(forwarded_headers(request.origin, head, request.connection.conn_id,
                                     listener.is_tls, target.forward_headers, request.strip_headers))
    headers.extend(request.headers)  # from policies (e.g. the JWT identity)
    return http.render_head(f"GET {path} HTTP/1.1", headers)


class UpstreamLeg(Protocol):
    """The gateway's client connection to the upstream: handshake, then relay."""

    def __init__(self, request, ready):
        self.request = request
        self.ready = ready  # fires with (self, status line, headers, extra bytes)
        self.relay = None
        self.headers = []  # the upstream's response headers
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
        self.headers = headers
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


def open_upstream(request):
    """Connect and upgrade to the route's upstream before the client gets its 101.

    *request* is the :class:`wsgate.targets.Accepted` request. Returns a
    cancellable Deferred firing with ``(leg, response headers, extra bytes)``
    or failing with :class:`wsgate.http.HttpRefusal` (503 or 502); the time
    it took goes to ``wsgate_upstream_connect_seconds`` unless the client left
    first. Cancelling (the client left) closes whatever was opened.
    """
    gateway, match, head = request.gateway, request.match, request.head
    target = match.route.target
    clock = gateway.clock
    started = clock.seconds()
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

    def client_left(d):
        state["client_left"] = True
        give_up("the client left")

    ready = defer.Deferred(client_left)
    leg = state["leg"] = UpstreamLeg(upstream_request(request), ready)
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

    def record_time(result):
        if not state.get("client_left"):
            failed = isinstance(result, Failure)
            gateway.stats.upstream_connected(match.route.name, not failed,
                                             clock.seconds() - started)
            if failed and result.check(http.HttpRefusal):  # unreachable or rejected
                gateway.stats.upstream_error(match.route.name,
                                             result.value.reason.replace("upstream_", ""))
        return result
    ready.addBoth(record_time)
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
                                   http.retry_after(),
                                   route=route_name)
    elif failure.check(UpstreamRejected):
        _log.warn("wsgate: upstream {url} rejected the upgrade for route {route}: {why}",
                  url=target.display_url, route=route_name, why=failure.getErrorMessage())
        refusal = http.HttpRefusal(502, "upstream_rejected", "Bad Gateway", route=route_name)
    else:
        return failure
    raise refusal


def _extension_params(extension):
    """``"permessage-deflate; client_max_window_bits=10"`` → its parameters, name first."""
    return [param.strip() for param in extension.split(";")]


def deflate_negotiated(headers):
    """Whether the upstream's 101 *headers* accept permessage-deflate."""
    return any(_extension_params(extension)[0].lower() == "permessage-deflate"
               for name, value in headers if name.lower() == "sec-websocket-extensions"
               for extension in value.split(","))


def _without_client_context(value):
    """A ``Sec-WebSocket-Extensions`` response value whose permessage-deflate carries
    ``client_no_context_takeover`` (other extensions unchanged)."""
    extensions = []
    for extension in value.split(","):
        params = _extension_params(extension)
        if params[0].lower() == "permessage-deflate" and \
                "client_no_context_takeover" not in (param.lower() for param in params[1:]):
            extension = "; ".join(params + ["client_no_context_takeover"])
        extensions.append(extension.strip())
    return ", ".join(extensions)


def client_response(headers):
    """The 101 for the client, built from the upstream's 101 (hop-by-hop headers dropped).

    With permessage-deflate, ``client_no_context_takeover`` is added: a server
    may add it to any offer (RFC 7692 §7.1.1.1), and it makes every client
    message a DEFLATE stream of its own, so the relay can hold
    ``max_message_size`` on its inflated size with a short-lived decompressor
    (:class:`wsgate.frames.InflateLimit`). The upstream, whose decompressor
    keeps its context, reads such messages as they are.
    """
    answer = [("Upgrade", "websocket"), ("Connection", "Upgrade")]
    for name, value in headers:
        if name.lower() in HOP_BY_HOP:
            continue
        if name.lower() == "sec-websocket-extensions":
            value = _without_client_context(value)
        answer.append((name, value))
    return http.render_head("HTTP/1.1 101 Switching Protocols", answer)


@implementer(ITarget)
@dataclass(frozen=True)
class UpstreamTarget:
    """Proxy to an upstream WebSocket whose URL is a template (``{path}``, ``{tail}``, ...)."""

    url: str  # as written in the config
    scheme: str
    host: str
    port: int
    path_template: str
    timeout: float = 5.0
    forward_headers: tuple = ()
    verify: bool = True
    ca: str = None
    tls_options: object = field(default=None, compare=False, repr=False)
    type = "upstream"
    websocket = True
    needs_shared_broker = False

    @property
    def display_url(self):
        return self.url

    @property
    def host_header(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "wss" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def request_target(self, match, head, strip_query=()):
        """The upstream request path: the template filled in, the client's query appended
        without the parameters named in *strip_query*."""
        values = dict(match.params, path=head.path, tail=match.tail)
        target = fill_template(self.path_template, values) or "/"
        if not target.startswith("/"):
            target = "/" + target
        query = query_without(head.query, strip_query) if head.query else ""
        if query:
            target += ("&" if "?" in target else "?") + query
        return target

    def describe(self):
        return f"upstream {self.url}"

    def accept(self, request):
        """The upstream answers first; the client's connection is then handed to a
        :class:`ProxyHandover` (a Deferred; 503 or 502 when the upstream fails)."""
        d = open_upstream(request)
        d.addCallback(lambda result: ProxyHandover(request, *result))
        return d


_UPSTREAM_AUTHORITY = re.compile(r"^(ws|wss)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d+))?")


def build(route, settings, context):
    path = context.path
    url = settings.get("upstream", units.non_empty)
    match = _UPSTREAM_AUTHORITY.match(url)
    if not match or (len(url) > match.end() and url[match.end()] not in "/{?"):
        raise SettingError("upstream", f"expected ws://host:port/path or wss://..., got {url!r}")
    scheme, host, port = match.group(1), match.group(2).strip("[]"), match.group(3)
    port = int(port) if port else (443 if scheme == "wss" else 80)
    if not 0 < port < 65536:
        raise SettingError("upstream", f"port {port} is out of range")
    path_template = url[match.end():]
    allowed = set(path.placeholders) | {"path", "tail"}
    for placeholder in placeholders(path_template):
        if placeholder not in allowed:
            raise SettingError(
                "upstream", f"{{{placeholder}}} is not {{path}}, {{tail}} or a placeholder "
                f"of path {path.text!r}")
    if "?" in path_template.split("{", 1)[0] and "{" in path_template.split("?", 1)[1]:
        raise SettingError("upstream", "placeholders belong in the path, not the query")
    timeout = settings.get("upstream_timeout", units.positive_duration, 5.0)
    verify = settings.get("upstream_verify", units.parse_bool, True)
    ca = settings.get("upstream_ca", units.non_empty, None)
    forward = settings.get("forward_headers", units.parse_list, ())
    if scheme == "ws" and (ca or not verify):
        key = "upstream_ca" if ca else "upstream_verify"
        raise SettingError(key, "only applies to wss:// upstreams")
    tls_options = None
    if scheme == "wss":
        from wsgate import tls

        try:
            tls_options = tls.upstream_tls_options(host, ca, verify)
        except tls.TLSConfigError as e:
            raise SettingError(e.key, e.message) from None
    return UpstreamTarget(
        url=url, scheme=scheme, host=host, port=port, path_template=path_template,
        timeout=timeout, forward_headers=forward, verify=verify, ca=ca,
        tls_options=tls_options)

class ProxyHandover(Protocol):
    """The client's connection once the upstream said 101: answer the client with the
    upstream's 101 and relay. The first bytes it gets start with the request head,
    which it skips (the upstream had it already)."""

    def __init__(self, request, leg, headers, upstream_extra):
        self.request = request
        self.leg = leg
        self.headers = headers
        self.upstream_extra = upstream_extra
        self.relay = None
        self._head_left = len(request.head.raw)

    def connectionMade(self):
        request, leg = self.request, self.leg
        if request.fast:
            fastpath.mark(leg.transport)
            fastpath.immediate_write(leg.transport)
        self.transport.write(client_response(self.headers))
        self.relay = Relay(request.gateway, request.listener, request.route,
                           request.connection, self.transport, leg,
                           compressed=deflate_negotiated(self.headers))
        self.relay.start(b"", self.upstream_extra)

    def dataReceived(self, data):
        if self._head_left:
            skip = min(self._head_left, len(data))
            self._head_left -= skip
            data = data[skip:]
        if data:
            self.relay.from_client(data)

    def connectionLost(self, reason):
        if self.relay is None:  # the client left before the hand-over
            self.leg.transport.abortConnection()
        else:
            self.relay.client_lost()


proxy = TargetType("upstream", ("upstream", "upstream_timeout", "upstream_verify",
                                "upstream_ca", "forward_headers"), build)
