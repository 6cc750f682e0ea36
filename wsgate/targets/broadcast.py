"""``broadcast = CHANNEL``: the connection joins a pub/sub channel (a terminated route).

Every connection is a :class:`BroadcastSubscriber` of its channel on the
process's broker (:mod:`wsgate.pubsub`): what the broker delivers is sent
to the client, and what the client sends is published (``client_publish``).

A client that negotiates the subprotocol ``wsgate.v1.json`` gets positions:
first ``{"type": "subscribed", "pos": ..., "id": its connection id}`` (and
``"members"`` with presence), then each delivery as
``{"pos", "data"}`` (``"b64"`` for binary), and with ``?since=POS`` every
message after POS from the channel's history before the live ones, with no
gap and no duplicate: the subscriber subscribes first and holds live
deliveries back, reads the history (after the broker confirmed the
subscription), sends it, then sends the held deliveries it did not send
yet. A position the history cannot serve gets ``{"type": "recovery_failed"}``.
Plain clients receive raw messages exactly as without history.
"""

import collections
import json
from urllib.parse import parse_qs

from autobahn.websocket.protocol import PreparedMessage
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from wsgate import units
from wsgate.fastpath_autobahn import FastTerminatedProtocol
from wsgate.interfaces import ISubscriber, IWebSocketApp
from wsgate.pubsub import Message, json_delivery
from wsgate.pubsub.history import ChannelPolicy, parse_position
from wsgate.pubsub.presence import member
from wsgate.settings import SettingError
from wsgate.units import fill_template, placeholders
from wsgate.targets import TargetType
from wsgate.targets.websocket import ApplicationTarget

_log = Logger()

CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013
SUBPROTOCOL = "wsgate.v1.json"
# At most this many members in a `subscribed` message: each join reads and sends the list,
# so a crowded channel must not make every join cost its whole membership.
MEMBERS_IN_SUBSCRIBED = 1000


class _FramedHistory:
    """History messages framed for ``wsgate.v1.json``, by channel and position: the most
    recently recovered ones, shared by the clients that recover them, at most
    *max_count* of them and *max_bytes* of frames (the oldest go first).

    The channel is part of the key: a position is unique within one channel's
    history only (Redis epochs are random, and two channels may draw the same).
    """

    def __init__(self, max_count=10000, max_bytes=64 * 1024 * 1024):
        self.max_count, self.max_bytes = max_count, max_bytes
        self._frames = collections.OrderedDict()
        self._bytes = 0

    def get(self, channel, message):
        key = (channel, message.pos)
        prepared = self._frames.get(key)
        if prepared is None:
            prepared = PreparedMessage(json_delivery(message), False, False, False)
            self._frames[key] = prepared
            self._bytes += len(prepared.payloadHybi)
            while len(self._frames) > self.max_count or self._bytes > self.max_bytes:
                _, old = self._frames.popitem(last=False)
                self._bytes -= len(old.payloadHybi)
        return prepared


_RECOVERED = _FramedHistory()


def _json(body):
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


