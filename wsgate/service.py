"""The service tree of a gateway process: listeners under one ``GatewayService``."""

import signal

from twisted.application import service
from twisted.internet import endpoints, reactor
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from wsgate import observe
from wsgate.gateway import Gateway, GatewayFactory
from wsgate.pubsub.memory import MemoryBroker
from wsgate.pubsub.redis import RedisBroker
from wsgate.routing import DefaultRouter
from wsgate.tap import fail

_log = Logger()


class ListenerService(service.Service):
    """Binds one ``[listen:NAME]`` endpoint.

    Binding happens in ``privilegedStartService`` (before twistd sheds
    privileges) and synchronously, so that a port in use ends start-up with
    one clear line instead of being only logged.
    """

    def __init__(self, gateway, listener):
        self.gateway = gateway
        self.listener = listener
        self.port = None

    def privilegedStartService(self):
        service.Service.privilegedStartService(self)
        factory = GatewayFactory(self.gateway, self.listener)
        if self.listener.tls is not None:
            factory = TLSMemoryBIOFactory(self.listener.tls, False, factory)
        endpoint = endpoints.serverFromString(reactor, self.listener.endpoint)
        outcome = []
        endpoint.listen(factory).addBoth(outcome.append)
        if not outcome:
            fail(f"cannot listen on {self.listener.endpoint} ([listen:{self.listener.name}]): "
                 "the endpoint did not bind at start-up")
        result = outcome[0]
        if not hasattr(result, "getHost"):
            error = result.value
            detail = _describe_listen_error(error)
            fail(f"cannot listen on {self.listener.endpoint} "
                 f"([listen:{self.listener.name}]): {detail}")
        self.port = result
        address = result.getHost()
        observe.emit(
            "wsgate.listening", "listening on {address} ([listen:{listener}], tls={tls})",
            listener=self.listener.name, address=observe.format_address(address),
            host=getattr(address, "host", None), port=getattr(address, "port", None),
            tls=self.listener.is_tls)

    def stopService(self):
        service.Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


def _describe_listen_error(error):
    if isinstance(error, CannotListenError):
        socket_error = error.socketError
        return getattr(socket_error, "strerror", None) or str(socket_error)
    return str(error) or error.__class__.__name__


class GatewayService(service.MultiService):
    """The root of a gateway process; installs the configured log format."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.brokers = {}
        self.broker = self._broker(config.core.broker)
        self._attach_shared_limiters()
        self.gateway = Gateway(config, DefaultRouter(config.routes), self.broker, reactor)
        for listener in config.listeners:
            ListenerService(self.gateway, listener).setServiceParent(self)
        for route in config.routes:
            target = route.target
            if getattr(target, "verify", True) is False:
                _log.warn("wsgate: route {route}: upstream_verify = no: the certificate of "
                          "{url} is NOT verified", route=route.name, url=target.url)

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

    def _attach_shared_limiters(self):
        for policy in self.config.policies.values():
            limiter = getattr(policy, "shared", None)
            if limiter is not None:
                limiter.broker = self._broker(limiter.broker_settings.name)

    def startService(self):
        super().startService()
        reactor.callWhenRunning(self._install_signal_handlers)

    def _install_signal_handlers(self):
        """SIGTERM stops the reactor and the process exits 0 (Twisted's own handler
        re-raises the signal at exit, which reads as a crash to supervisors)."""
        signal.signal(signal.SIGTERM, self._on_sigterm)
        observe.emit("wsgate.ready", "wsgate ready (node {node})",
                     node=self.config.core.node_id)

    def _on_sigterm(self, signum, frame):
        reactor.callFromThread(reactor.stop)

    def setServiceParent(self, parent):
        """twistd starts its log observer after ``makeService``, from a component
        of the application: set it here so ``log_format`` takes effect."""
        if hasattr(parent, "setComponent"):
            if self.config.core.log_format == "json":
                parent.setComponent(ILogObserver, observe.json_observer(self.config.core.node_id))
        return super().setServiceParent(parent)
