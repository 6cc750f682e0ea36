"""The benchmark's generated gateway config stays valid (a config key change once broke
every wsgate scenario of bench/run.py while the test suite stayed green)."""

import ast
import os

from wsgate.config import load

BENCHLIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "bench", "benchlib.py")


def _benchlib_string(name):
    tree = ast.parse(open(BENCHLIB, encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"bench/benchlib.py has no {name}")


def _wsgate_base():
    return _benchlib_string("WSGATE_BASE")


def test_the_benchmarks_gateway_config_loads(tmp_path):
    path = tmp_path / "bench.ini"
    path.write_text(_wsgate_base().format(ping_interval="0", wsgate_extra="")
                    + "[route:echo]\npath = /echo\necho = yes\n")
    config = load(str(path))
    assert config.listeners[0].backlog == 4096


def test_the_benchmarks_pool_config_loads(tmp_path):
    # bench/run.py's pool scenario: [upstream:bench] of three servers, a route to @bench
    servers = ", ".join(f"ws://127.0.0.1:{port}/echo" for port in (40001, 40002, 40003))
    path = tmp_path / "bench-pool.ini"
    path.write_text(_wsgate_base().format(ping_interval="0", wsgate_extra="")
                    + _benchlib_string("POOL_ROUTES").format(servers=servers,
                                                             balance="least_conn"))
    config = load(str(path))
    assert config.listeners[0].backlog == 4096
    pool = config.pools["bench"]
    assert pool.balance == "least_conn"
    assert [server.url.port for server in pool.servers] == [40001, 40002, 40003]
