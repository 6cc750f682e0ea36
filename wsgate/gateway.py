"""The upgrade pipeline: read the request head, decide, then answer or hand over.

Every accepted TCP (or TLS, or PROXY-protocol) connection starts with a
:class:`HandshakeProtocol`. It reads the HTTP request head under a size limit
and the listener's ``handshake_timeout``, asks the :class:`Gateway` for a
decision (route, limits, then the route's policies and, for proxy routes, the
upstream's own handshake) and then either writes an HTTP refusal or hands the
transport to the route's protocol (Autobahn replays the buffered bytes; the
proxy relay starts splicing). A request that fails any step never becomes a
WebSocket.
"""

import secrets
from urllib.parse import parse_qs

from twisted.internet import defer, error
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.protocols.policies import ProtocolWrapper

from wsgate import fastpath, fastpath_autobahn, forwarding, http, observe, sameorigin, targets
from wsgate.coalesce import IterationFlusher
from wsgate.metrics import Stats
from wsgate.policies import ChainOutcome, PolicyChain, UpgradeRequest
from wsgate.routing import strip_port
from wsgate.config.build import channel_settings, pool_health_tls
from wsgate.targets.websocket import make_websocket_factory
from wsgate.upstreams import dns, health
from wsgate.upstreams.pools import Upstreams

_log = Logger()

_MAX_BUFFER = 64 * 1024  # bytes held while a decision is pending (head + early frames)
DRAIN_SPREAD_MAX = 5.0  # drain closes are spread over up to this many seconds (jitter)
EVENT_FIELD_MAX = 512  # characters of a request's host, path or user agent in an event


class Connection:
    """The bookkeeping of one accepted WebSocket: who, where, since when, how much."""

    __slots__ = ("conn_id", "route", "client", "identity", "since", "protocol", "outcome",
                 "messages_in", "messages_out", "bytes_in", "bytes_out")

    def __init__(self, conn_id, route, client, since, identity=None):
        self.conn_id, self.route, self.client = conn_id, route, client
        self.since, self.identity = since, identity
        self.protocol = None
        self.outcome = None  # the policy chain's ChainOutcome (sessions to tell on close)
        self.messages_in = self.messages_out = self.bytes_in = self.bytes_out = 0

    def fields(self):
        """The fields every event about this connection carries."""
        return {"conn_id": self.conn_id, "route": self.route, "client": self.client,
                "identity": self.identity}


