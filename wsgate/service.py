"""The service tree of a gateway process, and what signals do to it.

``GatewayService`` owns the listeners, the brokers and the admin endpoint.
SIGTERM drains: new upgrades (and each listener's ``health_path``) get 503 on
listeners kept open for ``drain_delay``, so a load balancer takes the node out;
then it stops accepting, closes every WebSocket with 1001, waits up to
``drain_timeout`` and exits 0; a second SIGTERM ends at once. SIGHUP reloads the
config: new connections see the new routes, policies, limits, admin token and
certificates; live connections are untouched; an invalid config is logged and
the old one stays in force.

The same service runs each worker of ``workers = N`` (:mod:`wsgate.worker`),
with the parent's sockets adopted instead of bound. What it shares with the
worker pool's parent (binding, the ``wsgate.listening`` event, signal wiring,
log format, stop) is in :mod:`wsgate.startup`.
"""

import random

from twisted.application import service
from twisted.internet import reactor
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from wsgate import fastpath, observe, startup
from wsgate.admin import AdminSite
from wsgate.config import AdminSettings, ConfigError, load
from wsgate.gateway import DRAIN_SPREAD_MAX, Gateway, GatewayFactory, going_away
from wsgate.pubsub.memory import MemoryBroker
from wsgate.pubsub.redis import RedisBroker
from wsgate.routing import build_router
from wsgate.startup import BindError, ListeningService

_log = Logger()


def accept_one_per_wakeup(port):
    """Make a worker's shared listening port accept one connection per wakeup.

    Every worker polls the same listening socket and the kernel wakes them
    all. Twisted accepts up to ``numberAccepts`` connections per wakeup (100,
    growing by 20 while it keeps finding more), so the first worker awake
    takes a whole burst and the others little: 1,000 connections opened at
    once split 61/39 between two workers. Accepting one per wakeup makes the
    workers take turns; the cost is one more poll per connection.
    """
    read = port.doRead

    def doRead():
        port.numberAccepts = 1
        read()

    port.doRead = doRead


@implementer(IOpenSSLServerConnectionCreator)
class _CurrentTLS:
    """The TLS of a listener as the *current* config has it (SIGHUP swaps certificates):
    each accepted connection asks the config in force at that moment."""

    def __init__(self, gateway, name):
        self.gateway, self.name = gateway, name

    def serverConnectionForTLS(self, tlsProtocol):
        return self.gateway.listener(self.name).tls.serverConnectionForTLS(tlsProtocol)


class ListenerService(ListeningService):
    """Listens on one ``[listen:NAME]`` endpoint: binds it, or, in a worker, adopts
    the socket the parent bound (*adopt* = ``(fd, address family)``).

    See :class:`wsgate.startup.ListeningService` for when it binds and what a
    failure does. :attr:`listener` is replaced on reload (same endpoint, new
    settings); connections look their settings up through the gateway.
    """

    def __init__(self, gateway, listener, adopt=None):
        self.gateway = gateway
        self.listener = listener
        self.adopted = adopt is not None
        if adopt is None:
            endpoint = startup.server_endpoint(reactor, listener.endpoint, listener.backlog)
        else:
            endpoint = AdoptedStreamServerEndpoint(reactor, *adopt)
            if listener.endpoint.startswith("haproxy:"):
                endpoint = proxyEndpoint(endpoint)
        factory = GatewayFactory(gateway, listener.name)
        if listener.tls is not None:
            factory = TLSMemoryBIOFactory(_CurrentTLS(gateway, listener.name), False, factory)
        super().__init__(endpoint, factory, f"{listener.endpoint} ([listen:{listener.name}])",
                         self._bound)

    def _bound(self, port):
        if self.adopted:
            accept_one_per_wakeup(port)
        startup.announce_listening(
            port, "listening on {address} ([listen:{listener}], tls={tls})",
            listener=self.listener.name, tls=self.listener.is_tls)


