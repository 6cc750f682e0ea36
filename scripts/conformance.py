#!/usr/bin/env python3
"""Run the Autobahn testsuite (wstest fuzzingclient) against a real wsgate process.

Usage:  python scripts/conformance.py [--cases quick|all|1.*,2.*]
                                      [--targets echo,proxy,proxy-tls]
                                      [--fast-paths yes|no] [--update-readme]

Starts ``twistd -n wsgate`` with a conformance config (16 MiB messages, since
cases 9.* send 16 MiB, permessage-deflate for 12.*/13.*, and 65,537 frames
per message for 9.3.*/9.4.*), runs wstest from the Python 2.7 virtualenv that
scripts/install-wstest.sh makes, and reads the report's index.json.

The report has two verdicts per case, and both are counted: ``behavior``
(what the gateway sent back) and ``behaviorClose`` (how the connection was
closed). A case fails when its behavior is FAILED or its close verdict is
FAILED, UNCLEAN or FAILED BY CLIENT (the testsuite client had to drop the
TCP connection the gateway should have closed: RFC 6455 §7.1.1 has the
server close it first, and a gateway that does not keeps a file descriptor
per connection until the client gives up).

Targets: ``echo`` (the gateway's own echo route), ``proxy`` (a route that
proxies to a Node ``ws`` exact-echo upstream); a ``-tls`` suffix puts the
route behind a TLS listener with a certificate made for the run (the
testsuite connects with ``wss://`` and, given no ``hostname``, does not
verify it). Exit status 1 when any case failed (or wstest could not run).
"""

import argparse
import collections
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

QUICK_CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "8.*", "9.*", "10.*"]
TARGETS = ("echo", "proxy", "proxy-tls")
WSTEST = os.environ.get("WSGATE_WSTEST", os.path.join(ROOT, ".venv-wstest", "bin", "wstest"))

# The columns of the summary, for both verdicts; any other verdict the report
# holds (WRONG CODE, FAILED BY CLIENT, UNIMPLEMENTED) is listed after them.
COLUMNS = ("OK", "NON-STRICT", "INFORMATIONAL", "FAILED", "UNCLEAN")
FAILING_BEHAVIOR = frozenset({"FAILED"})
FAILING_CLOSE = frozenset({"FAILED", "UNCLEAN", "FAILED BY CLIENT"})

GATEWAY_CONFIG = """
[wsgate]
node_id = conformance
log_format = json

[listen:main]
endpoint = tcp:0:interface=127.0.0.1
max_message_size = 16MiB
# 9.3.1 and 9.4.1 send 4 MiB in 65,536 fragments of 64 bytes (plus an empty
# final frame: max_fragments counts the frames after the first).
max_fragments = 65536
compression = permessage-deflate
ping_interval = 0
"""

ECHO_ROUTE = """
[route:echo]
path = /echo
echo = yes
"""

PROXY_ROUTE = """
[route:echo]
path = /echo
upstream = ws://127.0.0.1:{port}/conformance
"""


@dataclasses.dataclass
class Summary:
    """Both verdicts of every case of one report, counted."""

    behavior: collections.Counter
    close: collections.Counter
    failed: list  # case ids whose behavior or close verdict is a failure
    durations: dict  # case id -> seconds

    @property
    def cases(self):
        return sum(self.behavior.values())

    def slowest(self, n=3):
        return sorted(self.durations.items(), key=lambda item: -item[1])[:n]


def summarize(index, agent):
    """Count ``behavior`` and ``behaviorClose`` of each case in *index* (index.json)."""
    behavior, close = collections.Counter(), collections.Counter()
    failed, durations = [], {}
    for case, result in index[agent].items():
        verdict = result.get("behavior", "FAILED")
        close_verdict = result.get("behaviorClose", "FAILED")
        behavior[verdict] += 1
        close[close_verdict] += 1
        if verdict in FAILING_BEHAVIOR or close_verdict in FAILING_CLOSE:
            failed.append(case)
        durations[case] = result.get("duration", 0) / 1000
    return Summary(behavior, close, sorted(failed, key=_case_key), durations)


def _case_key(case):
    return [int(part) if part.isdigit() else part for part in case.split(".")]


