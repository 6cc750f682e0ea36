#!/usr/bin/env python3
"""A naive two-leg WebSocket relay on Twisted + Autobahn (the proxy scenario's baseline).

usage: naive_relay.py UPSTREAM_URL

An Autobahn server that opens an Autobahn client to UPSTREAM_URL for each
client and relays every message both ways with ``sendMessage``: both legs are
fully parsed, unmasked, validated, re-framed (and re-masked towards the
upstream). Messages a client sends before its upstream is open are queued.
Stock Autobahn settings, auto-ping off. Prints {"listening": PORT}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import serve  # noqa: E402

from twisted.internet import epollreactor  # noqa: E402

epollreactor.install()

from autobahn.twisted.websocket import (  # noqa: E402
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
    connectWS,
)

UPSTREAM = sys.argv[1]


class UpstreamLeg(WebSocketClientProtocol):
    def onOpen(self):
        client = self.factory.client
        client.upstream = self
        for payload, is_binary in client.queue:
            self.sendMessage(payload, is_binary)
        client.queue = None

    def onMessage(self, payload, isBinary):
        self.factory.client.sendMessage(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        client = self.factory.client
        client.upstream = None
        if client.state == client.STATE_OPEN:
            client.sendClose(1000)


class ClientLeg(WebSocketServerProtocol):
    upstream = None

    def onOpen(self):
        self.queue = []
        factory = WebSocketClientFactory(UPSTREAM)
        factory.protocol = UpstreamLeg
        factory.client = self
        connectWS(factory)

    def onMessage(self, payload, isBinary):
        if self.upstream is not None:
            self.upstream.sendMessage(payload, isBinary)
        elif self.queue is not None:
            self.queue.append((payload, isBinary))

    def onClose(self, wasClean, code, reason):
        upstream = self.upstream
        self.upstream = None
        if upstream is not None and upstream.state == upstream.STATE_OPEN:
            upstream.sendClose(1000)


def main():
    factory = WebSocketServerFactory()
    factory.protocol = ClientLeg
    serve(factory)


if __name__ == "__main__":
    main()
