"""The admin endpoint of a worker pool: one answer for all workers.

The parent checks the token, then asks each worker's own admin API on its
control socket (a UNIX socket only the process owner can reach) and combines:
``/livez`` is 200 while the parent answers and no running worker is hung (see
:class:`_Live`); ``/readyz`` is 200 when the pool is not stopping and every
worker runs and is ready (see :class:`_Ready`);
``/healthz`` sums connections and is ``ok`` only when every worker is;
``/metrics`` labels every sample with ``worker``; ``/connections`` lists all
workers' connections (with their ``worker``) and a kick goes to the worker
that has the connection; ``/publish`` is done by one worker (the broker takes
the message to every process); ``/upstreams`` sums the workers' pools (each
worker balances on its own counts and health state); ``/channels`` sums the
workers' subscribers, its presence and history come from the shared broker.
"""

import json
from io import BytesIO

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from twisted.internet import defer, reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web import server
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from zope.interface import implementer

from wsgate.admin import _Base, _json, _LimitedRequest

PROBE_TIMEOUT = 2.0  # seconds a worker has to answer /livez or /readyz
WORKER_CALL_TIMEOUT = 5.0  # seconds a worker has to answer a kick, a publish or a drain
WORKER_START_GRACE = 10.0  # seconds a new worker's control socket may not answer yet


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    """Every request of an ``Agent`` goes to the UNIX socket *path* (a worker's control
    socket), whatever the URL says."""

    def __init__(self, path):
        self.path = path

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(reactor, self.path, timeout=5)


class _Pool:
    """What the resources need from the pool: token, limits, and calls to workers."""

    def __init__(self, pool):
        self.pool = pool

    def token(self):
        return self.pool.config.admin.token

    @property
    def max_body(self):
        return self.pool.config.admin.max_publish_size

    def indexes(self):
        return sorted(index for index, worker in self.pool.workers.items() if not worker.ended)

    def call(self, index, method, path, body=None, headers=None):
        """``(status, body bytes)`` from worker *index*; fails when it does not answer."""
        agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(self.pool.control_path(index)))
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        d = agent.request(method, b"http://worker" + path, Headers(headers or {}), producer)
        return d.addCallback(lambda response: readBody(response).addCallback(
            lambda data: (response.code, data)))

    def call_all(self, method, path, timeout=None):
        """Call every running worker; fire with ``[(index, (success, result))]`` (a
        ``DeferredList`` result: *result* is ``(status, body)`` or the failure: a
        ``defer.TimeoutError`` when a worker did not answer within *timeout* seconds)."""
        indexes = self.indexes()
        calls = [self.call(i, method, path) for i in indexes]
        if timeout is not None:
            for d in calls:
                d.addTimeout(timeout, reactor, onTimeoutCancel=_no_answer)
        d = defer.DeferredList(calls, consumeErrors=True)
        return d.addCallback(lambda results: list(zip(indexes, results)))

    @defer.inlineCallbacks
    def call_first(self, method, path, timeout):
        """``(status, body)`` from the first running worker (in order) that answers within
        *timeout* seconds; None when none does."""
        for index in self.indexes():
            d = self.call(index, method, path)
            d.addTimeout(timeout, reactor, onTimeoutCancel=_no_answer)
            try:
                return (yield d)
            except Exception:
                continue
        return None


def _no_answer(result, timeout):
    """A call cancelled by its timeout fails with ``defer.TimeoutError`` (the Agent's own
    failure for a cancelled request is ``ResponseNeverReceived``)."""
    raise defer.TimeoutError(f"no answer within {timeout}s")


def _finish(request, status, body):
    """Answer *request* with JSON, unless its client left while the workers were asked
    (a probe's own timeout may be shorter than :data:`PROBE_TIMEOUT`): twisted.web
    raises when a request whose connection is gone is finished."""
    if request.channel is None:  # connectionLost
        return
    request.write(_json(request, status, body))
    request.finish()


