"""``type = jwt``: a signed JSON Web Token (pyjwt); a claim becomes the identity.

The token is read from ``Authorization: Bearer``, then the ``query``
parameter (browsers cannot set headers on a WebSocket), then the ``cookie``.
"""

import os

import jwt
from zope.interface import implementer

from wsgate import units
from wsgate.interfaces import IPolicy
from wsgate.policies import Allow, Deny, PolicyConfigError
from wsgate.policies.base import PolicyType

_SYMMETRIC = ("HS256", "HS384", "HS512")
_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
               "ES512", "EdDSA")


def _challenge(error):
    return (("WWW-Authenticate", f'Bearer realm="wsgate", error="{error}"'),)


@implementer(IPolicy)
class JwtPolicy:
    mode = "enforce"

    def __init__(self, name, key, algorithms, audience, issuer, leeway, query, cookie,
                 identity_claim, forward_header):
        self.name = name
        self.key, self.algorithms = key, list(algorithms)
        self.audience, self.issuer, self.leeway = audience, issuer, leeway
        self.query, self.cookie = query, cookie
        self.identity_claim, self.forward_header = identity_claim, forward_header

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
        try:
            claims = jwt.decode(token, self.key, algorithms=self.algorithms,
                                audience=self.audience, issuer=self.issuer, leeway=self.leeway,
                                options={"verify_aud": self.audience is not None})
        except jwt.ExpiredSignatureError:
            return Deny(401, "Token expired", _challenge("invalid_token"))
        except jwt.InvalidTokenError:
            return Deny(401, "Invalid token", _challenge("invalid_token"))
        identity = claims.get(self.identity_claim)
        if identity is None:
            return Deny(401, "Token has no identity claim", _challenge("invalid_token"))
        identity = str(identity)
        headers = ((self.forward_header, identity),) if self.forward_header else ()
        return Allow(identity=identity, headers=headers)


def build(name, settings, context):
    secret = settings.get("secret", str, None)
    key_file = settings.get("public_key_file", str, None)
    if (secret is None) == (key_file is None):
        raise PolicyConfigError("secret", "expected exactly one of secret or public_key_file")
    if secret is not None:
        key, allowed, default = secret, _SYMMETRIC, ("HS256",)
    else:
        path = key_file if os.path.isabs(key_file) else os.path.join(context.config_dir, key_file)
        try:
            with open(path, encoding="utf-8") as f:
                key = f.read()
        except OSError as e:
            raise PolicyConfigError("public_key_file", f"cannot read {path}: {e.strerror}") from None
        allowed, default = _ASYMMETRIC, ("RS256",)
    algorithms = settings.get("algorithms", units.parse_list, default)
    for algorithm in algorithms:
        if algorithm not in allowed:
            raise PolicyConfigError("algorithms", f"{algorithm} does not fit this key "
                                    f"(expected some of {', '.join(allowed)})")
    return JwtPolicy(
        name, key, algorithms,
        settings.get("audience", str, None), settings.get("issuer", str, None),
        settings.get("leeway", units.parse_duration, 0.0),
        settings.get("query", str, "access_token"), settings.get("cookie", str, None),
        settings.get("identity_claim", str, "sub"), settings.get("forward_header", str, None))


jwt_type = PolicyType("jwt", ("secret", "public_key_file", "algorithms", "audience", "issuer",
                              "leeway", "query", "cookie", "identity_claim", "forward_header"),
                      build)
