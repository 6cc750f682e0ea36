"""The in-process broker: channels live in this process only."""

from twisted.internet import defer
from zope.interface import implementer

from wsgate.interfaces import IBroker
from wsgate.pubsub import LocalFanout


@implementer(IBroker)
class MemoryBroker:
    """Publishing delivers synchronously to this process's subscribers."""

    state = "none"

    def __init__(self):
        self.local = LocalFanout()

    def subscribe(self, channel, subscriber):
        self.local.add(channel, subscriber)

    def unsubscribe(self, channel, subscriber):
        self.local.remove(channel, subscriber)

    def publish(self, channel, message):
        return defer.succeed(self.local.fan_out(channel, message))