class Gateway:
    """Process-wide state: the router, the broker, live connections and their limit."""

    def __init__(self, config, router, broker, clock):
        self.config = config
        self.router = router
        self.broker = broker
        self.clock = clock
        self.reactor = clock
        self.flusher = IterationFlusher(clock)  # coalesced broadcast deliveries
        self.connections = {}
        self.stats = Stats()
        self.draining = False
        self.drained_routes = set()  # routes drained from the admin API
        # the pools' live state; a service (health checks) the GatewayService runs
        self.upstreams = Upstreams(clock, health.checker_factory(clock))
        self.apply(config, router)

    def not_ready(self):
        """Why this process should be sent no new connections, or None when it should:
        ``draining`` (SIGTERM), or ``broker_down`` when ``[wsgate] ready_requires_broker``
        is set and the ``[wsgate] broker`` is unreachable. ``/readyz`` and every
        listener's ``health_path`` answer from this."""
        if self.draining:
            return "draining"
        if self.config.core.ready_requires_broker and self.broker.state == "down":
            return "broker_down"
        return None

    def chain(self, route):
        """The policy chain of *route* (built once per route)."""
        chain = self._chains.get(route.name)
        if chain is None or chain.policies != route.policies:
            chain = self._chains[route.name] = PolicyChain(route.name, route.policies,
                                                           self.stats)
        return chain

    node_suffix = ""  # "-wN" in worker N

    @property
    def node_id(self):
        return self.config.core.node_id + self.node_suffix

    def listener(self, name):
        """The current settings of ``[listen:name]`` (they change on reload)."""
        return self._listeners[name]

    def apply(self, config, router):
        """Use *config* for new connections (SIGHUP); live ones keep what they have."""
        self.config = config
        self.router = router
        self._listeners = {listener.name: listener for listener in config.listeners}
        self._ws_factories = {}
        self._chains = {}
        self.upstreams.addresses = _addresses(config, self.clock)
        self.upstreams.apply(config.pools, pool_health_tls(config))
        # what each channel keeps (history, presence), for the broker and /channels
        self.channel_settings = channel_settings(config)
        configure = getattr(self.broker, "configure", None)  # a plugin's broker may not take it
        if configure is not None:
            configure(self.channel_settings)

    def new_conn_id(self):
        return secrets.token_hex(8)

    def decide(self, head, listener, trusted_peer=False):
        """Route and validate an upgrade request; return the ``RouteMatch``.

        Synchronous and cheap (the policies run after it). Raises
        :class:`wsgate.http.HttpRefusal` with the contract's answer; anything
        else a custom router raises becomes a generic 500. *trusted_peer*: the
        TCP peer is one of the listener's ``trusted_proxies``, so its
        ``X-Forwarded-Host`` is the host the same-origin check compares with.
        """
        match = self.router.route(head.host, head.path, listener.name)
        if match is None:
            raise http.HttpRefusal(404, "no_route", "No route for this host and path")
        route = match.route.name
        retry = http.retry_after()
        if self.draining or route in self.drained_routes:
            raise http.HttpRefusal(503, "draining", "Shutting down, retry elsewhere", retry,
                                   route=route)
        if not match.route.target.websocket:  # static files: plain GET
            if head.method not in ("GET", "HEAD"):
                raise http.HttpRefusal(405, "bad_handshake", "Method Not Allowed",
                                       [("Allow", "GET, HEAD")], route=route)
            return match
        try:
            http.check_websocket_upgrade(head)
        except http.HttpRefusal as refusal:
            refusal.route = route
            raise
        if match.route.same_origin and \
                sameorigin.is_cross_origin(head, listener.is_tls, trusted_peer):
            raise http.HttpRefusal(403, "cross_origin", "Cross-origin WebSocket refused",
                                   route=route)
        if len(self.connections) >= self.config.core.max_connections:
            raise http.HttpRefusal(503, "max_connections", "Too many connections, retry later",
                                   retry, route=route)
        return match

    def drain_route(self, name, spread):
        """Refuse new upgrades on route *name* (503) and close its connections with 1001,
        spread over *spread* seconds; return how many are being closed."""
        import random

        self.drained_routes.add(name)
        closing = [c for c in self.connections.values() if c.route == name]
        for connection in closing:
            self.clock.callLater(random.uniform(0, spread), going_away, connection)
        return len(closing)

    def rejected(self, refusal, client, identity=None, conn_id=None, head=None):
        """An upgrade was refused: count it and emit ``websocket.connection.rejected``.

        *head* is the parsed request (None when it could not be parsed): the
        event names its host, path and user agent, each cut to
        :data:`EVENT_FIELD_MAX` characters.
        """
        self.stats.rejected_handshake(refusal.route, refusal.status, refusal.reason)
        observe.emit(
            "websocket.connection.rejected", "rejected {client}: {status} ({reason})",
            conn_id=conn_id, route=refusal.route, client=client, identity=identity,
            status=refusal.status, reason=refusal.reason, policy=refusal.policy,
            **_request_fields(head))

    def register(self, connection):
        """A WebSocket is open: count it and emit ``websocket.connection.accepted``."""
        self.connections[connection.conn_id] = connection
        self.stats.accepted(connection.route, max(0.0, self.clock.seconds() - connection.since))
        observe.emit("websocket.connection.accepted", "accepted {client} on route {route}",
                     **connection.fields())

    def unregister(self, connection, close_code, close_reason, closed_by,
                   close_code_reply=None):
        """A WebSocket ended: fold its counters into the totals, emit its usage.

        *close_code* and *close_reason* are those of the first close frame on
        the client's connection, whoever sent it (None: no close frame at all,
        never 1006); *close_code_reply* is the code of the answer to it (None:
        no answer); *closed_by* is ``client``, ``upstream`` or ``gateway``.
        """
        if self.connections.pop(connection.conn_id, None) is None:
            return
        self.stats.closed(connection, close_code, closed_by)
        if connection.outcome is not None:
            connection.outcome.release()
        observe.emit(
            "websocket.connection.closed",
            "closed {client} on route {route}: {close_code} {close_reason!r} by {closed_by}",
            duration_s=round(self.clock.seconds() - connection.since, 3),
            messages_in=connection.messages_in, messages_out=connection.messages_out,
            bytes_in=connection.bytes_in, bytes_out=connection.bytes_out,
            close_code=close_code, close_reason=close_reason,
            close_code_reply=close_code_reply, closed_by=closed_by, **connection.fields())

    def websocket_factory(self, listener):
        """The Autobahn factory holding *listener*'s protocol options (one per listener)."""
        factory = self._ws_factories.get(listener.name)
        if factory is None:
            factory = make_websocket_factory(listener, self.clock)
            self._ws_factories[listener.name] = factory
        return factory

    def websocket_protocol(self, listener):
        """A new terminated WebSocket protocol with *listener*'s options (the fast one
        with ``fast_paths``, see :mod:`wsgate.fastpath_autobahn`)."""
        factory = self.websocket_factory(listener)
        protocol = fastpath_autobahn.protocol_class(factory, self.config.core.fast_paths)()
        protocol.factory = factory
        return protocol


