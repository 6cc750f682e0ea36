"""The settings a config file holds, as frozen dataclasses, and the error that names where
a config is wrong. Everything downstream reads these, never raw strings."""

from dataclasses import dataclass, field

from wsgate import sameorigin
from wsgate.routing import HostPattern, PathPattern


class ConfigError(Exception):
    """A config problem, printed as ``<file>: [section] key: message``."""

    def __init__(self, path, section, key, message):
        self.path, self.section, self.key, self.message = path, section, key, message
        where = f"[{section}]" if section else ""
        if key:
            where += f" {key}"
        super().__init__(f"{path}: {where}: {message}" if where else f"{path}: {message}")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class CoreSettings:
    """``[wsgate]``: process-wide settings."""

    node_id: str
    log_format: str = "text"
    max_connections: int = 50000
    max_history_channels: int = 10000  # channels with history kept (least recent go first)
    broker: str = None  # the [broker:NAME] broadcast routes use; None: in-process
    drain_timeout: float = 30.0
    drain_delay: float = 0.0  # after SIGTERM, seconds of 503s on open listeners before the drain
    ready_requires_broker: bool = False  # /readyz is 503 while the broker is down
    log_messages: bool = False
    metrics: bool = True
    fast_paths: bool = True
    workers: int = 1
    router: str = "default"  # an IRouterFactory plugin name or package.module:factory
    dns_hosts: str = "/etc/hosts"  # pools' resolve: names found here are not asked of DNS
    dns_servers: tuple = None  # ((address, port), ...); None: /etc/resolv.conf's


@dataclass(frozen=True)
class AdminSettings:
    """``[admin]``: the admin HTTP endpoint (health, metrics, publish, connections)."""

    endpoint: str = "tcp:8081:interface=127.0.0.1"
    token: str = None
    max_publish_size: int = 1024 * 1024


@dataclass(frozen=True)
class BrokerSettings:
    """``[broker:NAME]``: where broadcast channels (and shared rate limits) live."""

    name: str
    type: str  # "memory" or "redis"
    url: str = None
    prefix: str = "wsgate:"
    timeout: float = 2.0  # per Redis command
    ca: str = None  # PEM CA file for rediss://
    password: str = field(default=None, repr=False)  # password/password_file (else the URL's)
    presence_ttl: float = 30.0  # a crashed node's presence members expire after this


@dataclass(frozen=True)
class TLSFiles:
    """A listener's TLS files as the config names them (paths resolved); loaded by the build."""

    cert: str
    key: str = None
    sni_dir: str = None
    min_version: str = "1.2"


@dataclass(frozen=True)
class ListenerSettings:
    """``[listen:NAME]``: one listening endpoint and its per-connection limits."""

    name: str
    endpoint: str
    tls: object = field(default=None, compare=False, repr=False)  # wsgate.tls.ServerTLS (built)
    tls_files: TLSFiles = None  # what tls is loaded from
    handshake_timeout: float = 10.0
    ping_interval: float = 30.0
    ping_timeout: float = 10.0
    idle_timeout: float = 0.0
    max_message_size: int = 1024 * 1024
    max_frame_size: int = 1024 * 1024
    compression: bool = False
    trusted_proxies: tuple = ()  # ipaddress networks whose X-Forwarded-For is believed
    max_fragments: int = 1024  # frames per message; beyond it 1009
    backlog: int = 1024  # the listen() queue of not yet accepted connections
    health_path: str = None  # a load balancer's probe: 200 ok (503 while draining); None: off

    @property
    def is_tls(self):
        return self.tls is not None or self.endpoint.split(":", 1)[0] in ("ssl", "tls")


@dataclass(frozen=True)
class RouteSettings:
    """``[route:NAME]``: which requests it takes and what serves them."""

    name: str
    host: HostPattern
    path: PathPattern
    target: object  # an ITarget (built)
    listeners: tuple = None  # None: every listener
    policies: tuple = ()  # IPolicy providers, in order (built)
    max_message_size: int = None  # None: the listener's
    idle_timeout: float = None  # None: the listener's
    allow_cross_origin: bool = False  # no: cross-origin upgrades get 403 (wsgate.sameorigin)
    # whether upgrades get the same-origin check (derived: see sameorigin.applies)
    same_origin: bool = field(init=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "same_origin",
                           sameorigin.applies(self.allow_cross_origin, self.policies))


@dataclass(frozen=True)
class Config:
    """A whole, validated config file."""

    path: str
    core: CoreSettings
    listeners: tuple
    routes: tuple
    policies: dict = field(default_factory=dict)  # name → IPolicy
    brokers: dict = field(default_factory=dict)  # name → BrokerSettings
    admin: AdminSettings = None  # None: no admin endpoint
    pools: dict = field(default_factory=dict)  # name → wsgate.upstreams.config.PoolSettings
