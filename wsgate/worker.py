"""One worker process of ``[wsgate] workers = N`` (started by wsgate.workers, not by hand).

usage: python -m wsgate.worker --config FILE --index I --control SOCKET
                               --listen NAME=FD:FAMILY [--listen ...]
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="wsgate.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--listen", action="append", default=[])
    args = parser.parse_args(argv)
    _die_with_parent()

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from wsgate import observe
    from wsgate.config import ConfigError, load
    from wsgate.service import GatewayService

    try:
        config = load(args.config)
    except ConfigError as e:
        sys.stderr.write(f"wsgate: {e}\n")
        return 1
    adopted = {}
    for item in args.listen:
        name, _, rest = item.partition("=")
        fd, _, family = rest.partition(":")
        adopted[name] = (int(fd), int(family))
    node = f"{config.core.node_id}-w{args.index}"
    observer = (observe.json_observer(node) if config.core.log_format == "json"
                else observe.text_observer())
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    gateway_service = GatewayService(config, adopted=adopted, worker_index=args.index,
                                     control=args.control)
    gateway_service.privilegedStartService()
    gateway_service.startService()
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
