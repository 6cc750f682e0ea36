"""The admin HTTP endpoint: probes, health, metrics, publishing, and live connections.

``/livez`` (the process answers), ``/readyz`` (it should get new connections:
listening, not draining, and the broker up when ``[wsgate] ready_requires_broker``
says so), ``/healthz`` (the detail) and ``/metrics`` need no token; ``/publish/*`` and
``/connections*`` need ``Authorization: Bearer TOKEN`` when ``[admin] token``
is set (a token is required unless the endpoint is loopback-only).

Every request, head and body, must arrive within :data:`REQUEST_TIMEOUT`
seconds of the connection (or of the previous answer on a keep-alive
connection), however slowly its bytes trickle in; the head is bounded like the
listeners' (16 KiB, 100 header lines). See :class:`AdminChannel`.
"""

import hmac
import json

from prometheus_client import generate_latest
from twisted.logger import Logger
from twisted.web import http as web_http
from twisted.web import resource, server

from wsgate import frames, http, metrics
from wsgate.gateway import DRAIN_SPREAD_MAX
from wsgate.pubsub import Message, json_delivery

_log = Logger()

REQUEST_TIMEOUT = 10.0  # seconds for a whole request (head and body) to arrive


class AdminChannel(web_http.HTTPChannel):
    """An HTTP channel whose idle timeout is a deadline for each request.

    twisted.web restarts its timeout on every byte received, so a client
    sending one byte a second holds a connection for ever. Here the timer
    runs from the connection (or the end of the previous answer) until the
    request has fully arrived (HTTPChannel stops it then and restarts it when
    the answer is done); bytes do not reset it. When it fires the connection
    is dropped at once. The head is bounded like the listeners' heads.
    """

    maxHeaders = http.MAX_HEADERS
    totalHeadersSize = http.MAX_HEAD_BYTES

    def resetTimeout(self):
        pass  # arriving bytes do not extend the deadline

    def timeoutConnection(self):
        self.transport.abortConnection()


def bound_requests(site):
    """Give *site* (an admin ``twisted.web`` site) the :class:`AdminChannel` deadline."""
    site.protocol = AdminChannel
    site.timeOut = REQUEST_TIMEOUT
    return site


class _LimitedRequest(server.Request):
    """A request whose body is refused (413) past the site's ``max_body`` bytes."""

    too_large = False
    _received = 0

    def gotLength(self, length):
        limit = self.channel.site.max_body
        if length is not None and length > limit:
            self.too_large = True
        super().gotLength(length if not self.too_large else 0)

    def handleContentChunk(self, data):
        self._received += len(data)
        if self._received > self.channel.site.max_body:
            self.too_large = True
        if not self.too_large:
            super().handleContentChunk(data)


def _json(request, status, body):
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body).encode() + b"\n"


class _Base(resource.Resource):
    def __init__(self, admin):
        super().__init__()
        self.admin = admin

    def authorized(self, request):
        token = self.admin.token()
        if not token:
            return True
        value = (request.getHeader(b"authorization") or b"").decode("latin-1")
        presented = value[7:].strip() if value[:7].lower() == "bearer " else ""
        return hmac.compare_digest(presented.encode(), token.encode())

    def deny(self, request):
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="wsgate-admin"')
        return _json(request, 401, {"error": "unauthorized"})

    def not_allowed(self, request, allowed):
        request.setHeader(b"Allow", allowed.encode())
        return _json(request, 405, {"error": "method not allowed"})

    def render(self, request):
        allowed = [m for m in ("GET", "POST", "DELETE") if hasattr(self, f"render_{m}")]
        handler = getattr(self, "render_" + request.method.decode("ascii", "replace"), None)
        if handler is None:
            return self.not_allowed(request, ", ".join(allowed))
        return handler(request)


class Live(_Base):
    """``GET /livez``: 200 ``{"status": "ok"}``. Being answered at all proves the reactor
    turns, so it looks at nothing else and stays as cheap as an answer can be."""

    isLeaf = True

    def render_GET(self, request):
        return _json(request, 200, {"status": "ok"})


class Ready(_Base):
    """``GET /readyz``: 200 when new connections are welcome, else 503 with the reason."""

    isLeaf = True

    def render_GET(self, request):
        body = self.admin.readiness()
        return _json(request, 200 if body["status"] == "ok" else 503, body)


class Health(_Base):
    isLeaf = True

    def render_GET(self, request):
        body = self.admin.health()
        return _json(request, 200 if body["status"] == "ok" else 503, body)


class Metrics(_Base):
    isLeaf = True

    def render_GET(self, request):
        if not self.admin.gateway.config.core.metrics:
            return _json(request, 404, {"error": "metrics are off ([wsgate] metrics = no)"})
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return generate_latest(self.admin.registry)


