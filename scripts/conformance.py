#!/usr/bin/env python3
"""Run the Autobahn testsuite (wstest fuzzingclient) against a real wsgate process.

Usage:  python scripts/conformance.py [--cases quick|all|1.*,2.*] [--targets echo,proxy]
                                      [--update-readme]

Starts ``twistd -n wsgate`` with a conformance config (16 MiB messages, since
cases 9.* send 16 MiB, and permessage-deflate for 12.*/13.*), runs wstest from
the Python 2.7 virtualenv that scripts/install-wstest.sh makes, reads the
report's index.json and prints the OK / NON-STRICT / INFORMATIONAL / FAILED
counts. Exit status 1 when any case FAILED (or wstest could not run).
"""

import argparse
import collections
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

QUICK_CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "8.*", "9.*", "10.*"]
WSTEST = os.environ.get("WSGATE_WSTEST", os.path.join(ROOT, ".venv-wstest", "bin", "wstest"))

GATEWAY_CONFIG = """
[wsgate]
node_id = conformance
log_format = json

[listen:main]
endpoint = tcp:0:interface=127.0.0.1
max_message_size = 16MiB
compression = permessage-deflate
ping_interval = 0

[route:echo]
path = /echo
echo = yes
"""


def summarize(index, agent):
    """Count behaviours per outcome; a case counts by its worse of behavior/behaviorClose."""
    order = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
    counts = collections.Counter()
    failed = []
    for case, result in index[agent].items():
        outcomes = [result.get("behavior", "FAILED"), result.get("behaviorClose", "OK")]
        worst = max(outcomes, key=lambda o: order.index(o) if o in order else len(order))
        if worst == "INFORMATIONAL" and result.get("behavior") != "INFORMATIONAL":
            worst = result.get("behavior")
        counts[worst] += 1
        if worst == "FAILED":
            failed.append(case)
    return counts, sorted(failed)


def run_wstest(url, cases, outdir, agent="wsgate", timeout=3600):
    """Run fuzzingclient against *url*; return the parsed index.json."""
    if not os.path.exists(WSTEST):
        raise SystemExit(f"wstest not found at {WSTEST}: run scripts/install-wstest.sh")
    spec = {
        "outdir": outdir,
        "servers": [{"agent": agent, "url": url}],
        "cases": cases,
        "exclude-cases": [],
        "exclude-agent-cases": {},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    try:
        proc = subprocess.run([WSTEST, "-m", "fuzzingclient", "-s", spec_path],
                              cwd=outdir, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    finally:
        os.unlink(spec_path)
    index_path = os.path.join(outdir, "index.json")
    if not os.path.exists(index_path):
        raise SystemExit(f"wstest wrote no report (exit {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(index_path) as f:
        return json.load(f)


PROXY_ROUTE = """
[route:echo]
path = /echo
upstream = ws://127.0.0.1:{port}/conformance
"""


def run_against_gateway(cases, outdir, target="echo"):
    """Start a gateway, run *cases* against its /echo route, stop it.

    *target* ``echo``: the gateway's own echo route. ``proxy``: /echo proxies
    to a Node ``ws`` exact-echo upstream (tests/peers/upstream.js).
    """
    import pathlib

    from harness import NodeUpstream, start_gateway

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="wsgate-conformance-"))
    upstream = None
    config = GATEWAY_CONFIG
    if target == "proxy":
        upstream = NodeUpstream()
        head, _, _ = GATEWAY_CONFIG.partition("[route:echo]")
        config = head + PROXY_ROUTE.format(port=upstream.port)
    try:
        gateway = start_gateway(workdir, "", base=config)
        try:
            index = run_wstest(gateway.url("/echo"), cases, outdir)
        finally:
            code = gateway.stop()
    finally:
        if upstream is not None:
            upstream.stop()
    if code != 0:
        raise SystemExit(f"the gateway exited with {code} during the run")
    return index


def format_summary(counts, cases, failed):
    parts = ", ".join(f"{counts.get(k, 0)} {k}" for k in
                      ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"))
    text = f"{sum(counts.values())} cases ({', '.join(cases)}): {parts}"
    if failed:
        text += f"; failed: {', '.join(failed[:20])}"
    return text


def update_readme(line):
    path = os.path.join(ROOT, "README.rst")
    with open(path) as f:
        text = f.read()
    block = (".. conformance-summary-start\n\n" + line + "\n\n.. conformance-summary-end")
    text = re.sub(r"\.\. conformance-summary-start.*?\.\. conformance-summary-end", block,
                  text, flags=re.S)
    with open(path, "w") as f:
        f.write(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="quick",
                        help="quick (1.*-10.*), all, or a comma-separated list")
    parser.add_argument("--update-readme", action="store_true")
    parser.add_argument("--targets", default="echo,proxy",
                        help="echo, proxy or both (comma-separated)")
    args = parser.parse_args()
    cases = {"quick": QUICK_CASES, "all": ["*"]}.get(args.cases) or args.cases.split(",")
    lines, any_failed = [], False
    date = datetime.date.today().isoformat()
    for target in args.targets.split(","):
        outdir = os.path.join(ROOT, "reports", target)
        os.makedirs(outdir, exist_ok=True)
        index = run_against_gateway(cases, outdir, target)
        counts, failed = summarize(index, "wsgate")
        summary = format_summary(counts, cases, failed)
        print(f"{target}: {summary}", flush=True)
        label = "Echo route" if target == "echo" else "Through the proxy (Node ws echo upstream)"
        lines.append(f"- {label}, {date}, autobahntestsuite 25.10.1: {summary}.")
        any_failed = any_failed or bool(failed)
    if args.update_readme:
        update_readme("\n".join(lines))
    return 1 if any_failed else 0


if __name__ == "__main__":
    sys.exit(main())
