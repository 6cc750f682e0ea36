"""JWT from an OIDC provider: the JWKS key set (fetch, cache, refresh on an unknown kid at
most once per jwks_refresh, retries while the provider is down) and ``require``.

Unit tests drive :class:`wsgate.policies.jwks.JwksKeys` on a Clock with a fake fetch;
the wire tests run a gateway against a small JWKS HTTP server of the test's own,
serving keys generated here.
"""

import gc
import http.server
import json
import signal
import ssl
import threading
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

import certs
from harness import free_port, parse_response, raw_request, start_gateway, upgrade_request
from wsgate.policies import Allow, Deny, PolicyContext
from wsgate.policies.jwks import JwksError, JwksKeys, parse_jwks
from wsgate.policies.jwtauth import jwt_type

# ------------------------------------------------------------------- keys


class SigningKey:
    """A private key with its kid: signs tokens, and is published as a JWK."""

    def __init__(self, kid, kind="RSA"):
        self.kid, self.kind = kid, kind
        if kind == "RSA":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.algorithm = "RS256"
            self.jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())
            self.algorithm = "ES256"
            self.jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk.update(kid=kid, use="sig", alg=self.algorithm)

    def token(self, kid=None, **claims):
        claims.setdefault("sub", "alice")
        claims.setdefault("exp", int(time.time()) + 300)
        claims = {name: value for name, value in claims.items() if value is not None}
        return jwt.encode(claims, self.private, algorithm=self.algorithm,
                          headers={"kid": kid or self.kid})


RSA_1 = SigningKey("rsa-1")
RSA_2 = SigningKey("rsa-2")
EC_1 = SigningKey("ec-1", "EC")


def jwks(*keys):
    return {"keys": [key.jwk for key in keys]}


def document(*keys):
    return json.dumps(jwks(*keys)).encode()


# ------------------------------------------------------ JwksKeys on a Clock


class FakeProvider:
    """A fetch whose answers the test gives: each call returns a Deferred it keeps."""

    def __init__(self):
        self.calls = []

    def __call__(self, url):
        d = defer.Deferred()
        self.calls.append(d)
        return d

    def answer(self, *keys):
        self.calls[-1].callback(document(*keys))

    def fail(self, why="Connection refused"):
        self.calls[-1].errback(ConnectionRefusedError(why))


def key_set(refresh=60.0):
    clock, provider = Clock(), FakeProvider()
    keys = JwksKeys("https://idp.example/jwks", provider, clock, refresh, "oidc")
    return keys, provider, clock


@pytest.fixture
def jwks_events():
    """The wsgate.jwks.* events logged during the test."""
    seen = []

    def observe(event):
        if str(event.get("wsgate_event", "")).startswith("wsgate.jwks."):
            seen.append(event)
    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_known_kid_is_answered_from_the_cache_without_a_fetch():
    keys, provider, clock = key_set()
    keys.start()
    provider.answer(RSA_1, EC_1)
    assert keys.key("rsa-1").key_id == "rsa-1" and keys.key("ec-1").algorithm_name == "ES256"
    clock.advance(3600)
    assert keys.key("rsa-1").key_id == "rsa-1"
    assert len(provider.calls) == 1


def test_unknown_kid_refetches_once_per_refresh_interval():
    keys, provider, clock = key_set(refresh=60)
    keys.start()
    provider.answer(RSA_1)
    assert keys.key("nope") is None  # fetched 0s ago: no refetch yet
    assert len(provider.calls) == 1
    clock.advance(60)
    waiting = keys.key("nope")
    assert isinstance(waiting, defer.Deferred) and len(provider.calls) == 2
    also_waiting = keys.key("other")  # joins the running fetch
    assert len(provider.calls) == 2
    provider.answer(RSA_1)
    assert waiting.result is None and also_waiting.result is None
    clock.advance(59)
    assert keys.key("nope") is None and len(provider.calls) == 2


def test_rotated_key_is_picked_up_by_the_refetch_a_token_causes():
    keys, provider, clock = key_set(refresh=60)
    keys.start()
    provider.answer(RSA_1)
    clock.advance(61)
    waiting = keys.key("rsa-2")
    provider.answer(RSA_2)
    assert waiting.result.key_id == "rsa-2"
    assert keys.key("rsa-1") is None  # gone from the provider, gone here (no refetch yet)


