"""The in-process broker: channels, their history and presence live in this process only."""

import dataclasses

from twisted.internet import defer
from zope.interface import implementer

from wsgate.interfaces import IChannelHistory
from wsgate.pubsub import LocalFanout
from wsgate.pubsub.history import ChannelSettings, MemoryHistory
from wsgate.pubsub.presence import MemoryPresence


@implementer(IChannelHistory)
class MemoryBroker:
    """Publishing records the message (channels with history) and delivers it
    synchronously to this process's subscribers."""

    state = "none"

    def __init__(self, clock=None, settings=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.local = LocalFanout()
        self.history = MemoryHistory(clock, settings)
        self.presence = MemoryPresence()

    def configure(self, settings: ChannelSettings):
        """Which channels keep history (the config in force; SIGHUP changes it)."""
        self.history.settings = settings

    def subscribe(self, channel, subscriber):
        self.local.add(channel, subscriber)

    def unsubscribe(self, channel, subscriber):
        self.local.remove(channel, subscriber)

    def publish(self, channel, message):
        if not message.control:
            pos = self.history.append(channel, message)
            if pos is not None:
                message = dataclasses.replace(message, pos=pos)
        return defer.succeed(self.local.fan_out(channel, message))

    def position(self, channel):
        """A Deferred: the channel's current position (None: it keeps no history)."""
        return defer.succeed(self.history.position(channel))

    def recover(self, channel, since, limit=0):
        """A Deferred :class:`wsgate.pubsub.history.Recovery` of what followed *since*."""
        return defer.succeed(self.history.since(channel, since, limit))
