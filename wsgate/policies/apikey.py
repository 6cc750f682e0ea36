"""``type = apikey``: a static set of API keys; the key's label becomes the identity.

Keys are stored as SHA-256 digests and a presented key is looked up by its
digest, so the comparison never runs over the secret byte by byte (constant
time with respect to the stored keys) and memory holds no plain keys.
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

    def __init__(self, name, keys, header, query):
        self.name = name
        self._labels = {_digest(key): label for key, label in keys.items()}
        self.header = header.lower()
        self.query = query

    def check(self, request):
        token = (request.bearer_token() or request.header(self.header)
                 or request.query_value(self.query))
        if not token:
            return Deny(401, "API key required", _CHALLENGE)
        label = self._labels.get(_digest(token.strip()))
        if label is None:
            return Deny(401, "Invalid API key", _CHALLENGE)
        return Allow(identity=label)


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
                        settings.get("query", str, "api_key"))


apikey = PolicyType("apikey", ("keys", "keys_file", "header", "query"), build)