def test_provider_down_at_start_is_retried_with_a_bounded_backoff_and_warned_once(
        jwks_events):
    keys, provider, clock = key_set(refresh=10)
    keys.start()
    starts = []
    for _ in range(7):
        provider.fail()
        starts.append(clock.seconds())
        delay = min(call.getTime() for call in clock.getDelayedCalls()) - clock.seconds()
        clock.advance(delay)
    gaps = [round(b - a, 3) for a, b in zip(starts, starts[1:])]
    assert gaps == [1, 2, 4, 8, 10, 10]  # doubling, capped at jwks_refresh
    assert keys.key("rsa-1") is None or isinstance(keys.key("rsa-1"), defer.Deferred)
    provider.answer(RSA_1)
    assert keys.key("rsa-1").key_id == "rsa-1"
    assert not clock.getDelayedCalls()  # no more retries once keys are there
    failed = [e for e in jwks_events if e["wsgate_event"] == "wsgate.jwks.failed"]
    assert len(failed) == 1 and "refused (401)" in failed[0]["then"]
    assert [e["wsgate_event"] for e in jwks_events][-1] == "wsgate.jwks.fetched"


def test_tokens_wait_for_a_fetch_that_is_running():
    keys, provider, clock = key_set()
    keys.start()
    waiting = keys.key("rsa-1")
    provider.answer(RSA_1)
    assert waiting.result.key_id == "rsa-1"


def test_a_waiter_whose_client_left_is_forgotten():
    keys, provider, clock = key_set()
    keys.start()
    waiting = keys.key("rsa-1")
    waiting.addErrback(lambda failure: failure.trap(defer.CancelledError))
    waiting.cancel()
    provider.answer(RSA_1)  # does not fire the cancelled Deferred again
    assert keys.key("rsa-1").key_id == "rsa-1"


def test_a_failed_refetch_keeps_the_keys_and_schedules_no_retry(jwks_events):
    keys, provider, clock = key_set(refresh=5)
    keys.start()
    provider.answer(RSA_1)
    clock.advance(5)
    waiting = keys.key("rsa-2")
    provider.fail()
    assert waiting.result is None
    assert keys.key("rsa-1").key_id == "rsa-1" and not clock.getDelayedCalls()
    failed = [e for e in jwks_events if e["wsgate_event"] == "wsgate.jwks.failed"]
    assert "keeping the 1 keys" in failed[0]["then"]


def test_a_key_set_no_policy_uses_stops_retrying():
    keys, provider, clock = key_set()
    keys.start()
    provider.fail()
    assert len(clock.getDelayedCalls()) == 1
    del keys
    gc.collect()
    clock.advance(1)
    assert len(provider.calls) == 1


def test_token_without_kid_uses_the_only_key():
    keys, provider, clock = key_set()
    keys.start()
    provider.answer(RSA_1)
    assert keys.key(None).key_id == "rsa-1"
    keys, provider, clock = key_set()
    keys.start()
    provider.answer(RSA_1, RSA_2)
    clock.advance(3600)
    assert keys.key(None) is None and len(provider.calls) == 1  # ambiguous: no refetch


def test_parse_jwks_keeps_signing_keys_only():
    symmetric = {"kty": "oct", "k": "c2VjcmV0", "kid": "hs", "alg": "HS256"}
    encryption = dict(RSA_2.jwk, use="enc")
    keys = parse_jwks(json.dumps({"keys": [RSA_1.jwk, symmetric, encryption]}).encode())
    assert list(keys) == ["rsa-1"]
    for bad in (b"<html>", b"[]", b'{"keys": []}', json.dumps({"keys": [symmetric]}).encode()):
        with pytest.raises(JwksError):
            parse_jwks(bad)


# ------------------------------------------------ the policy with a key set


class Request:
    """The little of an UpgradeRequest the jwt policy reads."""

    def __init__(self, token):
        self.token = token

    def bearer_token(self):
        return self.token

    def query_value(self, name):
        return None

    def cookie(self, name):
        return None


def jwks_policy(settings):
    policy = jwt_type("oidc", dict(jwks_url="https://idp.example/jwks", **settings),
                      PolicyContext(Clock(), "/nonexistent"))
    provider = FakeProvider()
    policy.jwks = JwksKeys(policy.jwks.url, provider, Clock(), 60, "oidc")
    policy.jwks.start()
    provider.answer(RSA_1, EC_1)
    return policy


