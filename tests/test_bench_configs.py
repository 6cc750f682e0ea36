"""The benchmark's generated gateway config stays valid (a config key change once broke
every wsgate scenario of bench/run.py while the test suite stayed green)."""

import ast
import os

from wsgate.config import load

BENCHLIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "bench", "benchlib.py")


def _wsgate_base():
    tree = ast.parse(open(BENCHLIB, encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["WSGATE_BASE"]:
            return ast.literal_eval(node.value)
    raise AssertionError("bench/benchlib.py has no WSGATE_BASE")


def test_the_benchmarks_gateway_config_loads(tmp_path):
    path = tmp_path / "bench.ini"
    path.write_text(_wsgate_base().format(ping_interval="0", wsgate_extra="")
                    + "[route:echo]\npath = /echo\necho = yes\n")
    config = load(str(path))
    assert config.listeners[0].backlog == 4096
