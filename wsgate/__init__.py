"""wsgate: a WebSocket gateway on Twisted and Autobahn."""

__version__ = "0.1.0"