def test_policy_takes_the_algorithm_from_the_key_the_kid_names():
    policy = jwks_policy({})
    allowed = policy.check(Request(RSA_1.token()))
    assert allowed == Allow(identity="alice", claims=allowed.claims)  # claims: the token's
    assert allowed.claims["sub"] == "alice"
    allowed = policy.check(Request(EC_1.token(sub="bob")))
    assert allowed == Allow(identity="bob", claims=allowed.claims)
    # signed by another key that claims an existing kid
    assert isinstance(policy.check(Request(RSA_2.token(kid="rsa-1"))), Deny)


def test_policy_algorithms_narrow_the_keys_own():
    policy = jwks_policy({"algorithms": "ES256"})
    assert policy.check(Request(RSA_1.token())).status == 401
    assert isinstance(policy.check(Request(EC_1.token())), Allow)


def test_require_defaults_to_exp_and_takes_a_list():
    policy = jwks_policy({})
    denied = policy.check(Request(RSA_1.token(exp=None)))
    assert denied.status == 401 and denied.message == "Token has no exp claim"
    policy = jwks_policy({"require": "exp, email"})
    assert policy.check(Request(RSA_1.token())).message == "Token has no email claim"
    assert isinstance(policy.check(Request(RSA_1.token(email="a@example.com"))), Allow)
    policy = jwks_policy({"require": ""})
    assert isinstance(policy.check(Request(RSA_1.token(exp=None))), Allow)


@pytest.mark.parametrize("settings,key,expected", [
    ({"secret": "s", "jwks_url": "https://idp/jwks"}, "secret", "exactly one of"),
    ({"jwks_url": "ftp://idp/jwks"}, "jwks_url", "expected an https://"),
    ({"jwks_url": "http://idp/jwks", "jwks_ca": "ca.pem"}, "jwks_ca", "https://"),
    ({"jwks_url": "https://idp/jwks", "jwks_ca": "missing.pem"}, "jwks_ca", "missing.pem"),
    ({"secret": "s", "jwks_refresh": "10s"}, "jwks_refresh", "only applies with jwks_url"),
    ({"jwks_url": "https://idp/jwks", "jwks_refresh": "0"}, "jwks_refresh", "duration"),
    ({"jwks_url": "https://idp/jwks", "algorithms": "HS256"}, "algorithms", "does not fit"),
])
def test_jwks_settings_are_checked(tmp_path, settings, key, expected):
    from wsgate.policies import PolicyConfigError

    with pytest.raises(PolicyConfigError) as info:
        jwt_type("oidc", settings, PolicyContext(Clock(), str(tmp_path)))
    assert info.value.key == key and expected in info.value.message


# ------------------------------------------------------- over real sockets


class JwksServer:
    """A JWKS provider on 127.0.0.1 (http, or https with *tls* = (cert, key) paths):
    serves :attr:`keys` at /jwks and counts the requests."""

    def __init__(self, port=0, tls=None):
        self.keys = []
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                body = document(*server.keys) if self.path == "/jwks" else b"{}"
                self.send_response(200 if self.path == "/jwks" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, scheme="http"):
        return f"{scheme}://127.0.0.1:{self.port}/jwks"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def gateway_config(url, refresh="1s", extra=""):
    return f"""
        [policy:oidc]
        type = jwt
        jwks_url = {url}
        jwks_refresh = {refresh}
        {extra}

        [route:echo]
        path = /echo
        echo = yes
        policies = oidc
        """


def status(gateway, token):
    answer = raw_request(gateway.port(), upgrade_request(
        "/echo", extra=f"Authorization: Bearer {token}\r\n".encode()))
    return parse_response(answer)[0]


def fetched(gateway, count):
    """Wait until the gateway logged its *count*-th wsgate.jwks.fetched."""
    gateway.wait_event(lambda e: e.get("event") == "wsgate.jwks.fetched"
                       and len(gateway.events_named("wsgate.jwks.fetched")) >= count)


@pytest.fixture
def provider():
    server = JwksServer()
    yield server
    server.stop()


def test_valid_tokens_of_each_key_type_get_101(tmp_path, provider):
    provider.keys = [RSA_1, EC_1]
    gateway = start_gateway(tmp_path, gateway_config(provider.url()))
    try:
        fetched(gateway, 1)
        assert status(gateway, RSA_1.token()) == 101
        assert status(gateway, EC_1.token()) == 101
        assert provider.requests == 1
        assert status(gateway, RSA_1.token(exp=None)) == 401  # require = exp by default
        assert status(gateway, RSA_2.token(kid="rsa-1")) == 401  # wrong signature
    finally:
        assert gateway.stop() == 0


