"""``type = apikey``: a static set of API keys; the key's label becomes the identity.

The label is also exposed to the policies after it as the claim ``label``
(:attr:`~wsgate.policies.Allow.claims`; ``{claim:label}`` in a ``channel``
policy, the same as its ``{identity}`` unless a later policy sets another).

Keys are stored as SHA-256 digests and a presented key is looked up by its
digest, so the comparison never runs over the secret byte by byte (constant
time with respect to the stored keys) and memory holds no plain keys.

The key is the gateway's to check, not the upstream's: unless ``forward_key =
yes``, a proxy route does not pass on where it came from (the
``Authorization`` header, the ``header`` or the ``query`` parameter; each that
carried it), through :class:`~wsgate.policies.Allow`'s strip fields.
"""

import hashlib
import os

from zope.interface import implementer

from wsgate import units
from wsgate.interfaces import IPolicy
from wsgate.policies import Allow, Deny, PolicyConfigError
from wsgate.policies.base import PolicyType

_CHALLENGE = (("WWW-Authenticate", 'Bearer realm="wsgate"'),)


def _digest(key):
    return hashlib.sha256(key.encode("utf-8")).digest()


@implementer(IPolicy)
class ApiKeyPolicy:
    mode = "enforce"

    def __init__(self, name, keys, header, query, forward_key=False):
        self.name = name
        self._labels = {_digest(key): label for key, label in keys.items()}
        self.header = header.lower()
        self.query = query
        self.forward_key = forward_key

    def check(self, request):
        bearer = request.bearer_token()
        header = request.header(self.header)
        query = request.query_value(self.query)
        token = bearer or header or query
        if not token:
            return Deny(401, "API key required", _CHALLENGE)
        token = token.strip()
        label = self._labels.get(_digest(token))
        if label is None:
            return Deny(401, "Invalid API key", _CHALLENGE)
        claims = {"label": label}
        if self.forward_key:
            return Allow(identity=label, claims=claims)
        return Allow(
            identity=label, claims=claims,
            strip_headers=[name for name, value in (("authorization", bearer),
                                                    (self.header, header))
                           if _carries(value, token)],
            strip_query=[self.query] if _carries(query, token) else [])


def _carries(value, key):
    """Whether a place the key may come from (a value or None) holds *key*."""
    return value is not None and value.strip() == key


def _label_for(key, label):
    return label or "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def _parse_keys(text):
    keys = {}
    for item in units.parse_list(text):
        key, _, label = item.partition("=")
        if not key.strip():
            raise ValueError("expected KEY or KEY=label items")
        keys[key.strip()] = _label_for(key.strip(), label.strip())
    return keys


def _read_keys_file(path):
    keys = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise PolicyConfigError("keys_file", f"cannot read {path}: {e.strerror}") from None
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, label = line.partition(" ")
        keys[key] = _label_for(key, label.strip())
    return keys


def build(name, settings, context):
    keys = settings.get("keys", _parse_keys, {})
    path = settings.get("keys_file", str, None)
    if path is not None:
        if not os.path.isabs(path):
            path = os.path.join(context.config_dir, path)
        keys.update(_read_keys_file(path))
    if not keys:
        raise PolicyConfigError("keys", "expected at least one key (keys or keys_file)")
    return ApiKeyPolicy(name, keys,
                        settings.get("header", str, "X-API-Key"),
                        settings.get("query", str, "api_key"),
                        settings.get("forward_key", units.parse_bool, False))


apikey = PolicyType("apikey", ("keys", "keys_file", "header", "query", "forward_key"), build)
