"""Policies over real sockets: each built-in, order, shadow mode, Deferreds, errors, plugins."""

import asyncio
import json
import os
import subprocess
import sys
import time

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from harness import (
    ROOT,
    NodeUpstream,
    RedisServer,
    parse_response,
    raw_request,
    run,
    start_gateway,
    upgrade_request,
)

SECRET = "test-secret-of-32-bytes-or-more!!"
TESTS = os.path.dirname(os.path.abspath(__file__))


def _config(upstream_port):
    return f"""
[policy:keys]
type = apikey
keys = k-alice=alice, k-anon

[policy:token]
type = jwt
secret = {SECRET}
audience = wsgate-tests
forward_header = X-User

[policy:two-per-second]
type = ratelimit
rate = 2/s
burst = 2

[policy:no-loopback]
type = firewall
deny = 127.0.0.0/8, ::1/128

[policy:no-loopback-shadow]
type = firewall
deny = 127.0.0.0/8
mode = shadow

[policy:sites]
type = origin
allow = https://app.example.com, https://*.example.org

[policy:one-each]
type = connlimit
max = 1
retry_after = 3s

[policy:chatty]
type = ratelimit
rate = 100/s
messages = 5/s
message_burst = 5

[policy:chatty-drop]
type = ratelimit
rate = 100/s
messages = 2/s
message_burst = 2
message_action = drop

[policy:slow-allow]
type = policy_fixtures:slow_allow

[policy:slow-deny]
type = policy_fixtures:slow_deny

[policy:broken]
type = policy_fixtures:raises

[policy:dict-headers]
type = policy_fixtures:dict_headers

[policy:bad-headers]
type = policy_fixtures:bad_headers

[route:dict-headers]
path = /dict/*
upstream = ws://127.0.0.1:{upstream_port}{{path}}
policies = dict-headers

[route:bad-headers]
path = /bad-headers/*
upstream = ws://127.0.0.1:{upstream_port}{{path}}
policies = bad-headers

[route:key]
path = /key
echo = yes
policies = keys

[route:token]
path = /token/*
upstream = ws://127.0.0.1:{upstream_port}{{path}}
policies = token

[route:limited]
path = /limited
echo = yes
policies = two-per-second

[route:firewalled]
path = /firewalled
echo = yes
policies = no-loopback

[route:shadow]
path = /shadow
echo = yes
policies = no-loopback-shadow

[route:origin]
path = /origin
echo = yes
policies = sites

[route:connlimit]
path = /connlimit
echo = yes
policies = one-each

[route:firewall-first]
path = /order/a
echo = yes
policies = no-loopback, keys

[route:keys-first]
path = /order/b
echo = yes
policies = keys, no-loopback

[route:chatty-proxy]
path = /chatty/*
upstream = ws://127.0.0.1:{upstream_port}{{path}}
policies = chatty

[route:chatty-drop]
path = /chatty-drop
echo = yes
policies = chatty-drop

[route:slow]
path = /slow
echo = yes
policies = slow-allow, keys

[route:slow-deny]
path = /slow-deny
echo = yes
policies = slow-deny

[route:broken]
path = /broken
echo = yes
policies = broken
"""


@pytest.fixture(scope="module")
def upstream():
    node = NodeUpstream()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream):
    env = {"PYTHONPATH": TESTS}
    gw = start_gateway(tmp_path_factory.mktemp("policies"), _config(upstream.port), env=env)
    yield gw
    assert gw.stop() == 0


def status_of(gateway, path, extra=b""):
    return parse_response(raw_request(gateway.port(), upgrade_request(path, extra=extra)))


def accepted_identity(gateway, route):
    events = [e for e in gateway.events_named("websocket.connection.accepted")
              if e["route"] == route]
    return events[-1]["identity"]


# ------------------------------------------------------------------ apikey


