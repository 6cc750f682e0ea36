"""``target = roomcount``: an example third-party wsgate route target.

A small WebSocket application that wsgate runs the way it runs its own echo
and broadcast routes (it speaks the protocol, enforces the limits, runs the
route's policies, counts): every client of a room is told on arrival how
many are online, and every text message gets a reply with that count and a
sequence number. ``max_online`` (optional) closes newcomers with 1013 when
the room is full. Everything it uses is wsgate's public plugin API:
``IWebSocketApp``/``ITargetFactory`` from ``wsgate.interfaces``,
``ApplicationTarget`` from ``wsgate.targets.websocket`` and ``IPlugin`` from
``twisted.plugin``; a key's bad value is reported by ``settings.get`` as a
``wsgate.settings.SettingError`` naming the key.

[route:rooms]
path = /rooms/{room}
target = roomcount
max_online = 100
"""

import json

from twisted.plugin import IPlugin
from zope.interface import implementer

from wsgate.interfaces import ITargetFactory, IWebSocketApp
from wsgate.targets.websocket import ApplicationTarget


@implementer(IWebSocketApp)
class RoomCountApp:
    """One client of a room; *rooms* maps a room to its open connections (this process)."""

    def __init__(self, rooms, room, max_online, max_send_buffer):
        self.rooms, self.room, self.max_online = rooms, room, max_online
        self.max_send_buffer = max_send_buffer
        self.seq = 0

    def opened(self, connection):
        members = self.rooms.setdefault(self.room, set())
        if self.max_online and len(members) >= self.max_online:
            connection.close_with(1013, "room full")
            return
        members.add(connection)
        self._send(connection, {"type": "welcome", "room": self.room, "online": len(members)})

    def message(self, connection, payload, is_binary):
        if is_binary:
            connection.close_with(1003, "text only")
            return
        self.seq += 1
        self._send(connection, {"type": "reply", "seq": self.seq, "online": self._online(),
                                "text": payload.decode("utf-8")})

    def closed(self, connection):
        members = self.rooms.get(self.room)
        if members is not None:
            members.discard(connection)
            if not members:
                del self.rooms[self.room]

    def _online(self):
        return len(self.rooms.get(self.room, ()))

    @staticmethod
    def _send(connection, document):
        # Everything sent goes through the connection's send buffer: a client
        # that does not read is not read either (the app cannot pile up output).
        connection.send(json.dumps(document).encode("utf-8"), False)


@implementer(IPlugin, ITargetFactory)
class RoomCountFactory:
    name = "roomcount"  # target = roomcount
    keys = ("max_online", "max_send_buffer")  # other keys are config errors

    def __call__(self, route, settings, context):
        max_online = settings.get("max_online", _count, 0)
        max_send_buffer = settings.get("max_send_buffer", _count, 1024 * 1024)
        room_of = "room" if "room" in context.path.placeholders else None
        rooms = {}

        def make_app(request):
            room = request.match.params[room_of] if room_of else route
            return RoomCountApp(rooms, room, max_online, max_send_buffer)

        limit = f", at most {max_online} online" if max_online else ""
        return ApplicationTarget("roomcount", f"roomcount{limit}", make_app,
                                 max_send_buffer=max_send_buffer)


def _count(text):
    value = int(text)
    if value < 0:
        raise ValueError(f"expected a whole number of 0 or more, got {text!r}")
    return value


roomcount = RoomCountFactory()
