"""Policies: the request they see, the decisions they return, and the chain that runs them.

A route's policies run in order on the upgrade request, before any 101 and
before an upstream is contacted. Each may allow (adding an identity, claims
for the policies after it, headers for the upstream and a per-connection
:class:`~wsgate.interfaces.IPolicySession`) or deny with an HTTP status.
``mode = shadow`` policies are run, and what they would deny is logged and
counted, but allowed.
"""

from dataclasses import dataclass, field
from types import MappingProxyType

from twisted.internet import defer
from twisted.logger import Logger
from twisted.plugin import IPlugin

from wsgate import discovery, http, observe
from wsgate.interfaces import IPolicyFactory
from wsgate.settings import SettingError

_log = Logger()

MODES = ("enforce", "shadow")


# A policy section problem; *key* is the config key at fault (the name plugins know).
PolicyConfigError = SettingError

_NO_CLAIMS = MappingProxyType({})


@dataclass
class UpgradeRequest:
    """What a policy sees of an upgrade request.

    *client* is the client's IP address after ``trusted_proxies``; *headers*
    is the parsed request head (``get(name)``, ``get_all(name)``, lower-case
    names); *query* maps each parameter to its list of values; *params* holds
    the route's placeholders; *identity* is what earlier policies set.

    *channel* is the route's resolved broadcast channel (its template with
    the placeholders filled in), None on other routes. *claims* maps what
    earlier policies exposed about the client (see :class:`Allow`): a JWT
    policy its token's verified claims, an apikey policy ``{"label": ...}``.
    """

    conn_id: str
    route: str
    listener: str
    client: str
    host: str
    path: str
    query: dict
    params: dict
    headers: object
    identity: str = None
    channel: str = None
    claims: dict = field(default_factory=dict)

    def header(self, name):
        return self.headers.get(name.lower())

    def query_value(self, name):
        values = self.query.get(name)
        return values[0] if values else None

    def cookie(self, name):
        for value in self.headers.get_all("cookie"):
            for part in value.split(";"):
                key, sep, val = part.strip().partition("=")
                if sep and key == name:
                    return val
        return None

    def bearer_token(self):
        value = self.header("authorization")
        if value and value[:7].lower() == "bearer ":
            return value[7:].strip() or None
        return None


@dataclass(frozen=True)
class Allow:
    """Let the request through; optionally name the client and forward headers upstream.

    *headers* are added to the upstream request of proxy routes: a mapping
    ``{name: value}`` or an iterable of ``(name, value)`` pairs, both strings
    without CR, LF or NUL. They are normalised to a tuple of pairs here, so a
    malformed value fails in the policy that returned it, not later.

    *strip_headers* (header names, any case) and *strip_query* (query
    parameter names, as decoded) are what of the client's request the
    upstream must not see: a credential the policy consumed, say. A proxy
    route then leaves those client headers out of the upstream request and
    those parameters (every occurrence) out of the query string it appends;
    headers a policy adds through *headers* are kept, so a policy may replace
    a credential. What every allowing policy of the chain strips is stripped.

    *claims* (a mapping with string keys, values as in JSON) is what the
    policy learnt about the client, for the policies after it: the chain
    merges it into the request's ``claims`` (a later policy's value for a
    name replaces an earlier one's), as it sets the request's ``identity``.
    The ``channel`` policy reads both (``{identity}``, ``{claim:NAME}``).
    """

    identity: str = None
    headers: tuple = ()  # ((name, value), ...) added to the upstream request
    session: object = None  # an IPolicySession, or None
    strip_headers: tuple = ()  # lower-case names of client headers kept from the upstream
    strip_query: tuple = ()  # query parameter names kept from the upstream
    # {name: value} for the later policies, read-only; not part of the hash (a dict is
    # not hashable), part of the equality
    claims: object = field(default_factory=lambda: _NO_CLAIMS, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "headers", header_pairs(self.headers))
        object.__setattr__(self, "claims", _claims(self.claims))
        object.__setattr__(self, "strip_headers", _names(self.strip_headers, str.lower))
        object.__setattr__(self, "strip_query", _names(self.strip_query, str))


