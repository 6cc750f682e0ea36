#!/usr/bin/env python3
"""A naive broadcast server on Twisted + Autobahn (the fan-out scenario's baseline).

Every message a client sends goes to every other open client with one
``sendMessage`` call per subscriber (framed again for each). Stock Autobahn
settings, auto-ping off. Prints {"listening": PORT}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import serve  # noqa: E402

from twisted.internet import epollreactor  # noqa: E402

epollreactor.install()

from autobahn.twisted.websocket import (  # noqa: E402
    WebSocketServerFactory,
    WebSocketServerProtocol,
)

CLIENTS = set()


class Subscriber(WebSocketServerProtocol):
    def onOpen(self):
        CLIENTS.add(self)

    def onClose(self, wasClean, code, reason):
        CLIENTS.discard(self)

    def onMessage(self, payload, isBinary):
        for client in CLIENTS:
            if client is not self:
                client.sendMessage(payload, isBinary)


def main():
    factory = WebSocketServerFactory()
    factory.protocol = Subscriber
    serve(factory)


if __name__ == "__main__":
    main()
