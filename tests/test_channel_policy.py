"""Channel authorization (issue 21): ``type = channel``, and the identity and claims the
policies before it expose. Pattern matching in memory; joining, publishing and shadow
mode over real sockets with a real gateway."""

import asyncio
import textwrap
import time

import jwt
import pytest
from twisted.internet.task import Clock
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from zope.interface.verify import verifyObject

from harness import (
    admin_text,
    metric,
    parse_response,
    raw_request,
    run,
    run_twistd_expecting_failure,
    start_gateway,
    upgrade_request,
    write_config,
)
from wsgate.config import ConfigError, load
from wsgate.http import parse_head
from wsgate.interfaces import IPolicy, IPolicyFactory, IPolicySession
from wsgate.metrics import Stats
from wsgate.policies import (
    Allow,
    ChainOutcome,
    Close,
    Deny,
    PolicyChain,
    PolicyContext,
    UpgradeRequest,
    discovered_factories,
)
from wsgate.policies.channel import PUBLISH_DENIED, ChannelPolicy, Pattern, Patterns

SECRET = "test-secret-of-32-bytes-or-more!!"


def _token(sub, **claims):
    claims.update(sub=sub, aud="wsgate-tests", exp=int(time.time()) + 300)
    return jwt.encode(claims, SECRET, algorithm="HS256")


# ------------------------------------------------------------ patterns, in memory


def allows(patterns, channel, identity=None, **claims):
    return Patterns.parse(patterns).allow(channel, identity, claims)


def test_a_wildcard_matches_any_run_of_characters_within_the_channel():
    assert allows("room:*", "room:lobby") and allows("room:*", "room:a:b")
    assert allows("room:*", "room:")
    assert not allows("room:*", "rooms:lobby") and not allows("room:*", "xroom:lobby")
    assert allows("*:admin", "team:admin") and not allows("*:admin", "team:admins")
    assert allows("a*b*c", "abc") and allows("a*b*c", "axxbyybc")
    assert not allows("a*b*c", "acb") and not allows("a*a", "a")  # the ends may not overlap
    assert allows("*", "anything at all") and allows("lobby", "lobby")
    assert not allows("lobby", "lobby2") and not allows("lobby", "Lobby")


def test_identity_stands_for_itself_and_without_one_matches_nothing():
    assert allows("user:{identity}", "user:alice", "alice")
    assert not allows("user:{identity}", "user:bob", "alice")
    assert not allows("user:{identity}", "user:alice2", "alice")
    assert not allows("user:{identity}", "user:", None)
    assert not allows("user:{identity}", "user:None", None)
    assert allows("user:{identity}, room:*", "room:x", None)  # the other pattern still counts


def test_a_list_claim_stands_for_each_of_its_elements():
    rooms = ["dev", "ops"]
    assert allows("{claim:rooms}", "dev", rooms=rooms)
    assert allows("room:{claim:rooms}", "room:ops", rooms=rooms)
    assert not allows("room:{claim:rooms}", "room:hr", rooms=rooms)
    assert not allows("room:{claim:rooms}", "room:devops", rooms=rooms)
    assert not allows("room:{claim:rooms}", "room:", rooms=[])
    # several placeholders: every combination, none other
    assert allows("{claim:org}:{claim:rooms}:*", "acme:ops:x", org="acme", rooms=rooms)
    assert not allows("{claim:org}:{claim:rooms}", "acme:hr", org="acme", rooms=rooms)


def test_scalar_claims_are_strings_and_missing_null_or_object_claims_match_nothing():
    assert allows("tier:{claim:tier}", "tier:3", tier=3)
    assert allows("admin:{claim:admin}", "admin:True", admin=True)
    assert allows("room:{claim:rooms}", "room:7", rooms=[7, None, {"x": 1}, ["nested"]])
    assert not allows("room:{claim:rooms}", "room:None", rooms=[None])
    assert not allows("room:{claim:missing}", "room:")
    assert not allows("room:{claim:missing}", "room:x")
    assert not allows("room:{claim:nothing}", "room:None", nothing=None)
    assert not allows("room:{claim:obj}", "room:{'a': 1}", obj={"a": 1})


