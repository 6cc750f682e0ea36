"""The Redis broker: channels shared by every gateway process through Redis pub/sub.

Per process: one subscribing connection (SUBSCRIBE when a channel gets its
first local subscriber, UNSUBSCRIBE when it loses its last) and one connection
for PUBLISH and scripts. A publish goes to Redis only; every process, the
publisher's own included, delivers what its subscription receives, which
gives exactly-once delivery and per-publisher order.

Both connections are ``ClientService``s: Redis unreachable at start-up or lost
later is retried with backoff, and on reconnection every live channel is
subscribed again. Every command has a timeout (txredisapi would otherwise
wait while Redis is down). txredisapi runs binary-safe here
(``charset=None``, ``convertNumbers=False``).

Envelope (for publishers that write to Redis directly): a message is
``wsg1 <t|b> <origin node> <origin connection>\\n<payload>``; ``t`` is text,
``b`` binary. A message without that header is delivered as text when it is
valid UTF-8, else as binary.
"""

from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from wsgate.interfaces import IBroker
from wsgate.pubsub import LocalFanout, Message

_log = Logger()
_MAGIC = b"wsg1 "


class BrokerDown(Exception):
    """Redis is not reachable right now."""


def encode(message):
    kind = b"b" if message.is_binary else b"t"
    node = (message.origin_node or "-").encode()
    conn = (message.origin_conn or "-").encode()
    return _MAGIC + kind + b" " + node + b" " + conn + b"\n" + message.payload


def decode(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    if data.startswith(_MAGIC):
        head, sep, payload = data.partition(b"\n")
        parts = head.split(b" ")
        if sep and len(parts) == 4 and parts[1] in (b"t", b"b"):
            return Message(payload, parts[1] == b"b", parts[2].decode(), parts[3].decode())
    try:
        data.decode("utf-8")
        return Message(data, False)
    except UnicodeDecodeError:
        return Message(data, True)


class _ProtocolFactory(Factory):
    """The factory txredisapi's protocols expect (they call back into it)."""

    noisy = False
    isLazy = True

    def __init__(self, protocol_class, settings, on_message=None):
        self.protocol_class = protocol_class
        self.settings = settings
        self.on_message = on_message

    def buildProtocol(self, addr):
        kwargs = dict(charset=None, convertNumbers=False, replyTimeout=self.settings["timeout"],
                      password=self.settings["password"], dbid=self.settings["db"])
        if self.settings["username"]:
            kwargs["username"] = self.settings["username"]
        protocol = self.protocol_class(**kwargs)
        protocol.factory = self
        if self.on_message is not None:
            protocol.messageReceived = self.on_message
        return protocol

    def stopTrying(self):
        pass  # ClientService decides about retries

    def connectionError(self, message):
        _log.warn("wsgate: redis: {message}", message=message)


def parse_url(url, timeout):
    split = urlsplit(url)
    db = split.path.strip("/")
    return {
        "tls": split.scheme == "rediss",
        "host": split.hostname or "127.0.0.1",
        "port": split.port or 6379,
        "db": int(db) if db else None,
        "username": unquote(split.username) if split.username else None,
        "password": unquote(split.password) if split.password else None,
        "timeout": timeout,
    }


@implementer(IBroker)
class RedisBroker(MultiService):
    """See the module docstring. A service: start it to connect."""

    def __init__(self, settings, reactor, node_id=""):
        super().__init__()
        self.settings = settings
        self.prefix = settings.prefix.encode()
        self.local = LocalFanout()
        self.reactor = reactor
        self.node_id = node_id
        self._sub = None  # the ready subscriber protocol, or None
        self._pub = None  # the ready publishing protocol, or None
        self.stats = {"publish_failed": 0, "delivered": 0}
        url = parse_url(settings.url, settings.timeout)
        endpoint = HostnameEndpoint(reactor, url["host"], url["port"], timeout=5)
        if url["tls"]:
            from wsgate.tls import upstream_tls_options

            endpoint = wrapClientTLS(upstream_tls_options(url["host"], settings.ca, True),
                                     endpoint)
        policy = backoffPolicy(initialDelay=0.2, maxDelay=5.0)
        self._sub_service = ClientService(
            endpoint, _ProtocolFactory(txredisapi.SubscriberProtocol, url, self._received),
            retryPolicy=policy, clock=reactor, prepareConnection=self._subscriber_ready)
        self._pub_service = ClientService(
            endpoint, _ProtocolFactory(txredisapi.RedisProtocol, url),
            retryPolicy=policy, clock=reactor, prepareConnection=self._publisher_ready)
        self._sub_service.setServiceParent(self)
        self._pub_service.setServiceParent(self)

    @property
    def state(self):
        return "up" if self._sub is not None and self._pub is not None else "down"

    # -- connections

    def _subscriber_ready(self, protocol):
        d = protocol.whenConnected()

        def ready(_):
            self._sub = protocol
            protocol.whenDisconnected().addCallback(self._subscriber_lost, protocol)
            channels = self.local.channels()
            if channels:
                _log.info("wsgate: redis: subscribing again to {n} channels", n=len(channels))
                return protocol.subscribe([self.prefix + c.encode() for c in channels])
        return d.addCallback(ready)

    def _subscriber_lost(self, _, protocol):
        if self._sub is protocol:
            self._sub = None
            _log.warn("wsgate: redis: lost the subscribing connection; reconnecting")

    def _publisher_ready(self, protocol):
        d = protocol.whenConnected()

        def ready(_):
            self._pub = protocol
            protocol.whenDisconnected().addCallback(self._publisher_lost, protocol)
        return d.addCallback(ready)

    def _publisher_lost(self, _, protocol):
        if self._pub is protocol:
            self._pub = None

    def command(self):
        """The ready publishing connection, or raise :class:`BrokerDown`."""
        if self._pub is None:
            raise BrokerDown("redis is unreachable")
        return self._pub

    # -- IBroker

    def subscribe(self, channel, subscriber):
        if self.local.add(channel, subscriber) and self._sub is not None:
            d = self._sub.subscribe([self.prefix + channel.encode()])
            d.addErrback(self._log_failure, "SUBSCRIBE", channel)

    def unsubscribe(self, channel, subscriber):
        if self.local.remove(channel, subscriber) and self._sub is not None:
            d = self._sub.unsubscribe([self.prefix + channel.encode()])
            d.addErrback(self._log_failure, "UNSUBSCRIBE", channel)

    def publish(self, channel, message):
        try:
            protocol = self.command()
        except BrokerDown as e:
            self.stats["publish_failed"] += 1
            return defer.fail(e)
        d = protocol.publish(self.prefix + channel.encode(), encode(message))

        def failed(failure):
            self.stats["publish_failed"] += 1
            return failure
        return d.addCallback(int).addErrback(failed)

    def _received(self, pattern, channel, data):
        if isinstance(channel, str):
            channel = channel.encode()
        if not channel.startswith(self.prefix):
            return
        name = channel[len(self.prefix):].decode("utf-8", "replace")
        self.stats["delivered"] += self.local.deliver(name, decode(data))

    @staticmethod
    def _log_failure(failure, command, channel):
        _log.warn("wsgate: redis {command} {channel} failed: {why} (retried on reconnect)",
                  command=command, channel=channel, why=failure.getErrorMessage())