def test_apikey_missing_or_wrong_is_401_with_challenge(gateway):
    status, headers, _ = status_of(gateway, "/key")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    status, _, _ = status_of(gateway, "/key", b"Authorization: Bearer nope\r\n")
    assert status == 401
    rejected = gateway.wait_event(lambda e: e.get("event") == "websocket.connection.rejected"
                                  and e.get("route") == "key")
    assert rejected["reason"] == "keys" and rejected["policy"] == "keys"


@pytest.mark.parametrize("how,identity", [
    ("bearer", "alice"), ("header", "alice"), ("query", None)])
def test_apikey_from_bearer_header_or_query_sets_identity(gateway, how, identity):
    async def scenario():
        kwargs, path = {}, "/key"
        if how == "bearer":
            kwargs["additional_headers"] = {"Authorization": "Bearer k-alice"}
        elif how == "header":
            kwargs["additional_headers"] = {"X-API-Key": "k-alice"}
        else:
            path = "/key?api_key=k-anon"
        async with connect(gateway.url(path), **kwargs) as ws:
            await ws.send("in")
            assert await ws.recv() == "in"
    run(scenario())
    seen = accepted_identity(gateway, "key")
    if identity:
        assert seen == identity
    else:
        assert seen.startswith("key-") and "k-anon" not in seen  # a fingerprint, not the key


# -------------------------------------------------------------------- jwt


def _token(**claims):
    claims.setdefault("aud", "wsgate-tests")
    claims.setdefault("exp", int(time.time()) + 60)
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_jwt_identity_is_forwarded_upstream_from_header_or_query(gateway):
    async def scenario(path, headers):
        async with connect(gateway.url(path), additional_headers=headers) as ws:
            import json
            return json.loads(await ws.recv())["headers"]
    seen = run(scenario("/token/headers", {"Authorization": f"Bearer {_token(sub='bob')}"}))
    assert seen["x-user"] == "bob"
    seen = run(scenario(f"/token/headers?access_token={_token(sub='carol')}", {}))
    assert seen["x-user"] == "carol"
    assert accepted_identity(gateway, "token") == "carol"


@pytest.mark.parametrize("token", [
    _token(sub="x", exp=int(time.time()) - 120),  # expired
    _token(sub="x", aud="someone-else"),
    jwt.encode({"sub": "x", "aud": "wsgate-tests"}, "another-secret-of-32-bytes-length",
               algorithm="HS256"),
    "not.a.token",
])
def test_jwt_bad_or_expired_is_401(gateway, token):
    status, headers, _ = status_of(gateway, "/token/echo",
                                   f"Authorization: Bearer {token}\r\n".encode())
    assert status == 401 and "invalid_token" in headers["www-authenticate"]


# -------------------------------------------------------------- ratelimit


def test_ratelimit_denies_over_burst_with_429_and_retry_after(gateway):
    answers = [status_of(gateway, "/limited") for _ in range(4)]
    statuses = [status for status, _, _ in answers]
    assert statuses[:2] == [101, 101]
    assert 429 in statuses[2:]
    denied = next(headers for status, headers, _ in answers if status == 429)
    assert int(denied["retry-after"]) >= 1


def test_message_rate_on_a_proxied_connection_closes_with_1008(gateway):
    async def scenario():
        async with connect(gateway.url("/chatty/echo")) as ws:
            try:
                for i in range(20):
                    await ws.send(f"m{i}")
            except ConnectionClosed:
                pass  # the close came while we were still sending
            replies = []
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    replies.append(await ws.recv())
            assert info.value.rcvd.code == 1008
            assert len(replies) <= 5  # at most the burst got through (echoes may be cut by the close)
    run(scenario())


def test_message_rate_with_drop_drops_the_excess(gateway):
    async def scenario():
        async with connect(gateway.url("/chatty-drop")) as ws:
            for i in range(10):
                await ws.send(f"m{i}")
            got = []
            try:
                while True:
                    got.append(await asyncio.wait_for(ws.recv(), 0.5))
            except asyncio.TimeoutError:
                pass
            assert got[:2] == ["m0", "m1"] and len(got) < 10
            await asyncio.sleep(1.1)  # the budget refills: the connection is still usable
            await ws.send("later")
            assert await ws.recv() == "later"
    run(scenario())


