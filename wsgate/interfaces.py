"""The extension points of wsgate, as zope interfaces.

Implementations declare them with ``@implementer(...)``; the test suite calls
``verifyObject`` on each built-in one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from autobahn.websocket.protocol import PreparedMessage
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IProtocol

    from wsgate.policies import Allow, Close, Deny, PolicyContext, UpgradeRequest
    from wsgate.pubsub import Message
    from wsgate.routing import RouteMatch
    from wsgate.settings import Settings
    from wsgate.targets import Accepted, TargetContext


class IRouter(Interface):
    """Decides which route serves an upgrade request."""

    routes = Attribute("The routes this router knows, in matching order (for display).")

    def route(host: str, path: str, listener: str) -> RouteMatch | None:
        """Return the :class:`wsgate.routing.RouteMatch` for a request, or ``None``.

        *host* is the request's Host header as sent (the router strips the port
        and compares case-insensitively), *path* the request path without the
        query string, *listener* the name of the ``[listen:NAME]`` section the
        request arrived on. Synchronous; it must not block. An exception is
        answered with a 500 and logged; it never reaches the client.
        """


class IRouterFactory(Interface):
    """Builds an :class:`IRouter` from the routes of a config (``[wsgate] router``)."""

    name = Attribute("The name used in ``[wsgate] router = NAME``.")

    def __call__(routes: Sequence[Any]) -> IRouter:
        """Return an :class:`IRouter` for *routes* (a sequence of route configs)."""


class ISubscriber(Interface):
    """One local receiver of a broadcast channel (a WebSocket connection)."""

    conn_id = Attribute("The connection id, compared with a message's origin.")

    def deliver(message: Message, prepared: PreparedMessage) -> None:
        """Send *message* (a :class:`wsgate.pubsub.Message`) to this subscriber.

        *prepared* is the message framed once for every subscriber that shares
        its framing (an Autobahn ``PreparedMessage``). Must not raise and must
        not block: a subscriber that cannot keep up applies its own policy.
        """


class IBroker(Interface):
    """Channels shared by subscribers; the only shared state between processes."""

    state = Attribute('"up", "down" or "none" (in-process broker): for health checks.')

    def subscribe(channel: str, subscriber: ISubscriber) -> None:
        """Add *subscriber* (an :class:`ISubscriber`) to *channel*. Synchronous."""

    def unsubscribe(channel: str, subscriber: ISubscriber) -> None:
        """Remove *subscriber* from *channel*; unknown subscribers are ignored."""

    def publish(channel: str, message: Message) -> Deferred[int]:
        """Publish *message* to every subscriber of *channel* in every process.

        Returns a Deferred that fires with the number of receivers (local
        subscribers for the in-process broker, subscribed processes for Redis)
        or fails when the message could not be published.
        """


class IChannelHistory(IBroker):
    """A broker that records channels' history and knows their members (both built-in
    brokers; broadcast routes with ``history``, ``presence`` or the ``wsgate.v1.json``
    subprotocol need it). Positions are ``EPOCH:SEQ`` (:mod:`wsgate.pubsub.history`).
    A broker may also have ``ready(channel)``: a Deferred that fires once a new
    subscription of *channel* is in force, so that a history read after it misses
    nothing (the Redis broker's SUBSCRIBE is asynchronous)."""

    presence = Attribute("The channel members: ``join(channel, member)``, "
                         "``leave(channel, conn_id)``, ``members(channel, limit)``.")

    def configure(settings: object) -> None:
        """Use *settings* (a :class:`wsgate.pubsub.history.ChannelSettings`) to know what
        each channel keeps; called at start and on every reload."""

    def position(channel: str) -> Deferred[str | None]:
        """The channel's current position (None: it keeps no history). Makes no history."""

    def recover(channel: str, since: str | None, limit: int = 0) -> Deferred[object]:
        """A :class:`wsgate.pubsub.history.Recovery` of what followed *since* (None: all
        the channel keeps), at most *limit* messages (0: all). Fails while the store is
        unreachable. Makes no history."""


class IPolicy(Interface):
    """A check on the upgrade request, run before any 101 and before an upstream is contacted.

    Routes list policies (``policies = a, b``); they run in that order and a
    later policy sees the identity and the claims earlier ones set.

    Optional: a policy that decides on the ``Origin`` header itself sets
    ``checks_origin = True`` (the built-in ``origin`` type does); a route with
    such a policy, in enforce or shadow mode, then does not get the gateway's
    same-origin default (:mod:`wsgate.sameorigin`). A policy that decides on
    the request's ``channel`` sets ``needs_channel = True`` (the built-in
    ``channel`` type does): listing it on a route that is not a broadcast
    route is then a config error.
    """

    name = Attribute("The ``[policy:NAME]`` section name: the reason label of its denials.")
    mode = Attribute('"enforce", or "shadow": denials are logged and counted, not applied.')

    def check(
        request: UpgradeRequest,
    ) -> Allow | Deny | None | Deferred[Allow | Deny | None]:
        """Decide on *request* (a :class:`wsgate.policies.UpgradeRequest`).

        Return ``None`` or a :class:`wsgate.policies.Allow` (optionally with an
        identity and claims for the later policies, headers to forward
        upstream, client headers and query parameters the upstream must not
        see, and an :class:`IPolicySession` for the open connection), or a
        :class:`wsgate.policies.Deny` (status, reason, response headers); or a
        Deferred firing with one of these.
        Anything raised becomes a 500 with a generic body, logged once.
        """


class IPolicySession(Interface):
    """A policy's state for one allowed connection (per-message limits, counters)."""

    def message(
        direction: Literal["in", "out"], is_binary: bool, size: int,
    ) -> Close | Literal["drop"] | None:
        """Called for each message; *direction* is ``"in"`` (from the client) or ``"out"``.

        *size* is the payload size (for a proxied, fragmented message: its first
        frame). Return ``None`` to let it pass, :data:`wsgate.policies.DROP` to
        drop it, or a :class:`wsgate.policies.Close` to close the connection.
        Synchronous and cheap: it runs on the message path.
        """

    def closed() -> None:
        """Called once when the connection ends, or when the upgrade fails after
        this policy allowed it (release what ``check`` reserved)."""


class IPolicyFactory(Interface):
    """Makes policies of one ``type`` from their config sections (a plugin)."""

    name = Attribute("The ``type = NAME`` this factory serves.")
    keys = Attribute("The config keys this type accepts (besides type and mode).")

    def __call__(name: str, settings: Mapping[str, str], context: PolicyContext) -> IPolicy:
        """Return an :class:`IPolicy` for section ``[policy:name]``.

        *settings* maps the section's keys (only those in ``keys``) to raw
        strings; *context* is a :class:`wsgate.policies.PolicyContext` (clock,
        config directory, brokers). Raise
        :class:`wsgate.policies.PolicyConfigError` naming the key at fault.
        """


class ITarget(Interface):
    """What serves a route once the route and its policies accepted a request.

    Built-in: ``echo``, ``broadcast``, ``upstream`` (the proxy) and
    ``static``; plugins add their own (:class:`ITargetFactory`). The gateway
    has no other knowledge of what a target does: it routes, runs policies,
    and hands the connection over.
    """

    type = Attribute("The target type's name (echo, broadcast, upstream, static, a plugin's).")
    websocket = Attribute(
        "True: the route takes WebSocket upgrades (validated before the policies run); "
        "False: plain GET/HEAD requests (static files).")
    needs_shared_broker = Attribute(
        "True when its state lives in the broker (broadcast): several worker processes "
        "then need a Redis broker.")

    def describe() -> str:
        """One line for ``wsgate check``."""

    def accept(request: Accepted) -> IProtocol | Deferred[IProtocol]:
        """Take over an accepted request (a :class:`wsgate.targets.Accepted`).

        Return an ``IProtocol`` that will own the client's connection, or a
        Deferred firing with one (the proxy answers only once its upstream
        has). The gateway connects it to the client's transport and hands it
        every byte read so far, the request head included; if the client left
        meanwhile it gets ``connectionLost`` instead. Fail with
        :class:`wsgate.http.HttpRefusal` to answer with an HTTP error. Must
        not block; the Deferred must be cancellable (the client may leave).
        """


class ITargetFactory(Interface):
    """Makes targets of one type from a route section (a plugin, found like policies)."""

    name = Attribute("The type's name: a route selects it with ``target = NAME``.")
    keys = Attribute("The route keys this type reads (besides the routing keys).")

    def __call__(route: str, settings: Settings, context: TargetContext) -> ITarget:
        """Return an :class:`ITarget` for route *route* (its section name).

        *settings* is a :class:`wsgate.settings.Settings` over this type's
        keys; *context* a :class:`wsgate.targets.TargetContext` (the route's
        path pattern, the config folder). Raise
        :class:`wsgate.settings.SettingError` naming the key at fault.
        """


class IWebSocketConnection(Interface):
    """A terminated WebSocket as an application sees it (wsgate speaks the protocol)."""

    connection = Attribute("Its bookkeeping: ``conn_id``, ``route``, ``client``, ``identity``.")
    params = Attribute("The route's path placeholders, e.g. ``{'room': 'lobby'}``.")
    broker = Attribute("The process's :class:`IBroker` (channels shared with other processes).")
    send_buffer = Attribute(
        "Its :class:`wsgate.flow.SendBuffer`: ``blocked`` while the client's socket is "
        "full, ``over_limit`` while the client is not read because ``max_send_buffer`` "
        "bytes wait behind it.")

    def send(payload: bytes, is_binary: bool) -> None:
        """Send one message (counted, subject to per-message policies)."""

    def close_with(code: int, reason: str) -> None:
        """Close with any code valid on the wire; *reason* is cut to 123 bytes."""


class IWebSocketApp(Interface):
    """The behaviour of one terminated WebSocket (echo, a broadcast subscriber, a plugin's).

    wsgate speaks the protocol, enforces the listener's and route's limits and
    runs the per-message policies; the app only sees whole messages.
    Everything it sends goes through the connection's send buffer, so a
    client that does not read stops being read (no app can pile up output).
    """

    max_send_buffer = Attribute("Unsent bytes beyond which the client is not read.")

    def opened(connection: IWebSocketConnection) -> None:
        """*connection* (an :class:`IWebSocketConnection`) is open."""

    def message(connection: IWebSocketConnection, payload: bytes, is_binary: bool) -> None:
        """One whole message from the client."""

    def closed(connection: IWebSocketConnection) -> None:
        """The connection ended (once, whoever closed it)."""
