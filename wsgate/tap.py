"""``twistd wsgate``: command-line options and the service tree.

``makeService`` loads and validates the config; a bad config or a port that
cannot be bound prints one line (``wsgate: ...``) and exits 1, without a
traceback and without twistd's usage text.
"""

import sys

from twisted.python import usage

DEFAULT_CONFIG = "/etc/wsgate/wsgate.ini"


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the wsgate WebSocket gateway. Everything is set in the config "
        "file: listeners, TLS, routes and limits (see etc/wsgate.ini for every "
        "key, documented). Example: twistd -n wsgate --config etc/wsgate.ini")
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "The config file (INI)."],
    ]


def fail(message):
    """Print one line to standard error and exit 1 (start-up errors)."""
    # twistd redirects sys.stderr into the log once logging starts; the
    # operator should see the line on the real standard error.
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"wsgate: {message}\n")
    stream.flush()
    raise SystemExit(1)


def makeService(options):
    from wsgate.config import ConfigError, load
    from wsgate.service import GatewayService

    try:
        config = load(options["config"])
    except ConfigError as e:
        fail(str(e))
    if config.core.workers > 1:
        from wsgate.workers import WorkerPool

        return WorkerPool(config)
    return GatewayService(config)
