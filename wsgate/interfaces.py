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