def test_a_wildcard_in_a_substituted_value_is_literal():
    assert not allows("user:{identity}", "user:bob", "*")
    assert allows("user:{identity}", "user:*", "*")
    assert not allows("user:{identity}", "user:a-b", "a*")
    assert allows("user:{identity}", "user:a*", "a*")
    assert not allows("room:{claim:rooms}", "room:hr", rooms=["*"])
    assert not allows("room:{claim:rooms}:x", "room:dev:x", rooms=["d*"])
    assert allows("room:{claim:rooms}*", "room:d*v", rooms=["d*"])  # the pattern's * is one


def test_long_list_claims_in_many_placeholders_cost_their_length_not_their_product():
    # As much as a 16 KiB request head carries: every value occurs in the channel, and
    # a combination matching it comes last. Trying each combination would be 151 ** 6.
    rooms = ["a" * n for n in range(1, 151)] + ["b"]
    pattern = "{claim:rooms}" * 6
    started = time.monotonic()
    assert not allows(pattern, "a" * 700 + "c", rooms=rooms)
    assert allows(pattern, "a" * 700 + "b", rooms=rooms)
    assert allows(pattern + "*", "a" * 6 + "c", rooms=rooms)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("text,message", [
    ("user:{user}", "unknown placeholder {user}"),
    ("user:{claim:}", "unknown placeholder {claim:}"),
    ("user:{identity", "unbalanced '{'"),
    ("user:identity}", "unbalanced '}'"),
    ("user:{{identity}}", "unbalanced '{'"),
    (" , ", "expected at least one pattern"),
])
def test_malformed_patterns_are_refused(text, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")
                       .replace("(", r"\(")):
        Patterns.parse(text)


def test_patterns_are_parsed_into_text_wildcards_and_placeholders():
    assert [str(piece) for piece in Pattern.parse("a*b{identity}{claim:x}*").pieces] == [
        "a", "*", "b", "Identity()", "Claim(name='x')", "*"]


# ------------------------------------------------------- the policy, in memory


class _Head:
    def __init__(self, headers=None):
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}

    def get(self, name):
        return self.headers.get(name)

    def get_all(self, name):
        return [self.headers[name]] if name in self.headers else []


def request(channel="room:dev", identity=None, claims=None, headers=None, query=None):
    return UpgradeRequest("c1", "r", "main", "127.0.0.1", "gw", "/", query or {}, {},
                          _Head(headers), identity=identity, channel=channel,
                          claims=dict(claims or {}))


def policy(subscribe, publish=None, mode="enforce"):
    factory = discovered_factories()["channel"]
    settings = {"subscribe": subscribe}
    if publish is not None:
        settings["publish"] = publish
    built = factory("acl", settings, PolicyContext(Clock(), "."))
    built.mode = mode
    return built


def test_channel_is_a_builtin_plugin_with_the_interfaces():
    factory = discovered_factories()["channel"]
    verifyObject(IPolicyFactory, factory)
    assert set(factory.keys) == {"subscribe", "publish"}
    verifyObject(IPolicy, policy("room:*"))
    verifyObject(IPolicySession, PUBLISH_DENIED)
    assert ChannelPolicy.needs_channel is True


def test_subscribe_denies_403_and_publish_only_adds_a_closing_session():
    p = policy("room:{claim:rooms}, lobby", publish="room:{claim:rooms}")
    assert p.check(request("room:dev", claims={"rooms": ["dev"]})) is None
    denied = p.check(request("room:hr", claims={"rooms": ["dev"]}))
    assert isinstance(denied, Deny) and denied.status == 403
    read_only = p.check(request("lobby", claims={"rooms": ["dev"]}))
    assert isinstance(read_only, Allow) and read_only.session is PUBLISH_DENIED
    verdict = read_only.session.message("in", False, 3)
    assert isinstance(verdict, Close) and verdict.code == 1008
    assert read_only.session.message("out", False, 3) is None
    assert policy("lobby").check(request("lobby")) is None  # no publish: client_publish decides
    no_channel = policy("*").check(request(channel=None))  # fails closed
    assert isinstance(no_channel, Deny) and no_channel.status == 403


