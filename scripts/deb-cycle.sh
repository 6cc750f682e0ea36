#!/usr/bin/env bash
# The Debian package's whole life on this machine, checked step by step:
#   build deps (installed where missing) -> dpkg-buildpackage -us -uc -b from a
#   clean copy of the repo -> lintian (no error, no un-overridden warning) ->
#   apt-get install ./wsgate_*.deb -> files, conffile, user, unit
#   (systemd-analyze verify) -> the installed gateway started as the unit's
#   ExecStart would, as user wsgate -> WebSocket echo -> SIGHUP (still serves)
#   -> SIGTERM (exit 0) -> apt-get purge -> nothing left but the wsgate user.
#
# `--build-only` stops after lintian (what `make deb` runs): the .deb is then
# in dist/deb/.
#
# Runs as root, non-interactively, idempotently (a package left installed by an
# interrupted run is purged first). Needs port 8080 free: the default config
# listens on 127.0.0.1:8080. Ends with a PASS/FAIL line; exits 1 on any failure.
#
# Environment:
#   DEB_SOURCE=worktree  build from the work tree's tracked and untracked,
#                        not ignored files (default; = HEAD in a fresh clone)
#   DEB_SOURCE=HEAD      build from `git archive HEAD`
#   KEEP_INSTALLED=1     leave the package installed when the cycle fails
# Artifacts (the .deb, build log, lintian output, gateway log): dist/deb/.
set -euo pipefail

build_only=0
case "${1:-}" in
    "") ;;
    --build-only) build_only=1 ;;
    *) echo "usage: $0 [--build-only]" >&2; exit 2 ;;
esac

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
out="$root/dist/deb"

# Debian's tools and interpreter, never a pyenv shim or an activated venv.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset VIRTUAL_ENV PYTHONHOME PYTHONPATH PYENV_VERSION
export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C.UTF-8

PKG=wsgate
VENV=/opt/venvs/wsgate
CONF=/etc/wsgate/wsgate.ini
UNIT=/lib/systemd/system/wsgate.service
PORT=8080        # the echo listener of the default config; read from it below
ADMIN_PORT=""    # [admin]'s port when the installed config has one
EXEC_START=("$VENV/bin/twistd" --nodaemon --pidfile= wsgate --config "$CONF")
# Tools this script uses besides the package's Build-Depends.
TOOLS=(build-essential dpkg-dev debhelper dh-virtualenv lintian python3 python3-dev
       python3-venv git systemd adduser util-linux)

t_start=$SECONDS
passed=()
failed=()
work=""
gw_pid=""
installed_by_us=0
made_rundir=0

log() { printf '%s\n' "deb-cycle: $*"; }
pass() { passed+=("$1"); log "ok   $1"; }
fail() { failed+=("$1"); log "FAIL $1${2:+: $2}"; }
check() {  # check NAME COMMAND...: record whether COMMAND succeeds
    local name="$1"; shift
    if "$@"; then pass "$name"; else fail "$name"; fi
}

