"""The config file: :func:`load` = :func:`~wsgate.config.parse.parse` (INI → plain,
validated data) then :func:`~wsgate.config.build.build` (data → TLS contexts, policies,
routers' lookups and targets, with the reactor passed in).

Every error is a :class:`ConfigError` whose text names the file, the section,
the key and what was expected, so start-up can print it as one line and exit 1.
"""

from wsgate.config.build import build
from wsgate.config.model import (
    AdminSettings,
    BrokerSettings,
    Config,
    ConfigError,
    CoreSettings,
    ListenerSettings,
    RouteSettings,
    TLSFiles,
)
from wsgate.config.parse import parse


def load(path, reactor=None):
    """Parse and build the config file at *path*; raise :class:`ConfigError`.

    *reactor* is what time-keeping policies use (default: the global reactor).
    """
    if reactor is None:
        from twisted.internet import reactor
    return build(parse(path), reactor)


__all__ = ["load", "parse", "build", "ConfigError", "Config", "CoreSettings", "AdminSettings",
           "BrokerSettings", "ListenerSettings", "RouteSettings", "TLSFiles"]
