"""``type = jwt``: a signed JSON Web Token (pyjwt); a claim becomes the identity.

The token is read from ``Authorization: Bearer``, then the ``query``
parameter (browsers cannot set headers on a WebSocket), then the ``cookie``.
It is checked with one of: ``secret`` (or ``secret_file``; HS*),
``public_key_file``, or ``jwks_url``, an OIDC provider's key set
(:mod:`wsgate.policies.jwks`), where the token's ``kid`` picks the key and
the key its algorithm. The claims ``require`` names must be present (``exp``
by default: a token that never expires is refused).

The token's verified claims (all of them, as decoded) are exposed to the
policies after it (:attr:`~wsgate.policies.Allow.claims`): a ``channel``
policy's ``{claim:NAME}``.
"""

import os
from urllib.parse import urlsplit

import jwt
from twisted.internet import defer
from zope.interface import implementer

from wsgate import units
from wsgate.interfaces import IPolicy
from wsgate.policies import Allow, Deny, PolicyConfigError
from wsgate.policies.base import PolicyType
from wsgate.policies.jwks import JwksKeys, VerifyingTLS, http_fetcher

_SYMMETRIC = ("HS256", "HS384", "HS512")
_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
               "ES512", "EdDSA")


def _challenge(error):
    return (("WWW-Authenticate", f'Bearer realm="wsgate", error="{error}"'),)


@implementer(IPolicy)
class JwtPolicy:
    """*key* checks every token (secret or public key), or, with *jwks* (a
    :class:`~wsgate.policies.jwks.JwksKeys`), the key the token's ``kid`` names;
    *algorithms* then narrows the keys' own (empty: any of theirs)."""

    mode = "enforce"

    def __init__(self, name, key, algorithms, audience, issuer, leeway, query, cookie,
                 identity_claim, forward_header, require=("exp",), jwks=None):
        self.name = name
        self.key, self.algorithms = key, list(algorithms)
        self.audience, self.issuer, self.leeway = audience, issuer, leeway
        self.query, self.cookie = query, cookie
        self.identity_claim, self.forward_header = identity_claim, forward_header
        self.require = list(require)
        self.jwks = jwks

    def _token(self, request):
        token = request.bearer_token()
        if not token and self.query:
            token = request.query_value(self.query)
        if not token and self.cookie:
            token = request.cookie(self.cookie)
        return token

    def check(self, request):
        token = self._token(request)
        if not token:
            return Deny(401, "Token required", _challenge("invalid_request"))
        if self.jwks is None:
            return self._verify(token, self.key, self.algorithms)
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError:
            return Deny(401, "Invalid token", _challenge("invalid_token"))
        if kid is not None and not isinstance(kid, str):
            return Deny(401, "Invalid token", _challenge("invalid_token"))
        key = self.jwks.key(kid)
        if isinstance(key, defer.Deferred):
            return key.addCallback(self._verify_with, token)
        return self._verify_with(key, token)

    def _verify_with(self, key, token):
        """Check *token* with *key* (a PyJWK from the key set, or None: none fits)."""
        if key is None:
            return Deny(401, "Unknown signing key", _challenge("invalid_token"))
        if self.algorithms and key.algorithm_name not in self.algorithms:
            return Deny(401, "Invalid token", _challenge("invalid_token"))
        return self._verify(token, key, [key.algorithm_name])

    def _verify(self, token, key, algorithms):
        try:
            claims = jwt.decode(token, key, algorithms=algorithms,
                                audience=self.audience, issuer=self.issuer, leeway=self.leeway,
                                options={"verify_aud": self.audience is not None,
                                         "require": self.require})
        except jwt.ExpiredSignatureError:
            return Deny(401, "Token expired", _challenge("invalid_token"))
        except jwt.MissingRequiredClaimError as e:
            return Deny(401, f"Token has no {e.claim} claim", _challenge("invalid_token"))
        except jwt.InvalidTokenError:
            return Deny(401, "Invalid token", _challenge("invalid_token"))
        identity = claims.get(self.identity_claim)
        if identity is None:
            return Deny(401, "Token has no identity claim", _challenge("invalid_token"))
        identity = str(identity)
        headers = ((self.forward_header, identity),) if self.forward_header else ()
        return Allow(identity=identity, headers=headers, claims=claims)


