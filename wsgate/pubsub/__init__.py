"""Broadcast channels: the message type and the local fan-out shared by every broker.

A broker moves messages between processes (or not, for the in-process one);
:class:`LocalFanout` delivers what reaches this process to its local
subscribers, framing each message once for all of them.
"""

import base64
import json
from dataclasses import dataclass

from autobahn.websocket.protocol import PreparedMessage


@dataclass(frozen=True)
class Message:
    """One broadcast message. *origin_conn* lets a sender skip its own messages.

    *pos* is its position in the channel's history (``EPOCH:SEQ``; None when the
    channel keeps none, or a publisher wrote to Redis directly). A *control*
    message (join, leave) is JSON for ``wsgate.v1.json`` clients only: never
    recorded, never sent to plain clients.
    """

    payload: bytes
    is_binary: bool
    origin_node: str = ""
    origin_conn: str = ""
    pos: str = None
    control: bool = False


def json_delivery(message):
    """The ``wsgate.v1.json`` text of a delivery: ``{"pos", "data"}``, or ``"b64"`` in
    place of ``data`` for a binary message."""
    if message.is_binary:
        body = {"pos": message.pos, "b64": base64.b64encode(message.payload).decode()}
    else:
        body = {"pos": message.pos, "data": message.payload.decode("utf-8", "replace")}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


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

    def count(self, channel):
        """How many local subscribers *channel* has."""
        return len(self._channels.get(channel, ()))

    def counts(self):
        return {channel: len(subscribers) for channel, subscribers in self._channels.items()}

    def fan_out(self, channel, message):
        """Hand *message* to every local subscriber of *channel*; return how many.

        Plain subscribers get the message framed once for all of them;
        ``wsgate.v1.json`` subscribers (``wants_json``) its JSON delivery, framed
        once for all of them too; control messages go to those only.
        """
        # A snapshot: a delivery may close a subscriber, which unsubscribes it.
        snapshot = self._snapshots.get(channel)
        if snapshot is None:
            if channel not in self._channels:
                return 0
            subscribers = tuple(self._channels[channel])
            snapshot = self._snapshots[channel] = (
                tuple(s for s in subscribers if not getattr(s, "wants_json", False)),
                tuple(s for s in subscribers if getattr(s, "wants_json", False)))
        plain, structured = snapshot
        if message.control:
            prepared = PreparedMessage(message.payload, False, False, False)
            for subscriber in structured:
                subscriber.deliver(message, prepared)
            return len(structured)
        if plain:
            prepared = PreparedMessage(message.payload, message.is_binary, False, False)
            for subscriber in plain:
                subscriber.deliver(message, prepared)
        if structured:
            prepared = PreparedMessage(json_delivery(message), False, False, False)
            for subscriber in structured:
                subscriber.deliver(message, prepared)
        return len(plain) + len(structured)
