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
from dataclasses import dataclass, field

from twisted.internet import defer, error
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from wsgate import fastpath, http, units
from wsgate.forwarding import HOP_BY_HOP, forwarded_headers
from wsgate.interfaces import ITarget
from wsgate.settings import SettingError
from wsgate.targets import TargetType
from wsgate.targets.relay import Relay
from wsgate.upstreams.config import UpstreamURL, check_placeholders, parse_url
from wsgate.upstreams.health import connect_to
from wsgate.upstreams.pools import request_hash_value

_log = Logger()

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_value(key):
    return base64.b64encode(hashlib.sha1(key.strip().encode() + _WS_GUID).digest()).decode()


# --------------------------------------------------------------------- handshake


class TryFailed(Exception):
    """One try of the upstream handshake failed.

    *reason* labels ``wsgate_upstream_failures_total``: ``refused`` (the
    connection failed), ``timeout``, ``closed`` (the server hung up without
    answering), ``tls`` (the TLS handshake or the certificate failed),
    ``http_5xx``, ``http_4xx`` (any other HTTP answer than 101 and 5xx too) or
    ``bad_handshake`` (a 101 that breaks the protocol). *status* is the HTTP
    status when the server answered with one.
    """

    def __init__(self, reason, message, status=None):
        super().__init__(message)
        self.reason, self.message, self.status = reason, message, status

    @property
    def retried(self):
        """Whether the next server is tried: not after an answer the client's request
        caused (4xx) or a broken 101."""
        return self.reason not in ("http_4xx", "bad_handshake")

    @property
    def rejected(self):
        """The server answered with an HTTP error or a broken 101, or its TLS failed: when
        no server accepts, the client gets 502 rather than 503."""
        return self.reason in ("http_5xx", "http_4xx", "bad_handshake", "tls")


