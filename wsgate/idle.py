"""The idle timeout shared by terminated and proxied connections."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class IdleTimer:
    """Calls *on_idle* once no ``touch()`` came for *timeout* seconds (0: never).

    One DelayedCall per connection, reset (not re-created) on activity.
    """

    __slots__ = ("clock", "timeout", "on_idle", "_call")

    def __init__(self, clock: IReactorTime, timeout: float, on_idle: Callable[[], object]):
        self.clock, self.timeout, self.on_idle = clock, timeout, on_idle
        self._call: IDelayedCall | None = None

    def touch(self) -> None:
        """Activity: the timeout starts again."""
        if not self.timeout:
            return
        if self._call is not None and self._call.active():
            self._call.reset(self.timeout)
        else:
            self._call = self.clock.callLater(self.timeout, self._fire)

    def _fire(self) -> None:
        self._call = None
        self.on_idle()

    def cancel(self) -> None:
        """The connection is over: no call to *on_idle* from now on."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class _RouteTimeout(Protocol):
    @property
    def idle_timeout(self) -> float | None: ...


class _ListenerTimeout(Protocol):
    @property
    def idle_timeout(self) -> float: ...


def idle_timeout(route: _RouteTimeout, listener: _ListenerTimeout) -> float:
    """A route's idle_timeout, or its listener's."""
    return route.idle_timeout if route.idle_timeout is not None else listener.idle_timeout
