"""The service tree of a gateway process, and what signals do to it.

``GatewayService`` owns the listeners, the brokers and the admin endpoint.
SIGTERM drains (stop accepting, close every WebSocket with 1001, wait up to
``drain_timeout``, exit 0; a second SIGTERM ends at once). SIGHUP reloads the
config: new connections see the new routes, policies, limits, admin token and
certificates; live connections are untouched; an invalid config is logged and
the old one stays in force.
"""

import random
import signal

from twisted.application import service
from twisted.internet import endpoints, reactor
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import ILogObserver, Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from wsgate import fastpath, observe
from wsgate.config import ConfigError, load
from wsgate.gateway import DRAIN_SPREAD_MAX, Gateway, GatewayFactory, going_away
from wsgate.pubsub.memory import MemoryBroker
from wsgate.pubsub.redis import RedisBroker
from wsgate.routing import build_router
from wsgate.tap import fail

_log = Logger()


class BindError(Exception):
    """An endpoint could not be bound; the text is the one-line explanation."""


_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix", "haproxy")  # endpoints with a listen queue


def with_backlog(endpoint_text, backlog):
    """*endpoint_text* with its listen queue set to *backlog* (None: Twisted's default).

    The config refuses ``backlog=`` in the endpoint text itself, so appending
    the keyword is unambiguous; ``haproxy:`` passes it to the endpoint it wraps.
    """
    if backlog is None or endpoint_text.split(":", 1)[0] not in _BACKLOG_TYPES:
        return endpoint_text
    return f"{endpoint_text}:backlog={backlog}"


def bind(endpoint_text, factory, label, backlog=None):
    """Listen on *endpoint_text* with *backlog* now (synchronously); return the port or
    raise BindError."""
    endpoint = endpoints.serverFromString(reactor, with_backlog(endpoint_text, backlog))
    outcome = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:
        raise BindError(f"cannot listen on {endpoint_text} ({label}): the endpoint did not "
                        "bind at once")
    result = outcome[0]
    if not hasattr(result, "getHost"):
        error = result.value
        if isinstance(error, CannotListenError):
            detail = getattr(error.socketError, "strerror", None) or str(error.socketError)
        else:
            detail = str(error) or error.__class__.__name__
        raise BindError(f"cannot listen on {endpoint_text} ({label}): {detail}")
    return result


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


class ListenerService(service.Service):
    """Binds one ``[listen:NAME]`` endpoint.

    Binding happens in ``privilegedStartService`` (before twistd sheds
    privileges) and synchronously, so that a port in use ends start-up with
    one clear line instead of being only logged.
    """

    def __init__(self, gateway, listener, adopt=None):
        self.gateway = gateway
        self.listener = listener
        self.adopt = adopt  # (fd, address family) of a socket the parent bound (workers)
        self.port = None

    def factory(self):
        factory = GatewayFactory(self.gateway, self.listener.name)
        if self.listener.tls is not None:
            factory = TLSMemoryBIOFactory(_CurrentTLS(self.gateway, self.listener.name), False,
                                          factory)
        return factory

    def bind(self):
        if self.adopt is not None:
            factory = self.factory()
            if self.listener.endpoint.startswith("haproxy:"):
                from twisted.protocols.haproxy import HAProxyWrappingFactory

                factory = HAProxyWrappingFactory(factory)
            fd, family = self.adopt
            self.port = reactor.adoptStreamPort(fd, family, factory)
            accept_one_per_wakeup(self.port)
        else:
            self.port = bind(self.listener.endpoint, self.factory(),
                             f"[listen:{self.listener.name}]", self.listener.backlog)
        address = self.port.getHost()
        observe.emit(
            "wsgate.listening", "listening on {address} ([listen:{listener}], tls={tls})",
            listener=self.listener.name, address=observe.format_address(address),
            host=getattr(address, "host", None), port=getattr(address, "port", None),
            tls=self.listener.is_tls)

    def privilegedStartService(self):
        service.Service.privilegedStartService(self)
        if self.port is None:
            try:
                self.bind()
            except BindError as e:
                fail(str(e))

    def stopListening(self):
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()

    def stopService(self):
        service.Service.stopService(self)
        return self.stopListening()


class AdminService(service.Service):
    """Binds the ``[admin]`` endpoint."""

    def __init__(self, gateway, settings, internal=False):
        self.gateway, self.settings, self.internal = gateway, settings, internal
        self.port = None

    def privilegedStartService(self):
        from wsgate.admin import AdminSite

        service.Service.privilegedStartService(self)
        try:
            self.port = bind(self.settings.endpoint,
                             AdminSite(self.gateway, self.settings, self.internal), "[admin]")
        except BindError as e:
            fail(str(e))
        address = self.port.getHost()
        observe.emit("wsgate.listening", "admin listening on {address}",
                     listener="control" if self.internal else "admin",
                     address=observe.format_address(address),
                     host=getattr(address, "host", None), port=getattr(address, "port", None),
                     tls=False)

    def stopService(self):
        service.Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


class GatewayService(service.MultiService):
    """The root of a gateway process; see the module docstring."""

    def __init__(self, config, adopted=None, worker_index=None, control=None):
        super().__init__()
        _raise_open_file_limit()
        self.config = config
        self.adopted = adopted or {}
        self.worker_index = worker_index
        self.brokers = {}
        self.broker = self._broker(config.core.broker)
        self._attach_shared_limiters(config)
        self.gateway = Gateway(config, build_router(config), self.broker, reactor)
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
            from wsgate.config import AdminSettings

            AdminService(self.gateway, AdminSettings(endpoint=f"unix:{control}"),
                         internal=True).setServiceParent(self)
        elif config.admin is not None:
            AdminService(self.gateway, config.admin).setServiceParent(self)
        self._warn_unverified(config)
        self._drain_call = None
        self._sigterms = 0

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
                broker = MemoryBroker()
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

    def startService(self):
        super().startService()
        reactor.callWhenRunning(self._install_signal_handlers)

    def _install_signal_handlers(self):
        """Twisted installs no SIGHUP handler (the default ends the process) and its
        SIGTERM handler re-raises the signal at exit; ours drain and reload."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        observe.emit("wsgate.ready", "wsgate ready (node {node})",
                     node=self.config.core.node_id)

    def _on_signal(self, signum, frame):
        action = self.reload if signum == signal.SIGHUP else self.drain
        reactor.callFromThread(action)

    def setServiceParent(self, parent):
        install_log_format(parent, self.config)
        return super().setServiceParent(parent)

    # -- SIGTERM: drain

    def drain(self):
        """Stop accepting, close every WebSocket with 1001, exit when none is left."""
        self._sigterms += 1
        if self._sigterms > 1:
            _log.info("wsgate: stopping now")
            self._stop()
            return
        gateway = self.gateway
        gateway.draining = True
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
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        if reactor.running:
            reactor.stop()

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


def install_log_format(parent, config):
    """twistd starts its log observer after ``makeService``, from a component of the
    application: a root service sets it when attached, so ``log_format`` takes effect."""
    if hasattr(parent, "setComponent") and config.core.log_format == "json":
        parent.setComponent(ILogObserver, observe.json_observer(config.core.node_id))


def _raise_open_file_limit():
    """One socket per connection: use the hard open-file limit, not the soft default
    (often 1024), as nginx's worker_rlimit_nofile would."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