def upstream_request(request, url):
    """The bytes of the upgrade request the server of *url* (an UpstreamURL) gets for
    *request* (an Accepted), without the client headers and query parameters the
    policies strip."""
    target, match, head, listener = request.route.target, request.match, request.head, \
        request.listener
    path = url.request_target(match, head, request.strip_query)
    headers = [("Host", url.host_header), ("Upgrade", "websocket"),
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
        self.ready = ready  # fires with (self, status, headers, extra bytes)
        self.relay = None
        self._buffer = b""

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        if self.relay is not None:
            self.relay.from_upstream(data)
            return
        scanned = len(self._buffer)
        self._buffer += data
        # Only the new bytes are searched (a head sent byte by byte costs no more than
        # one sent at once), and the bound holds however the head is split.
        end = self._buffer.find(b"\r\n\r\n", max(0, scanned - 3))
        end = -1 if end < 0 else end + 4
        if end < 0 or end > http.MAX_HEAD_BYTES:
            if len(self._buffer) > http.MAX_HEAD_BYTES:
                self._fail(TryFailed("bad_handshake", "response head too large"))
            return
        head, extra = self._buffer[:end], self._buffer[end:]
        self._buffer = b""
        lines = head.decode("latin-1")[:-4].split("\r\n")
        parts = lines[0].split(" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            self._fail(TryFailed("bad_handshake", "malformed response"))
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
            self.ready.errback(_lost(reason))


def _lost(reason):
    value = reason.value
    if _is_tls(reason):
        return TryFailed("tls", f"TLS verification failed: {value}")
    if isinstance(value, error.ConnectionDone):
        return TryFailed("closed", "closed the connection without answering")
    return TryFailed("closed", f"connection lost before answering: {value}")


def try_server(request, url, tls_options, timeout):
    """One try: connect to the server of *url* and send it the upgrade.

    Returns a cancellable Deferred firing with ``(leg, response headers, extra
    bytes)`` once the server answered with a valid 101, or failing with
    :class:`TryFailed` (no answer within *timeout* seconds included).
    Cancelling closes whatever was opened.
    """
    def give_up(failure):  # (the timer, or the canceller: both run after connect_to)
        if leg.transport is not None:
            leg.transport.abortConnection()
        if not connecting.called:
            connecting.cancel()
        if not ready.called:
            ready.errback(failure)

    ready = defer.Deferred(lambda d: give_up(defer.CancelledError()))
    leg = UpstreamLeg(upstream_request(request, url), ready)
    connecting = connect_to(request.gateway.reactor, url, leg, timeout, tls_options)

    def connect_failed(failure):
        if not ready.called:
            if failure.check(error.TimeoutError):
                ready.errback(TryFailed("timeout", f"no connection within {timeout:g}s"))
            else:
                ready.errback(_lost(failure) if _is_tls(failure) else
                              TryFailed("refused", failure.getErrorMessage()))
    connecting.addErrback(connect_failed)
    timer = request.gateway.clock.callLater(
        timeout, give_up, TryFailed("timeout", f"no answer within {timeout:g}s"))

    def cancel_timer(result):
        if timer.active():
            timer.cancel()
        return result
    ready.addBoth(cancel_timer)
    ready.addCallback(_check_response, request.head)
    return ready


def _is_tls(failure):
    return type(failure.value).__module__.startswith(("OpenSSL", "service_identity"))


class _Choice:
    """What one try goes to: a URL, its TLS options, and (in a pool) the server's state
    and the lease that counts the connection on it."""

    __slots__ = ("url", "tls_options", "server", "lease", "registry")

    def __init__(self, url, tls_options, server=None, lease=None, registry=None):
        self.url, self.tls_options, self.server, self.lease = url, tls_options, server, lease
        self.registry = registry  # the gateway's Upstreams (pools only)

    @property
    def label(self):
        return self.url.url

    def release(self):
        if self.lease is not None:
            self.lease.release()


class Handshake:
    """The upstream side of one proxied handshake: its tries, failover and answer.

    The target's :meth:`choose` picks each try's server; every try has the
    target's ``try_timeout`` (a pool's ``connect_timeout``), all of them
    together the route's ``upstream_timeout``. A try that failed with
    :attr:`TryFailed.retried` goes on to the next server, at most ``tries``.
    When none accepted: 502 if any answered with an HTTP error, else 503
    with Retry-After. :attr:`result` fires with ``(choice, leg, headers,
    extra)``; cancelling it (the client left) cancels the try under way.
    """

    def __init__(self, request, target):
        self.request = request
        self.target = target
        self.clock = request.gateway.clock
        self.started = self.clock.seconds()
        self.deadline = self.started + target.timeout
        self.tried = set()
        self.failures = []  # (label, TryFailed)
        self.result = defer.Deferred(self._cancelled)
        self._try = None
        self._try_started = None
        self._client_left = False

    def run(self):
        self._next()
        return self.result

    def _next(self):
        remaining = self.deadline - self.clock.seconds()
        if len(self.tried) >= self.target.tries or remaining <= 0:
            self._give_up()
            return
        choice = self.target.choose(self.request, self.tried)
        if choice is None:
            self._give_up()
            return
        self.tried.add(choice.url.key)
        self._try_started = self.clock.seconds()
        d = self._try = try_server(self.request, choice.url, choice.tls_options,
                                   min(self.target.try_timeout, remaining))
        d.addCallbacks(self._accepted, self._failed, callbackArgs=(choice,),
                       errbackArgs=(choice,))

    def _accepted(self, result, choice):
        self._try = None
        self.target.tried(choice, None, self.clock.seconds() - self._try_started)
        leg, headers, extra = result
        self._record(True)
        self.result.callback((choice, leg, headers, extra))

    def _failed(self, failure, choice):
        self._try = None
        choice.release()
        if self._client_left or failure.check(defer.CancelledError):
            return None
        if not failure.check(TryFailed):
            self.result.errback(failure)  # a bug: the gateway answers 500 and logs it
            return None
        failed = failure.value
        self.failures.append((choice.label, failed))
        self.target.tried(choice, failed, self.clock.seconds() - self._try_started)
        if failed.retried:
            if len(self.tried) < self.target.tries:
                _log.info("wsgate: upstream {url} failed for route {route} ({why}); trying "
                          "the next server", url=choice.label, route=self.request.route.name,
                          why=failed.message)
            self._next()
        else:
            self._give_up()
        return None

    def _give_up(self):
        route = self.request.route.name
        if any(failed.rejected for _, failed in self.failures):
            kind, refusal = "rejected", http.HttpRefusal(502, "upstream_rejected",
                                                         "Bad Gateway", route=route)
        else:
            kind, refusal = "unreachable", http.HttpRefusal(
                503, "upstream_unreachable", "Upstream unavailable", http.retry_after(),
                route=route)
        if self.failures:
            tries = "; ".join(f"{label}: {failed.message}" for label, failed in self.failures)
        else:
            tries = "no server is up"
        _log.warn("wsgate: upstream " + ("rejected the upgrade" if kind == "rejected" else
                                         "unreachable") + " for route {route}: {tries}",
                  route=route, tries=tries)
        self._record(False, kind)
        self.result.errback(refusal)

    def _record(self, ok, kind=None):
        stats = self.request.gateway.stats
        route = self.request.route.name
        stats.upstream_connected(route, ok, self.clock.seconds() - self.started)
        if kind is not None:
            stats.upstream_error(route, kind)

    def _cancelled(self, d):
        self._client_left = True
        if self._try is not None:
            self._try.cancel()


def open_upstream(request):
    """Connect and upgrade to the route's upstream before the client gets its 101.

    *request* is the :class:`wsgate.targets.Accepted` request. Returns a
    cancellable Deferred firing with ``(choice, leg, response headers, extra
    bytes)`` or failing with :class:`wsgate.http.HttpRefusal` (503 or 502);
    see :class:`Handshake`. The time it took goes to
    ``wsgate_upstream_connect_seconds`` unless the client left first.
    """
    return Handshake(request, request.route.target).run()


def _check_response(result, head):
    leg, status, headers, extra = result
    if status != 101:
        leg.transport.abortConnection()
        reason = "http_5xx" if 500 <= status < 600 else \
            "http_4xx" if 400 <= status < 500 else "bad_handshake"
        raise TryFailed(reason, f"answered {status} instead of 101", status)
    by_name = {}
    for name, value in headers:
        by_name.setdefault(name.lower(), []).append(value)
    accept = by_name.get("sec-websocket-accept", [""])[0]
    if accept != accept_value(head.get("sec-websocket-key")):
        leg.transport.abortConnection()
        raise TryFailed("bad_handshake", "answered with a wrong Sec-WebSocket-Accept")
    offered = {p.strip() for value in head.get_all("sec-websocket-protocol")
               for p in value.split(",") if p.strip()}
    chosen = by_name.get("sec-websocket-protocol", [None])[0]
    if chosen is not None and chosen not in offered:
        leg.transport.abortConnection()
        raise TryFailed("bad_handshake", f"chose subprotocol {chosen!r} the client did not "
                        "offer")
    return leg, headers, extra


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


class _Proxying:
    """What both proxy targets are: a WebSocket route whose upstream answers first.

    A subclass says where each try goes (``choose``), how many tries and how
    long each may take (``tries``, ``try_timeout``, within ``timeout``), and
    hears how each ended (``tried``); :class:`Handshake` does the rest.
    """

    type = "upstream"
    websocket = True
    needs_shared_broker = False

    def accept(self, request):
        """The upstream answers first; the client's connection is then handed to a
        :class:`ProxyHandover` (a Deferred; 503 or 502 when no server accepts)."""
        d = open_upstream(request)
        d.addCallback(lambda result: ProxyHandover(request, *result))
        return d


@implementer(ITarget)
@dataclass(frozen=True)
class UpstreamTarget(_Proxying):
    """Proxy to one upstream WebSocket whose URL is a template (``{path}``, ``{tail}``, ...).

    One try, with the whole ``upstream_timeout``; no pool state.
    """

    upstream: UpstreamURL
    timeout: float = 5.0
    forward_headers: tuple = ()
    verify: bool = True
    ca: str = None
    tls_options: object = field(default=None, compare=False, repr=False)
    tries = 1
    pool = None

    @property
    def url(self):
        return self.upstream.url

    @property
    def try_timeout(self):
        return self.timeout

    def describe(self):
        return f"upstream {self.url}"

    def choose(self, request, tried):
        return None if tried else _Choice(self.upstream, self.tls_options)

    def tried(self, choice, failed, seconds):
        """A try ended (*failed*: its TryFailed, None for a 101)."""


@implementer(ITarget)
@dataclass(frozen=True)
class PoolTarget(_Proxying):
    """Proxy to the servers of ``[upstream:NAME]`` (``upstream = @NAME``).

    The pool's live state is the gateway's (``gateway.upstreams``): this
    object holds what the route adds, the TLS options of each wss:// server
    (the route's ``upstream_verify``/``upstream_ca``) and the budget.
    """

    pool: str
    settings: object  # the PoolSettings the route was built with (for `wsgate check`)
    timeout: float = 5.0
    forward_headers: tuple = ()
    verify: bool = True
    ca: str = None
    tls_by_server: dict = field(default=None, compare=False, repr=False)

    @property
    def url(self):
        return "@" + self.pool

    @property
    def tries(self):
        return self.settings.tries

    @property
    def try_timeout(self):
        return self.settings.connect_timeout

    def describe(self):
        return f"upstream @{self.pool} ({len(self.settings.servers)} servers, " \
               f"{self.settings.balance})"

    def choose(self, request, tried):
        upstreams = request.gateway.upstreams
        pool = upstreams.pools.get(self.pool)
        if pool is None:
            return None
        hashed = request_hash_value(pool.settings, request)
        server = pool.choose(hashed, tried, upstreams.clock.seconds())
        if server is None:
            return None
        return _Choice(server.spec.url, (self.tls_by_server or {}).get(server.spec.entry_key),
                       server, pool.lease(server, request.connection, hashed), upstreams)

    def tried(self, choice, failed, seconds):
        """Tell the pool how the try went: passive health, failure counts, timings."""
        registry = choice.registry
        registry.observe_try(self.pool, failed is None, seconds)
        if failed is None:
            registry.succeeded(choice.server)
        else:
            registry.failed(choice.server, failed.reason)


def build(route, settings, context):
    path = context.path
    text = settings.get("upstream", units.non_empty)
    timeout = settings.get("upstream_timeout", units.positive_duration, 5.0)
    verify = settings.get("upstream_verify", units.parse_bool, True)
    ca = settings.get("upstream_ca", units.non_empty, None)
    forward = settings.get("forward_headers", units.parse_list, ())
    if text.startswith("@"):
        return _pool_target(text[1:], path, timeout, forward, verify, ca, context)
    try:
        url = parse_url(text)
        check_placeholders(url, path)
    except ValueError as e:
        raise SettingError("upstream", str(e)) from None
    _check_tls_keys(url.scheme, verify, ca)
    return UpstreamTarget(url, timeout=timeout, forward_headers=forward, verify=verify, ca=ca,
                          tls_options=_tls_options(url, verify, ca))


def _pool_target(name, path, timeout, forward, verify, ca, context):
    pools = context.pools or {}
    pool = pools.get(name)
    if pool is None:
        known = ", ".join(sorted(pools)) or "none"
        raise SettingError("upstream", f"no [upstream:{name}] section (known: {known})")
    for server in pool.servers:
        try:
            check_placeholders(server.url, path)
        except ValueError as e:
            raise SettingError("upstream", f"[upstream:{name}] servers: {e}") from None
    key = pool.hash_key
    if key is not None and key.kind == "placeholder" and key.name not in path.placeholders:
        raise SettingError("upstream", f"[upstream:{name}] hash_key {key.text} is not a "
                           f"placeholder of path {path.text!r}")
    _check_tls_keys(pool.scheme, verify, ca)
    tls = {server.key: _tls_options(server.url, verify, ca) for server in pool.servers}
    return PoolTarget(name, pool, timeout=timeout, forward_headers=forward, verify=verify,
                      ca=ca, tls_by_server=tls)


def _check_tls_keys(scheme, verify, ca):
    if scheme == "ws" and (ca or not verify):
        key = "upstream_ca" if ca else "upstream_verify"
        raise SettingError(key, "only applies to wss:// upstreams")


def _tls_options(url, verify, ca):
    if url.scheme != "wss":
        return None
    from wsgate import tls

    try:
        return tls.upstream_tls_options(url.host, ca, verify)
    except tls.TLSConfigError as e:
        raise SettingError(e.key, e.message) from None


class ProxyHandover(Protocol):
    """The client's connection once the upstream said 101: answer the client with the
    upstream's 101 and relay. The first bytes it gets start with the request head,
    which it skips (the upstream had it already)."""

    def __init__(self, request, choice, leg, headers, upstream_extra):
        self.request = request
        self.choice = choice  # its lease counts this connection on a pool's server
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
                           compressed=deflate_negotiated(self.headers),
                           on_finish=self.choice.release)
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
            self.choice.release()
            self.leg.transport.abortConnection()
        else:
            self.relay.client_lost()


proxy = TargetType("upstream", ("upstream", "upstream_timeout", "upstream_verify",
                                "upstream_ca", "forward_headers"), build)
