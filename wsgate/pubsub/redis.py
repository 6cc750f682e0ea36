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
(``charset=None``, ``convertNumbers=False``). An outage is logged twice, not
per attempt: ``wsgate.broker.down`` (a warning naming the broker, its address
and the first error) and ``wsgate.broker.up`` once both connections are back.

Envelope (for publishers that write to Redis directly): a message is
``wsg1 <t|b> <origin node> <origin connection>\\n<payload>``; ``t`` is text,
``b`` binary (``j``: a join/leave message for ``wsgate.v1.json`` clients). A
message without that header is delivered as text when it is valid UTF-8,
else as binary. A recorded message carries its position as a fifth field.

History (channels whose route sets ``history``/``history_ttl``): a publish is
one Lua script (:data:`PUBLISH_SCRIPT`) that appends the message to the
channel's stream (``<prefix>hist:<channel>``, entry ID ``SEQ-1``, trimmed
with ``MAXLEN ~ history`` and by age), counts it in ``<prefix>hmeta:<channel>``
(``epoch``, ``seq``: they outlive messages the ttl expired), bounds the number of channels with history
(``<prefix>hist-channels``, ``max_history_channels``) and PUBLISHes it with its
position, so that recording and delivery cannot part. It runs on the
publishing connection (txredisapi's ``eval``), never the subscribing one. A
plain PUBLISH by another program is delivered without a position; to record
it, run the same script (documented in the README). Presence is
:class:`wsgate.pubsub.presence.RedisPresence`.
"""

import secrets
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from wsgate import observe
from wsgate.interfaces import IChannelHistory
from wsgate.pubsub import LocalFanout, Message
from wsgate.pubsub.history import (
    HISTORY_TTL_ONLY_MAX,
    NEW_EPOCH,
    ChannelSettings,
    Recovery,
    accepts,
    format_position,
    parse_position,
)
from wsgate.pubsub.presence import RedisPresence

_log = Logger()
_MAGIC = b"wsg1 "


class BrokerDown(Exception):
    """Redis is not reachable right now."""


def envelope_head(message):
    """``wsg1 <t|b|j> <node> <conn>``: the envelope without position or payload."""
    kind = b"j" if message.control else b"b" if message.is_binary else b"t"
    node = (message.origin_node or "-").encode()
    conn = (message.origin_conn or "-").encode()
    return _MAGIC + kind + b" " + node + b" " + conn


def encode(message):
    head = envelope_head(message)
    if message.pos:
        head += b" " + message.pos.encode()
    return head + b"\n" + message.payload


def decode(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    if data.startswith(_MAGIC):
        head, sep, payload = data.partition(b"\n")
        parts = head.split(b" ")
        if sep and len(parts) in (4, 5) and parts[1] in (b"t", b"b", b"j"):
            pos = parts[4].decode("ascii", "replace") if len(parts) == 5 else None
            return Message(payload, parts[1] == b"b", parts[2].decode(), parts[3].decode(),
                           pos, parts[1] == b"j")
    try:
        data.decode("utf-8")
        return Message(data, False)
    except UnicodeDecodeError:
        return Message(data, True)


class _Outage:
    """Logs an outage of one broker once: a warning when it starts, a line when it ends.

    Every failed attempt and lost connection calls :meth:`failed`; only the
    first of an outage is logged, with its error. :meth:`recovered` logs the
    end of an outage (nothing when there was none, as at start-up).
    """

    def __init__(self, broker, address, clock):
        self.broker, self.address, self.clock = broker, address, clock
        self.since = None  # when the outage began; None: no outage

    def failed(self, error):
        if self.since is not None:
            return
        self.since = self.clock.seconds()
        observe.emit("wsgate.broker.down",
                     "wsgate: broker {broker} ({address}) is down: {error}; reconnecting",
                     level=LogLevel.warn, broker=self.broker, address=self.address,
                     error=error.rstrip("."))

    def recovered(self, channels):
        if self.since is None:
            return
        down_s, self.since = round(self.clock.seconds() - self.since, 1), None
        observe.emit("wsgate.broker.up",
                     "wsgate: broker {broker} ({address}) is back after {down_s}s; "
                     "{channels} channels subscribed again",
                     broker=self.broker, address=self.address, down_s=down_s,
                     channels=channels)


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """An endpoint that reports each failed connection attempt to *failed*."""

    def __init__(self, endpoint, failed):
        self._endpoint, self._failed = endpoint, failed

    def connect(self, factory):
        def report(failure):
            self._failed(failure.getErrorMessage())
            return failure
        return self._endpoint.connect(factory).addErrback(report)


class _QuietClientService(ClientService):
    """A ``ClientService`` without its line per retry (:class:`_Outage` logs once)."""

    _log = Logger(observer=lambda event: None)


class _ReportsLoss:
    """A txredisapi protocol that tells its factory why its connection ended."""

    def connectionLost(self, why):
        self.factory.connection_lost(why.getErrorMessage())
        super().connectionLost(why)


class _Subscriber(_ReportsLoss, txredisapi.SubscriberProtocol):
    pass


class _Commands(_ReportsLoss, txredisapi.RedisProtocol):
    pass


def _when_ready(ready):
    """A ``prepareConnection`` calling *ready(protocol)* once txredisapi's AUTH and
    SELECT are done, without making ClientService wait for it.

    ClientService cannot take a connection lost while it waits for
    ``prepareConnection`` (Twisted raises ``NoTransition`` and never tries
    again, as when a proxy in front of a stopped Redis accepts and closes);
    not waiting, such a connection is lost like any other and retried.
    """
    def prepare(protocol):
        protocol.whenConnected().addCallback(ready)
    return prepare


class _ProtocolFactory(Factory):
    """The factory txredisapi's protocols expect (they call back into it)."""

    noisy = False
    isLazy = False  # txredisapi would log its connection errors a second time

    def __init__(self, protocol_class, settings, failed, on_message=None):
        self.protocol_class = protocol_class
        self.settings = settings
        self.failed = failed  # called with the error of a lost or refused connection
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
        self.failed(message)  # AUTH or SELECT refused

    def connection_lost(self, message):
        self.failed(f"connection lost: {message}")


def parse_url(url, timeout, password=None):
    """The connection settings of a ``redis://`` or ``rediss://`` *url*; *password*
    (``[broker:NAME] password`` or ``password_file``) stands in for the URL's, which
    the config refuses to have both of."""
    split = urlsplit(url)
    db = split.path.strip("/")
    return {
        "tls": split.scheme == "rediss",
        "host": split.hostname or "127.0.0.1",
        "port": split.port or 6379,
        "db": int(db) if db else None,
        "username": unquote(split.username) if split.username else None,
        "password": password if password is not None else (
            unquote(split.password) if split.password else None),
        "timeout": timeout,
    }


# KEYS: stream, meta, channels zset, pubsub channel.
# ARGV: envelope head, payload, history (0: none), ttl ms (0: none), a new epoch,
#       now ms, max_history_channels, channel name, key prefix.
PUBLISH_SCRIPT = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[5]
  redis.call('HSET', KEYS[2], 'epoch', epoch)
end
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
local now = tonumber(ARGV[6])
local maxlen = tonumber(ARGV[3])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, seq .. '-1', 't', now, 'h', ARGV[1],
           'p', ARGV[2])
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  while true do
    local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
    if #first == 0 or tonumber(first[1][2][2]) >= now - ttl then break end
    redis.call('XDEL', KEYS[1], first[1][1])
  end
  redis.call('PEXPIRE', KEYS[1], ttl)