def _claims(claims):
    """*claims* (a mapping with string keys) as a read-only copy."""
    if claims is _NO_CLAIMS:
        return claims
    if not hasattr(claims, "items"):
        raise ValueError(f"expected a mapping of claims, got {claims!r}")
    copy = dict(claims.items())
    if not all(isinstance(name, str) for name in copy):
        raise ValueError(f"expected claim names as strings, got {list(copy)!r}")
    return MappingProxyType(copy) if copy else _NO_CLAIMS


def _names(names, normalise):
    """*names* (an iterable of non-empty strings, not one string) as a tuple."""
    if names == ():
        return names
    if isinstance(names, (str, bytes)):
        raise ValueError(f"expected a sequence of names, got {names!r}")
    result = tuple(names)
    if not all(isinstance(name, str) and name for name in result):
        raise ValueError(f"expected non-empty names, got {result!r}")
    return tuple(normalise(name) for name in result)


def header_pairs(headers):
    """*headers* (a mapping or ``(name, value)`` pairs) as a tuple of string pairs.

    Raises ``ValueError`` for anything else, or a name or value that would
    break the request head.
    """
    items = headers.items() if hasattr(headers, "items") else headers
    pairs = []
    for item in items:
        if isinstance(item, (str, bytes)) or len(item) != 2:
            raise ValueError(f"expected (name, value) pairs or a mapping, got {item!r}")
        name, value = item
        if not isinstance(name, str) or not isinstance(value, str) or not name \
                or not set(name) <= http.TOKEN_CHARS or any(ch in value for ch in "\r\n\0"):
            raise ValueError(f"invalid header {name!r}: {value!r}")
        pairs.append((name, value))
    return tuple(pairs)


@dataclass(frozen=True)
class Deny:
    """Refuse the request with *status*; *headers* go on the response (Retry-After, ...)."""

    status: int
    message: str = None  # the response body; a generic text by default
    headers: tuple = ()  # a mapping or (name, value) pairs, as Allow's

    def __post_init__(self):
        object.__setattr__(self, "headers", header_pairs(self.headers))


@dataclass(frozen=True)
class Close:
    """From a session's ``message``: close the connection with *code* and *reason*."""

    code: int
    reason: str = ""


DROP = "drop"


@dataclass
class ChainOutcome:
    """What the chain leaves for the connection: identity, claims, upstream headers, what
    of the client's request the upstream must not see (see :class:`Allow`), sessions."""

    identity: str = None
    claims: dict = field(default_factory=dict)
    headers: list = field(default_factory=list)
    sessions: list = field(default_factory=list)
    strip_headers: set = field(default_factory=set)  # lower-case header names
    strip_query: set = field(default_factory=set)  # query parameter names

    def release(self):
        """Tell every session the connection is over (exactly once)."""
        sessions, self.sessions = self.sessions, []
        for session in sessions:
            try:
                session.closed()
            except Exception:
                _log.failure("wsgate: a policy session raised in closed()")


@dataclass(frozen=True)
class PolicyContext:
    """What a factory may use to build a policy."""

    clock: object
    config_dir: str
    brokers: dict = field(default_factory=dict)  # name → broker settings
    default_broker: str = None

    def shared_limiter(self, broker_name=None):
        """A limiter kept in the Redis broker *broker_name* (default: ``[wsgate] broker``).

        The connection is attached when the gateway starts; until then, and
        while Redis is unreachable, its ``take`` fails (→ ``on_broker_down``).
        """
        from wsgate.pubsub.limits import SharedLimiter

        name = broker_name or self.default_broker
        broker = self.brokers.get(name) if name else None
        if broker is None or broker.type != "redis":
            raise PolicyConfigError(
                "scope", "scope = broker needs a [broker:NAME] with type = redis, named by "
                "this section's broker key or by [wsgate] broker")
        return SharedLimiter(broker)


