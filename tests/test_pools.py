"""Upstream pools over real sockets: 3 Node ``ws`` servers behind one route.

The balance, failover and health tests with many clients are in
test_pools_balance.py and test_pools_failover.py; this module holds the
basics: a pool proxies, ``/upstreams`` and the metrics show its servers.
"""

import json

import pytest
from websockets.asyncio.client import connect

from harness import NodeUpstream, admin_text, metric, run, start_gateway
from pool_helpers import ADMIN, TOKEN, poll, pool_config


@pytest.fixture(scope="module")
def servers():
    nodes = [NodeUpstream() for _ in range(3)]
    yield nodes
    for node in nodes:
        node.stop()


def test_a_pool_proxies_spreads_and_reports_its_servers(tmp_path, servers):
    gw = start_gateway(tmp_path, ADMIN + pool_config(servers), listeners=("main", "admin"))

    async def scenario():
        clients = [await connect(gw.url("/app")) for _ in range(30)]
        ports = [await ws.recv() for ws in clients]
        await clients[0].send("hello")
        assert await clients[0].recv() == "echo: hello"
        status, body = admin_text(gw, "GET", "/upstreams", TOKEN)
        metrics = admin_text(gw, "GET", "/metrics", TOKEN)[1]
        for ws in clients:
            await ws.close()
        return ports, status, json.loads(body), metrics

    ports, status, body, metrics = run(scenario())
    counts = {node.port: ports.count(f"port:{node.port}") for node in servers}
    assert counts == {node.port: 10 for node in servers}, counts
    assert status == 200
    (pool,) = body["pools"]
    assert pool["pool"] == "app" and pool["balance"] == "least_conn"
    assert [s["connections"] for s in pool["servers"]] == [10, 10, 10]
    assert {s["state"] for s in pool["servers"]} == {"up"}
    for node in servers:
        labels = {"pool": "app", "server": f"127.0.0.1:{node.port}"}
        assert metric(metrics, "wsgate_upstream_connections", **labels) == 10
        assert metric(metrics, "wsgate_upstream_up", **labels) == 1
    assert metric(metrics, "wsgate_upstream_pool_connect_seconds_count", pool="app",
                  result="ok") == 30
    assert admin_text(gw, "GET", "/upstreams")[0] == 401  # the token is required
    # every connection closed: the counts come back to 0
    poll(lambda: json.loads(admin_text(gw, "GET", "/upstreams", TOKEN)[1]),
         lambda b: [s["connections"] for s in b["pools"][0]["servers"]] == [0] * 3, timeout=10)
    assert gw.stop() == 0


def test_unknown_pool_is_a_config_error(tmp_path):
    from harness import run_twistd_expecting_failure, write_config

    path = write_config(tmp_path, """
[listen:main]
endpoint = tcp:0:interface=127.0.0.1

[route:app]
path = /app
upstream = @nowhere
""")
    code, err, _ = run_twistd_expecting_failure(path)
    assert code != 0
    assert "[route:app] upstream: no [upstream:nowhere] section" in err
