"""Same-origin by default (cross-site WebSocket hijacking): the rules of wsgate.sameorigin,
then a real gateway refusing foreign pages with 403 unless the route opts out or has an
``origin`` policy of its own, and what ``wsgate check`` says about opted-out proxy routes."""

import io
import re
import ssl
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from harness import parse_response, raw_request, run, start_gateway, upgrade_request, write_config

from wsgate import sameorigin
from wsgate.http import parse_head
from wsgate.policies.origin import OriginPolicy

# ------------------------------------------------------------------ the rules (unit)


def head(host="example.com", origin=None, extra=()):
    lines = ["GET /ws HTTP/1.1", f"Host: {host}"]  # the parser requires exactly one Host
    if origin is not None:
        lines.append(f"Origin: {origin}")
    lines.extend(extra)
    return parse_head(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


@pytest.mark.parametrize("host,origin", [
    ("example.com", "http://example.com"),
    ("example.com:80", "http://example.com"),
    ("example.com", "http://example.com:80"),
    ("example.com:8080", "http://example.com:8080"),
    ("example.com:443", "https://example.com"),
    ("Example.COM:8080", "HTTP://example.com:8080"),  # case-insensitive
    ("example.com.", "http://example.com"),  # a trailing dot names the same host
    ("[::1]:8080", "http://[::1]:8080"),
    ("[0:0::1]:8080", "http://[::1]:8080"),  # IPv6 literals in canonical form
    ("[2001:DB8::1]", "https://[2001:db8::1]"),
    ("127.0.0.1:9000", "http://127.0.0.1:9000/"),  # a trailing slash a hand-made client adds
    ("example.com", "wss://example.com"),
    # a plain listener cannot tell whether a TLS-terminating proxy is in front:
    # a Host without a port stands for 80 or 443
    ("example.com", "https://example.com"),
])
def test_same_origin_passes(host, origin):
    assert not sameorigin.is_cross_origin(head(host, origin))


@pytest.mark.parametrize("host,origin", [
    ("example.com", "https://evil.example"),
    ("example.com", "http://example.com.evil.example"),
    ("example.com", "http://sub.example.com"),
    ("example.com:8080", "http://example.com"),  # 8080 vs 80
    ("example.com:8080", "http://example.com:8081"),
    ("example.com:443", "http://example.com"),  # 443 vs 80
    ("example.com", "http://example.com:8080"),  # no port in Host: 80 or 443, not 8080
    ("[::1]:8080", "http://[::2]:8080"),
    ("[::1]:8080", "http://127.0.0.1:8080"),
    ("example.com", "null"),
    ("example.com", "NULL"),
    ("example.com", "file://"),
    ("example.com", "chrome-extension://abcdef"),  # no default port for the scheme
    ("example.com", "not an origin"),
    ("example.com", "http://example.com:99999"),
    ("example.com", "http://user@example.com"),
    ("example.com", "http://example.com/path"),
    ("example.com", ""),
    ("[::1", "http://[::1]"),  # a Host that names no host
    ("exa mple.com", "http://exa mple.com"),
])
def test_cross_origin_is_refused(host, origin):
    assert sameorigin.is_cross_origin(head(host, origin))


def test_no_origin_passes_whatever_the_host():
    assert not sameorigin.is_cross_origin(head("anything.example:1234"))
    assert not sameorigin.is_cross_origin(head("[garbage"))


def test_two_origin_headers_are_cross_origin():
    both = head("example.com", "http://example.com", ["Origin: http://example.com"])
    assert sameorigin.is_cross_origin(both)


def test_a_tls_listener_fills_in_443_for_a_host_without_port():
    assert not sameorigin.is_cross_origin(head("example.com", "https://example.com"), tls=True)
    assert sameorigin.is_cross_origin(head("example.com", "http://example.com"), tls=True)


def test_forwarded_host_and_proto_count_only_from_a_trusted_proxy():
    forwarded = ["X-Forwarded-Host: app.example.com", "X-Forwarded-Proto: https"]
    request = head("10.0.0.5:8080", "https://app.example.com", forwarded)
    assert not sameorigin.is_cross_origin(request, trusted_peer=True)
    assert sameorigin.is_cross_origin(request)  # untrusted: Host is compared
    # behind a trusted proxy the Host header no longer counts
    own = head("10.0.0.5:8080", "http://10.0.0.5:8080", forwarded)
    assert sameorigin.is_cross_origin(own, trusted_peer=True)
    # X-Forwarded-Proto: http makes a portless X-Forwarded-Host port 80
    plain = head("10.0.0.5:8080", "https://app.example.com",
                 ["X-Forwarded-Host: app.example.com", "X-Forwarded-Proto: http"])
    assert sameorigin.is_cross_origin(plain, trusted_peer=True)
    # several proxies: the first value is the host the client addressed
    chain = head("10.0.0.5:8080", "https://app.example.com",
                 ["X-Forwarded-Host: app.example.com, inner.local"])
    assert not sameorigin.is_cross_origin(chain, trusted_peer=True)
    # a trusted proxy without X-Forwarded-Host: Host is compared
    bare = head("app.example.com", "https://app.example.com")
    assert not sameorigin.is_cross_origin(bare, trusted_peer=True)


def test_parse_origin_fills_in_default_ports():
    assert sameorigin.parse_origin("https://A.example") == sameorigin.Authority("a.example", 443)
    assert sameorigin.parse_origin("ws://a.example") == sameorigin.Authority("a.example", 80)
    assert sameorigin.parse_origin("http://[0::1]:81") == sameorigin.Authority("[::1]", 81)
    assert sameorigin.parse_origin("null") is None


def test_origin_policies_replace_the_default_enforcing_or_shadow():
    policy = OriginPolicy("sites", (), False)
    assert sameorigin.checks_origin(policy)
    policy.mode = "shadow"
    assert sameorigin.checks_origin(policy)
    assert not sameorigin.applies(False, [object(), policy])
    assert sameorigin.applies(False, [object()])
    assert sameorigin.applies(False, ())
    assert not sameorigin.applies(True, ())


# ------------------------------------------------------------------ a real gateway

CONFIG = """
[listen:proxied]
endpoint = tcp:0:interface=127.0.0.1
trusted_proxies = 127.0.0.1/32

[listen:tls]
endpoint = tcp:0:interface=127.0.0.1
tls_cert = {cert}
tls_key = {key}

[policy:sites]
type = origin
allow = https://app.example.com

[policy:sites-shadow]
type = origin
allow = https://app.example.com
mode = shadow

[route:echo]
path = /echo
echo = yes

[route:open]
path = /open
echo = yes
allow_cross_origin = yes

[route:sites]
path = /sites
echo = yes
policies = sites

[route:shadow]
path = /shadow
echo = yes
policies = sites-shadow

[route:proxied]
path = /proxied
upstream = ws://127.0.0.1:9/nothing-listens-here
upstream_timeout = 2s

[admin]
endpoint = tcp:0:interface=127.0.0.1
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    from certs import TestCA

    directory = tmp_path_factory.mktemp("sameorigin")
    ca = TestCA()
    cert, key = ca.write_leaf(directory, "tls", "localhost")
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    gw = start_gateway(directory, CONFIG.format(cert=cert, key=key),
                       listeners=("main", "proxied", "tls", "admin"))
    gw.ca = str(directory / "ca.pem")
    yield gw
    assert gw.stop() == 0


def answer(gw, path, origin=None, host=None, listener="main", extra=b""):
    """(status, headers, body) of a raw upgrade request with *origin* and *host*."""
    port = gw.port(listener)
    host = host if host is not None else f"127.0.0.1:{port}"
    if origin is not None:
        extra = f"Origin: {origin}\r\n".encode() + extra
    return parse_response(raw_request(port, upgrade_request(path, host=host, extra=extra)))


def rejected(gw, **fields):
    return gw.wait_event(lambda e: e.get("event") == "websocket.connection.rejected"
                         and all(e.get(k) == v for k, v in fields.items()))


def test_a_foreign_origin_gets_403_and_a_rejected_event(gateway):
    status, headers, body = answer(gateway, "/echo", "https://evil.example",
                                   extra=b"User-Agent: evil-page/1\r\n")
    assert status == 403
    assert body.strip() == b"Cross-origin WebSocket refused"
    event = rejected(gateway, user_agent="evil-page/1")
    assert (event["status"], event["reason"], event["route"], event["policy"]) == \
        (403, "cross_origin", "echo", None)
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port('admin')}/metrics",
                                timeout=10) as response:
        metrics = response.read().decode()
    assert re.search(r'wsgate_handshakes_rejected_total\{(?=[^}]*reason="cross_origin")'
                     r'(?=[^}]*route="echo")(?=[^}]*status="403")[^}]*\} [1-9]', metrics)


def test_the_same_origin_is_accepted(gateway):
    port = gateway.port()
    assert answer(gateway, "/echo", f"http://127.0.0.1:{port}")[0] == 101
    assert answer(gateway, "/echo", f"HTTP://LOCALHOST:{port}", host=f"localhost:{port}")[0] \
        == 101
    # an IPv6 literal, written two ways (the Host header is only compared, not dialled)
    assert answer(gateway, "/echo", f"http://[0:0::1]:{port}", host=f"[::1]:{port}")[0] == 101
    # and a real client's messages flow
    async def scenario():
        async with connect(gateway.url("/echo"), origin=f"http://127.0.0.1:{port}") as ws:
            await ws.send("same site")
            assert await ws.recv() == "same site"
    run(scenario())


def test_a_proxy_route_refuses_before_contacting_its_upstream(gateway):
    assert answer(gateway, "/proxied", "https://evil.example")[0] == 403
    # the same origin gets as far as the (unreachable) upstream
    assert answer(gateway, "/proxied", f"http://127.0.0.1:{gateway.port()}")[0] == 503


def test_another_port_of_the_same_host_is_another_origin(gateway):
    port = gateway.port()
    assert answer(gateway, "/echo", f"http://127.0.0.1:{port + 1}")[0] == 403
    assert answer(gateway, "/echo", "http://127.0.0.1")[0] == 403


def test_origin_null_is_refused(gateway):
    assert answer(gateway, "/echo", "null")[0] == 403


def test_no_origin_is_accepted(gateway):
    assert answer(gateway, "/echo")[0] == 101
    async def scenario():
        async with connect(gateway.url("/echo")) as ws:  # a non-browser client
            await ws.send("no origin")
            assert await ws.recv() == "no origin"
    run(scenario())


def test_a_real_client_with_a_foreign_origin_is_refused(gateway):
    async def scenario():
        with pytest.raises(InvalidStatus) as info:
            await connect(gateway.url("/echo"), origin="https://evil.example")
        assert info.value.response.status_code == 403
    run(scenario())


def test_forwarded_host_counts_from_a_trusted_proxy_only(gateway):
    forwarded = b"X-Forwarded-Host: app.example.com\r\nX-Forwarded-Proto: https\r\n"
    # the proxied listener trusts 127.0.0.1: the page's host is the forwarded one
    assert answer(gateway, "/echo", "https://app.example.com", listener="proxied",
                  extra=forwarded)[0] == 101
    port = gateway.port("proxied")
    assert answer(gateway, "/echo", f"http://127.0.0.1:{port}", listener="proxied",
                  extra=forwarded)[0] == 403
    # the main listener trusts nobody: X-Forwarded-Host is a forgery to ignore
    assert answer(gateway, "/echo", "https://app.example.com", extra=forwarded)[0] == 403
    assert answer(gateway, "/echo", f"http://127.0.0.1:{gateway.port()}",
                  extra=forwarded)[0] == 101


def test_a_tls_listener_takes_a_portless_host_as_443(gateway):
    ctx = ssl.create_default_context(cafile=gateway.ca)

    def status(origin):
        import socket

        raw = socket.create_connection(("127.0.0.1", gateway.port("tls")), timeout=5)
        with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(upgrade_request("/echo", host="localhost",
                                         extra=f"Origin: {origin}\r\n".encode()))
            return parse_response(sock.recv(4096))[0]

    assert status("https://localhost") == 101
    assert status("https://localhost:443") == 101
    assert status("http://localhost") == 403


def test_allow_cross_origin_opts_out(gateway):
    assert answer(gateway, "/open", "https://evil.example")[0] == 101
    # a terminated route's Autobahn handshake no longer refuses null on its own
    assert answer(gateway, "/open", "null")[0] == 101
    assert answer(gateway, "/open", "file://")[0] == 101


def test_an_origin_policy_replaces_the_default(gateway):
    # a foreign origin the policy lists is accepted ...
    assert answer(gateway, "/sites", "https://app.example.com")[0] == 101
    # ... one it does not list is refused by the policy (its name is the reason) ...
    assert answer(gateway, "/sites", "https://evil.example",
                  extra=b"User-Agent: policy-check/1\r\n")[0] == 403
    event = rejected(gateway, user_agent="policy-check/1")
    assert (event["reason"], event["policy"]) == ("sites", "sites")
    # ... and so is the gateway's own origin: the list is the whole rule
    assert answer(gateway, "/sites", f"http://127.0.0.1:{gateway.port()}")[0] == 403


def test_a_shadow_origin_policy_replaces_the_default_too(gateway):
    assert answer(gateway, "/shadow", "https://evil.example")[0] == 101
    event = gateway.wait_event(lambda e: e.get("event") == "websocket.policy.shadow_denied"
                               and e.get("policy") == "sites-shadow")
    assert event["status"] == 403 and event["route"] == "shadow"


# ------------------------------------------------------------------ config and check


def _check(tmp_path, body):
    from wsgate.cli import check

    path = write_config(tmp_path, "[listen:main]\nendpoint = tcp:0:interface=127.0.0.1\n"
                        + body)
    out, err = io.StringIO(), io.StringIO()
    code = check.run(str(path), out, err)
    return code, out.getvalue(), err.getvalue()


def test_allow_cross_origin_defaults_to_no_and_is_a_boolean(tmp_path):
    from wsgate.config import load

    path = write_config(tmp_path, "[listen:main]\nendpoint = tcp:0:interface=127.0.0.1\n"
                        "[route:a]\npath = /a\necho = yes\n"
                        "[route:b]\npath = /b\necho = yes\nallow_cross_origin = on\n")
    routes = {route.name: route for route in load(str(path)).routes}
    assert routes["a"].allow_cross_origin is False
    assert routes["b"].allow_cross_origin is True
    code, _, err = _check(tmp_path, "[route:a]\npath = /a\necho = yes\n"
                                    "allow_cross_origin = maybe\n")
    assert code == 1
    assert "[route:a] allow_cross_origin: expected yes or no" in err


def test_allow_cross_origin_on_a_static_route_is_an_error(tmp_path):
    code, _, err = _check(tmp_path, "[route:page]\npath = /page/*\nstatic = @demo\n"
                                    "allow_cross_origin = yes\n")
    assert code == 1
    assert "[route:page] allow_cross_origin: applies to WebSocket routes only" in err


def test_check_warns_about_an_opted_out_proxy_route(tmp_path):
    code, out, err = _check(tmp_path, """
[policy:sites]
type = origin
allow = https://app.example.com

[policy:sites-shadow]
type = origin
allow = https://app.example.com
mode = shadow

[route:app]
path = /app
upstream = ws://127.0.0.1:9/app
allow_cross_origin = yes

[route:guarded]
path = /guarded
upstream = ws://127.0.0.1:9/guarded
allow_cross_origin = yes
policies = sites

[route:watched]
path = /watched
upstream = ws://127.0.0.1:9/watched
allow_cross_origin = yes
policies = sites-shadow

[route:default]
path = /default
upstream = ws://127.0.0.1:9/default

[route:echo]
path = /echo
echo = yes
allow_cross_origin = yes
""")
    assert code == 0
    warned = re.findall(r"^wsgate: warning: \[route:(\w+)\] allow_cross_origin = yes on a "
                        r"proxy route", err, re.M)
    assert warned == ["app", "watched"]  # a shadow policy lets every page through
    assert "cookies" in err
    echo = next(line for line in out.splitlines() if line.startswith("echo "))
    assert "allow_cross_origin=yes" in echo
