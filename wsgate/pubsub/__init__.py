"""Broadcast channels: the message type and the local fan-out shared by every broker.

A broker moves messages between processes (or not, for the in-process one);
:class:`LocalFanout` delivers what reaches this process to its local
subscribers, framing each message once for all of them.
"""

from dataclasses import dataclass

from autobahn.websocket.protocol import PreparedMessage


@dataclass(frozen=True)
class Message:
    """One broadcast message. *origin_conn* lets a sender skip its own messages."""

    payload: bytes
    is_binary: bool
    origin_node: str = ""
    origin_conn: str = ""


class LocalFanout:
    """This process's subscribers per channel.

    ``add`` and ``remove`` return whether the channel just gained its first or
    lost its last local subscriber, which is when a shared broker subscribes
    or unsubscribes.
    """

    def __init__(self):
        self._channels = {}
        self._snapshots = {}  # channel -> tuple of its subscribers, until one comes or goes

    def add(self, channel, subscriber):
        subscribers = self._channels.setdefault(channel, {})
        first = not subscribers
        subscribers[subscriber] = None
        self._snapshots.pop(channel, None)
        return first

    def remove(self, channel, subscriber):
        subscribers = self._channels.get(channel)
        if subscribers is None or subscriber not in subscribers:
            return False
        del subscribers[subscriber]
        self._snapshots.pop(channel, None)
        if not subscribers:
            del self._channels[channel]
            return True
        return False

    def channels(self):
        return list(self._channels)

    def fan_out(self, channel, message):
        """Hand *message* to every local subscriber of *channel*; return how many."""
        # A snapshot: a delivery may close a subscriber, which unsubscribes it.
        subscribers = self._snapshots.get(channel)
        if subscribers is None:
            if channel not in self._channels:
                return 0
            subscribers = self._snapshots[channel] = tuple(self._channels[channel])
        prepared = PreparedMessage(message.payload, message.is_binary, False, False)
        for subscriber in subscribers:
            subscriber.deliver(message, prepared)
        return len(subscribers)
