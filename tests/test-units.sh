#!/usr/bin/env bash
# test-units: the systemd units, the bus and polkit policy files and the
# example tenant, checked with the tools that will read them: systemd-analyze
# (verify, and the security exposure score, which must be 2.0 or lower),
# systemd-sysusers and systemd-tmpfiles on a scratch root, dbus-daemon (a
# private bus that loads the policy and enforces who may own the name),
# xmllint, and meson's install plan.
set -euo pipefail
build=${1:?usage: test-units.sh BUILD_DIR [SOURCE_DIR]}
src=${2:-${MOED_SOURCE_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moed-units-XXXXXX")
bus_pid=
cleanup() {
  if [ -n "$bus_pid" ]; then kill "$bus_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
passed=0 failed=0

ok() { echo "ok - $1"; passed=$((passed + 1)); }
bad() { echo "not ok - $1"; failed=$((failed + 1)); }
check() { # description, command...
  local what=$1; shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}
# The command succeeds and prints nothing (systemd-analyze verify reports
# unknown keys and bad values on stderr but still exits 0).
quiet() {
  local out
  out=$("$@" 2>&1) || { printf '%s\n' "$out" | sed 's/^/  /'; return 1; }
  [ -z "$out" ] || { printf '%s\n' "$out" | sed 's/^/  /'; return 1; }
}
# The command succeeds; its output is shown only when it does not.
silent() {
  local out
  out=$("$@" 2>&1) || { printf '%s\n' "$out" | sed 's/^/  /'; return 1; }
}

for tool in systemd-analyze systemd-sysusers systemd-tmpfiles dbus-daemon busctl xmllint meson python3; do
  if ! command -v "$tool" >/dev/null; then
    bad "$tool is installed (packages: systemd, dbus-daemon, libxml2-utils, meson)"
    echo "$passed passed, $failed failed"
    exit 1
  fi
done

# --- The configured units ------------------------------------------------
service=$build/units/moed.service
user_service=$build/units/moed-user.service
socket=$src/units/moed.socket
option() { # the value of a meson option of this build
  meson introspect --buildoptions "$build" |
    python3 -c 'import json, sys; print(next(o["value"] for o in json.load(sys.stdin) if o["name"] == sys.argv[1]))' "$1"
}
prefix=$(option prefix)
sbindir=$(option sbindir)
case $sbindir in /*) ;; *) sbindir=$prefix/$sbindir ;; esac

check "moed.service is configured" test -s "$service"
unsubstituted() { ! grep -n '@[a-z_]*@' "$1"; }
check "moed.service has no unsubstituted @variables@" unsubstituted "$service"
check "the user unit has no unsubstituted @variables@" unsubstituted "$user_service"
check "moed.service runs $sbindir/moed" grep -qxF "ExecStart=$sbindir/moed" "$service"
check "the user unit runs $sbindir/moed --user" grep -qxF "ExecStart=$sbindir/moed --user" "$user_service"

# What the issue asks of the service, line by line (the score below does
# not notice a missing Type= or LimitCORE=).
# shellcheck disable=SC2016 # $MAINPID is for systemd
for line in Type=notify User=moed PrivateNetwork=yes ProtectSystem=strict NoNewPrivileges=yes \
    LimitCORE=0 LimitMEMLOCK=infinity DevicePolicy=closed 'DeviceAllow=char-nvidia* rw' \
    'ExecReload=/bin/kill -HUP $MAINPID' WatchdogSec=60s SystemCallFilter=@system-service \
    StateDirectory=moed RuntimeDirectory=moed; do
  check "moed.service sets $line" grep -qxF "$line" "$service"
done
check "moed.socket listens on /run/moed/moed.sock" grep -qx "ListenStream=/run/moed/moed.sock" "$socket"
check "moed.socket lets every caller connect (moed decides per caller)" grep -qx "SocketMode=0666" "$socket"

# systemd-analyze checks that ExecStart= is an executable file: the units go
# into a scratch directory with ExecStart= pointing at a stand-in for moed.
units=$tmp/units
mkdir -p "$units/bin" "$units/user" "$tmp/xdg"
chmod 700 "$tmp/xdg"
cp "$(type -P true)" "$units/bin/moed"
sed "s|^ExecStart=$sbindir/moed|ExecStart=$units/bin/moed|" "$service" >"$units/moed.service"
cp "$socket" "$units/moed.socket"
sed "s|^ExecStart=$sbindir/moed|ExecStart=$units/bin/moed|" "$user_service" >"$units/user/moed.service"
check "systemd-analyze verify passes on moed.service and moed.socket" \
  quiet systemd-analyze verify --man=no "$units/moed.service" "$units/moed.socket"
# A user manager needs a runtime directory, even offline, and reads the
# caller's own unit directories: all of them scratch ones here.
check "systemd-analyze verify --user passes on the user unit" \
  quiet env HOME="$tmp/xdg" XDG_RUNTIME_DIR="$tmp/xdg" XDG_CONFIG_HOME="$tmp/xdg/config" \
    XDG_DATA_HOME="$tmp/xdg/data" systemd-analyze verify --user --man=no "$units/user/moed.service"

# The exposure score: 0 (best) .. 10; the issue asks for 2.0 or lower.
if systemd-analyze security --offline=yes "$units/moed.service" >"$tmp/security" 2>&1; then
  score=$(sed -n 's/.*Overall exposure level for moed\.service: \([0-9][0-9.]*\) .*/\1/p' "$tmp/security")
  echo "# systemd-analyze security: $(grep 'Overall exposure level' "$tmp/security" || echo '(no score)')"
  grep '✗' "$tmp/security" | sed -E 's/ {2,}/  /g; s/^/#   /' || true
  if [ -z "$score" ]; then
    bad "systemd-analyze security prints an exposure score"
  else
    check "exposure score $score is 2.0 or lower" python3 -c 'import sys; sys.exit(float(sys.argv[1]) > 2.0)' "$score"
  fi
  # The tool's own threshold (exposure x 10) agrees.
  check "systemd-analyze security --threshold=20 passes" \
    silent systemd-analyze security --offline=yes --threshold=20 "$units/moed.service"
else
  sed 's/^/  /' "$tmp/security"
  bad "systemd-analyze security --offline=yes runs on moed.service"
fi

# --- sysusers.d and tmpfiles.d on a scratch root -------------------------
root=$tmp/root
mkdir -p "$root/etc"
check "systemd-sysusers creates the user from moed.sysusers" \
  silent systemd-sysusers --root="$root" "$src/units/moed.sysusers"
passwd_line=$(grep '^moed:' "$root/etc/passwd" || true)
check "user moed has its home in /var/lib/moed" test "$(cut -d: -f6 <<<"$passwd_line")" = /var/lib/moed
check "user moed has no login shell" grep -Eq '/(nologin|false)$' <<<"$passwd_line"
check "user moed has a group moed" grep -q '^moed:' "$root/etc/group"
check "user moed is in group video (root:video NVIDIA nodes)" grep -Eq '^video:[^:]*:[0-9]+:(.*,)?moed(,|$)' "$root/etc/group"

# tmpfiles resolves moed in the scratch root's /etc/passwd. Without root
# the directories are made but cannot be given away: only those errors are
# tolerated then, and the owners are not checked.
rc=0
systemd-tmpfiles --root="$root" --create "$src/units/moed.tmpfiles" 2>"$tmp/tmpfiles.err" || rc=$?
if [ "$(id -u)" -eq 0 ]; then
  check "systemd-tmpfiles --create applies moed.tmpfiles" quiet cat "$tmp/tmpfiles.err"
  check "systemd-tmpfiles exits 0" test "$rc" -eq 0
else
  echo "# not root: directory owners are not checked"
  only_chown_refused() { ! grep -v 'fchownat() of .* failed: Operation not permitted' "$1"; }
  check "systemd-tmpfiles --create applies moed.tmpfiles (only chown refused)" \
    only_chown_refused "$tmp/tmpfiles.err"
fi
moed_uid=$(cut -d: -f3 <<<"$passwd_line")
dir_is() { # path mode owner
  local p=$root$1
  [ -d "$p" ] || { echo "  $1 is missing"; return 1; }
  [ "$(stat -c %a "$p")" = "$2" ] || { echo "  $1 has mode $(stat -c %a "$p")"; return 1; }
  [ "$(id -u)" -ne 0 ] && return 0
  local want=0
  [ "$3" = moed ] && want=$moed_uid
  [ "$(stat -c %u "$p")" = "$want" ] || { echo "  $1 is owned by uid $(stat -c %u "$p")"; return 1; }
}
check "tmpfiles: /etc/moed/tenants.d 755 root" dir_is /etc/moed/tenants.d 755 root
check "tmpfiles: /etc/moed/moed.conf.d 755 root" dir_is /etc/moed/moed.conf.d 755 root
check "tmpfiles: /var/lib/moed 750 moed" dir_is /var/lib/moed 750 moed
check "tmpfiles: /var/lib/moed/models 755 root" dir_is /var/lib/moed/models 755 root
check "tmpfiles: /var/log/moed 750 moed" dir_is /var/log/moed 750 moed
check "tmpfiles: /run/moed 755 moed" dir_is /run/moed 755 moed
# systemd applies the unit's modes at every start: tmpfiles must agree, or
# the two rewrite each other's modes.
check "StateDirectoryMode matches tmpfiles" grep -qx 'StateDirectoryMode=0750' "$service"
check "LogsDirectoryMode matches tmpfiles" grep -qx 'LogsDirectoryMode=0750' "$service"
check "RuntimeDirectoryMode matches tmpfiles" grep -qx 'RuntimeDirectoryMode=0755' "$service"

# --- The system bus policy -----------------------------------------------
bus_policy=$src/policy/org.moed.Engine1.conf
check "org.moed.Engine1.conf is well-formed XML" xmllint --noout "$bus_policy"
# A private bus with the system bus's defaults (deny own, deny method
# calls) plus the policy. A control name proves denials are the policy's
# and not a broken connection.
chmod 755 "$tmp"
cat >"$tmp/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=$tmp/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow own="org.moed.Test.Control"/>
  </policy>
  <include>$bus_policy</include>
</busconfig>
EOF
dbus-daemon --config-file="$tmp/bus.conf" --nofork --print-address=3 3>"$tmp/bus.addr" 2>"$tmp/bus.err" &
bus_pid=$!
for _ in $(seq 50); do
  [ -s "$tmp/bus.addr" ] && break
  kill -0 "$bus_pid" 2>/dev/null || break
  sleep 0.1
done
address=$(head -n 1 "$tmp/bus.addr")
if [ -z "$address" ]; then
  sed 's/^/  /' "$tmp/bus.err"
  bad "dbus-daemon loads org.moed.Engine1.conf"
else
  ok "dbus-daemon loads org.moed.Engine1.conf"
  request_name() { # name [setpriv args]: prints the reply or the error
    local name=$1; shift
    local as=()
    [ $# -eq 0 ] || as=(setpriv "$@")
    "${as[@]}" busctl --address="$address" call org.freedesktop.DBus /org/freedesktop/DBus \
      org.freedesktop.DBus RequestName su "$name" 0 2>&1
  }
  check "the test's connection may own the control name" grep -qx 'u 1' <<<"$(request_name org.moed.Test.Control)"
  if [ "$(id -u)" -eq 0 ]; then
    check "root may own org.moed.Engine1" grep -qx 'u 1' <<<"$(request_name org.moed.Engine1)"
    check "nobody may not own org.moed.Engine1" grep -q 'Access denied' \
      <<<"$(request_name org.moed.Engine1 --reuid=nobody --regid=nogroup --clear-groups)"
    check "nobody's connection works (control name)" grep -qx 'u 1' \
      <<<"$(request_name org.moed.Test.Control --reuid=nobody --regid=nogroup --clear-groups)"
  else
    check "$(id -un) may not own org.moed.Engine1" grep -q 'Access denied' <<<"$(request_name org.moed.Engine1)"
  fi
  kill "$bus_pid" 2>/dev/null || true
  wait "$bus_pid" 2>/dev/null || true
  bus_pid=
fi
for iface in org.moed.Engine1 org.moed.Request1 org.freedesktop.DBus.Introspectable \
    org.freedesktop.DBus.Properties org.freedesktop.DBus.Peer; do
  check "everyone may call $iface" test "$(xmllint --xpath "count(/busconfig/policy[@context='default']/allow[@send_destination='org.moed.Engine1' and @send_interface='$iface'])" "$bus_policy")" = 1
done

# --- The polkit actions --------------------------------------------------
polkit_policy=$src/policy/org.moed.policy
check "org.moed.policy is well-formed XML" xmllint --noout "$polkit_policy"
dtd=/usr/share/polkit-1/policyconfig-1.dtd
if [ -f "$dtd" ]; then
  check "org.moed.policy is valid against polkit's DTD" xmllint --noout --dtdvalid "$dtd" "$polkit_policy"
else
  echo "ok - org.moed.policy is valid against polkit's DTD # SKIP $dtd not installed (polkitd)"
fi
for action in org.moed.manage org.moed.usage.all; do
  for d in allow_any=no allow_inactive=no allow_active=auth_admin_keep; do
    check "$action: $d" test "$(xmllint --xpath "string(/policyconfig/action[@id='$action']/defaults/${d%%=*})" "$polkit_policy")" = "${d#*=}"
  done
  check "$action has a description and a message" test \
    "$(xmllint --xpath "count(/policyconfig/action[@id='$action'][description!=''][message!=''])" "$polkit_policy")" = 1
done

# --- The example tenant --------------------------------------------------
example=$src/policy/research.conf.example
# The keys are the contract in policy/tenant.h ("/* Key=" comments).
mapfile -t keys < <(grep -oE '/\*\s*[A-Z][A-Za-z]+=' "$src/policy/tenant.h" | sed -E 's#/\*\s*##; s/=$//')
check "policy/tenant.h names the tenant keys" test "${#keys[@]}" -ge 15
check "the example tenant has a [Tenant] section" grep -qx '\[Tenant\]' "$example"
for key in "${keys[@]}"; do
  check "the example tenant sets $key=" grep -Eq "^$key=.+" "$example"
done
for key in $(grep -oE '^[A-Za-z]+=' "$example" | tr -d =); do
  check "the example's key $key= is one of policy/tenant.h's" grep -qxF "$key" <(printf '%s\n' "${keys[@]}")
done
check "the example's Tokens= is sha256:<64 hex>" grep -Eqx 'Tokens=sha256:[0-9a-f]{64}' "$example"

# --- Where meson install puts each file ----------------------------------
meson introspect --installed "$build" >"$tmp/installed.json"
installed() { # source file, the end of its destination
  python3 - "$tmp/installed.json" "$1" "$2" <<'EOF'
import json, sys
installed, src, want = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
dest = installed.get(src)
if dest is None or not dest.endswith(want):
    print("  %s goes to %s" % (src, dest))
    sys.exit(1)
EOF
}
check "moed.service goes to lib/systemd/system" installed "$service" /lib/systemd/system/moed.service
check "moed.socket goes to lib/systemd/system" installed "$src/units/moed.socket" /lib/systemd/system/moed.socket
check "the user unit goes to lib/systemd/user as moed.service" \
  installed "$user_service" /lib/systemd/user/moed.service
check "moed.sysusers goes to sysusers.d/moed.conf" installed "$src/units/moed.sysusers" /lib/sysusers.d/moed.conf
check "moed.tmpfiles goes to tmpfiles.d/moed.conf" installed "$src/units/moed.tmpfiles" /lib/tmpfiles.d/moed.conf
check "the bus policy goes to share/dbus-1/system.d" \
  installed "$bus_policy" /share/dbus-1/system.d/org.moed.Engine1.conf
check "the polkit actions go to share/polkit-1/actions" \
  installed "$polkit_policy" /share/polkit-1/actions/org.moed.policy
check "the example tenant goes to share/doc/moed/examples" \
  installed "$example" /share/doc/moed/examples/research.conf.example

echo "$passed passed, $failed failed"
test "$failed" -eq 0
