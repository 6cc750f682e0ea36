"""Bounds on what one client connection may make the gateway hold or do.

Plain objects with no Autobahn in them, so they are tested on a ``Clock``
and a ``StringTransport``:

* :class:`SendBuffer` bounds the client's unsent output: beyond a limit the
  gateway stops reading that client until it drains (a client that never
  reads cannot make an echo, its own broadcasts or its pongs pile up);
* :class:`ControlFrameRate` bounds how many control frames (pings, pongs)
  a client may send per second (ping floods).
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer, IReactorTime
from zope.interface import implementer


@implementer(IPushProducer)
class SendBuffer:
    """The client's unsent output, as far as the gateway can tell, and the reading pause it implies.

    Registered as the streaming producer of the client's transport. Twisted
    calls :meth:`pauseProducing` when the transport's write buffer is over
    its own threshold (64 KiB for TCP) and :meth:`resumeProducing` when it
    drained. While paused, every byte the gateway writes is counted by
    :meth:`wrote`; once more than *limit* bytes have been written into the
    full buffer, the client's transport stops being read until the buffer
    drains, so what the gateway holds for one client is bounded by Twisted's
    threshold + *limit* + one write, whatever the client sends.

    *listener* (an ``IPushProducer``, e.g. a broadcast subscriber that queues
    its deliveries) is told of the same pauses. Only one producer can be
    registered on a transport: anything that wants to know goes through here.
    """

    __slots__ = ("transport", "limit", "listener", "blocked", "backlog", "reading_paused")

    def __init__(self, transport: IPushProducer, limit: int,
                 listener: IPushProducer | None = None):
        self.transport = transport
        self.limit = limit
        self.listener = listener
        self.blocked: bool = False  # the transport's write buffer is over its threshold
        self.backlog: int = 0  # bytes written while blocked
        self.reading_paused: bool = False  # the client is not read until the buffer drains

    def wrote(self, size: int) -> None:
        """Count *size* bytes just written to the transport (cheap when not blocked)."""
        if self.blocked:
            self.backlog += size
            if self.backlog > self.limit and not self.reading_paused:
                self.reading_paused = True
                self.transport.pauseProducing()

    @property
    def over_limit(self) -> bool:
        """True while the client is not read because its output is stuck."""
        return self.reading_paused

    def pauseProducing(self) -> None:
        self.blocked = True
        if self.listener is not None:
            self.listener.pauseProducing()

    def resumeProducing(self) -> None:
        self.blocked = False
        self.backlog = 0
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resumeProducing()
        if self.listener is not None:
            self.listener.resumeProducing()

    def stopProducing(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.stopProducing()


class ControlFrameRate:
    """At most *limit* control frames per one-second window (a fixed window: cheap, and
    a flood is many times the limit, so the window's edges do not matter)."""

    __slots__ = ("limit", "clock", "window", "count")

    def __init__(self, limit: int, clock: IReactorTime):
        self.limit = limit
        self.clock = clock
        self.window = -1
        self.count = 0

    def allow(self) -> bool:
        """Count one control frame; False once the current second has seen more than *limit*."""
        window = int(self.clock.seconds())
        if window != self.window:
            self.window, self.count = window, 0
        self.count += 1
        return self.count <= self.limit