class _Live(_Base):
    """``GET /livez``: 200 when the parent answers (its reactor turns) and every running
    worker answers its own ``/livez`` within :data:`PROBE_TIMEOUT`; else 503 naming the
    ``unresponsive`` workers: a hung worker is only cured by a restart.

    A worker whose control socket cannot be reached yet is ``starting`` (alive) for
    :data:`WORKER_START_GRACE` seconds after it was started; a worker that ended is
    not listed (the parent starts it again, which is no reason to restart the pool).
    """

    isLeaf = True

    def render_GET(self, request):
        def combine(results):
            now = reactor.seconds()
            workers = []
            for index, (success, value) in results:
                if success and value[0] == 200:
                    status = "ok"
                elif not success and not value.check(defer.TimeoutError) and \
                        now - self.admin.pool.workers[index].started < WORKER_START_GRACE:
                    status = "starting"
                else:
                    status = "unresponsive"
                workers.append({"worker": index, "status": status})
            alive = all(w["status"] != "unresponsive" for w in workers)
            _finish(request, 200 if alive else 503,
                    {"status": "ok" if alive else "unresponsive", "workers": workers})
        self.admin.call_all(b"GET", b"/livez", PROBE_TIMEOUT).addCallback(combine)
        return server.NOT_DONE_YET


class _Ready(_Base):
    """``GET /readyz``: 200 when the pool is not stopping and each of its ``workers``
    runs and answers ready within :data:`PROBE_TIMEOUT`; else 503 with the first
    reason: ``draining`` (the pool is stopping), a worker's own (``draining``,
    ``broker_down``, ``not_listening``), ``unreachable`` (a worker did not answer) or
    ``not_running`` (a worker is being started again)."""

    isLeaf = True

    def render_GET(self, request):
        def combine(results):
            workers = {}
            for index, (success, value) in results:
                body = json.loads(value[1]) if success else {"status": "unreachable"}
                workers[index] = {"worker": index, **body}
            for index in range(self.admin.pool.count):
                workers.setdefault(index, {"worker": index, "status": "not_running"})
            listed = [workers[index] for index in sorted(workers)]
            reasons = [w["status"] for w in listed if w["status"] != "ok"]
            status = "draining" if self.admin.pool.stopping else \
                reasons[0] if reasons else "ok"
            _finish(request, 200 if status == "ok" else 503,
                    {"status": status, "workers": listed})
        self.admin.call_all(b"GET", b"/readyz", PROBE_TIMEOUT).addCallback(combine)
        return server.NOT_DONE_YET


class _Health(_Base):
    isLeaf = True

    def render_GET(self, request):
        def combine(results):
            workers, connections, broker, generations, ok = [], 0, "none", [], bool(results)
            for index, (success, value) in results:
                if not success:
                    ok = False
                    workers.append({"worker": index, "status": "unreachable"})
                    continue
                body = json.loads(value[1])
                workers.append({"worker": index, **body})
                connections += body["connections"]
                generations.append(body["config_generation"])
                broker = "down" if body["broker"] == "down" else body["broker"]
                ok = ok and body["status"] == "ok"
            statuses = [w["status"] for w in workers if w["status"] != "ok"]
            status = "ok" if ok else (statuses[0] if statuses else "starting")
            if self.admin.pool.stopping:
                status = "draining"
            _finish(request, 200 if status == "ok" else 503, {
                "status": status, "connections": connections, "broker": broker,
                "config_generation": min(generations) if generations else 0,
                "workers": workers})
        self.admin.call_all(b"GET", b"/healthz").addCallback(combine)
        return server.NOT_DONE_YET


class _Metrics(_Base):
    isLeaf = True

    def render_GET(self, request):
        def combine(results):
            if request.channel is None:  # the scraper left (see _finish)
                return
            families = {}
            for index, (success, value) in results:
                if not success or value[0] != 200:
                    continue
                for family in text_string_to_metric_families(value[1].decode()):
                    labelled = [Sample(s.name, {**s.labels, "worker": str(index)}, s.value,
                                       s.timestamp, s.exemplar) for s in family.samples]
                    if family.name in families:
                        families[family.name].samples.extend(labelled)
                    else:
                        family.samples = labelled
                        families[family.name] = family
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Fixed(list(families.values())))
            request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
            request.write(generate_latest(registry))
            request.finish()
        self.admin.call_all(b"GET", b"/metrics").addCallback(combine)
        return server.NOT_DONE_YET


