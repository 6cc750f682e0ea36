"""The idle timeout shared by terminated and proxied connections."""


class IdleTimer:
    """Calls *on_idle* once no ``touch()`` came for *timeout* seconds (0: never).

    One DelayedCall per connection, reset (not re-created) on activity.
    """

    __slots__ = ("clock", "timeout", "on_idle", "_call")

    def __init__(self, clock, timeout, on_idle):
        self.clock, self.timeout, self.on_idle = clock, timeout, on_idle
        self._call = None

    def touch(self):
        if not self.timeout:
            return
        if self._call is not None and self._call.active():
            self._call.reset(self.timeout)
        else:
            self._call = self.clock.callLater(self.timeout, self._fire)

    def _fire(self):
        self._call = None
        self.on_idle()

    def cancel(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def idle_timeout(route, listener):
    """A route's idle_timeout, or its listener's."""
    return route.idle_timeout if route.idle_timeout is not None else listener.idle_timeout
