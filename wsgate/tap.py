"""``twistd wsgate``: command-line options and the service tree.

``makeService`` loads and validates the config and returns the root service:
:class:`wsgate.service.GatewayService` (one process) or, with ``workers`` > 1,
:class:`wsgate.pool.WorkerPool`. A bad config, or a port that cannot be bound,
prints one line (``wsgate: ...``) and exits 1, without a traceback and without
twistd's usage text. Nothing in wsgate imports this module.
"""

from twisted.python import usage

from wsgate import DEFAULT_CONFIG


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the wsgate WebSocket gateway. Everything is set in the config "
        "file: listeners, TLS, routes and limits (see etc/wsgate.ini for every "
        "key, documented). Example: twistd -n wsgate --config etc/wsgate.ini")
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "The config file (INI)."],
    ]


def makeService(options):
    """The root service for ``options["config"]``; exits 1 with one line on a bad config.

    The gateway modules are imported here, not at the top: twistd imports this
    module to parse the options (``twistd wsgate --help`` too), and the gateway
    (reactor, Autobahn, TLS) is needed only once there is a config to run.
    """
    from wsgate.config import ConfigError, load
    from wsgate.startup import fail

    try:
        config = load(options["config"])
    except ConfigError as e:
        fail(str(e))
    if config.core.workers > 1:
        from wsgate.pool import WorkerPool

        return WorkerPool(config)
    from wsgate.service import GatewayService

    return GatewayService(config)