def _jwks_url(text):
    url = units.non_empty(text)
    split = urlsplit(url)
    if split.scheme not in ("https", "http") or not split.hostname or not url.isascii():
        raise ValueError(f"expected an https:// (or http://) URL, got {text!r}")
    return url


def _jwks(name, settings, context, url):
    """The key set of ``jwks_url``, fetched once the reactor runs (never by ``wsgate
    check``, which does not run it; at once on a reload)."""
    ca = settings.get("jwks_ca", units.non_empty, None)
    tls = None
    if url.startswith("https://"):
        if ca is not None and not os.path.isabs(ca):
            ca = os.path.join(context.config_dir, ca)
        from wsgate import tls as tls_module

        try:  # read and check the CA file now: a bad one is a config error
            tls_module.upstream_tls_options(urlsplit(url).hostname, ca, True)
        except tls_module.TLSConfigError as e:
            raise PolicyConfigError("jwks_ca", e.message) from None
        tls = VerifyingTLS(ca)
    elif ca is not None:
        raise PolicyConfigError("jwks_ca", "only applies to an https:// jwks_url")
    refresh = settings.get("jwks_refresh", units.positive_duration, 60.0)
    clock = context.clock
    keys = JwksKeys(url, http_fetcher(clock, tls), clock, refresh, name)
    when_running = getattr(clock, "callWhenRunning", None)
    if when_running is not None:
        when_running(keys.start)
    return keys


def build(name, settings, context):
    secret = settings.secret("secret", context.config_dir, str, None)
    key_file = settings.get("public_key_file", str, None)
    jwks_url = settings.get("jwks_url", _jwks_url, None)
    if [secret, key_file, jwks_url].count(None) != 2:
        raise PolicyConfigError("secret", "expected exactly one of secret (or secret_file), "
                                "public_key_file or jwks_url")
    jwks = None
    if secret is not None:
        key, allowed, default = secret, _SYMMETRIC, ("HS256",)
    elif key_file is not None:
        path = key_file if os.path.isabs(key_file) else os.path.join(context.config_dir, key_file)
        try:
            with open(path, encoding="utf-8") as f:
                key = f.read()
        except OSError as e:
            raise PolicyConfigError("public_key_file", f"cannot read {path}: {e.strerror}") from None
        allowed, default = _ASYMMETRIC, ("RS256",)
    else:
        key, allowed, default = None, _ASYMMETRIC, ()  # (): the keys' own algorithms
    algorithms = settings.get("algorithms", units.parse_list, default)
    for algorithm in algorithms:
        if algorithm not in allowed:
            raise PolicyConfigError("algorithms", f"{algorithm} does not fit this key "
                                    f"(expected some of {', '.join(allowed)})")
    if jwks_url is not None:
        jwks = _jwks(name, settings, context, jwks_url)
    else:
        for jwks_key in ("jwks_ca", "jwks_refresh"):
            if settings.has(jwks_key):
                raise PolicyConfigError(jwks_key, "only applies with jwks_url")
    return JwtPolicy(
        name, key, algorithms,
        settings.get("audience", str, None), settings.get("issuer", str, None),
        settings.get("leeway", units.parse_duration, 0.0),
        settings.get("query", str, "access_token"), settings.get("cookie", str, None),
        settings.get("identity_claim", str, "sub"), settings.get("forward_header", str, None),
        require=settings.get("require", units.parse_list, ("exp",)), jwks=jwks)


jwt_type = PolicyType("jwt", ("secret", "secret_file", "public_key_file", "jwks_url",
                              "jwks_refresh", "jwks_ca", "require", "algorithms", "audience",
                              "issuer", "leeway", "query", "cookie", "identity_claim",
                              "forward_header"),
                      build)