def admin_service(gateway, settings, internal=False, listening=lambda: True):
    """The service of the ``[admin]`` endpoint (*internal*: a worker's control socket,
    ``unix:PATH``, which the pool parent asks; announced as listener ``control``);
    *listening()* tells ``/readyz`` whether the listeners accept."""
    def bound(port):
        startup.announce_listening(port, "admin listening on {address}",
                                   listener="control" if internal else "admin", tls=False)

    return ListeningService(startup.server_endpoint(reactor, settings.endpoint),
                            AdminSite(gateway, settings, internal, listening),
                            f"{settings.endpoint} ([admin])", bound)


class GatewayService(service.MultiService):
    """The root of a gateway process; see the module docstring.

    *adopted* maps listener names to ``(fd, address family)`` of sockets the pool
    parent bound; *worker_index* N makes the gateway's node id ``NODE_ID-wN``;
    *control* is the UNIX socket path of a worker's admin API,
    which replaces ``[admin]`` (the parent answers there). All three are None
    for a single process.
    """

    def __init__(self, config, adopted=None, worker_index=None, control=None):
        super().__init__()
        startup.raise_open_file_limit()
        self.config = config
        self.adopted = adopted or {}
        self.brokers = {}
        self.broker = self._broker(config.core.broker)
        self._attach_shared_limiters(config)
        self.gateway = Gateway(config, build_router(config), self.broker, reactor)
        self.gateway.upstreams.setServiceParent(self)  # the pools' health checks
        if worker_index is not None:
            self.gateway.node_suffix = f"-w{worker_index}"
        if config.core.fast_paths:
            if not fastpath.install_reactor_shortcut(reactor):
                _log.info("wsgate: fast_paths: this Twisted or reactor is not the one they "
                          "were written for; running without the reactor shortcut")
        self.listeners = {}
        for listener in config.listeners:
            self._add_listener(listener)
        if control is not None:  # a worker: the parent's admin endpoint asks us here
            admin_service(self.gateway, AdminSettings(endpoint=f"unix:{control}"),
                          internal=True, listening=self.listening).setServiceParent(self)
        elif config.admin is not None:
            admin_service(self.gateway, config.admin,
                          listening=self.listening).setServiceParent(self)
        self._warn_unverified(config)
        self._delay_call = None  # the end of drain_delay
        self._drain_call = None
        self._sigterms = 0

    def listening(self):
        """Whether every listener accepts connections (not once the drain closed them)."""
        return all(child.port is not None for child in self.listeners.values())

    def _add_listener(self, listener):
        child = ListenerService(self.gateway, listener, self.adopted.get(listener.name))
        child.setServiceParent(self)
        self.listeners[listener.name] = child
        return child

    @staticmethod
    def _warn_unverified(config):
        for route in config.routes:
            if getattr(route.target, "verify", True) is False:
                _log.warn("wsgate: route {route}: upstream_verify = no: the certificate of "
                          "{url} is NOT verified", route=route.name, url=route.target.url)

    def _broker(self, name):
        """The broker of ``[broker:name]`` (one per name), or the in-process one."""
        if name is None:
            name = "\0memory"
        broker = self.brokers.get(name)
        if broker is None:
            settings = self.config.brokers.get(name)
            if settings is None or settings.type == "memory":
                broker = MemoryBroker(reactor)
            else:
                broker = RedisBroker(settings, reactor, self.config.core.node_id)
                broker.setServiceParent(self)
            self.brokers[name] = broker
        return broker

    def _attach_shared_limiters(self, config):
        for policy in config.policies.values():
            limiter = getattr(policy, "shared", None)
            if limiter is not None:
                limiter.broker = self._broker(limiter.broker_settings.name)

    # -- start-up

    def setServiceParent(self, parent):
        startup.install_log_format(parent, self.config)
        return super().setServiceParent(parent)

    def startService(self):
        super().startService()
        reactor.callWhenRunning(self._ready)

    def _ready(self):
        """The reactor runs: SIGTERM/SIGINT drain, SIGHUP reloads; say ``wsgate.ready``."""
        startup.handle_signals(reactor, stop=self.drain, reload=self.reload)
        observe.emit("wsgate.ready", "wsgate ready (node {node})",
                     node=self.config.core.node_id)

    # -- SIGTERM: drain

    def drain(self):
        """Refuse new connections with 503 (listeners open for ``drain_delay``), then stop
        accepting, close every WebSocket with 1001, exit when none is left."""
        self._sigterms += 1
        if self._sigterms > 1:
            _log.info("wsgate: stopping now")
            self._stop()
            return
        self.gateway.draining = True
        delay = self.config.core.drain_delay
        if delay > 0:
            _log.info("wsgate: drain_delay: answering 503 on the listeners for {t}s, then "
                      "draining", t=delay)
            self._delay_call = reactor.callLater(delay, self._drain_connections)
        else:
            self._drain_connections()

    def _drain_connections(self):
        """The drain proper: the listeners close, every WebSocket gets 1001."""
        self._delay_call = None
        gateway = self.gateway
        timeout = self.config.core.drain_timeout
        for child in self.listeners.values():
            child.stopListening()
        connections = list(gateway.connections.values())
        _log.info("wsgate: draining {n} connections (drain_timeout {t}s)", n=len(connections),
                  t=timeout)
        spread = min(DRAIN_SPREAD_MAX, timeout / 3)
        for connection in connections:
            reactor.callLater(random.uniform(0, spread), going_away, connection)
        self._drain_call = reactor.callLater(timeout, self._drain_timed_out)
        self._wait_until_empty()

    def _wait_until_empty(self):
        if not self.gateway.connections:
            self._stop()
        else:
            reactor.callLater(0.05, self._wait_until_empty)

    def _drain_timed_out(self):
        self._drain_call = None
        _log.warn("wsgate: drain_timeout reached with {n} connections open; stopping",
                  n=len(self.gateway.connections))
        self._stop()

    def _stop(self):
        startup.stop(reactor, self._delay_call, self._drain_call)

    # -- SIGHUP: reload

    def reload(self):
        """Apply the config file again; on any error keep the one in force."""
        stats = self.gateway.stats
        try:
            config = load(self.config.path)
            self._check_restart_only(config)
            self._apply_listeners(config)
        except (ConfigError, BindError) as e:
            stats.reloads["error"] += 1
            _log.error("wsgate: config reload failed, keeping generation {generation}: "
                       "{error}", generation=stats.config_generation, error=str(e))
            return
        self._attach_shared_limiters(config)
        self.config = config
        self.gateway.apply(config, build_router(config))
        stats.reloads["ok"] += 1
        stats.config_generation += 1
        self._warn_unverified(config)
        observe.emit("wsgate.config.reloaded", "config reloaded (generation {generation})",
                     generation=stats.config_generation, path=config.path)

    def _check_restart_only(self, config):
        old = self.config
        if config.core.broker != old.core.broker or config.brokers != old.brokers:
            raise ConfigError(config.path, "broker", None,
                              "broker changes need a restart (the running brokers stay)")
        if config.admin != old.admin and (config.admin is None or old.admin is None
                                          or config.admin.endpoint != old.admin.endpoint):
            raise ConfigError(config.path, "admin", "endpoint",
                              "adding, removing or moving the admin endpoint needs a restart")
        if config.core.log_format != old.core.log_format:
            raise ConfigError(config.path, "wsgate", "log_format", "needs a restart")

    def _apply_listeners(self, config):
        """Bind added or moved endpoints first (all or nothing), then close the old ones."""
        new = {listener.name: listener for listener in config.listeners}
        if self.adopted and [(l.name, l.endpoint) for l in config.listeners] != [
                (l.name, l.endpoint) for l in self.config.listeners]:
            raise ConfigError(config.path, "listen", None,
                              "with workers, listener changes need a restart")
        bound = []
        try:
            for name, listener in new.items():
                current = self.listeners.get(name)
                if current is None or current.listener.endpoint != listener.endpoint:
                    child = ListenerService(self.gateway, listener)
                    child.bind()
                    bound.append((name, child))
        except BindError:
            for _, child in bound:
                child.stopListening()
            raise
        for name, child in list(self.listeners.items()):
            if name not in new or any(name == n for n, _ in bound):
                child.stopListening()
                child.disownServiceParent()
                del self.listeners[name]
        for name, child in bound:
            child.setServiceParent(self)
            self.listeners[name] = child
        for name, child in self.listeners.items():
            child.listener = new[name]