def test_unknown_kid_causes_one_refetch_then_401(tmp_path, provider):
    provider.keys = [RSA_1]
    gateway = start_gateway(tmp_path, gateway_config(provider.url(), refresh="1s"))
    try:
        fetched(gateway, 1)
        time.sleep(1.1)  # jwks_refresh since the start-up fetch
        assert status(gateway, RSA_2.token()) == 401
        assert provider.requests == 2  # one refetch
        assert status(gateway, RSA_2.token(kid="made-up")) == 401
        assert provider.requests == 2  # within jwks_refresh: none
    finally:
        assert gateway.stop() == 0


def test_key_rotation_is_picked_up_after_jwks_refresh(tmp_path, provider):
    provider.keys = [RSA_1]
    gateway = start_gateway(tmp_path, gateway_config(provider.url(), refresh="1s"))
    try:
        fetched(gateway, 1)
        assert status(gateway, RSA_1.token()) == 101
        provider.keys = [RSA_2]  # the provider rotates
        time.sleep(1.1)
        assert status(gateway, RSA_2.token()) == 101  # waited for the refetch
        assert provider.requests == 2
        assert status(gateway, RSA_1.token()) == 401  # the old key is gone
    finally:
        assert gateway.stop() == 0


def test_provider_down_at_start_gives_401_then_101_once_it_is_up(tmp_path):
    port = free_port()
    gateway = start_gateway(tmp_path, gateway_config(f"http://127.0.0.1:{port}/jwks",
                                                     refresh="1s"))
    server = None
    try:
        warning = gateway.wait_event(lambda e: e.get("event") == "wsgate.jwks.failed")
        assert warning["level"] == "warn" and "401" in warning["then"]
        assert status(gateway, RSA_1.token()) == 401
        server = JwksServer(port)
        server.keys = [RSA_1]
        fetched(gateway, 1)
        assert status(gateway, RSA_1.token()) == 101
        assert len(gateway.events_named("wsgate.jwks.failed")) == 1  # warned once
    finally:
        assert gateway.stop() == 0
        if server is not None:
            server.stop()


def test_https_provider_is_verified_against_jwks_ca(tmp_path):
    ca = certs.TestCA()
    cert, key = ca.write_leaf(tmp_path, "idp", "127.0.0.1")
    ca.write_ca(tmp_path / "idp-ca.pem")
    server = JwksServer(tls=(str(cert), str(key)))
    server.keys = [EC_1]
    trusted = start_gateway(tmp_path, gateway_config(server.url("https"),
                                                     extra="jwks_ca = idp-ca.pem"))
    try:
        fetched(trusted, 1)
        assert status(trusted, EC_1.token()) == 101
    finally:
        assert trusted.stop() == 0
    (tmp_path / "untrusting").mkdir()
    untrusting = start_gateway(tmp_path / "untrusting", gateway_config(server.url("https")))
    try:  # the platform's CAs do not know the test CA
        warning = untrusting.wait_event(lambda e: e.get("event") == "wsgate.jwks.failed")
        assert "certificate" in warning["error"].lower() or "tls" in warning["error"].lower()
        assert status(untrusting, EC_1.token()) == 401
    finally:
        assert untrusting.stop() == 0
        server.stop()


def test_sighup_builds_the_policy_again_and_fetches_its_keys_at_once(tmp_path, provider):
    provider.keys = [RSA_1]
    gateway = start_gateway(tmp_path, gateway_config(provider.url(), refresh="1h"))
    try:
        fetched(gateway, 1)
        provider.keys = [RSA_2]
        gateway.signal(signal.SIGHUP)
        gateway.wait_event(lambda e: e.get("event") == "wsgate.config.reloaded")
        fetched(gateway, 2)  # not waiting for jwks_refresh (1h): a new policy
        assert status(gateway, RSA_2.token()) == 101
        assert provider.requests == 2
    finally:
        assert gateway.stop() == 0


def test_a_fetch_that_answers_at_once_is_used_at_once():
    keys = JwksKeys("https://idp.example/jwks", lambda url: document(RSA_1), Clock(), 60, "p")
    assert keys.key("rsa-1").key_id == "rsa-1"