end
redis.call('ZADD', KEYS[3], now, ARGV[8])
local over = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[7])
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[3], over)
  for i = 1, #old, 2 do
    if old[i] ~= ARGV[8] then
      redis.call('DEL', ARGV[9] .. 'hist:' .. old[i], ARGV[9] .. 'hmeta:' .. old[i])
    end
  end
end
local pos = epoch .. ':' .. seq
local receivers = redis.call('PUBLISH', KEYS[4], ARGV[1] .. ' ' .. pos .. '\\n' .. ARGV[2])
return {receivers, pos}
"""

# KEYS: stream, meta. ARGV: first ID to read. It writes nothing (subscribers may name any
# channel): a channel without history answers epoch '' and seq 0.
READ_SCRIPT = """
local epoch = redis.call('HGET', KEYS[2], 'epoch') or ''
local seq = redis.call('HGET', KEYS[2], 'seq') or '0'
local entries = {}
if ARGV[1] ~= '' then entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+') end
return {epoch, seq, entries}
"""


class _SharedRead:
    """One READ_SCRIPT answer for every recovery of a channel that needs no older entry:
    when a thousand clients reconnect at once with the same position, Redis is read
    once (not a thousand times, each answer the whole history, each within the command
    timeout) and the entries are parsed once.

    A subscriber that joins a read sent before it subscribed may have missed a
    live message the read does not hold either (published after Redis ran the
    read, delivered here before the subscriber came). *live* keeps what the
    channel delivered live while the read is under way; a joining recovery
    notes how many there were and gets those that came after the answer
    (:meth:`RedisBroker._recovery`), so the read stays shared.
    """

    def __init__(self, first, d):
        self.first = first  # the first sequence number read
        self.live = []  # messages with a position delivered live since the read was sent
        self.waiters = []
        self.epoch = None
        self.last = 0
        self._raw = None
        self._entries = None
        d.addBoth(self._done)

    def wait(self):
        waiter = defer.Deferred()
        if self._raw is not None:
            waiter.callback(self)
        else:
            self.waiters.append(waiter)
        return waiter

    def _done(self, result):
        waiters, self.waiters = self.waiters, []
        if isinstance(result, Failure):
            for waiter in waiters:
                waiter.errback(result)
            return None
        self._raw = result
        self.epoch, self.last = _text(result[0]) or NEW_EPOCH, int(result[1])
        for waiter in waiters:
            waiter.callback(self)
        return None

    def entries(self):
        """``[(seq, time ms, Message)]`` of the answer, parsed on first use."""
        if self._entries is None:
            self._entries = []
            for entry_id, fields in self._raw[2] or ():
                values = dict(zip(fields[::2], fields[1::2]))
                seq = int(_text(entry_id).split("-", 1)[0])
                head = values[b"h"].split(b" ")
                message = Message(values[b"p"], head[1] == b"b", _text(head[2]),
                                  _text(head[3]), format_position(self.epoch, seq))
                self._entries.append((seq, int(values[b"t"]), message))
        return self._entries


@implementer(IChannelHistory)
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
        url = parse_url(settings.url, settings.timeout, settings.password)
        self._outage = _Outage(settings.name, f"{url['host']}:{url['port']}", reactor)
        endpoint = HostnameEndpoint(reactor, url["host"], url["port"], timeout=5)
        if url["tls"]:
            from wsgate.tls import upstream_tls_options

            endpoint = wrapClientTLS(upstream_tls_options(url["host"], settings.ca, True),
                                     endpoint)
        endpoint = _ReportingEndpoint(endpoint, self._failed)
        policy = backoffPolicy(initialDelay=0.2, maxDelay=5.0)
        self._sub_service = _QuietClientService(
            endpoint, _ProtocolFactory(_Subscriber, url, self._failed, self._received),
            retryPolicy=policy, clock=reactor,
            prepareConnection=_when_ready(self._subscriber_ready))
        self._pub_service = _QuietClientService(
            endpoint, _ProtocolFactory(_Commands, url, self._failed),
            retryPolicy=policy, clock=reactor,
            prepareConnection=_when_ready(self._publisher_ready))
        self._sub_service.setServiceParent(self)
        self._pub_service.setServiceParent(self)
        self.channel_settings = ChannelSettings()
        self.presence = RedisPresence(self, reactor, settings.presence_ttl)
        self._subscribing = {}  # channel → the SUBSCRIBE under way
        self._reads = {}  # channel → the _SharedRead under way

    def configure(self, channel_settings):
        """Which channels keep history (the config in force; SIGHUP changes it)."""
        self.channel_settings = channel_settings

    def startService(self):
        super().startService()
        self.presence.start()

    def stopService(self):
        self.presence.stop()
        return super().stopService()

    @property
    def state(self):
        return "up" if self._sub is not None and self._pub is not None else "down"

    # -- connections

    def _failed(self, error):
        """A connection was lost or refused (not while stopping): an outage, if new."""
        if self.running:
            self._outage.failed(error)

    def _connection_ready(self):
        """One connection is ready: when both are, an outage (if any) has ended."""
        if self.state == "up":
            self._outage.recovered(len(self.local.channels()))

    def _subscriber_ready(self, protocol):
        self._sub = protocol
        protocol.whenDisconnected().addCallback(self._subscriber_lost, protocol)
        channels = self.local.channels()
        self._connection_ready()
        if channels:
            d = protocol.subscribe([self.prefix + c.encode() for c in channels])
            d.addErrback(self._log_failure, "SUBSCRIBE", f"({len(channels)} channels)")

    def _subscriber_lost(self, _, protocol):
        if self._sub is protocol:
            self._sub = None

    def _publisher_ready(self, protocol):
        self._pub = protocol
        protocol.whenDisconnected().addCallback(self._publisher_lost, protocol)
        self._connection_ready()

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
            self._subscribing[channel] = d

            def done(result):
                if self._subscribing.get(channel) is d:
                    del self._subscribing[channel]
                return result
            d.addBoth(done)

    def ready(self, channel):
        """A Deferred that fires once Redis confirmed the subscription of *channel* (at
        once when it did already): a history read after it misses nothing."""
        pending = self._subscribing.get(channel)
        if pending is None:
            return defer.succeed(None)
        d = defer.Deferred()
        pending.addBoth(lambda result: (d.callback(None), result)[1])
        return d

    def unsubscribe(self, channel, subscriber):
        if self.local.remove(channel, subscriber) and self._sub is not None:
            d = self._sub.unsubscribe([self.prefix + channel.encode()])
            d.addErrback(self._log_failure, "UNSUBSCRIBE", channel)

    def publish(self, channel, message):
        try:
            protocol = self.command()
        except BrokerDown as e:
            return defer.fail(e)
        policy = self.channel_settings(channel)
        if message.control or not policy.keeps_history:
            return protocol.publish(self.prefix + channel.encode(),
                                    encode(message)).addCallback(int)
        keys = self._history_keys(channel) + [self.prefix + b"hist-channels",
                                              self.prefix + channel.encode()]
        args = [envelope_head(message), message.payload,
                policy.history or HISTORY_TTL_ONLY_MAX, int(policy.history_ttl * 1000),
                secrets.token_hex(4), int(self.reactor.seconds() * 1000),
                self.channel_settings.max_history_channels, channel.encode(), self.prefix]
        d = protocol.eval(PUBLISH_SCRIPT, keys, args)
        return d.addCallback(lambda result: int(result[0]))

    def _history_keys(self, channel):
        name = channel.encode()
        return [self.prefix + b"hist:" + name, self.prefix + b"hmeta:" + name]

    def position(self, channel):
        """A Deferred: the channel's current position (None: it keeps no history)."""
        return self.recover(channel, None, 0, read=False).addCallback(
            lambda recovery: recovery.position)

    def recover(self, channel, since, limit=0, read=True):
        """A Deferred :class:`wsgate.pubsub.history.Recovery` of what followed *since*
        (``None``: everything kept); fails while Redis is down. A read under way for
        the channel is shared (see :class:`_SharedRead`)."""
        policy = self.channel_settings(channel)
        if not policy.keeps_history:
            return defer.succeed(Recovery(None, False))
        try:
            protocol = self.command()
        except BrokerDown as e:
            return defer.fail(e)
        parsed = parse_position(since) if since is not None else None
        if since is not None and parsed is None:
            first = ""  # not a position: nothing to read, recovery fails
        elif not read:
            first = ""
        else:
            first = f"{parsed[1] + 1 if parsed else 0}-0"
        needed = parsed[1] + 1 if parsed else 0
        shared = self._reads.get(channel) if first else None
        if shared is None or shared.first > needed:
            d = protocol.eval(READ_SCRIPT, self._history_keys(channel), [first])
            shared = _SharedRead(needed, d)
            if first:
                self._reads[channel] = shared
                d.addBoth(self._read_done, channel, shared)
        missed = len(shared.live)  # joined late: what came live before it subscribed
        return shared.wait().addCallback(self._recovery, policy, since, parsed, limit, read,
                                         missed)

    def _read_done(self, result, channel, shared):
        if self._reads.get(channel) is shared:
            del self._reads[channel]
        return result

    def _recovery(self, shared, policy, since, parsed, limit, read, missed):
        epoch, last = shared.epoch, shared.last
        entries = [(seq, t, message) for seq, t, message in shared.entries()]
        for message in shared.live[:missed]:  # live before this recovery joined the read
            live = parse_position(message.pos)
            if live is not None and live[0] == epoch and live[1] > last:
                entries.append((live[1], None, message))
                last = live[1]
        position = format_position(epoch, last)
        if not read:
            return Recovery(position, True)
        if since is not None and not accepts(parsed, epoch, last):
            return Recovery(position, False)
        cutoff = (self.reactor.seconds() - policy.history_ttl) * 1000 \
            if policy.history_ttl else None
        entries = [(seq, message) for seq, t, message in entries
                   if cutoff is None or t is None or t >= cutoff]
        if policy.history and len(entries) > policy.history:  # MAXLEN ~ keeps a few more
            entries = entries[-policy.history:]
        start = parsed[1] if parsed else 0
        entries = [(seq, message) for seq, message in entries if seq > start]
        first = entries[0][0] if entries else last + 1
        if since is not None and start < last and first != start + 1:
            return Recovery(position, False)  # what followed *since* is gone
        if limit:
            entries = entries[:limit]
        return Recovery(position, True, tuple((m.pos, m) for _, m in entries))

    def _received(self, pattern, channel, data):
        if isinstance(channel, str):
            channel = channel.encode()
        if not channel.startswith(self.prefix):
            return
        name = channel[len(self.prefix):].decode("utf-8", "replace")
        message = decode(data)
        if self._reads and message.pos is not None:
            shared = self._reads.get(name)
            if shared is not None:
                shared.live.append(message)
        self.local.fan_out(name, message)

    @staticmethod
    def _log_failure(failure, command, channel):
        _log.warn("wsgate: redis {command} {channel} failed: {why} (retried on reconnect)",
                  command=command, channel=channel, why=failure.getErrorMessage())


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
