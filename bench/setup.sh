#!/usr/bin/env bash
# Installs what bench/run.py needs, idempotently (each step checks first):
#   - Debian's nginx (nginx-light, else nginx), never started as a service: a
#     temporary policy-rc.d refuses the package's start; the benchmark runs its own
#     nginx with -c on a temporary config and a free loopback port
#   - Node.js/npm and redis-server (as scripts/install-peers.sh does)
#   - bench/node_modules: ws + bufferutil + utf-8-validate, from package-lock.json (npm ci)
#   - matplotlib in the project's .venv (for bench/results/ratios.png)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
venv="${VENV:-$root/.venv}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

apt_updated=""
apt_install() {
    if [ -z "$apt_updated" ]; then $sudo apt-get update -qq; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! [ -x /usr/sbin/nginx ]; then
    policy=/usr/sbin/policy-rc.d
    created=""
    if ! [ -e "$policy" ]; then
        # exit 101 = "action forbidden": invoke-rc.d and deb-systemd-invoke do not start it
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod 755 "$policy"
        created=1
    fi
    trap 'if [ -n "$created" ]; then $sudo rm -f "$policy"; fi' EXIT
    if apt-cache show nginx-light >/dev/null 2>&1 || { $sudo apt-get update -qq && apt_updated=1; \
            apt-cache show nginx-light >/dev/null 2>&1; }; then
        apt_install nginx-light
    else
        apt_install nginx
    fi
fi
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
command -v redis-server >/dev/null || apt_install redis-server
command -v taskset >/dev/null || apt_install util-linux

if ! [ -f "$here/node_modules/ws/package.json" ] || ! [ -f "$here/node_modules/bufferutil/package.json" ] \
        || ! [ -f "$here/node_modules/utf-8-validate/package.json" ]; then
    (cd "$here" && npm ci --no-audit --no-fund --silent)
fi
node -e "require('$here/node_modules/bufferutil'); require('$here/node_modules/utf-8-validate')" \
    || { echo "bench/setup.sh: bufferutil/utf-8-validate do not load" >&2; exit 1; }

"$venv/bin/python" -c "import matplotlib" 2>/dev/null || "$venv/bin/pip" install -q matplotlib
