"""Routing: specificity order, wildcards, placeholders and tails (pure logic)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from wsgate.config import RouteSettings
from wsgate.targets.echo import EchoApp
from wsgate.targets.websocket import ApplicationTarget
from wsgate.interfaces import IRouter
from wsgate.routing import DefaultRouter, HostPattern, PathPattern, strip_port


def route(name, path, host="*", listeners=None):
    return RouteSettings(name=name, host=HostPattern.parse(host), path=PathPattern.parse(path),
                         target=ApplicationTarget("echo", "echo", lambda r: EchoApp(1)),
                         listeners=listeners)


def test_default_router_provides_irouter():
    verifyObject(IRouter, DefaultRouter([]))


def test_exact_path_beats_pattern_beats_prefix_regardless_of_file_order():
    router = DefaultRouter([
        route("prefix", "/chat/*"),
        route("pattern", "/chat/{room}"),
        route("exact", "/chat/lobby"),
    ])
    assert router.route("h", "/chat/lobby", "main").route.name == "exact"
    match = router.route("h", "/chat/kitchen", "main")
    assert match.route.name == "pattern" and match.params == {"room": "kitchen"}
    match = router.route("h", "/chat/kitchen/old", "main")
    assert match.route.name == "prefix" and match.tail == "kitchen/old"


def test_more_literal_segments_and_longer_prefixes_win():
    router = DefaultRouter([
        route("short", "/api/*"),
        route("long", "/api/v2/*"),
        route("two-vars", "/t/{a}/{b}"),
        route("one-var", "/t/{a}/fixed"),
    ])
    assert router.route("h", "/api/v2/x", "main").route.name == "long"
    assert router.route("h", "/api/v1/x", "main").route.name == "short"
    assert router.route("h", "/api", "main").route.name == "short"
    assert router.route("h", "/t/x/fixed", "main").route.name == "one-var"
    assert router.route("h", "/t/x/y", "main").params == {"a": "x", "b": "y"}


def test_host_specificity_comes_before_path_specificity():
    router = DefaultRouter([
        route("any-exact", "/echo"),
        route("suffix", "/*", host="*.example.com"),
        route("longer-suffix", "/*", host="*.eu.example.com"),
        route("exact-host", "/*", host="api.eu.example.com"),
    ])
    assert router.route("api.eu.example.com", "/echo", "main").route.name == "exact-host"
    assert router.route("x.eu.example.com:443", "/echo", "main").route.name == "longer-suffix"
    assert router.route("WWW.Example.COM", "/echo", "main").route.name == "suffix"
    assert router.route("example.com", "/echo", "main").route.name == "any-exact"
    assert router.route("example.com", "/other", "main") is None


def test_file_order_breaks_ties():
    router = DefaultRouter([route("first", "/a/{x}"), route("second", "/a/{y}")])
    assert router.route("h", "/a/1", "main").route.name == "first"


def test_listeners_restrict_a_route():
    router = DefaultRouter([route("internal", "/x", listeners=("admin",)), route("any", "/*")])
    assert router.route("h", "/x", "admin").route.name == "internal"
    assert router.route("h", "/x", "main").route.name == "any"


def test_named_segment_needs_a_non_empty_segment():
    router = DefaultRouter([route("chat", "/chat/{room}")])
    assert router.route("h", "/chat/", "main") is None
    assert router.route("h", "/chat", "main") is None
    assert router.route("h", "/chat/a/b", "main") is None


@pytest.mark.parametrize("text", ["echo", "/a/{1x}", "/a/{x}/{x}", "/a*", "/a/{x", "/a//b",
                                  "/a/{path}"])
def test_bad_paths_are_refused(text):
    with pytest.raises(ValueError):
        PathPattern.parse(text)


@pytest.mark.parametrize("text", ["*.*.com", "exa mple.com", "ex*ample.com", ""])
def test_bad_hosts_are_refused(text):
    with pytest.raises(ValueError):
        HostPattern.parse(text)


def test_strip_port_handles_ipv6_and_case():
    assert strip_port("Example.COM:8080") == "example.com"
    assert strip_port("[::1]:443") == "[::1]"
    assert strip_port("example.com.") == "example.com"


segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~", min_size=1, max_size=12)


@given(st.lists(segment, min_size=1, max_size=6))
def test_an_exact_path_matches_itself_and_a_prefix_matches_everything_below(parts):
    path = "/" + "/".join(parts)
    assert PathPattern.parse(path).match(path) == ({}, "")
    prefix = PathPattern.parse("/" + parts[0] + "/*")
    assert prefix.match(path) == ({}, "/".join(parts[1:]))


@given(st.lists(segment, min_size=1, max_size=6))
def test_one_placeholder_per_segment_captures_each_segment(parts):
    pattern = PathPattern.parse("/" + "/".join("{v%d}" % i for i in range(len(parts))))
    params, tail = pattern.match("/" + "/".join(parts))
    assert [params["v%d" % i] for i in range(len(parts))] == parts and tail == ""


def test_router_is_chosen_by_name_or_import_path(tmp_path):
    from wsgate.config import ConfigError, load
    from wsgate.routing import build_router

    base = "[listen:main]\nendpoint = tcp:0:interface=127.0.0.1\n[route:r]\npath = /r\necho = yes\n"
    good = tmp_path / "good.ini"
    good.write_text("[wsgate]\nrouter = wsgate.routing:DefaultRouter\n" + base)
    assert build_router(load(str(good))).route("h", "/r", "main").route.name == "r"
    bad = tmp_path / "bad.ini"
    bad.write_text("[wsgate]\nrouter = nosuch\n" + base)
    with pytest.raises(ConfigError) as info:
        load(str(bad))
    assert "[wsgate] router: unknown router 'nosuch' (known: default)" in str(info.value)