class _Fixed:
    """A prometheus_client collector that returns the metric families it was given."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


class _Connections(_Base):
    isLeaf = True

    def render_GET(self, request):
        if not self.authorized(request):
            return self.deny(request)

        def combine(results):
            connections = []
            for index, (success, value) in results:
                if success and value[0] == 200:
                    for entry in json.loads(value[1])["connections"]:
                        connections.append({**entry, "worker": index})
            _finish(request, 200, {"connections": connections})
        self.admin.call_all(b"GET", b"/connections").addCallback(combine)
        return server.NOT_DONE_YET

    def render_DELETE(self, request):
        if not self.authorized(request):
            return self.deny(request)
        path = request.uri  # /connections/ID?code=...
        conn_id = request.postpath[0].decode("utf-8", "replace") if request.postpath else ""

        @defer.inlineCallbacks
        def kick():
            for index in self.admin.indexes():
                d = self.admin.call(index, b"DELETE", path)
                d.addTimeout(WORKER_CALL_TIMEOUT, reactor, onTimeoutCancel=_no_answer)
                try:
                    status, body = yield d
                except Exception:  # unreachable or hung: the others may have it
                    continue
                if status != 404:
                    _finish(request, status, {**json.loads(body), "worker": index})
                    return
            _finish(request, 404, {"error": "no such connection", "id": conn_id})
        kick()
        return server.NOT_DONE_YET


class _Publish(_Base):
    isLeaf = True

    def render_POST(self, request):
        if not self.authorized(request):
            return self.deny(request)
        if request.too_large:
            return _json(request, 413, {"error": "body too large", "limit": self.admin.max_body})
        indexes = self.admin.indexes()
        if not indexes:
            return _json(request, 503, {"error": "no worker is running"})
        headers = {b"Content-Type": [request.getHeader(b"content-type") or b"application/octet-stream"]}
        d = self.admin.call(indexes[0], b"POST", request.uri, request.content.read(), headers)
        # not tried on another worker: a slow publish may still have gone out
        d.addTimeout(WORKER_CALL_TIMEOUT, reactor, onTimeoutCancel=_no_answer)
        d.addCallbacks(lambda result: _finish(request, result[0], json.loads(result[1])),
                       lambda failure: _finish(request, 503, {"error": "worker unreachable"}))
        return server.NOT_DONE_YET


class _Drain(_Base):
    """``/drain/route/{name}`` and ``/drain/upstream/{pool}/{server}``: every worker
    drains (or stops draining) the route or the pool server."""

    isLeaf = True

    def _forward(self, request, method):
        if not self.authorized(request):
            return self.deny(request)

        def combine(results):
            answers = [value for _, (ok, value) in results if ok]
            if not answers:
                _finish(request, 503, {"error": "no worker answered"})
                return
            status = answers[0][0]
            body = json.loads(answers[0][1])
            for key in ("closing", "connections"):  # per worker: add them up
                if key in body:
                    body[key] = sum(json.loads(a[1]).get(key, 0) for a in answers)
            _finish(request, status, body)
        self.admin.call_all(method, request.uri, WORKER_CALL_TIMEOUT).addCallback(combine)
        return server.NOT_DONE_YET

    def render_POST(self, request):
        return self._forward(request, b"POST")

    def render_DELETE(self, request):
        return self._forward(request, b"DELETE")


def combine_upstreams(answers):
    """The pools of every worker's ``/upstreams`` (*answers*: ``[(index, body)]``) as one:
    connections and failures summed; ``state`` is the workers' common state or
    ``mixed`` (``workers`` says each one's: every worker balances and checks health
    on its own); ``last_check`` is the latest of any worker."""
    pools = {}
    for index, body in answers:
        for pool in body["pools"]:
            merged = pools.setdefault(pool["pool"], {**pool, "servers": {}})
            for entry in pool["servers"]:
                server = merged["servers"].get(entry["server"])
                if server is None:
                    server = merged["servers"][entry["server"]] = {
                        **entry, "connections": 0, "failures": {}, "workers": {},
                        "last_check": None}
                server["connections"] += entry["connections"]
                for reason, count in entry["failures"].items():
                    server["failures"][reason] = server["failures"].get(reason, 0) + count
                server["workers"][str(index)] = entry["state"]
                check = entry.get("last_check")
                if check and (server["last_check"] is None or
                              check["at"] > server["last_check"]["at"]):
                    server["last_check"] = check
    result = []
    for name in sorted(pools):
        pool = pools[name]
        servers = []
        for server in pool["servers"].values():
            states = set(server["workers"].values())
            server["state"] = states.pop() if len(states) == 1 else "mixed"
            servers.append(server)
        result.append({**pool, "servers": servers})
    return result


class _Upstreams(_Base):
    """``GET /upstreams``: the workers' pools, combined (:func:`combine_upstreams`)."""

    isLeaf = True

    def render_GET(self, request):
        if not self.authorized(request):
            return self.deny(request)

        def combine(results):
            answers = [(index, json.loads(value[1])) for index, (ok, value) in results
                       if ok and value[0] == 200]
            if not answers:
                _finish(request, 503, {"error": "no worker answered"})
                return
            _finish(request, 200, {"pools": combine_upstreams(answers)})
        self.admin.call_all(b"GET", b"/upstreams", PROBE_TIMEOUT).addCallback(combine)
        return server.NOT_DONE_YET