def _counts(counter):
    extra = sorted(k for k in counter if k not in COLUMNS and counter[k])
    return ", ".join(f"{counter.get(k, 0)} {k}" for k in (*COLUMNS, *extra))


def format_summary(summary, cases):
    text = (f"{summary.cases} cases ({', '.join(cases)}): "
            f"behavior {_counts(summary.behavior)}; close {_counts(summary.close)}")
    if summary.failed:
        more = len(summary.failed) - 20
        text += f"; failed: {', '.join(summary.failed[:20])}" + (f" (+{more})" if more > 0 else "")
    return text


def run_wstest(url, cases, outdir, agent="wsgate", timeout=3600):
    """Run fuzzingclient against *url*; return the parsed index.json.

    For a ``wss://`` URL the server entry carries no ``hostname``: the
    fuzzingclient then uses Twisted's ``ClientContextFactory``, which does not
    verify the certificate (with a hostname it would verify against the
    system's trust store).
    """
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


def gateway_config(workdir, target, upstream_port=None):
    """The conformance config for *target* (see the module docstring)."""
    kind, _, tls = target.partition("-")
    if kind not in ("echo", "proxy") or tls not in ("", "tls"):
        raise SystemExit(f"unknown target {target!r}: expected echo or proxy, "
                         "optionally with -tls")
    config = GATEWAY_CONFIG
    if tls:
        import certs

        cert, key = certs.TestCA().write_leaf(workdir, "conformance", "127.0.0.1", "localhost")
        config += f"tls_cert = {cert}\ntls_key = {key}\n"
    if kind == "proxy":
        return config + PROXY_ROUTE.format(port=upstream_port)
    return config + ECHO_ROUTE


def run_against_gateway(cases, outdir, target="echo"):
    """Start a gateway for *target*, run *cases* against its /echo route, stop it."""
    import pathlib

    from harness import NodeUpstream, start_gateway

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="wsgate-conformance-"))
    upstream = NodeUpstream() if target.startswith("proxy") else None
    try:
        config = gateway_config(workdir, target, upstream and upstream.port)
        gateway = start_gateway(workdir, "", base=config)
        try:
            scheme = "wss" if target.endswith("-tls") else "ws"
            index = run_wstest(gateway.url("/echo", scheme=scheme), cases, outdir)
        finally:
            code = gateway.stop()
    finally:
        if upstream is not None:
            upstream.stop()
    if code != 0:
        raise SystemExit(f"the gateway exited with {code} during the run")
    return index


LABELS = {
    "echo": "Echo route",
    "proxy": "Through the proxy (Node ws echo upstream)",
    "proxy-tls": "Through the proxy behind a TLS listener (wss)",
    "echo-tls": "Echo route behind a TLS listener (wss)",
}


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
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated: echo, proxy, proxy-tls (or echo-tls)")
    parser.add_argument("--fast-paths", choices=("yes", "no"),
                        help="[wsgate] fast_paths for the gateway (default: its default)")
    args = parser.parse_args()
    if args.fast_paths:
        os.environ["WSGATE_TEST_FAST_PATHS"] = args.fast_paths  # read by the test harness
    cases = {"quick": QUICK_CASES, "all": ["*"]}.get(args.cases) or args.cases.split(",")
    lines, any_failed = [], False
    date = datetime.date.today().isoformat()
    for target in args.targets.split(","):
        outdir = os.path.join(ROOT, "reports", target)
        os.makedirs(outdir, exist_ok=True)
        started = time.monotonic()
        index = run_against_gateway(cases, outdir, target)
        elapsed = time.monotonic() - started
        summary = summarize(index, "wsgate")
        text = format_summary(summary, cases)
        slowest = ", ".join(f"{case} {seconds:.1f} s" for case, seconds in summary.slowest())
        print(f"{target}: {text}\n{target}: {elapsed:.0f} s; slowest cases: {slowest}",
              flush=True)
        label = LABELS.get(target, target)
        lines.append(f"- {label}, {date}, autobahntestsuite 25.10.1: {text}.")
        any_failed = any_failed or bool(summary.failed)
    if args.update_readme:
        update_readme("\n".join(lines))
    return 1 if any_failed else 0


if __name__ == "__main__":
    sys.exit(main())