def test_the_chain_carries_identity_and_claims_to_later_policies():
    class Gives:
        mode = "enforce"

        def __init__(self, name, allow):
            self.name, self.allow = name, allow

        def check(self, request):
            return self.allow

    seen = []

    class Sees(Gives):
        def check(self, request):
            seen.append((request.identity, dict(request.claims)))

    chain = PolicyChain("r", [
        Gives("a", Allow(identity="alice", claims={"rooms": ["dev"], "org": "acme"})),
        Gives("b", Allow(claims={"rooms": ["ops"]})),
        Sees("c", None),
        policy("room:{claim:rooms}, user:{identity}"),
    ])
    outcome = chain.run(request("room:ops")).result
    assert isinstance(outcome, ChainOutcome)
    assert seen == [("alice", {"rooms": ["ops"], "org": "acme"})]  # the later value wins
    assert outcome.identity == "alice" and outcome.claims == {"rooms": ["ops"], "org": "acme"}
    failures = []
    chain.run(request("room:dev")).addErrback(failures.append)  # "dev" was replaced: 403
    [failure] = failures
    assert failure.value.status == 403 and failure.value.reason == "acl"


def test_allow_claims_are_a_read_only_copy_of_a_mapping():
    source = {"rooms": ["dev"]}
    allow = Allow(claims=source)
    source["rooms"] = ["changed"]
    assert allow.claims == {"rooms": ["dev"]}
    with pytest.raises(TypeError):
        allow.claims["x"] = 1
    with pytest.raises(ValueError):
        Allow(claims=["rooms"])
    with pytest.raises(ValueError):
        Allow(claims={1: "x"})
    assert Allow().claims == {} and hash(Allow(claims={"a": [1]})) == hash(Allow())


def test_shadow_mode_counts_what_it_would_deny_and_lets_it_through():
    stats = Stats()
    chain = PolicyChain("r", [policy("user:{identity}", publish="nobody", mode="shadow")],
                        stats)
    outcome = chain.run(request("user:bob", identity="alice")).result
    assert isinstance(outcome, ChainOutcome) and outcome.sessions == []
    assert stats.shadow_denials[("r", "acl")] == 1
    outcome = chain.run(request("user:alice", identity="alice")).result
    [session] = outcome.sessions
    assert session.message("in", False, 1) is None  # delivered, but counted
    assert stats.shadow_denials[("r", "acl")] == 2


def test_jwt_exposes_its_verified_claims_and_apikey_its_label():
    context = PolicyContext(Clock(), ".")
    factories = discovered_factories()
    token_policy = factories["jwt"]("token", {"secret": SECRET, "audience": "wsgate-tests"},
                                    context)
    token = _token("alice", rooms=["dev", "ops"])
    allowed = token_policy.check(request(headers={"Authorization": f"Bearer {token}"}))
    assert allowed.identity == "alice" and allowed.claims["rooms"] == ["dev", "ops"]
    assert allowed.claims["sub"] == "alice" and allowed.claims["aud"] == "wsgate-tests"

    keys = factories["apikey"]("keys", {"keys": "k-1=alice, k-2"}, context)
    allowed = keys.check(request(headers={"X-API-Key": "k-1"}))
    assert allowed.identity == "alice" and dict(allowed.claims) == {"label": "alice"}
    forwarding = factories["apikey"]("keys", {"keys": "k-1=alice", "forward_key": "yes"},
                                     context)
    assert dict(forwarding.check(request(query={"api_key": ["k-1"]})).claims) == {
        "label": "alice"}


