"""One write per connection per reactor iteration for broadcast deliveries.

Why: a fan-out hands the same pre-framed message to thousands of
connections. Written one by one through Twisted's buffered write, every
delivery costs a buffer append, an ``epoll_ctl`` to watch for writability, a
writable event in the next iteration and another ``epoll_ctl`` to stop
watching; written at once, every delivery costs a ``send``. Collected per
connection instead and written when the iteration's events are handled,
a burst of messages leaves in one ``send`` per connection (measured in
``bench/``: "fan-out, bursts").

:class:`IterationFlusher` only schedules; the objects it flushes own their
pending bytes (see ``BroadcastSession``) and keep these promises:

* bytes queued for a connection reach it in the order queued, at the latest
  when the reactor next runs its timed calls (a ``callLater(0)``);
* anything else written to that connection writes the queued bytes first,
  so frames keep their order (wsgate's fast protocol does so in ``sendData``,
  which every control frame, close included, goes through);
* flow control stays the transport's: a write the socket does not take is
  buffered by Twisted, which pauses the registered producer as usual.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Flushable(Protocol):
    """What :class:`IterationFlusher` flushes: an object that holds pending bytes."""

    def flush(self) -> None:
        """Write the pending bytes (none left afterwards); called once per mark."""


class IterationFlusher:
    """Calls ``flush()`` once, early in the next reactor iteration, on each object marked."""

    __slots__ = ("_clock", "_dirty", "_call")

    def __init__(self, clock: IReactorTime):
        self._clock = clock
        self._dirty: list[Flushable] = []
        self._call: IDelayedCall | None = None

    def mark(self, flushable: Flushable) -> None:
        """Flush *flushable* soon. Mark it only when its pending bytes go from none to some."""
        self._dirty.append(flushable)
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Flush every object marked so far (an object flushed meanwhile has nothing left)."""
        self._call = None
        dirty, self._dirty = self._dirty, []
        for flushable in dirty:
            flushable.flush()
