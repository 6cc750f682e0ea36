"""``echo = yes``: every message is sent back, text as text and binary as binary."""

from zope.interface import implementer

from wsgate import units
from wsgate.interfaces import IWebSocketApp
from wsgate.settings import SettingError
from wsgate.targets import TargetType
from wsgate.targets.websocket import DEFAULT_MAX_SEND_BUFFER, ApplicationTarget


@implementer(IWebSocketApp)
class EchoApp:
    """Sends every message back, text as text and binary as binary.

    A client that sends and never reads is not read beyond *max_send_buffer*
    bytes of unsent echoes (the connection's :class:`wsgate.flow.SendBuffer`).
    """

    def __init__(self, max_send_buffer):
        self.max_send_buffer = max_send_buffer

    def opened(self, connection):
        pass

    def message(self, connection, payload, is_binary):
        connection.send(payload, is_binary)

    def closed(self, connection):
        pass


def build(route, settings, context):
    if not settings.get("echo", units.parse_bool):
        raise SettingError("echo", "expected yes (set another target to turn echo off)")
    max_send_buffer = settings.get("max_send_buffer", units.parse_size,
                                   DEFAULT_MAX_SEND_BUFFER)
    return ApplicationTarget("echo", "echo", lambda request: EchoApp(max_send_buffer),
                             max_send_buffer=max_send_buffer)


echo = TargetType("echo", ("echo", "max_send_buffer"), build)
