"""Shared bits of the benchmark's Python peer servers (not part of wsgate)."""

import json
import resource
import sys


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def announce(port, **extra):
    """Tell bench/run.py the port: one JSON line on stdout."""
    sys.stdout.write(json.dumps({"listening": port, **extra}) + "\n")
    sys.stdout.flush()