class PolicyChain:
    """Runs a route's policies in order; see the module docstring."""

    def __init__(self, route_name, policies, stats=None):
        self.route_name = route_name
        self.policies = tuple(policies)
        self.stats = stats

    def run(self, request):
        """Return a Deferred firing with a :class:`ChainOutcome` or failing with
        :class:`wsgate.http.HttpRefusal` (the denying policy's status, or 500)."""
        return defer.ensureDeferred(self._run(request))

    async def _run(self, request):
        outcome = ChainOutcome()
        try:
            for policy in self.policies:
                try:
                    decision = policy.check(request)
                    if isinstance(decision, defer.Deferred):
                        decision = await decision
                    if decision is not None and not isinstance(decision, (Allow, Deny)):
                        raise TypeError(f"check() returned {decision!r}, not None, "
                                        "Allow or Deny")
                except defer.CancelledError:
                    raise  # the client left while the policy decided: nothing to log
                except Exception:
                    _log.failure("wsgate: policy {policy} raised on route {route}",
                                 policy=policy.name, route=self.route_name)
                    raise http.HttpRefusal(500, policy.name, "Internal Server Error",
                                           route=self.route_name, policy=policy.name)
                if isinstance(decision, Deny):
                    if policy.mode == "shadow":
                        self._shadow_denied(policy, request, decision)
                        continue
                    refusal = http.HttpRefusal(decision.status, policy.name,
                                               decision.message, decision.headers,
                                               route=self.route_name, policy=policy.name)
                    refusal.identity = request.identity  # who an earlier policy said it is
                    raise refusal
                elif decision is not None:
                    if decision.identity is not None:
                        outcome.identity = request.identity = decision.identity
                    if decision.claims:
                        outcome.claims = request.claims = {**request.claims,
                                                           **decision.claims}
                    outcome.headers.extend(decision.headers)
                    outcome.strip_headers.update(decision.strip_headers)
                    outcome.strip_query.update(decision.strip_query)
                    if decision.session is not None:
                        session = decision.session
                        if policy.mode == "shadow":
                            session = ShadowSession(session, policy, self)
                        outcome.sessions.append(session)
        except BaseException:
            outcome.release()
            raise
        return outcome

    def _shadow_denied(self, policy, request, decision):
        if self.stats is not None:
            self.stats.shadow_denied(self.route_name, policy.name)
        observe.emit(
            "websocket.policy.shadow_denied",
            "policy {policy} (shadow) would deny {client} on route {route}: {status}",
            conn_id=request.conn_id, route=self.route_name, client=request.client,
            identity=request.identity, policy=policy.name, status=decision.status)


class ShadowSession:
    """A shadow-mode policy's session: its verdicts are logged and counted, not applied."""

    def __init__(self, inner, policy, chain):
        self.inner, self.policy, self.chain = inner, policy, chain

    def message(self, direction, is_binary, size):
        verdict = self.inner.message(direction, is_binary, size)
        if verdict is not None and self.chain.stats is not None:
            self.chain.stats.shadow_denied(self.chain.route_name, self.policy.name)
        return None

    def closed(self):
        self.inner.closed()


def apply_sessions(sessions, direction, is_binary, size):
    """Ask every session about one message; return the first verdict that is not None."""
    for session in sessions:
        verdict = session.message(direction, is_binary, size)
        if verdict is not None:
            return verdict
    return None


# ----------------------------------------------------------------- discovery


def discovered_factories():
    """``{type name: factory}`` for every IPolicyFactory plugin."""
    return discovery.plugins(IPolicyFactory)


def resolve_factory(type_name, known=None):
    """The factory for ``type = NAME`` or ``type = package.module:Class``."""
    try:
        return discovery.find(IPolicyFactory, type_name, "policy type", known)
    except ValueError as e:
        raise PolicyConfigError("type", str(e)) from None


__all__ = ["Allow", "Deny", "Close", "DROP", "UpgradeRequest", "PolicyChain", "PolicyContext",
           "PolicyConfigError", "IPlugin", "resolve_factory", "discovered_factories"]