class _Channels(_Base):
    """``/channels``: every worker's local subscriber counts added up per channel;
    ``/channels/{channel}/presence`` and ``/history`` come from the shared broker
    (workers need Redis for broadcast), so one worker is asked: the first that answers."""

    isLeaf = True

    def render_GET(self, request):
        if not self.authorized(request):
            return self.deny(request)
        if any(request.postpath):
            def forward(answer):
                if answer is None:
                    _finish(request, 503, {"error": "no worker answered"})
                else:
                    _finish(request, answer[0], json.loads(answer[1]))
            self.admin.call_first(b"GET", request.uri, PROBE_TIMEOUT).addCallback(forward)
            return server.NOT_DONE_YET

        def combine(results):
            answers = [value for _, (ok, value) in results if ok]
            if not answers:
                _finish(request, 503, {"error": "no worker answered"})
                return
            counts = {}
            for status, body in answers:
                if status == 200:
                    for entry in json.loads(body)["channels"]:
                        counts[entry["channel"]] = counts.get(entry["channel"], 0) + \
                            entry["subscribers"]
            _finish(request, 200, {"channels": [{"channel": c, "subscribers": n}
                                                for c, n in sorted(counts.items())]})
        self.admin.call_all(b"GET", request.uri, PROBE_TIMEOUT).addCallback(combine)
        return server.NOT_DONE_YET


class PoolAdminSite(server.Site):
    """The parent's admin site: the same paths and token as a single process's
    (:mod:`wsgate.admin`), answered by asking the workers of *pool*."""

    requestFactory = _LimitedRequest
    noisy = False

    def __init__(self, pool):
        self.pool_view = _Pool(pool)
        root = Resource()
        root.putChild(b"livez", _Live(self.pool_view))
        root.putChild(b"readyz", _Ready(self.pool_view))
        root.putChild(b"healthz", _Health(self.pool_view))
        root.putChild(b"metrics", _Metrics(self.pool_view))
        root.putChild(b"connections", _Connections(self.pool_view))
        root.putChild(b"publish", _Publish(self.pool_view))
        root.putChild(b"drain", _Drain(self.pool_view))
        root.putChild(b"upstreams", _Upstreams(self.pool_view))
        root.putChild(b"channels", _Channels(self.pool_view))
        super().__init__(root)
        self.displayTracebacks = False

    @property
    def max_body(self):
        return self.pool_view.max_body

    def log(self, request):
        pass
