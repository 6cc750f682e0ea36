#!/usr/bin/env python3
"""A bare Twisted + Autobahn echo server: stock settings, auto-ping off.

usage: autobahn_echo.py [--ping SECONDS]

Listens on 127.0.0.1, port 0, and prints {"listening": PORT}. Any path is
accepted (Autobahn does not route). ``--ping 30`` turns Autobahn's auto-ping on
(interval 30 s, timeout 10 s) for the idle-memory scenario.
"""

import argparse
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


class Echo(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ping", type=float, default=0)
    args = parser.parse_args()
    factory = WebSocketServerFactory()
    factory.protocol = Echo
    if args.ping:
        factory.setProtocolOptions(autoPingInterval=args.ping, autoPingTimeout=10)
    serve(factory)


if __name__ == "__main__":
    main()
