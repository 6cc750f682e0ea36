"""Secrets out of the config file (``token_file``, ``secret_file``, ``password_file``) and out
of the upstream's reach (the apikey policy's consumed key, ``Allow``'s strip fields)."""

import json
import signal
import textwrap
import time
import urllib.error
import urllib.request

import jwt
import pytest
from websockets.asyncio.client import connect

from harness import (
    NodeUpstream,
    RedisServer,
    parse_response,
    raw_request,
    run,
    run_twistd_expecting_failure,
    start_gateway,
    upgrade_request,
    write_config,
)
from wsgate.config import ConfigError, load
from wsgate.forwarding import query_without
from wsgate.policies import Allow, ChainOutcome, PolicyChain

LISTENER = "[listen:main]\nendpoint = tcp:0:interface=127.0.0.1\n"
SECRET = "a-jwt-secret-of-at-least-32-bytes!"


def write(tmp_path, text, name="gw.ini"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def error_for(path):
    with pytest.raises(ConfigError) as info:
        load(path)
    return str(info.value)


# -------------------------------------------------------------- the config


def test_token_file_is_read_relative_to_the_config_with_trailing_whitespace_stripped(
        tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "admin").write_text("s3cret token \n\n")
    config = load(write(tmp_path, LISTENER + """
        [admin]
        endpoint = tcp:0:interface=127.0.0.1
        token_file = secrets/admin
        """))
    assert config.admin.token == "s3cret token"


@pytest.mark.parametrize("section,key", [
    ("[admin]\nendpoint = tcp:0:interface=127.0.0.1", "token"),
    ("[policy:p]\ntype = jwt", "secret"),
    ("[broker:b]\ntype = redis\nurl = redis://127.0.0.1:6379/0", "password"),
])
def test_a_key_and_its_file_form_together_are_an_error_naming_both(tmp_path, section, key):
    (tmp_path / "s").write_text("x" * 40)
    text = LISTENER + f"{section}\n{key} = inline\n{key}_file = s\n"
    message = error_for(write(tmp_path, text))
    name = section.split("\n")[0]
    assert f"{name} {key}_file: set {key} or {key}_file, not both" in message


@pytest.mark.parametrize("section,key", [
    ("[admin]\nendpoint = tcp:0:interface=127.0.0.1", "token_file"),
    ("[policy:p]\ntype = jwt", "secret_file"),
    ("[broker:b]\ntype = redis\nurl = redis://127.0.0.1:6379/0", "password_file"),
])
def test_missing_or_empty_secret_file_is_a_one_line_error_naming_file_section_key(
        tmp_path, section, key):
    path = write(tmp_path, LISTENER + f"{section}\n{key} = nowhere/secret\n")
    missing = tmp_path / "nowhere" / "secret"
    message = error_for(path)
    assert message == (f"{path}: {section.split(chr(10))[0]} {key}: cannot read {missing}: "
                       "No such file or directory")
    (tmp_path / "nowhere").mkdir()
    missing.write_text(" \n\t\n")
    message = error_for(path)
    assert message.endswith(f"{section.split(chr(10))[0]} {key}: {missing} is empty")
    assert "\n" not in message


def test_unreadable_secret_file_is_an_error(tmp_path):
    (tmp_path / "token").mkdir()  # unreadable as a file, for root too
    message = error_for(write(tmp_path, LISTENER + "[admin]\ntoken_file = token\n"))
    assert message.endswith(f"[admin] token_file: cannot read {tmp_path / 'token'}: "
                            "Is a directory")


def test_jwt_secret_file_and_broker_password_file_are_read(tmp_path):
    (tmp_path / "jwt.key").write_text(" " + SECRET + " \r\n")  # only the end is stripped
    (tmp_path / "redis.pass").write_text("r3dis\n")
    config = load(write(tmp_path, LISTENER + """
        [policy:p]
        type = jwt
        secret_file = jwt.key
        [broker:b]
        type = redis
        url = redis://user@127.0.0.1:6379/0
        password_file = redis.pass
        """))
    assert config.policies["p"].key == " " + SECRET
    broker = config.brokers["b"]
    assert broker.password == "r3dis" and "r3dis" not in repr(broker)


@pytest.mark.parametrize("key", ["password", "password_file"])
def test_broker_password_and_a_password_in_the_url_are_an_error(tmp_path, key):
    (tmp_path / "p").write_text("pw")
    message = error_for(write(tmp_path, LISTENER + f"""
        [broker:b]
        type = redis
        url = redis://:other@127.0.0.1:6379/0
        {key} = {"p" if key.endswith("_file") else "pw"}
        """))
    assert f"[broker:b] {key}: the url carries a password already" in message


def test_memory_broker_takes_no_password(tmp_path):
    message = error_for(write(tmp_path, LISTENER + "[broker:b]\ntype = memory\npassword = x\n"))
    assert "[broker:b] password: unknown key" in message


def test_startup_with_a_missing_token_file_prints_one_line_and_exits_1(tmp_path):
    path = write_config(tmp_path, LISTENER + "[admin]\ntoken_file = absent\n")
    code, stderr, _ = run_twistd_expecting_failure(path)
    assert code == 1
    assert stderr.strip().splitlines() == [
        f"wsgate: {path}: [admin] token_file: cannot read {tmp_path / 'absent'}: "
        "No such file or directory"]


# ---------------------------------------------------------- over real sockets


def admin_get(gateway, path, token):
    """(status, JSON body or None) of a GET on the admin endpoint."""
    request = urllib.request.Request(f"http://127.0.0.1:{gateway.port('admin')}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body.startswith(b"{") else None


def test_admin_token_file_guards_the_api_and_sighup_reads_it_again(tmp_path):
    token = tmp_path / "admin-token"
    token.write_text("first-token\n")
    gateway = start_gateway(tmp_path, """
        [admin]
        endpoint = tcp:0:interface=127.0.0.1
        token_file = admin-token
        """, listeners=("main", "admin"))
    try:
        assert admin_get(gateway, "/connections", "first-token")[0] == 200
        assert admin_get(gateway, "/connections", None)[0] == 401
        token.write_text("second-token\n")
        gateway.signal(signal.SIGHUP)
        gateway.wait_event(lambda e: e.get("event") == "wsgate.config.reloaded")
        assert admin_get(gateway, "/connections", "second-token")[0] == 200
        assert admin_get(gateway, "/connections", "first-token")[0] == 401
    finally:
        assert gateway.stop() == 0


def test_jwt_secret_file_checks_tokens(tmp_path):
    (tmp_path / "jwt.key").write_text(SECRET + "\n")
    gateway = start_gateway(tmp_path, """
        [policy:token]
        type = jwt
        secret_file = jwt.key

        [route:echo]
        path = /echo
        echo = yes
        policies = token
        """)
    try:
        for secret, expected in ((SECRET, 101), ("another-secret-of-at-least-32-bytes", 401)):
            token = jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, secret,
                               algorithm="HS256")
            answer = raw_request(gateway.port(), upgrade_request(
                "/echo", extra=f"Authorization: Bearer {token}\r\n".encode()))
            assert parse_response(answer)[0] == expected
    finally:
        assert gateway.stop() == 0


REDIS_BASE = """
[wsgate]
node_id = test-node
log_format = json
broker = shared

[listen:main]
endpoint = tcp:0:interface=127.0.0.1

[admin]
endpoint = tcp:0:interface=127.0.0.1
"""


@pytest.mark.parametrize("written,expected", [("right", "up"), ("wrong", "down")])
def test_redis_password_file_authenticates_the_broker(tmp_path, written, expected):
    redis = RedisServer(tmp_path)
    try:
        assert redis.command("CONFIG", "SET", "requirepass", "right").startswith(b"+OK")
        (tmp_path / "redis.pass").write_text(written + "\n")
        gateway = start_gateway(tmp_path, f"""
            [broker:shared]
            type = redis
            url = {redis.url}
            password_file = redis.pass
            timeout = 1s
            """, listeners=("main", "admin"), base=REDIS_BASE)
        try:
            deadline = time.monotonic() + 10
            while True:
                state = admin_get(gateway, "/healthz", None)[1]["broker"]
                if state == expected or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert state == expected
            if expected == "down":
                time.sleep(1.5)  # retried meanwhile, with the same wrong password
                assert admin_get(gateway, "/healthz", None)[1]["broker"] == "down"
        finally:
            assert gateway.stop() == 0
    finally:
        redis.stop()


# -------------------------------------------- keys the upstream does not see


def test_query_without_drops_every_occurrence_and_keeps_the_rest_byte_for_byte():
    assert query_without("a=1&api_key=k&b=%20x&api_key=z", {"api_key"}) == "a=1&b=%20x"
    assert query_without("api%5Fkey=k&c", {"api_key"}) == "c"  # compared decoded
    assert query_without("api_key=k", {"api_key"}) == ""
    assert query_without("a=1", set()) == "a=1"


def test_allow_strip_fields_are_checked_and_collected_by_the_chain():
    assert Allow(strip_headers=["X-API-Key"]).strip_headers == ("x-api-key",)
    with pytest.raises(ValueError):
        Allow(strip_headers="authorization")  # one string, not a list of names
    with pytest.raises(ValueError):
        Allow(strip_query=[""])

    class Strips:
        mode = "enforce"

        def __init__(self, name, allow):
            self.name, self.allow = name, allow

        def check(self, request):
            return self.allow

    chain = PolicyChain("r", [Strips("a", Allow(strip_headers=["Authorization"])),
                              Strips("b", Allow(strip_query=["t"]))])
    outcome = chain.run(object()).result
    assert isinstance(outcome, ChainOutcome)
    assert outcome.strip_headers == {"authorization"} and outcome.strip_query == {"t"}


@pytest.fixture(scope="module")
def upstream():
    node = NodeUpstream()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def keyed_gateway(tmp_path_factory, upstream):
    gateway = start_gateway(tmp_path_factory.mktemp("apikey"), f"""
        [policy:keys]
        type = apikey
        keys = k-alice=alice

        [policy:forwarding-keys]
        type = apikey
        keys = k-alice=alice
        forward_key = yes

        [route:stripped]
        path = /stripped
        upstream = ws://127.0.0.1:{upstream.port}/headers
        forward_headers = X-API-Key
        policies = keys

        [route:forwarded]
        path = /forwarded
        upstream = ws://127.0.0.1:{upstream.port}/headers
        forward_headers = X-API-Key
        policies = forwarding-keys
        """)
    yield gateway
    assert gateway.stop() == 0


def seen_upstream(gateway, path, headers=None):
    """What the Node upstream's /headers saw: (request URL, headers)."""
    async def scenario():
        async with connect(gateway.url(path), additional_headers=headers or {}) as ws:
            seen = json.loads(await ws.recv())
            return seen["url"], seen["headers"]
    return run(scenario())


@pytest.mark.parametrize("how", ["bearer", "header", "query"])
def test_apikey_does_not_forward_the_key_it_consumed(keyed_gateway, how):
    headers, query = {"Authorization": "Basic for-upstream"}, "?a=1&api_key=k-alice&b=2"
    if how == "bearer":
        headers = {"Authorization": "Bearer k-alice"}
    elif how == "header":
        headers["X-API-Key"] = "k-alice"
    if how != "query":
        query = "?a=1&b=2"
    url, seen = seen_upstream(keyed_gateway, "/stripped" + query, headers)
    assert "k-alice" not in json.dumps([url, seen])
    assert url == "/headers?a=1&b=2"
    if how != "bearer":  # an Authorization that did not carry the key still goes up
        assert seen["authorization"] == "Basic for-upstream"


def test_apikey_forwards_the_key_with_forward_key_yes(keyed_gateway):
    url, seen = seen_upstream(keyed_gateway, "/forwarded?api_key=k-alice&a=1")
    assert url == "/headers?api_key=k-alice&a=1"
    url, seen = seen_upstream(keyed_gateway, "/forwarded", {"X-API-Key": "k-alice"})
    assert seen["x-api-key"] == "k-alice"
    url, seen = seen_upstream(keyed_gateway, "/forwarded", {"Authorization": "Bearer k-alice"})
    assert seen["authorization"] == "Bearer k-alice"