@implementer(ISubscriber, IPushProducer, IWebSocketApp)
class BroadcastSubscriber:
    """A subscriber of one channel; publishes what its client sends (if allowed).

    Slow consumers: the protocol's :class:`wsgate.flow.SendBuffer` tells the
    session when the socket's write buffer is full (``pauseProducing``). While paused, deliveries wait in a queue bounded by
    the route's ``max_send_buffer`` bytes; past that the route's
    ``slow_consumer`` applies: ``drop`` the message for this subscriber
    (counted) or ``close`` it with 1013. Fan-out never waits for anyone.

    Coalescing (wsgate's fast protocol, ``fast_paths = yes``): deliveries are
    pre-framed bytes collected in ``pending`` and written once per reactor
    iteration by :meth:`flush` (see :mod:`wsgate.coalesce`). ``direct`` says
    that a delivery may skip every per-message check and go straight to
    ``pending``: no per-message policy, no message log, no compression, not
    paused, nothing queued. Queued bytes are written only while the
    connection is open, so nothing follows a close frame.
    """

    wants_json = False  # negotiated wsgate.v1.json: JSON deliveries with positions
    catching_up = None  # while the history is read: the live deliveries held back
    held_bytes = 0  # their payload bytes (at most max_send_buffer, else 1013)
    floor = None  # (epoch, seq) sent from the history: live duplicates up to it are dropped

    def __init__(self, broker, channel, target, node_id, stats, route, flusher=None,
                 since=None):
        # target: the route's BroadcastTarget (client_publish, include_sender,
        # max_send_buffer, slow_consumer); flusher: the gateway's IterationFlusher
        # when deliveries are coalesced (fast_paths), else None
        self.broker = broker
        self.channel = channel
        self.target = target
        self.node_id = node_id
        self.stats, self.route = stats, route
        self.flusher = flusher
        self.protocol = None  # the IWebSocketConnection, once open
        self.conn_id = None
        self.paused = False
        self.queue = collections.deque()
        self.queued_bytes = 0
        self.pending = []
        self.pending_bytes = 0
        self.may_be_direct = False
        self.direct = False
        self.since = since  # ?since=POS (honoured with wsgate.v1.json)
        self.joined = False  # presence

    def choose_subprotocol(self, offered):
        """The subprotocol of the 101: ``wsgate.v1.json`` when offered, else none."""
        if SUBPROTOCOL in offered:
            self.wants_json = True
            return SUBPROTOCOL
        return None

    @property
    def max_send_buffer(self):
        return self.target.max_send_buffer

    def opened(self, protocol):
        self.protocol = protocol
        self.conn_id = protocol.connection.conn_id
        self.may_be_direct = (
            self.flusher is not None and isinstance(protocol, FastTerminatedProtocol)
            and not protocol.policy_sessions and not protocol.log_messages
            and protocol._perMessageCompress is None)
        protocol.send_buffer.listener = self  # told when the client's socket is full
        if self.wants_json:
            self.catching_up = []
        self.direct = self.may_be_direct and self.catching_up is None
        self.broker.subscribe(self.channel, self)
        policy = self.target.policy
        if policy.presence:
            connection = protocol.connection
            presence = getattr(self.broker, "presence", None)
            if presence is not None:
                presence.join(self.channel, member(self.conn_id, connection.identity,
                                                   self.node_id, connection.since))
                self.joined = True
        if policy.join_leave:
            self._announce("join")
        if self.wants_json:
            ready = getattr(self.broker, "ready", None)
            d = ready(self.channel) if ready is not None else None
            if d is None:
                self._read_history(None)
            else:
                d.addBoth(self._read_history)

    def _announce(self, what):
        identity = self.protocol.connection.identity
        message = Message(_json({"type": what, "id": self.conn_id, "identity": identity}),
                          False, self.node_id, self.conn_id, control=True)
        self.broker.publish(self.channel, message).addErrback(lambda failure: None)

    # -- wsgate.v1.json: the position, then the history, then live deliveries

    def _read_history(self, _):
        if self.protocol is None or self.catching_up is None:
            return
        if self.since is not None:
            d = self.broker.recover(self.channel, self.since)
        else:
            d = self.broker.position(self.channel)
        d.addCallbacks(self._with_members, self._history_failed)

    def _with_members(self, result):
        """With ``presence``, the ``subscribed`` message lists the channel's members too
        (so a client knows who is online when it joins); a failed read lists none."""
        if not self.target.policy.presence or getattr(self.broker, "presence", None) is None:
            self._caught_up(result)
            return
        d = self.broker.presence.members(self.channel, MEMBERS_IN_SUBSCRIBED)
        d.addErrback(lambda failure: None)
        d.addCallback(lambda members: self._caught_up(result, members))

    def _caught_up(self, result, members=None):
        held = self.catching_up
        if held is None or self.protocol.state != self.protocol.STATE_OPEN:
            return
        position = result if self.since is None else result.position
        subscribed = {"type": "subscribed", "pos": position, "id": self.conn_id}
        if members is not None:
            subscribed["members"] = members
            if len(members) >= MEMBERS_IN_SUBSCRIBED:
                subscribed["members_truncated"] = True  # GET .../presence lists them all
        self.protocol.send(_json(subscribed), False)
        parsed = parse_position(position)
        epoch, last = parsed if parsed else (None, 0)
        if self.since is not None:
            if result.ok:  # the entries run up to the position, *last*
                for _, message in result.entries:
                    self._send_json(message)
            else:
                self.protocol.send(_json({"type": "recovery_failed"}), False)
        self._release(held, epoch, last)

    def _history_failed(self, failure):
        held = self.catching_up
        if held is None or self.protocol.state != self.protocol.STATE_OPEN:
            return
        _log.warn("wsgate: history of {channel} unavailable: {error}", channel=self.channel,
                  error=failure.getErrorMessage())
        self.stats.drop(self.route, "history_unavailable")
        self.protocol.send(_json({"type": "subscribed", "pos": None, "id": self.conn_id}),
                           False)
        if self.since is not None:
            self.protocol.send(_json({"type": "recovery_failed"}), False)
        self._release(held, None, 0)

    def _release(self, held, epoch, last):
        """Go live: send the deliveries held back during the catch-up that come after
        *last* (positions of another epoch, or none, always go).

        Until a live delivery after *last* arrives, later ones at or before it
        are dropped too: with Redis the history is read on the publishing
        connection and live messages come on the subscribing one, so a message
        may arrive live after it was sent from the history. Live deliveries
        come in order, so the first one past *last* ends this.
        """
        self.catching_up = None
        self.floor = (epoch, last) if epoch is not None else None
        for message, prepared in held:
            self.deliver(message, prepared)
        self._may_go_direct()

    def _may_go_direct(self):
        self.direct = self.may_be_direct and not self.paused and not self.queue and \
            self.floor is None and self.catching_up is None

    def _send_json(self, message):
        """Send a message from the history, framed once for every client that recovers
        it (a thousand clients reconnecting at once recover the same messages)."""
        if message.origin_conn == self.conn_id and not self.target.include_sender:
            return
        self.protocol.send_prepared(_RECOVERED.get(self.channel, message),
                                    len(message.payload), False)

    def message(self, protocol, payload, is_binary):
        if not self.target.client_publish:
            protocol.close_with(CLOSE_POLICY_VIOLATION, "publishing is not allowed here")
            return
        message = Message(payload, is_binary, self.node_id, self.conn_id)
        d = self.broker.publish(self.channel, message)
        d.addErrback(self._publish_failed, protocol)

    def _publish_failed(self, failure, protocol):
        _log.warn("wsgate: publish to {channel} failed: {error}", channel=self.channel,
                  error=failure.getErrorMessage())
        self.stats.drop(self.route, "broker_down")
        protocol.close_with(CLOSE_TRY_AGAIN_LATER, "broker unavailable")

    def deliver(self, message, prepared):
        if message.origin_conn == self.conn_id and not self.target.include_sender:
            return
        if self.direct:  # the hot path, 1,000s per message: enqueue() inlined
            if not self.pending:
                self.flusher.mark(self)
            self.pending.append(prepared.payloadHybi)
            self.pending_bytes += len(message.payload)
            return
        if self.catching_up is not None:
            self.held_bytes += len(message.payload)
            if self.held_bytes > self.target.max_send_buffer:
                # the history read is slow and the channel busy: bounded like a queue
                self.catching_up = None
                self.stats.drop(self.route, "slow_consumer_closed")
                self.protocol.close_with(CLOSE_TRY_AGAIN_LATER, "slow consumer")
                return
            self.catching_up.append((message, prepared))
            return
        if self.floor is not None and message.pos is not None:
            parsed = parse_position(message.pos)
            if parsed is not None and parsed[0] == self.floor[0]:
                if parsed[1] <= self.floor[1]:
                    return  # sent from the history already
                self.floor = None  # live from here: in order, past the history
                self._may_go_direct()
        size = len(message.payload)
        is_binary = message.is_binary and not self.wants_json
        if not self.paused and not self.queue:
            self.protocol.send_prepared(prepared, size, is_binary)
            return
        if self.queued_bytes + size > self.target.max_send_buffer:
            self._too_slow()
            return
        self.queue.append((prepared, size, is_binary))
        self.queued_bytes += size

    def enqueue(self, frame, size):
        """Coalesce one pre-framed delivery (the fast protocol's ``send_prepared``)."""
        if not self.pending:
            self.flusher.mark(self)
        self.pending.append(frame)
        self.pending_bytes += size

    def flush(self):
        """Write the pending frames in one write, counted, if the connection is still open."""
        pending = self.pending
        if not pending:
            return
        self.pending = []
        size, self.pending_bytes = self.pending_bytes, 0
        protocol = self.protocol
        if protocol.state != protocol.STATE_OPEN:
            return  # closing: no data frame may follow the close frame
        connection = protocol.connection
        connection.messages_out += len(pending)
        connection.bytes_out += size
        protocol.idle.touch()
        protocol.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        protocol.send_buffer.wrote(size)

    def _too_slow(self):
        if self.target.slow_consumer == "drop":
            self.stats.drop(self.route, "slow_consumer")
            return
        if self.protocol.state == self.protocol.STATE_OPEN:
            self.stats.drop(self.route, "slow_consumer_closed")
            self.queue.clear()
            self.queued_bytes = 0
            self.protocol.close_with(CLOSE_TRY_AGAIN_LATER, "slow consumer")

    # IPushProducer: Twisted's verdict on the socket's write buffer

    def pauseProducing(self):
        self.paused = True
        self.direct = False

    def resumeProducing(self):
        self.paused = False
        while self.queue and not self.paused:
            prepared, size, is_binary = self.queue.popleft()
            self.queued_bytes -= size
            self.protocol.send_prepared(prepared, size, is_binary)
        self._may_go_direct()

    def stopProducing(self):
        self.direct = self.may_be_direct = False
        self.queue.clear()
        self.queued_bytes = 0
        self.pending = []
        self.pending_bytes = 0

    def closed(self, protocol):
        self.broker.unsubscribe(self.channel, self)
        self.catching_up = None
        self.stopProducing()
        if self.joined:
            self.joined = False
            self.broker.presence.leave(self.channel, self.conn_id)
        if self.target.policy.join_leave and self.protocol is not None:
            self._announce("leave")


