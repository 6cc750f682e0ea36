"""One worker process of ``[wsgate] workers = N``, started by :mod:`wsgate.pool`, not by hand.

usage: python -m wsgate.worker --config FILE --index I --control SOCKET
                               --listen NAME=FD:FAMILY [--listen ...]

A worker is a :class:`wsgate.service.GatewayService` that adopts the listening
sockets its parent bound (inherited descriptors *FD*, address family *FAMILY*)
instead of binding them, answers the parent's admin endpoint on the UNIX
socket *SOCKET*, and tags its log records with ``node_id``-w*I*. It handles
SIGTERM and SIGHUP as a single gateway process does (drain, reload), and gets
SIGTERM when the parent dies. A bad config is one line on standard error and
exit status 1.
"""

import argparse
import ctypes
import signal
import sys


def _die_with_parent():
    """Linux: get SIGTERM if the parent dies, so no worker outlives it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _adopted(listen):
    """``["NAME=FD:FAMILY", ...]`` → ``{name: (fd, family)}``."""
    adopted = {}
    for item in listen:
        name, _, rest = item.partition("=")
        fd, _, family = rest.partition(":")
        adopted[name] = (int(fd), int(family))
    return adopted


def main(argv=None):
    """Run the worker until it is stopped; return the exit status."""
    parser = argparse.ArgumentParser(prog="wsgate.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--listen", action="append", default=[])
    args = parser.parse_args(argv)
    _die_with_parent()

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from wsgate import observe, startup
    from wsgate.config import ConfigError, load
    from wsgate.service import GatewayService

    try:
        config = load(args.config)
    except ConfigError as e:
        startup.fail(str(e))
    node = f"{config.core.node_id}-w{args.index}"
    observer = startup.log_observer(config, node) or observe.text_observer()
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    gateway_service = GatewayService(config, adopted=_adopted(args.listen),
                                     worker_index=args.index, control=args.control)
    gateway_service.privilegedStartService()
    gateway_service.startService()
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