def _addresses(config, reactor):
    """The DNS lookups of pools with ``resolve`` (``[wsgate] dns_hosts``, ``dns_servers``)."""
    return dns.Addresses(reactor, config.core.dns_hosts, config.core.dns_servers)


def _request_fields(head):
    """The ``host``, ``path`` and ``user_agent`` of *head* for an event (None: unknown)."""
    if head is None:
        return {"host": None, "path": None, "user_agent": None}
    agent = head.get("user-agent")
    return {"host": head.host[:EVENT_FIELD_MAX], "path": head.path[:EVENT_FIELD_MAX],
            "user_agent": agent[:EVENT_FIELD_MAX] if agent is not None else None}


def health_answer(raw, health_path, not_ready):
    """The answer to a probe of *health_path* when the request head *raw* is one, else None.

    A probe is ``GET`` or ``HEAD`` of exactly *health_path* (a query string aside)
    in HTTP/1.1 or HTTP/1.0, whatever its headers: load balancers' checks often
    send HTTP/1.0 without ``Host``. The answer is 200 ``ok``, or, when
    *not_ready* (:meth:`Gateway.not_ready`) names a reason, 503 with that reason
    and ``Retry-After``; ``Connection: close`` either way.
    """
    parts = raw.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if method not in (b"GET", b"HEAD") or version not in (b"HTTP/1.1", b"HTTP/1.0") or \
            target.partition(b"?")[0].decode("latin-1") != health_path:
        return None
    if not_ready is None:
        status, body, extra = "200 OK", b"ok\n", []
    else:
        status, body, extra = "503 Service Unavailable", f"{not_ready}\n".encode(), \
            http.retry_after()
    head = http.render_head(f"HTTP/1.1 {status}", [
        ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"), *extra, ("Connection", "close")])
    return head if method == b"HEAD" else head + body


def going_away(connection):
    """Close *connection* with 1001 (drain); proxied ones close their upstream too."""
    if connection.protocol is not None:
        connection.protocol.close_with(1001, "going away")


class HandshakeProtocol(Protocol):
    """Reads one upgrade request and turns it into a refusal or a hand-over.

    States, one way only: ``READING`` the request head (bounded in size and
    by ``handshake_timeout``), ``DECIDING`` (route, policies, then the
    route's target; bytes that arrive meanwhile are kept, up to a bound),
    ``DONE`` (refused, handed over, or the client left). Every callback that
    arrives in ``DONE`` only releases what it holds.
    """

    READING, DECIDING, DONE = "reading", "deciding", "done"

    def __init__(self, gateway, listener):
        self.gateway = gateway
        self.listener = listener
        self.state = self.READING
        self._buffer = b""
        self._timer = None
        self.client = None
        self._peer_ip = None
        self._pending = None  # the Deferred being waited for (policies, target)
        self._outcome = None  # the policy chain's outcome until a target owns it
        self._head = None  # the parsed request head, once there is one
        self._lines = 0  # line feeds in the head so far (request line + headers + blank)

    def connectionMade(self):
        self._started = self.gateway.clock.seconds()
        self.fast = self.gateway.config.core.fast_paths
        if self.fast:
            fastpath.mark(self.transport)
        self._timer = self.gateway.clock.callLater(
            self.listener.handshake_timeout, self._timed_out)

    def dataReceived(self, data):
        if self.state is self.DONE:
            return
        scanned = len(self._buffer)
        self._buffer += data
        if self.state is self.DECIDING:
            if len(self._buffer) > _MAX_BUFFER:
                self._abort()
            return
        # Only the new bytes are searched and counted, so a head sent byte by
        # byte costs no more than one sent at once.
        end = self._buffer.find(b"\r\n\r\n", max(0, scanned - 3))
        end = -1 if end < 0 else end + 4
        self._lines += data.count(b"\n", 0, len(data) if end < 0 else end - scanned)
        if self._lines > http.MAX_HEADERS + 2:
            self._refuse(http.HttpRefusal(431, "bad_handshake", "Too many header fields"))
            return
        if end < 0 or end > http.MAX_HEAD_BYTES:
            # The bound holds however the head is split: an oversize head in
            # one write is refused like one that trickles in.
            if len(self._buffer) > http.MAX_HEAD_BYTES:
                self._refuse(http.HttpRefusal(431, "bad_handshake", "Request head too large"))
            return
        self._head_complete(end)

    def _head_complete(self, end):
        if self.listener.health_path is not None and self._probed(self._buffer[:end]):
            return
        # Read the peer only now: behind a PROXY-protocol wrapper it is known
        # once the PROXY header has been parsed, before the HTTP head.
        peer = self.transport.getPeer()
        self.client = observe.format_address(peer)
        self._peer_ip = getattr(peer, "host", None) or "unix"
        try:
            head = self._head = http.parse_head(self._buffer[:end])
        except http.HttpRefusal as refusal:
            self._refuse(refusal)
            return
        self.origin = forwarding.client_origin(self._peer_ip, head,
                                               self.listener.trusted_proxies)
        if self.origin.ip != self._peer_ip:
            self.client = self.origin.ip  # the client behind a trusted proxy
        self.state = self.DECIDING
        try:
            match = self.gateway.decide(head, self.listener, self.origin.trusted_peer)
        except http.HttpRefusal as refusal:
            self._refuse(refusal)
        except Exception:
            self._internal_error(Failure())
        else:
            self._run_policies(match, head)

    def _probed(self, raw):
        """Answer a load balancer's probe of the listener's ``health_path`` and return
        True, or return False when *raw* is another request. It comes before parsing
        and routing (no route is needed for it) and is not an upgrade: neither counted
        as a rejection nor logged."""
        answer = health_answer(raw, self.listener.health_path, self.gateway.not_ready())
        if answer is None:
            return False
        self.state = self.DONE
        self._cancel_timer()
        self.transport.write(answer)
        self.transport.loseConnection()
        return True

    def connectionLost(self, reason):
        self.state = self.DONE
        self._cancel_timer()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()  # stop the policies or the upstream handshake: the client left
        self._release()

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self):
        self._timer = None
        self._abort()

    def _abort(self):
        if self.state is not self.DONE:
            self.state = self.DONE
            self._cancel_timer()
            self.transport.abortConnection()

    def _internal_error(self, failure):
        _log.failure("wsgate: a router, policy or target raised while deciding on {client}",
                     failure=failure, client=self.client)
        self._refuse(http.HttpRefusal(500, "internal_error", "Internal Server Error"))

    def _release(self):
        if self._outcome is not None:
            outcome, self._outcome = self._outcome, None
            outcome.release()

    def _refuse(self, refusal):
        if self.state is self.DONE:
            return
        self.state = self.DONE
        self._cancel_timer()
        identity = self._outcome.identity if self._outcome is not None else \
            getattr(refusal, "identity", None)  # a later policy denied a known client
        self._release()
        if self.client is None:
            self.client = observe.format_address(self.transport.getPeer())
        self.gateway.rejected(refusal, self.client, identity, head=self._head)
        self.transport.write(http.render_refusal(refusal))
        self.transport.loseConnection()

    def _wait(self, d, callback, *args):
        """Wait for *d* (policies, a target): *callback* with its result, a refusal's
        answer, or a generic 500 for anything else. *d* may have fired already."""
        self._pending = d
        d.addCallback(self._waited, callback, *args)
        d.addErrback(self._step_failed)
        d.addErrback(self._internal_error)

    def _waited(self, result, callback, *args):
        self._pending = None
        return callback(result, *args)

    def _step_failed(self, failure):
        self._pending = None
        if failure.check(defer.CancelledError):
            return None  # the client left: nothing to answer
        failure.trap(http.HttpRefusal)
        self._refuse(failure.value)

    def _run_policies(self, match, head):
        connection = Connection(
            self.gateway.new_conn_id(), match.route.name, self.client, self._started)
        if not match.route.policies:
            self._policies_passed(ChainOutcome(), match, head, connection)
            return
        channel_for = getattr(match.route.target, "channel_for", None)  # broadcast routes
        request = UpgradeRequest(
            conn_id=connection.conn_id, route=match.route.name, listener=self.listener.name,
            client=self.origin.ip, host=strip_port(head.host), path=head.path,
            query=parse_qs(head.query, keep_blank_values=True), params=dict(match.params),
            headers=head,
            channel=channel_for(match.params) if channel_for is not None else None)
        self._wait(self.gateway.chain(match.route).run(request), self._policies_passed,
                   match, head, connection)

    def _policies_passed(self, outcome, match, head, connection):
        if self.state is self.DONE:
            outcome.release()
            return
        self._outcome = connection.outcome = outcome
        connection.identity = outcome.identity
        request = targets.Accepted(self.gateway, self.listener, match, head, connection,
                                   self.origin, tuple(outcome.headers), self.fast,
                                   tuple(outcome.strip_headers), tuple(outcome.strip_query))
        self._wait(defer.maybeDeferred(match.route.target.accept, request), self._take_over,
                   match.route.target)

    def _take_over(self, protocol, target):
        """The target's protocol owns the connection from here (the policies' outcome
        too), and gets every byte read so far, the request head included."""
        if self.state is self.DONE:  # the client left or timed out meanwhile
            protocol.connectionLost(Failure(error.ConnectionDone("the client left")))
            return
        self.state = self.DONE
        self._cancel_timer()
        self._outcome = None
        transport, buffered = self.transport, self._buffer
        self.transport, self._buffer = None, b""
        if self.fast and target.websocket:
            # request/response (echo, proxy) sends at once; a coalesced broadcast
            # write leaves in one send without an epoll round trip
            fastpath.immediate_write(transport)
        # Same pattern as Autobahn's WebSocketResource: a wrapping transport (TLS,
        # PROXY protocol) delivers to wrappedProtocol, a plain one to protocol.
        if isinstance(transport, ProtocolWrapper):
            transport.wrappedProtocol = protocol
        else:
            transport.protocol = protocol
        protocol.makeConnection(transport)
        protocol.dataReceived(buffered)


class GatewayFactory(Factory):
    """Builds a :class:`HandshakeProtocol` for each connection on one listener.

    The listener's settings are looked up per connection, so a reload's new
    limits apply to new connections.
    """

    noisy = False

    def __init__(self, gateway, listener_name):
        self.gateway = gateway
        self.listener_name = listener_name

    def buildProtocol(self, addr):
        protocol = HandshakeProtocol(self.gateway, self.gateway.listener(self.listener_name))
        protocol.factory = self
        return protocol