summary() {
    local total=$((SECONDS - t_start))
    echo
    log "timings: deps ${t_deps:-?}s, build ${t_build:-?}s, lintian ${t_lintian:-?}s," \
        "install+checks ${t_install:-?}s, run ${t_run:-?}s, purge ${t_purge:-?}s, total ${total}s"
    log "artifacts in $out"
    if [ ${#failed[@]} -eq 0 ]; then
        log "${#passed[@]} passed, 0 failed"
        echo "deb-cycle: PASS (${#passed[@]} checks, ${total}s)"
        return 0
    fi
    log "${#passed[@]} passed, ${#failed[@]} failed"
    local IFS=";"
    log "failed: ${failed[*]}"
    echo "deb-cycle: FAIL (${#failed[@]} of $(( ${#passed[@]} + ${#failed[@]} )) checks failed, ${total}s)"
    return 1
}

abort() {  # a step the rest depends on failed: stop here
    fail "$1" "${2:-}"
    exit 1
}

alive() {  # the gateway we started is running (not exited, not a zombie)
    local st
    [ -n "$gw_pid" ] || return 1
    st="$(ps -o stat= -p "$gw_pid" 2>/dev/null)" || return 1
    [[ "$st" != Z* ]]
}

cleanup() {
    local rc=$?
    trap - EXIT
    if [ "$rc" -ne 0 ] && [ ${#failed[@]} -eq 0 ]; then
        failed+=("unexpected error (status $rc) at line ${err_line:-?}")
    fi
    if alive; then
        kill -KILL "$gw_pid" 2>/dev/null || true
        wait "$gw_pid" 2>/dev/null || true
    fi
    [ "$made_rundir" -eq 0 ] || rm -rf /run/wsgate
    if [ "$installed_by_us" -eq 1 ] && [ "${KEEP_INSTALLED:-0}" != 1 ] && pkg_present; then
        log "purging $PKG left installed by this failed run"
        apt-get purge -y -qq "$PKG" >/dev/null 2>&1 || true
    fi
    [ -z "$work" ] || rm -rf "$work"
    summary || rc=1
    exit "$rc"
}

pkg_present() {  # installed, or removed with its conffiles left
    local st
    st="$(dpkg-query -W -f='${db:Status-Status}' "$PKG" 2>/dev/null)" || return 1
    [ -n "$st" ] && [ "$st" != not-installed ]
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/${1:-$PORT}") 2>/dev/null; }

config_ports() {  # "main=PORT admin=PORT all=PORT,PORT" for the tcp endpoints of $CONF
    /usr/bin/python3 -B - "$CONF" <<'PY'
import configparser, re, sys
c = configparser.ConfigParser(interpolation=None, comment_prefixes=(";", "#"))
c.read(sys.argv[1])
ports = {}
for name in c.sections():
    m = re.match(r"(?:haproxy:)?(?:tcp6?|ssl):(?:port=)?(\d+)", c[name].get("endpoint", ""))
    if m:
        ports[name] = m.group(1)
listen = [p for n, p in ports.items() if n.startswith("listen:")]
print("main=%s admin=%s all=%s" % (listen[0] if listen else "", ports.get("admin", ""),
                                    ",".join(ports.values())))
PY
}

health() {  # health FIELD: a field of GET /healthz on the admin endpoint
    /usr/bin/python3 -B - "$ADMIN_PORT" "$1" <<'PY'
import json, sys, urllib.request
with urllib.request.urlopen("http://127.0.0.1:%s/healthz" % sys.argv[1], timeout=10) as r:
    print(json.load(r)[sys.argv[2]])
PY
}

apt_missing() {  # prints the packages of "$@" that are not installed
    local p
    for p in "$@"; do
        dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || echo "$p"
    done
}

# ---------------------------------------------------------------- preflight
[ "$(id -u)" -eq 0 ] || { echo "deb-cycle: run as root (apt-get, dpkg, a system user)" >&2; exit 1; }
trap cleanup EXIT
trap 'err_line=$LINENO' ERR
mkdir -p "$out"
rm -f "$out"/*

# ------------------------------------------------------------- clean source
work="$(mktemp -d /tmp/wsgate-deb.XXXXXX)"
src="$work/wsgate"
mkdir -p "$src"
git -C "$root" rev-parse --git-dir >/dev/null 2>&1 || abort "source" "$root is not a git work tree"
if [ "${DEB_SOURCE:-worktree}" = HEAD ]; then
    git -C "$root" archive HEAD | tar -x -C "$src"
else
    # Tracked and untracked files that .gitignore does not exclude (.venv,
    # build/, *.egg-info, reports/ stay out); in a fresh clone this is HEAD.
    (cd "$root" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -x -C "$src"
fi
[ -f "$src/debian/control" ] || abort "source" "no debian/control in the source"

deb_version="$(cd "$src" && dpkg-parsechangelog -S Version)"
py_version="$(/usr/bin/python3 -c 'import configparser, sys; c = configparser.ConfigParser(); c.read(sys.argv[1]); print(c["metadata"]["version"])' "$src/setup.cfg")"
check "debian/changelog version $deb_version = setup.cfg version $py_version" \
    test "${deb_version%%-*}" = "$py_version"

# ----------------------------------------------------------------- build deps
t0=$SECONDS
mapfile -t missing < <(apt_missing "${TOOLS[@]}")
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! (cd "$src" && dpkg-checkbuilddeps) 2>/dev/null; then
    log "installing the Build-Depends of debian/control"
    apt-get update -qq
    apt-get build-dep -y -qq --no-install-recommends "$src" >/dev/null
fi
(cd "$src" && dpkg-checkbuilddeps) || abort "build dependencies installed"
pass "build dependencies installed"
t_deps=$((SECONDS - t0))

# ---------------------------------------------------------------------- build
t0=$SECONDS
log "dpkg-buildpackage -us -uc -b (log: $out/build.log)"
if ! (cd "$src" && dpkg-buildpackage -us -uc -b) >"$out/build.log" 2>&1; then
    tail -n 40 "$out/build.log"
    abort "dpkg-buildpackage" "see $out/build.log"
fi
t_build=$((SECONDS - t0))
shopt -s nullglob
debs=("$work"/wsgate_*.deb)
shopt -u nullglob
[ ${#debs[@]} -eq 1 ] || abort "dpkg-buildpackage" "expected one wsgate_*.deb, got ${#debs[@]}"
deb="${debs[0]}"
cp "$deb" "$work"/*.buildinfo "$out"/
pass "built $(basename "$deb") in ${t_build}s ($(du -h "$deb" | cut -f1))"

# What the .deb ships: nothing Python or Twisted generates at run time.
dpkg-deb -c "$deb" >"$out/contents.txt"
generated="$(grep -E '(/__pycache__/|\.py[co]$|/dropin\.cache$)' "$out/contents.txt" || true)"
check "no __pycache__, *.pyc or dropin.cache in the .deb" test -z "$generated"
[ -z "$generated" ] || printf '%s\n' "$generated" | head -n 5
check "the .deb ships the conffile $CONF" \
    bash -c "dpkg-deb -I '$deb' conffiles | grep -qx '$CONF'"

# -------------------------------------------------------------------- lintian
t0=$SECONDS
lintian --display-info --show-overrides "$deb" >"$out/lintian.txt" 2>&1 || true
grep -v '^running with root privileges' "$out/lintian.txt" >"$out/lintian.tmp" || true
mv "$out/lintian.tmp" "$out/lintian.txt"
t_lintian=$((SECONDS - t0))
count() { grep -c "^$1: " "$out/lintian.txt" || true; }
n_e=$(count E); n_w=$(count W); n_i=$(count I); n_o=$(count O)
log "lintian: $n_e errors, $n_w warnings, $n_i info, $n_o overridden (with reasons in debian/wsgate.lintian-overrides)"
grep -E '^(E|W): ' "$out/lintian.txt" | head -n 20 || true
# dh-virtualenv's /opt layout is always reported (overridden): none means
# lintian did not run properly.
check "lintian ran (it reports the overridden dir-or-file-in-opt)" test "$n_o" -gt 0
check "lintian: 0 errors" test "$n_e" -eq 0
check "lintian: 0 warnings not overridden" test "$n_w" -eq 0
if [ "$build_only" -eq 1 ]; then
    log "built $out/$(basename "$deb") (--build-only: not installed)"
    exit 0
fi

# -------------------------------------------------------------------- install
t0=$SECONDS
if pkg_present; then
    log "purging $PKG left by an earlier run"
    apt-get purge -y -qq "$PKG" >/dev/null
fi
# What exists before the install, to compare after the purge.
snapshot() {
    find /etc /opt /usr /var/lib/systemd -xdev 2>/dev/null | sort
}
snapshot >"$work/before.txt"
installed_by_us=1
if ! apt-get install -y -qq --no-install-recommends "$deb" >"$out/install.log" 2>&1; then
    cat "$out/install.log"
    abort "apt-get install ./$(basename "$deb")"
fi
pass "apt-get install ./$(basename "$deb")"
if [ -d /run/systemd/system ]; then
    # systemd is running and the postinst started the service: stop it, the
    # cycle below starts the gateway itself.
    systemctl stop wsgate.service || true
fi

check "$VENV/bin/twistd is executable" test -x "$VENV/bin/twistd"
check "the venv runs Debian's /usr/bin/python3" \
    bash -c "[ \"\$(readlink -f $VENV/bin/python)\" = \"\$(readlink -f /usr/bin/python3)\" ]"
check "$CONF is registered as a conffile" \
    bash -c "dpkg-query -W -f='\${Conffiles}\n' $PKG | awk '{print \$1}' | grep -qx '$CONF'"
check "$CONF is the repo's etc/wsgate.ini" cmp -s "$CONF" "$src/etc/wsgate.ini"
check "system user and group wsgate exist" \
    bash -c 'getent passwd wsgate >/dev/null && getent group wsgate >/dev/null && [ "$(id -u wsgate)" -lt 1000 ]'
check "/etc/wsgate is root:wsgate 0750" \
    bash -c '[ "$(stat -c %U:%G:%a /etc/wsgate)" = root:wsgate:750 ]'
check "the unit $UNIT is installed" bash -c "dpkg -L $PKG | grep -qx '$UNIT'"
check "postinst generated Twisted's dropin.cache" \
    bash -c "ls $VENV/lib/python3*/site-packages/twisted/plugins/dropin.cache >/dev/null"
check "postinst byte-compiled the venv" \
    bash -c "ls -d $VENV/lib/python3*/site-packages/wsgate/__pycache__ >/dev/null"
if systemd-analyze verify "$UNIT" >"$out/systemd-analyze.txt" 2>&1; then
    pass "systemd-analyze verify $UNIT"
else
    cat "$out/systemd-analyze.txt"
    fail "systemd-analyze verify $UNIT"
fi
exec_start="$(sed -n 's/^ExecStart=//p' "$UNIT")"
check "the unit's ExecStart is what this cycle runs" test "$exec_start" = "${EXEC_START[*]}"
t_install=$((SECONDS - t0))

# ------------------------------------------------------------------------ run
t0=$SECONDS
# What the unit gives the process, short of systemd's sandboxing: user and
# group wsgate, no new privileges, a clean environment, WorkingDirectory,
# RuntimeDirectory, UMask and (as far as the hard limit allows) LimitNOFILE.
workdir="$(sed -n 's/^WorkingDirectory=//p' "$UNIT")"
umask_unit="$(sed -n 's/^UMask=//p' "$UNIT")"
nofile_unit="$(sed -n 's/^LimitNOFILE=//p' "$UNIT")"

start_gateway() {
    if [ ! -d /run/wsgate ]; then
        install -d -o wsgate -g wsgate -m 0755 /run/wsgate
        made_rundir=1
    fi
    (
        cd "${workdir:-/}"
        umask "${umask_unit:-0022}"
        ulimit -n "${nofile_unit:-1024}" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
        exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            LANG=C.UTF-8 HOME=/nonexistent USER=wsgate LOGNAME=wsgate SHELL=/usr/sbin/nologin \
            setpriv --reuid=wsgate --regid=wsgate --init-groups --no-new-privs -- \
            "${EXEC_START[@]}"
    ) >>"$out/gateway.log" 2>&1 &
    gw_pid=$!
    local i
    for i in $(seq 1 150); do
        if port_open && { [ -z "$ADMIN_PORT" ] || port_open "$ADMIN_PORT"; }; then
            return 0
        fi
        alive || break
        sleep 0.2
    done
    return 1
}

echo_check() {  # a WebSocket client on the standard library: handshake, echo, close
    /usr/bin/python3 -B - "$PORT" "$1" <<'PY'
import base64, hashlib, os, socket, struct, sys

port, text = int(sys.argv[1]), sys.argv[2]
key = base64.b64encode(os.urandom(16)).decode()
sock = socket.create_connection(("127.0.0.1", port), timeout=10)
sock.sendall(("GET /echo HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
              "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
              "Sec-WebSocket-Version: 13\r\n\r\n" % (port, key)).encode())
buf = b""
while b"\r\n\r\n" not in buf:
    chunk = sock.recv(4096)
    if not chunk:
        sys.exit("connection closed during the handshake: %r" % buf)
    buf += chunk
head, _, buf = buf.partition(b"\r\n\r\n")
lines = head.decode("latin-1").split("\r\n")
if lines[0].split(" ")[1:2] != ["101"]:
    sys.exit("handshake answered %r" % lines[0])
headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
accept = base64.b64encode(hashlib.sha1(
    (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
if headers.get("sec-websocket-accept") != accept:
    sys.exit("bad Sec-WebSocket-Accept: %r" % headers)

def send(opcode, payload):
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

def exact(n):
    global buf
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            sys.exit("connection closed while reading a frame")
        buf += chunk
    data, buf = buf[:n], buf[n:]
    return data

def receive():
    b0, b1 = exact(2)
    n = b1 & 0x7F
    if n == 126:
        n, = struct.unpack("!H", exact(2))
    elif n == 127:
        n, = struct.unpack("!Q", exact(8))
    mask = exact(4) if b1 & 0x80 else None
    payload = exact(n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return b0 & 0x0F, payload

send(0x1, text.encode())
while True:
    opcode, payload = receive()
    if opcode == 0x9:            # a ping from the gateway: answer it
        send(0xA, payload)
        continue
    break
if (opcode, payload) != (0x1, text.encode()):
    sys.exit("expected the text %r back, got opcode %d %r" % (text, opcode, payload[:80]))
send(0x8, struct.pack("!H", 1000))
while True:
    opcode, payload = receive()
    if opcode == 0x8:
        break
sock.close()
print("echo ok: %s" % text)
PY
}

wait_exit() {  # wait_exit SECONDS: the gateway's exit status, or 124 if still running
    local i
    for i in $(seq 1 $(($1 * 5))); do
        alive || break
        sleep 0.2
    done
    if alive; then
        return 124
    fi
    local rc=0
    wait "$gw_pid" || rc=$?
    gw_pid=""
    return "$rc"
}

: >"$out/gateway.log"
ports="$(config_ports)"
log "installed config: $ports"
main_port="$(sed -n 's/.*main=\([0-9]*\).*/\1/p' <<<"$ports")"
PORT="${main_port:-$PORT}"
ADMIN_PORT="$(sed -n 's/.*admin=\([0-9]*\).*/\1/p' <<<"$ports")"
for p in $(sed -n 's/.*all=//p' <<<"$ports" | tr , ' '); do
    if port_open "$p"; then
        ss -ltnp "sport = :$p" 2>/dev/null || true
        abort "port $p is free for the installed gateway" "something already listens there"
    fi
done
if start_gateway; then
    pass "the installed gateway listens on 127.0.0.1:$PORT${ADMIN_PORT:+ (admin $ADMIN_PORT)}"
else
    cat "$out/gateway.log"
    abort "the installed gateway listens on 127.0.0.1:$PORT${ADMIN_PORT:+ (admin $ADMIN_PORT)}"
fi
check "the gateway runs as user wsgate" \
    bash -c "[ \"\$(ps -o user= -p $gw_pid)\" = wsgate ]"
check "WebSocket echo on ws://127.0.0.1:$PORT/echo" echo_check "hello from deb-cycle"
generation=""
if [ -n "$ADMIN_PORT" ]; then
    check "admin /healthz says ok" test "$(health status 2>&1)" = ok
    generation="$(health config_generation 2>/dev/null || true)"
    [[ "$generation" =~ ^[0-9]+$ ]] || generation=""
fi

# SIGHUP (systemctl reload): reload the config and keep serving.
kill -HUP "$gw_pid"
sleep 2
if alive; then
    pass "still running after SIGHUP"
    check "echo still works after SIGHUP" echo_check "hello after SIGHUP"
    for i in $(seq 1 25); do
        grep -q "config reloaded" "$out/gateway.log" && break
        sleep 0.2
    done
    check "SIGHUP logged 'config reloaded'" grep -q "config reloaded" "$out/gateway.log"
    if [ -n "$ADMIN_PORT" ] && [ -z "$generation" ]; then
        fail "admin /healthz has a config_generation"
    elif [ -n "$ADMIN_PORT" ]; then
        check "admin /healthz config_generation went from $generation to $((generation + 1))" \
            test "$(health config_generation 2>&1)" = "$((generation + 1))"
    fi
else
    rc=0; wait "$gw_pid" || rc=$?; gw_pid=""
    fail "still running after SIGHUP" "the process ended with status $rc"
    fail "echo still works after SIGHUP"
    fail "SIGHUP logged 'config reloaded'"
    # Start it again so that SIGTERM is still checked.
    start_gateway || { cat "$out/gateway.log"; abort "restart after SIGHUP"; }
fi

# SIGTERM (systemctl stop): drain and exit 0 within TimeoutStopSec.
stop_timeout="$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s\?$/\1/p' "$UNIT")"
kill -TERM "$gw_pid"
rc=0; wait_exit "${stop_timeout:-90}" || rc=$?
if [ "$rc" -eq 124 ]; then
    kill -KILL "$gw_pid" 2>/dev/null || true
    fail "SIGTERM ends the gateway with status 0" "still running after ${stop_timeout}s"
else
    check "SIGTERM ends the gateway with status 0 (got $rc)" test "$rc" -eq 0
fi
check "the gateway did not need to write Twisted's plugin cache" \
    bash -c "! grep -q 'Unable to write to plugin cache' '$out/gateway.log'"
if [ "$made_rundir" -eq 1 ]; then rm -rf /run/wsgate; made_rundir=0; fi
t_run=$((SECONDS - t0))

# ---------------------------------------------------------------------- purge
t0=$SECONDS
if apt-get purge -y -qq "$PKG" >"$out/purge.log" 2>&1; then
    pass "apt-get purge $PKG"
    installed_by_us=0
else
    cat "$out/purge.log"
    fail "apt-get purge $PKG"
fi
check "dpkg knows nothing of $PKG after the purge" bash -c "! dpkg-query -W -f='\${db:Status-Status}' $PKG 2>/dev/null | grep -qv not-installed"
check "$VENV is gone" test ! -e "$VENV"
check "/etc/wsgate is gone" test ! -e /etc/wsgate
check "the unit is gone" test ! -e "$UNIT"
leftover="$(find /etc/systemd /var/lib/systemd -name '*wsgate*' 2>/dev/null || true)"
check "no systemd enablement or mask left" test -z "$leftover"
[ -z "$leftover" ] || printf '%s\n' "$leftover"
snapshot >"$work/after.txt"
left="$(comm -13 "$work/before.txt" "$work/after.txt")"
check "no file left that was not there before the install" test -z "$left"
[ -z "$left" ] || printf '%s\n' "$left" | head -n 20
if getent passwd wsgate >/dev/null; then
    log "kept by Debian practice: the system user and group wsgate"
fi
t_purge=$((SECONDS - t0))