def test_a_real_request_head_reaches_the_policy():
    head = parse_head(b"GET /u/alice HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                      + _token("alice").encode() + b"\r\n\r\n")
    req = UpgradeRequest("c", "r", "main", "127.0.0.1", "gw", "/u/alice", {},
                         {"user": "alice"}, head, channel="user:alice")
    chain = PolicyChain("r", [
        discovered_factories()["jwt"]("t", {"secret": SECRET, "audience": "wsgate-tests"},
                                      PolicyContext(Clock(), ".")),
        policy("user:{identity}")])
    assert chain.run(req).result.identity == "alice"


# ------------------------------------------------------------ config checks


def _config_error(tmp_path, text):
    path = tmp_path / "gw.ini"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as info:
        load(str(path))
    return str(info.value)


ACL_ON_ECHO = """
    [listen:main]
    endpoint = tcp:0:interface=127.0.0.1
    [policy:acl]
    type = channel
    subscribe = room:*
    [route:echo]
    path = /echo
    echo = yes
    policies = acl
    """


def test_a_channel_policy_on_a_route_without_a_channel_is_a_config_error(tmp_path):
    message = _config_error(tmp_path, ACL_ON_ECHO)
    assert "[route:echo] policies: " in message and "[policy:acl]" in message
    assert "broadcast" in message


@pytest.mark.parametrize("keys,key,expected", [
    ("", "subscribe", "is required"),
    ("subscribe = room:{room}", "subscribe", "unknown placeholder {room}"),
    ("subscribe = room:*\npublish =", "publish", "expected at least one pattern"),
    ("subscribe = room:*\nrooms = a", "rooms", "unknown key"),
])
def test_channel_policy_keys_are_checked(tmp_path, keys, key, expected):
    message = _config_error(tmp_path, f"""
[listen:main]
endpoint = tcp:0:interface=127.0.0.1
[policy:acl]
type = channel
{keys}
""")
    assert f"[policy:acl] {key}: " in message and expected in message


def test_a_channel_policy_on_a_broadcast_route_loads(tmp_path):
    path = tmp_path / "gw.ini"
    path.write_text(textwrap.dedent(ACL_ON_ECHO).replace("echo = yes", "broadcast = c"))
    [route] = load(str(path)).routes
    assert [p.name for p in route.policies] == ["acl"]


def test_twistd_refuses_a_channel_policy_off_broadcast_with_one_line(tmp_path):
    code, stderr, _ = run_twistd_expecting_failure(write_config(tmp_path, ACL_ON_ECHO))
    assert code == 1
    [line] = [line for line in stderr.splitlines() if line.strip()]
    assert line.startswith("wsgate: ") and "[route:echo] policies: " in line


# ---------------------------------------------------------- real sockets

BASE = """
[wsgate]
node_id = acl-node
log_format = json

[listen:main]
endpoint = tcp:0:interface=127.0.0.1

[admin]
endpoint = tcp:0:interface=127.0.0.1
"""

ROUTES = f"""
[policy:token]
type = jwt
secret = {SECRET}
audience = wsgate-tests

[policy:keys]
type = apikey
keys = k-alice=alice, k-bob=bob

[policy:own]
type = channel
subscribe = user:{{identity}}

[policy:listed-rooms]
type = channel
subscribe = room:{{claim:rooms}}

[policy:chat]
type = channel
subscribe = room:lobby, room:{{claim:rooms}}
publish = room:{{claim:rooms}}

[policy:watch]
type = channel
subscribe = watched:{{identity}}
publish = user:nobody
mode = shadow

[route:user]
path = /user/{{user}}
broadcast = user:{{user}}
policies = token, own

[route:rooms]
path = /rooms/{{room}}
broadcast = room:{{room}}
policies = token, listed-rooms

[route:chat]
path = /chat/{{room}}
broadcast = room:{{room}}
policies = token, chat

[route:keyed]
path = /keyed/{{user}}
broadcast = user:{{user}}
policies = keys, own

[route:watched]
path = /watched/{{user}}
broadcast = watched:{{user}}
policies = keys, watch
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("acl"), ROUTES, base=BASE,
                       listeners=("main", "admin"))
    yield gw
    assert gw.stop() == 0


def status(gateway, path, token=None, key=None):
    extra = b""
    if token is not None:
        extra += f"Authorization: Bearer {token}\r\n".encode()
    if key is not None:
        extra += f"X-API-Key: {key}\r\n".encode()
    return parse_response(raw_request(gateway.port(), upgrade_request(path, extra=extra)))[0]


def _rejected(gateway, path):
    return gateway.wait_event(lambda e: e.get("event") == "websocket.connection.rejected"
                              and e.get("path") == path)


def test_an_identity_joins_its_own_user_channel_and_no_other(gateway):
    token = _token("A")
    assert status(gateway, "/user/A", token) == 101
    assert status(gateway, "/user/B", token) == 403
    event = _rejected(gateway, "/user/B")
    assert (event["status"], event["reason"], event["policy"]) == (403, "own", "own")
    assert status(gateway, "/user/A") == 401  # no token: the jwt policy answers first


def test_a_list_claim_admits_exactly_the_listed_rooms(gateway):
    token = _token("carol", rooms=["dev", "ops"])
    assert [status(gateway, f"/rooms/{room}", token) for room in
            ("dev", "ops", "hr", "de", "devops", "lobby")] == [101, 101, 403, 403, 403, 403]
    assert status(gateway, "/rooms/dev", _token("dave")) == 403  # no rooms claim
    assert status(gateway, "/rooms/dev", _token("eve", rooms=["*"])) == 403  # literal *
    assert status(gateway, "/rooms/dev", _token("fay", rooms="dev")) == 101  # one string


def test_publish_denied_while_subscribe_allowed_closes_1008_and_reaches_nobody(gateway):
    def url(room, sub, rooms):
        return gateway.url(f"/chat/{room}?access_token={_token(sub, rooms=rooms)}")

    async def scenario():
        async with connect(url("lobby", "listener", [])) as listener, \
                connect(url("lobby", "reader", ["dev"])) as reader, \
                connect(url("lobby", "writer", ["lobby"])) as writer:
            await reader.send("not allowed")
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(reader.recv(), 5)
            assert info.value.rcvd.code == 1008
            await writer.send("allowed")  # after the refused one: the first to arrive
            assert await asyncio.wait_for(listener.recv(), 5) == "allowed"
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(listener.recv(), 0.3)
        # where its rooms claim allows, the same client publishes
        async with connect(url("dev", "listener", ["dev"])) as listener, \
                connect(url("dev", "reader", ["dev"])) as reader:
            await reader.send("hello dev")
            assert await asyncio.wait_for(listener.recv(), 5) == "hello dev"
    run(scenario())


def test_an_apikey_label_is_the_identity_of_user_channels(gateway):
    assert status(gateway, "/keyed/alice", key="k-alice") == 101
    assert status(gateway, "/keyed/bob", key="k-alice") == 403
    assert status(gateway, "/keyed/bob", key="k-bob") == 101
    assert _rejected(gateway, "/keyed/bob")["reason"] == "own"


def _shadow_denials(gateway):
    code, text = admin_text(gateway, "GET", "/metrics")
    assert code == 200
    return metric(text, "wsgate_policy_shadow_denials_total", route="watched",
                  policy="watch") or 0


def test_shadow_mode_allows_and_counts(gateway):
    before = _shadow_denials(gateway)
    assert status(gateway, "/watched/bob", key="k-alice") == 101  # would be 403
    event = gateway.wait_event(lambda e: e.get("event") == "websocket.policy.shadow_denied"
                               and e.get("policy") == "watch")
    assert event["status"] == 403 and event["route"] == "watched"
    assert _shadow_denials(gateway) == before + 1

    async def scenario():  # alice may subscribe but not publish: delivered and counted
        async with connect(gateway.url("/watched/alice"),
                           additional_headers={"X-API-Key": "k-bob"}) as listener, \
                connect(gateway.url("/watched/alice"),
                        additional_headers={"X-API-Key": "k-alice"}) as alice:
            assert _shadow_denials(gateway) == before + 2  # bob's join; alice's is fine
            await alice.send("still delivered")
            assert await asyncio.wait_for(listener.recv(), 5) == "still delivered"
            await alice.send("and again")
            assert await asyncio.wait_for(listener.recv(), 5) == "and again"
    run(scenario())
    assert _shadow_denials(gateway) == before + 4  # and each of alice's messages