# ------------------------------------------------- firewall, origin, connlimit


def test_firewall_denies_loopback_with_403(gateway):
    assert status_of(gateway, "/firewalled")[0] == 403


def test_shadow_mode_allows_but_logs_what_it_would_deny(gateway):
    assert status_of(gateway, "/shadow")[0] == 101
    event = gateway.wait_event(lambda e: e.get("event") == "websocket.policy.shadow_denied")
    assert event["policy"] == "no-loopback-shadow" and event["status"] == 403


@pytest.mark.parametrize("origin,status", [
    ("https://app.example.com", 101), ("https://a.b.example.org", 101),
    ("https://example.org", 403), ("https://evil.example", 403),
    ("http://app.example.com", 403), (None, 403)])
def test_origin_policy(gateway, origin, status):
    extra = f"Origin: {origin}\r\n".encode() if origin else b""
    assert status_of(gateway, "/origin", extra)[0] == status


def test_connlimit_allows_one_per_ip_and_frees_the_slot_on_close(gateway):
    async def scenario():
        first = await connect(gateway.url("/connlimit"))
        with pytest.raises(InvalidStatus) as info:
            await connect(gateway.url("/connlimit"))
        assert info.value.response.status_code == 429
        assert info.value.response.headers["Retry-After"] == "3"
        await first.close()
        await asyncio.sleep(0.2)
        again = await connect(gateway.url("/connlimit"))
        await again.close()
    run(scenario())


# ------------------------------------------------------- order and errors


def test_policies_run_in_route_order(gateway):
    assert status_of(gateway, "/order/a")[0] == 403  # firewall first
    assert status_of(gateway, "/order/b")[0] == 401  # apikey first


def test_deferred_returning_policies(gateway):
    assert status_of(gateway, "/slow", b"X-API-Key: k-alice\r\n")[0] == 101
    assert status_of(gateway, "/slow")[0] == 401  # slow allow, then the key check
    assert status_of(gateway, "/slow-deny")[0] == 403


def test_allowed_and_denied_upgrades_log_no_critical_entry(gateway):
    """Issue 16, item 13: every upgrade on a route with policies logged a critical
    traceback (the chain fired synchronously). The harness fails this test if one appears."""
    before = len(gateway.lines)
    assert status_of(gateway, "/key", b"X-API-Key: k-alice\r\n")[0] == 101
    assert status_of(gateway, "/key")[0] == 401
    time.sleep(0.3)
    assert not [line for line in gateway.lines[before:] if '"critical"' in line]


def test_policy_headers_as_a_mapping_reach_the_upstream(gateway):
    """Issue 16, item 14: Allow(headers={...}) used to get the client a 500."""
    async def scenario():
        async with connect(gateway.url("/dict/headers")) as ws:
            return json.loads(await ws.recv())
    seen = run(scenario())
    assert seen["headers"]["x-team"] == "blue" and seen["headers"]["x-tier"] == "gold"


@pytest.mark.expect_log("policy bad-headers raised")
def test_policy_headers_that_would_break_the_request_are_500_logged_with_the_policy(gateway):
    status, _, body = status_of(gateway, "/bad-headers/echo")
    assert status == 500 and b"Injected" not in body
    gateway.wait_event(lambda e: "policy bad-headers raised" in e.get("message", ""))


@pytest.mark.expect_log("secret internals")
def test_raising_policy_is_500_generic_logged_once_and_harmless(gateway):
    status, _, body = status_of(gateway, "/broken")
    assert status == 500
    assert b"secret" not in body
    time.sleep(0.3)
    tracebacks = [line for line in gateway.lines if "secret internals" in line]
    assert len(tracebacks) == 1 and "Traceback" in tracebacks[0]
    assert status_of(gateway, "/key", b"X-API-Key: k-alice\r\n")[0] == 101