class Publish(_Base):
    """``POST /publish/{channel}``: text for text/* and JSON bodies, binary otherwise."""

    isLeaf = True

    def render_POST(self, request):
        if not self.authorized(request):
            return self._refused("unauthorized", self.deny(request))
        if request.too_large:
            return self._refused("too_large", _json(
                request, 413, {"error": "body too large", "limit": self.admin.max_body}))
        # postpath segments are already percent-decoded by twisted.web
        channel = "/".join(p.decode("utf-8", "replace") for p in request.postpath)
        if not channel:
            return self._refused("no_channel", _json(
                request, 404, {"error": "no channel in the path"}))
        body = request.content.read()
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        is_text = ctype.startswith(b"text/") or ctype == b"application/json" or \
            ctype.endswith(b"+json")
        if is_text:
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                return self._refused("not_utf8", _json(
                    request, 400, {"error": "a text body must be UTF-8"}))
        message = Message(body, not is_text, self.admin.node_id, "admin")
        d = self.admin.broker.publish(channel, message)

        def done(receivers):
            self.admin.stats.published()
            request.write(_json(request, 202, {"channel": channel, "receivers": receivers}))
            request.finish()

        def failed(failure):
            self._refused("broker_down", None)
            request.write(_json(request, 503, {"error": "broker unavailable"}))
            request.finish()
        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET

    def _refused(self, reason, answer):
        """Count a refused publish (``wsgate_publish_refused_total{reason}``); return *answer*."""
        self.admin.stats.publish_refused(reason)
        return answer


class Connections(_Base):
    """``GET /connections`` lists; ``DELETE /connections/{id}`` closes (1008 or ?code=)."""

    isLeaf = True

    def render_GET(self, request):
        if not self.authorized(request):
            return self.deny(request)
        if request.postpath and request.postpath[0]:
            return _json(request, 404, {"error": "not found"})
        return _json(request, 200, {"connections": self.admin.list_connections()})

    def render_DELETE(self, request):
        if not self.authorized(request):
            return self.deny(request)
        conn_id = request.postpath[0].decode("utf-8", "replace") if request.postpath else ""
        args = request.args
        try:
            code = int(args.get(b"code", [b"1008"])[0])
        except ValueError:
            code = -1
        if not frames.kick_code(code):
            return _json(request, 400, {"error": "code must be 1000, 1001, 1008 or 3000-4999"})
        # cut to 123 bytes on a character boundary where the close frame is written
        reason = args.get(b"reason", [b"kicked by admin"])[0].decode("utf-8", "replace")
        if not self.admin.kick(conn_id, code, reason):
            return _json(request, 404, {"error": "no such connection", "id": conn_id})
        return _json(request, 200, {"id": conn_id, "closed": True, "code": code,
                                    "reason": frames.reason_bytes(reason).decode("utf-8")})


class Drain(_Base):
    """``POST /drain/route/{name}``: refuse new upgrades on a route (503) and close its
    connections with 1001 over a few seconds; ``DELETE`` takes new upgrades again.

    ``POST /drain/upstream/{pool}/{host:port}``: the pool server takes no new
    connections and its live ones are closed with 1012 over the pool's
    ``drain_time`` (:mod:`wsgate.upstreams.moving`); ``DELETE`` stops the drain and
    the server takes connections again.
    """

    isLeaf = True

    def _target(self, request):
        """``("route", name)``, ``("upstream", (pool, server))`` or None (404)."""
        parts = [p.decode("utf-8", "replace") for p in request.postpath]
        if len(parts) == 2 and parts[0] == "route":
            names = {route.name for route in self.admin.gateway.config.routes}
            return ("route", parts[1]) if parts[1] in names else None
        if len(parts) == 3 and parts[0] == "upstream":
            return "upstream", (parts[1], parts[2])
        return None

    def render_POST(self, request):
        return self._drain(request, True)

    def render_DELETE(self, request):
        return self._drain(request, False)

    def _drain(self, request, on):
        if not self.authorized(request):
            return self.deny(request)
        target = self._target(request)
        if target is None:
            return _json(request, 404, {"error": "no such route"})
        kind, name = target
        if kind == "upstream":
            return self._drain_upstream(request, name, on)
        if on:
            closing = self.admin.gateway.drain_route(name, DRAIN_SPREAD_MAX)
            return _json(request, 202, {"route": name, "draining": True, "closing": closing})
        self.admin.gateway.drained_routes.discard(name)
        return _json(request, 200, {"route": name, "draining": False})

    def _drain_upstream(self, request, name, on):
        pool, key = name
        upstreams = self.admin.gateway.upstreams
        server = upstreams.drain(pool, key, on)
        if server is None:
            return _json(request, 404, {"error": "no such pool server", "pool": pool,
                                        "server": key})
        body = {"pool": pool, "server": key, "draining": on,
                "connections": server.live}
        if on:
            body.update(closing=server.live, drain_time=upstreams.drain_time(server))
            return _json(request, 202, body)
        return _json(request, 200, body)


class Upstreams(_Base):
    """``GET /upstreams``: every pool's servers: state, weight, live connections, failures
    by reason and the last health check (token required)."""

    isLeaf = True

    def render_GET(self, request):
        if not self.authorized(request):
            return self.deny(request)
        if request.postpath and request.postpath[0]:
            return _json(request, 404, {"error": "not found"})
        return _json(request, 200, {"pools": self.admin.gateway.upstreams.describe()})


