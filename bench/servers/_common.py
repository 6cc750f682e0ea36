"""Shared bits of the benchmark's Python peer servers (not part of wsgate)."""

import json
import resource
import sys


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def announce(port, **extra):
    """Tell bench/run.py the port: one JSON line on stdout."""
    sys.stdout.write(json.dumps({"listening": port, **extra}) + "\n")
    sys.stdout.flush()


def serve(factory):
    """Listen on a free loopback port (the file limit raised), announce it, run the reactor.

    Import this module before installing the epoll reactor; the reactor is
    imported here only when called.
    """
    from twisted.internet import reactor

    raise_nofile()
    port = reactor.listenTCP(0, factory, backlog=4096, interface="127.0.0.1")
    announce(port.getHost().port)
    reactor.run()