# ------------------------------------------------------------ plugins


def test_example_plugin_is_discovered_after_pip_install(tmp_path):
    example = os.path.join(ROOT, "examples", "wsgate-policy-example")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", example],
                   check=True, capture_output=True)
    gw = start_gateway(tmp_path, """
[policy:teams]
type = header_match
header = X-Team
values = blue, green

[route:teams]
path = /teams
echo = yes
policies = teams
""")
    try:
        assert parse_response(raw_request(gw.port(), upgrade_request(
            "/teams", extra=b"X-Team: blue\r\n")))[0] == 101
        assert parse_response(raw_request(gw.port(), upgrade_request(
            "/teams", extra=b"X-Team: red\r\n")))[0] == 403
        assert accepted_identity(gw, "teams") == "blue"
    finally:
        assert gw.stop() == 0


def test_example_plugin_is_discovered_after_an_editable_install(tmp_path):
    """Issue 18, item 10: ``pip install -e`` put no wsgate/plugins/*.py where twisted.plugin
    looks; the ``wsgate.policies`` entry point finds it."""
    example = os.path.join(ROOT, "examples", "wsgate-policy-example")
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e",
                        example], check=True, capture_output=True)
        gw = start_gateway(tmp_path, """
[policy:teams]
type = header_match
header = X-Team
values = blue

[route:teams]
path = /teams
echo = yes
policies = teams
""")
        try:
            assert parse_response(raw_request(gw.port(), upgrade_request(
                "/teams", extra=b"X-Team: blue\r\n")))[0] == 101
            assert parse_response(raw_request(gw.port(), upgrade_request(
                "/teams", extra=b"X-Team: red\r\n")))[0] == 403
        finally:
            assert gw.stop() == 0
    finally:  # leave the usual (non-editable) install for the other tests
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", example],
                       check=True, capture_output=True)


def test_unknown_policy_type_lists_the_known_ones(tmp_path):
    from harness import run_twistd_expecting_failure, write_config

    path = write_config(tmp_path, """
        [listen:main]
        endpoint = tcp:0:interface=127.0.0.1
        [policy:p]
        type = nosuch
        """)
    code, stderr, _ = run_twistd_expecting_failure(path)
    assert code == 1
    assert "[policy:p] type: unknown policy type 'nosuch' (known: " in stderr
    assert "apikey" in stderr and "ratelimit" in stderr


# ------------------------------------------------------ scope = broker


def test_shared_ratelimit_holds_across_two_processes_and_follows_on_broker_down(tmp_path):
    redis = RedisServer(tmp_path)
    config = f"""
[broker:shared]
type = redis
url = {redis.url}
prefix = test:

[policy:shared-allow]
type = ratelimit
rate = 3/m
key = route
scope = broker
broker = shared
on_broker_down = allow

[policy:shared-deny]
type = ratelimit
rate = 3/m
key = route
scope = broker
broker = shared
on_broker_down = deny

[route:a]
path = /a
echo = yes
policies = shared-allow

[route:d]
path = /d
echo = yes
policies = shared-deny
"""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = start_gateway(tmp_path / "one", config)
    two = start_gateway(tmp_path / "two", config)
    try:
        time.sleep(0.5)  # both connected to redis
        statuses = []
        for gw in (one, two, one, two, one, two):
            statuses.append(parse_response(raw_request(gw.port(), upgrade_request("/a")))[0])
        assert statuses.count(101) == 3 and statuses.count(429) == 3
        redis.stop()
        time.sleep(0.5)
        assert parse_response(raw_request(one.port(), upgrade_request("/a")))[0] == 101
        denied = parse_response(raw_request(two.port(), upgrade_request("/d")))
        assert denied[0] == 503 and denied[1]["retry-after"]
    finally:
        assert one.stop() == 0
        assert two.stop() == 0
        redis.stop()
