"""The extension points of wsgate, as zope interfaces.

Implementations declare them with ``@implementer(...)``; the test suite calls
``verifyObject`` on each built-in one.
"""

from zope.interface import Attribute, Interface


class IRouter(Interface):
    """Decides which route serves an upgrade request."""

    routes = Attribute("The routes this router knows, in matching order (for display).")

    def route(host, path, listener):
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

    def __call__(routes):
        """Return an :class:`IRouter` for *routes* (a sequence of route configs)."""


class ISubscriber(Interface):
    """One local receiver of a broadcast channel (a WebSocket connection)."""

    conn_id = Attribute("The connection id, compared with a message's origin.")

    def deliver(message, prepared):
        """Send *message* (a :class:`wsgate.pubsub.Message`) to this subscriber.

        *prepared* is the message framed once for every subscriber that shares
        its framing (an Autobahn ``PreparedMessage``). Must not raise and must
        not block: a subscriber that cannot keep up applies its own policy.
        """


class IBroker(Interface):
    """Channels shared by subscribers; the only shared state between processes."""

    state = Attribute('"up", "down" or "none" (in-process broker): for health checks.')

    def subscribe(channel, subscriber):
        """Add *subscriber* (an :class:`ISubscriber`) to *channel*. Synchronous."""

    def unsubscribe(channel, subscriber):
        """Remove *subscriber* from *channel*; unknown subscribers are ignored."""

    def publish(channel, message):
        """Publish *message* to every subscriber of *channel* in every process.

        Returns a Deferred that fires with the number of receivers (local
        subscribers for the in-process broker, subscribed processes for Redis)
        or fails when the message could not be published.
        """


class IPolicy(Interface):
    """A check on the upgrade request, run before any 101 and before an upstream is contacted.

    Routes list policies (``policies = a, b``); they run in that order and a
    later policy sees the identity an earlier one set.
    """

    name = Attribute("The ``[policy:NAME]`` section name: the reason label of its denials.")
    mode = Attribute('"enforce", or "shadow": denials are logged and counted, not applied.')

    def check(request):
        """Decide on *request* (a :class:`wsgate.policies.UpgradeRequest`).

        Return ``None`` or a :class:`wsgate.policies.Allow` (optionally with an
        identity, headers to forward upstream and an :class:`IPolicySession`
        for the open connection), or a :class:`wsgate.policies.Deny` (status,
        reason, response headers); or a Deferred firing with one of these.
        Anything raised becomes a 500 with a generic body, logged once.
        """


class IPolicySession(Interface):
    """A policy's state for one allowed connection (per-message limits, counters)."""

    def message(direction, is_binary, size):
        """Called for each message; *direction* is ``"in"`` (from the client) or ``"out"``.

        *size* is the payload size (for a proxied, fragmented message: its first
        frame). Return ``None`` to let it pass, :data:`wsgate.policies.DROP` to
        drop it, or a :class:`wsgate.policies.Close` to close the connection.
        Synchronous and cheap: it runs on the message path.
        """

    def closed():
        """Called once when the connection ends, or when the upgrade fails after
        this policy allowed it (release what ``check`` reserved)."""


class IPolicyFactory(Interface):
    """Makes policies of one ``type`` from their config sections (a plugin)."""

    name = Attribute("The ``type = NAME`` this factory serves.")
    keys = Attribute("The config keys this type accepts (besides type and mode).")

    def __call__(name, settings, context):
        """Return an :class:`IPolicy` for section ``[policy:name]``.

        *settings* maps the section's keys (only those in ``keys``) to raw
        strings; *context* is a :class:`wsgate.policies.PolicyContext` (clock,
        config directory, brokers). Raise
        :class:`wsgate.policies.PolicyConfigError` naming the key at fault.
        """
