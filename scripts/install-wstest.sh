#!/usr/bin/env bash
# Install the Autobahn testsuite (wstest, autobahntestsuite 25.10.1 -- Python 2.7
# only) into a Python 2.7 virtualenv, idempotently.
#
#   usage: bash scripts/install-wstest.sh [VENV_DIR]      (default: <repo>/.venv-wstest)
#
# Then:  $VENV_DIR/bin/wstest -m fuzzingclient -s spec.json
#
# Python 2.7 is taken from, in order: $PYTHON27; $(pyenv root)/versions/2.7.18/bin/python2.7;
# python2.7 on PATH. None found -> one line on stderr, exit 1.
# The 2.7 environment is made by virtualenv 20.21.1 (the 20.21.x line is the last
# that creates 2.7 environments), run from a throw-away Python 3 venv kept inside
# VENV_DIR/.bootstrap (python from $PYTHON3, else python3) and removed on success.
# Every py2 package is pinned in scripts/wstest-requirements.txt.
# A second run only checks (imports + `wstest --help`) and prints the path.
# The last line on stdout is always the path of wstest; progress goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
reqs="$here/wstest-requirements.txt"
venv="${1:-$root/.venv-wstest}"
case "$venv" in /*) ;; *) venv="$(pwd)/$venv" ;; esac
venv="${venv%/}"
wstest="$venv/bin/wstest"
stamp="$venv/.wstest-requirements.sha256"
virtualenv_pin="virtualenv==20.21.1"
wanted_version="25.10.1"

say() { echo "install-wstest: $*" >&2; }
die() { echo "install-wstest: error: $*" >&2; exit 1; }

# Quiet, non-interactive pip for Python 2.7.
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_PYTHON_VERSION_WARNING=1 PIP_NO_INPUT=1 PIP_PROGRESS_BAR=off

is_py27() { [ -n "$1" ] && "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (2, 7) else 1)' >/dev/null 2>&1; }

find_python27() {
    if [ -n "${PYTHON27:-}" ]; then
        # An explicit choice is never silently replaced by another interpreter.
        is_py27 "$PYTHON27" || die "PYTHON27=$PYTHON27 is not a working Python 2.7 interpreter"
        echo "$PYTHON27"; return
    fi
    local pyenv_root="" cand
    if command -v pyenv >/dev/null 2>&1; then
        pyenv_root="$(pyenv root 2>/dev/null || true)"
    fi
    pyenv_root="${pyenv_root:-${PYENV_ROOT:-}}"
    if [ -n "$pyenv_root" ]; then
        cand="$pyenv_root/versions/2.7.18/bin/python2.7"
        if is_py27 "$cand"; then echo "$cand"; return; fi
    fi
    # On PATH (a pyenv shim for an inactive version fails is_py27, so it is skipped).
    if cand="$(command -v python2.7 2>/dev/null)" && is_py27 "$cand"; then
        echo "$cand"; return
    fi
    die "no Python 2.7 found (set PYTHON27, or install 2.7.18 with pyenv: 'pyenv install 2.7.18', or put python2.7 on PATH)"
}

reqs_sum() { sha256sum "$reqs" | cut -d' ' -f1; }

# The installed environment works: Python 2.7, the pinned autobahntestsuite
# imports with its deps, wstest starts, and the requirements did not change.
installed_ok() {
    [ -x "$venv/bin/python" ] && [ -x "$wstest" ] || return 1
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(reqs_sum)" ] || return 1
    "$venv/bin/python" -c "
import sys
assert sys.version_info[:2] == (2, 7)
import autobahntestsuite, autobahn, twisted
from autobahntestsuite import wstest
assert autobahntestsuite.__version__ == '$wanted_version', autobahntestsuite.__version__
" >/dev/null 2>&1 || return 1
    "$wstest" --help >/dev/null 2>&1
}

[ -f "$reqs" ] || die "missing $reqs"
py27="$(find_python27)"

if installed_ok; then
    echo "$wstest"
    exit 0
fi

say "using Python 2.7 at $py27"

# Make (or repair) the 2.7 virtualenv. A directory is only ever removed if it
# is a virtualenv (has pyvenv.cfg) or is empty -- never an arbitrary directory.
if [ -e "$venv" ]; then
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (2, 7) else 1)' >/dev/null 2>&1 \
        && "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
        say "reusing the Python 2.7 virtualenv at $venv"
    elif [ -f "$venv/pyvenv.cfg" ] || [ -d "$venv/.bootstrap" ] || [ -z "$(ls -A "$venv" 2>/dev/null)" ]; then
        say "removing the unusable environment at $venv"
        rm -rf "$venv"
    else
        die "$venv exists and is not a virtualenv; refusing to touch it (pass another VENV_DIR)"
    fi
fi

if [ ! -x "$venv/bin/python" ]; then
    py3="${PYTHON3:-python3}"
    "$py3" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 7) else 1)' >/dev/null 2>&1 \
        || die "need Python >= 3.7 with the venv module to run virtualenv (set PYTHON3); '$py3' is not one"
    boot="$venv/.bootstrap"
    mkdir -p "$venv"
    if [ ! -x "$boot/bin/virtualenv" ]; then
        say "creating bootstrap venv with $virtualenv_pin in $boot"
        rm -rf "$boot"
        "$py3" -m venv "$boot"
        "$boot/bin/python" -m pip install -q --disable-pip-version-check "$virtualenv_pin" >"$venv/.bootstrap.log" 2>&1 \
            || { tail -n 30 "$venv/.bootstrap.log" >&2; die "could not install $virtualenv_pin (log: $venv/.bootstrap.log)"; }
    fi
    say "creating Python 2.7 virtualenv in $venv"
    # --app-data keeps virtualenv's wheel cache inside the venv, not in ~/.local/share.
    "$boot/bin/virtualenv" --quiet --no-download --no-periodic-update \
        --app-data "$boot/app-data" -p "$py27" "$venv" >&2 \
        || die "virtualenv could not create a 2.7 environment in $venv"
fi

say "installing the pinned wstest dependency set (first time: ~1 min, builds autobahn/wsaccel from sdist)"
log="$venv/.pip-install.log"
if ! "$venv/bin/python" -m pip install --no-deps -r "$reqs" >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 40 >&2
    die "pip install -r $reqs failed (full log: $log)"
fi
"$venv/bin/python" -m pip check >&2 || die "the pinned set in $reqs is inconsistent (pip check above)"

reqs_sum >"$stamp"
if ! installed_ok; then
    "$wstest" --help >&2 || true
    die "wstest was installed but does not start: $wstest"
fi
rm -rf "$venv/.bootstrap" "$venv/.bootstrap.log"
say "ok: $("$venv/bin/python" -c 'import autobahntestsuite, autobahn, twisted; print("autobahntestsuite %s, autobahn %s, Twisted %s" % (autobahntestsuite.__version__, autobahn.__version__, twisted.__version__))' 2>/dev/null)"
echo "$wstest"
