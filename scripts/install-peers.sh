#!/usr/bin/env bash
# Installs the real peers the test suite talks to, idempotently:
#   - Node.js and the npm `ws` package (tests/peers): the upstream WebSocket servers
#   - redis-server: the tests start their own on free ports (never the machine's 6379)
#   - Debian's chromium: the demo page test drives it through Playwright
#   - the Autobahn testsuite (wstest) in a Python 2.7 virtualenv (.venv-wstest)
# Safe to run again: each step checks before it installs. Runs as root in CI
# (apt-get); elsewhere it needs sudo rights only for the missing system packages.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
command -v redis-server >/dev/null || apt_install redis-server
[ -x /usr/bin/chromium ] || apt_install chromium fonts-dejavu-core

if [ ! -f "$root/tests/peers/node_modules/ws/package.json" ]; then
    (cd "$root/tests/peers" && npm ci --no-audit --no-fund --silent)
fi

bash "$here/install-wstest.sh" >/dev/null
