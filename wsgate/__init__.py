"""wsgate: a WebSocket gateway on Twisted and Autobahn."""

__version__ = "0.1.0"

# Where ``twistd wsgate`` and the ``wsgate`` command look for the config by default.
DEFAULT_CONFIG = "/etc/wsgate/wsgate.ini"