class BroadcastTarget(ApplicationTarget):
    """The channel template and the subscribers' settings of one broadcast route."""

    def __init__(self, channel, client_publish=True, include_sender=False,
                 max_send_buffer=1024 * 1024, slow_consumer="drop", policy=None):
        super().__init__("broadcast", f"broadcast {channel}", self._subscriber,
                         needs_shared_broker=True, max_send_buffer=max_send_buffer)
        self.channel = channel
        self.client_publish = client_publish
        self.include_sender = include_sender
        self.slow_consumer = slow_consumer
        self.policy = policy or ChannelPolicy()  # history, presence, join_leave

    def channel_for(self, params):
        """The channel of a request whose path placeholders are *params*."""
        return fill_template(self.channel, params)

    def _subscriber(self, request):
        gateway = request.gateway
        since = None
        if request.head.query:
            values = parse_qs(request.head.query).get("since")
            since = values[0] if values else None
        return BroadcastSubscriber(
            gateway.broker, self.channel_for(request.match.params), self, gateway.node_id,
            gateway.stats, request.route.name, flusher=gateway.flusher if request.fast else None,
            since=since)


def build(route, settings, context):
    channel = settings.get("broadcast", units.non_empty)
    for placeholder in placeholders(channel):
        if placeholder not in context.path.placeholders:
            raise SettingError("broadcast", f"{{{placeholder}}} is not a placeholder of path "
                               f"{context.path.text!r}")
    return BroadcastTarget(
        channel=channel,
        client_publish=settings.get("client_publish", units.parse_bool, True),
        include_sender=settings.get("include_sender", units.parse_bool, False),
        max_send_buffer=settings.get("max_send_buffer", units.parse_size, 1024 * 1024),
        slow_consumer=settings.get("slow_consumer", units.choice("drop", "close"), "drop"),
        policy=ChannelPolicy(
            history=settings.get("history", units.bounded_int(0, 1_000_000), 0),
            history_ttl=settings.get("history_ttl", units.parse_duration, 0.0),
            presence=settings.get("presence", units.parse_bool, False),
            join_leave=settings.get("join_leave", units.parse_bool, False)),
    )


broadcast = TargetType("broadcast", ("broadcast", "client_publish", "include_sender",
                                     "max_send_buffer", "slow_consumer", "history",
                                     "history_ttl", "presence", "join_leave"), build)