class Channels(_Base):
    """``GET /channels``: this process's channels and their local subscriber counts;
    ``GET /channels/{channel}/presence`` and ``GET /channels/{channel}/history?since=&limit=``
    (token required: presence lists identities)."""

    isLeaf = True
    MAX_LIMIT = 10000

    def render_GET(self, request):
        if not self.authorized(request):
            return self.deny(request)
        parts = [p.decode("utf-8", "replace") for p in request.postpath]
        while parts and parts[-1] == "":
            parts.pop()
        broker = self.admin.broker
        if not parts:
            counts = broker.local.counts()
            return _json(request, 200, {"channels": [
                {"channel": channel, "subscribers": n} for channel, n in sorted(counts.items())]})
        if len(parts) < 2 or parts[-1] not in ("presence", "history"):
            return _json(request, 404, {"error": "not found"})
        channel = "/".join(parts[:-1])
        policy = self.admin.gateway.channel_settings(channel)  # the config in force's
        if parts[-1] == "presence":
            if not policy.presence or getattr(broker, "presence", None) is None:
                return _json(request, 404, {"error": "no presence on this channel",
                                            "channel": channel})
            d = broker.presence.members(channel)
            d.addCallback(lambda members: {"channel": channel, "members": members})
        else:
            if not policy.keeps_history:
                return _json(request, 404, {"error": "this channel keeps no history",
                                            "channel": channel})
            args = request.args
            since = args.get(b"since", [None])[0]
            try:
                limit = int(args.get(b"limit", [b"100"])[0])
            except ValueError:
                limit = -1
            if not 0 < limit <= self.MAX_LIMIT:
                return _json(request, 400, {"error": f"limit must be 1 to {self.MAX_LIMIT}"})
            since = since.decode("utf-8", "replace") if since is not None else None
            d = broker.recover(channel, since, limit)
            d.addCallback(lambda recovery: {
                "channel": channel, "pos": recovery.position, "recovered": recovery.ok,
                "messages": [json.loads(json_delivery(message)) for _, message in
                             recovery.entries]})

        def done(body):
            if request.channel is not None:
                request.write(_json(request, 200, body))
                request.finish()

        def failed(failure):
            if request.channel is not None:
                request.write(_json(request, 503, {"error": "broker unavailable"}))
                request.finish()
        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET


class AdminSite(server.Site):
    """The admin endpoint's site; answers from the gateway it is given."""

    requestFactory = _LimitedRequest
    noisy = False

    def __init__(self, gateway, settings, internal=False, listening=lambda: True):
        self.gateway = gateway
        self.settings = settings
        self.internal = internal  # a worker's control socket: the parent checked the token
        self.listening = listening  # whether every listener accepts (see readiness)
        self.registry = metrics.registry(gateway)
        root = resource.Resource()
        root.putChild(b"livez", Live(self))
        root.putChild(b"readyz", Ready(self))
        root.putChild(b"healthz", Health(self))
        root.putChild(b"metrics", Metrics(self))
        root.putChild(b"publish", Publish(self))
        root.putChild(b"connections", Connections(self))
        root.putChild(b"drain", Drain(self))
        root.putChild(b"upstreams", Upstreams(self))
        root.putChild(b"channels", Channels(self))
        super().__init__(root)
        bound_requests(self)
        self.displayTracebacks = False

    def log(self, request):
        pass  # the gateway's own events are its access log

    @property
    def stats(self):
        return self.gateway.stats

    @property
    def max_body(self):
        admin = self.gateway.config.admin
        return admin.max_publish_size if admin is not None else self.settings.max_publish_size

    def token(self):
        if self.internal or self.gateway.config.admin is None:
            return None
        return self.gateway.config.admin.token  # follows reloads

    @property
    def broker(self):
        return self.gateway.broker

    @property
    def node_id(self):
        return self.gateway.node_id

    def readiness(self):
        """``/readyz``'s body: ``status`` is ``ok``, ``draining``, ``broker_down`` (only with
        ``ready_requires_broker``) or ``not_listening``; ``broker`` as in ``/healthz``."""
        reason = self.gateway.not_ready() or (None if self.listening() else "not_listening")
        return {"status": reason or "ok", "broker": self.gateway.broker.state}

    def health(self):
        gateway = self.gateway
        broker = gateway.broker.state
        status = "draining" if gateway.draining else "broker_down" if broker == "down" else "ok"
        return {"status": status, "connections": len(gateway.connections), "broker": broker,
                "config_generation": gateway.stats.config_generation}

    def list_connections(self):
        return [{"id": c.conn_id, "route": c.route, "client": c.client, "identity": c.identity,
                 "since": c.since, "messages_in": c.messages_in,
                 "messages_out": c.messages_out, "bytes_in": c.bytes_in,
                 "bytes_out": c.bytes_out}
                for c in self.gateway.connections.values()]

    def kick(self, conn_id, code, reason):
        connection = self.gateway.connections.get(conn_id)
        if connection is None or connection.protocol is None:
            return False
        connection.protocol.close_with(code, reason)
        return True

