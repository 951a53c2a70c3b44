#!/usr/bin/env bash
# test-tenants: tenants, quotas, data residency and the audit trail end to
# end through the real moed in system mode (--config), with clients of
# several uids (root through curl, others through setpriv) and a bearer
# token. A tenant over its TokensPerMinute gets 429 with Retry-After while
# another keeps being served; usage is counted per tenant, shown to each
# its own and to root all, survives a restart and a corrupt usage.json;
# SIGHUP applies changed and new tenants; a stream crossing its limit ends
# as "length" and says why; every request leaves one audit record (stderr
# without journald, and the hash-chained AuditFile, which `moectl audit
# verify` checks); Residency=strict refuses to serve while a network is
# reachable and serves in an empty network namespace.
# Needs root (it switches uids); tests/tenants-check.py does the JSON work.
set -euo pipefail
umask 022
build=${1:?usage: test-tenants.sh BUILD_DIR}
here=$(cd "$(dirname "$0")" && pwd)
moed=$build/daemon/moed
moectl=$build/cli/moectl
fixture=$build/tools/moed-fixture
tokenize=$build/tools/moed-tokenize

if [ "$(id -u)" != 0 ]; then
  echo "SKIP: test-tenants needs root: it runs clients as other uids (setpriv)"
  exit 77
fi

passed=0 failed=0
t_start=$SECONDS
section() { echo "# -- $1 (at $((SECONDS - t_start)) s)"; }
ok() { echo "ok - $1"; passed=$((passed + 1)); }
bad() { # description, files to show
  echo "not ok - $1"; shift
  local f
  for f; do
    echo "  --- $(basename "$f"):"
    head -c 3000 "$f" 2>/dev/null | sed 's/^/  | /' || true
    echo
  done
  failed=$((failed + 1))
}
check() { # description, command...
  local what=$1; shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}
expect_eq() { # description, expected, actual
  if [ "$2" == "$3" ]; then ok "$1"; else
    echo "not ok - $1"; printf '  expected: %s\n  actual:   %s\n' "$2" "$3"
    failed=$((failed + 1))
  fi
}
die() { # a failure the rest cannot go on from
  bad "$1"
  if [ -n "${log:-}" ] && [ -f "$log" ]; then echo "--- moed log (tail)"; tail -n 40 "$log"; fi
  echo "$passed passed, $failed failed"
  exit 1
}

for b in "$moed" "$moectl" "$fixture" "$tokenize"; do
  [ -x "$b" ] || { echo "not ok - no executable $b"; exit 1; }
done
py=python3
[ -x /usr/bin/python3 ] && py=/usr/bin/python3 # not a shim under /root
for c in "$py" curl setpriv sha256sum; do
  command -v "$c" >/dev/null || { echo "not ok - $c is needed"; exit 1; }
done
helper() { "$py" "$here/tenants-check.py" "$@"; }
# A helper command that prints TAP lines: counted into ours.
tap() {
  local out rc=0 n
  out=$(helper "$@" 2>&1) || rc=$?
  echo "$out"
  n=$(grep -c '^ok - ' <<<"$out" || true); passed=$((passed + n))
  n=$(grep -c '^not ok - ' <<<"$out" || true); failed=$((failed + n))
  if [ "$rc" != 0 ] && ! grep -q '^not ok - ' <<<"$out"; then
    echo "not ok - tenants-check.py $1 failed (status $rc)"; failed=$((failed + 1))
  fi
}

# The clients of other uids must reach the socket: the directory and every
# component above it must be searchable by everyone, and the socket path
# under 108 bytes. Else /tmp.
# bob is the user nobody; uid 65533 belongs to no tenant.
nb_uid=$(id -u nobody) nb_gid=$(id -g nobody)
[ "$nb_uid" != 65533 ] || { echo "not ok - nobody is uid 65533 here"; exit 1; }
pre=()
as_args() { # uid|root: the setpriv prefix that runs a command as it, in pre
  pre=()
  [ "$1" = root ] && return 0
  local g=$1
  [ "$1" = "$nb_uid" ] && g=$nb_gid
  pre=(setpriv --reuid="$1" --regid="$g" --clear-groups --)
}
as_uid() { as_args "$1"; shift; "${pre[@]}" "$@"; }
base=${MOED_TEST_TMP:-${TMPDIR:-/tmp}}
mkdir -p "$base"
tmp=$(mktemp -d "$base/tenants-XXXXXX")
chmod 755 "$tmp"
if [ ${#tmp} -gt 60 ] || ! as_uid "$nb_uid" test -x "$tmp"; then
  rmdir "$tmp"
  tmp=$(mktemp -d /tmp/moed-tenants-XXXXXX)
  chmod 755 "$tmp"
fi
as_uid "$nb_uid" test -x "$tmp" || { echo "not ok - nobody cannot reach $tmp"; exit 1; }
mkdir -p "$tmp/run" "$tmp/tenants" "$tmp/state" "$tmp/models" "$tmp/audit" "$tmp/strict"
chmod 755 "$tmp/run" "$tmp/tenants" "$tmp/state" "$tmp/models" "$tmp/audit" "$tmp/strict"

moed_pid=''
cleanup() { # the daemon, every background client, then the files
  local p
  if [ -n "$moed_pid" ]; then kill -KILL "$moed_pid" 2>/dev/null || true; fi
  for p in $(jobs -p); do kill "$p" 2>/dev/null || true; done
  for p in $(jobs -p); do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- the daemon ----

sock='' log=''
start_moed() { # log name, prefix command ('' or e.g. "unshare -n"), moed args...
  local name=$1 wrap=$2; shift 2
  log=$tmp/$name.log
  # shellcheck disable=SC2086 # wrap is a word list on purpose
  $wrap "$moed" "$@" >"$log" 2>&1 &
  moed_pid=$!
  local i
  for i in $(seq 600); do
    grep -q '^moed: ready' "$log" && return 0
    kill -0 "$moed_pid" 2>/dev/null || { moed_pid=''; die "moed ($name) exited while starting"; }
    sleep 0.1
  done
  die "moed ($name) was not ready within 60 s"
}
exit_status=''
wait_exit() { # pid, seconds: 0 when it exited in time (status in exit_status)
  local pid=$1 i
  for i in $(seq $(($2 * 10))); do
    if ! kill -0 "$pid" 2>/dev/null; then
      exit_status=0
      wait "$pid" || exit_status=$?
      return 0
    fi
    sleep 0.1
  done
  return 1
}
stop_moed() { # what: SIGTERM with nothing running exits 0 promptly
  local what=$1
  kill -TERM "$moed_pid"
  if wait_exit "$moed_pid" 20; then
    expect_eq "$what: moed exits with status 0 on SIGTERM" 0 "$exit_status"
  else
    bad "$what: moed did not exit within 20 s of SIGTERM" "$log"
    kill -KILL "$moed_pid" 2>/dev/null || true
    wait "$moed_pid" 2>/dev/null || true
  fi
  moed_pid=''
  if grep -qE 'ERROR: (Address|Leak)Sanitizer|runtime error:' "$log"; then
    bad "$what: the sanitizers reported errors" "$log"
  fi
}

# ---- requests ----

code=''
call() { # uid|root, method, path, body ('' for none), curl args...
  # HTTP status in $code, body in $tmp/resp, headers in $tmp/hdr.
  local who=$1 m=$2 p=$3 body=$4
  shift 4
  as_args "$who"
  local data=()
  if [ -n "$body" ]; then
    printf '%s' "$body" >"$tmp/req.json"
    data=(-H 'Content-Type: application/json' --data-binary "@$tmp/req.json")
  fi
  # curl runs as that uid and must be able to write its output files.
  : >"$tmp/resp"; : >"$tmp/hdr"; chmod 666 "$tmp/resp" "$tmp/hdr"
  code=$("${pre[@]}" curl -q -sS --max-time 120 --unix-socket "$sock" -X "$m" "${data[@]}" "$@" \
           -D "$tmp/hdr" -o "$tmp/resp" -w '%{http_code}' "http://localhost$p" 2>"$tmp/curl.err") ||
    code="curl-exit-$?"
}
post() { call "$1" POST "$2" "$3" "${@:4}"; }
get() { call "$1" GET "$2" '' "${@:3}"; }
jv() { helper json "$1" "$2"; }
jr() { helper json "$tmp/resp" "$1"; }
expect_code() { # description, wanted HTTP status
  if [ "$code" = "$2" ]; then ok "$1 (HTTP $2)"; else
    bad "$1: HTTP $code, expected $2" "$tmp/resp" "$tmp/curl.err"; fi
}
expect_true() { # description, Python expression of j (the last response)
  local v
  v=$(jr "$2" 2>&1) || true
  if [ "$v" = true ]; then ok "$1"; else bad "$1: $2 is $v" "$tmp/resp"; fi
}
header() { # name: its value in the last response, or ''
  tr -d '\r' <"$tmp/hdr" | awk -v h="$(tr '[:upper:]' '[:lower:]' <<<"$1")" -F': ' \
    'tolower($1) == h { print $2 }'
}
# A stream to a file, as uid; waits for it (bounded).
stream() { # uid|root, path, body, out file, curl args...
  local who=$1 p=$2 body=$3 f=$4
  shift 4
  as_args "$who"
  printf '%s' "$body" >"$f.req"
  "${pre[@]}" curl -q -sS -N --max-time 180 --unix-socket "$sock" -H 'Content-Type: application/json' \
    --data-binary "@$f.req" "$@" "http://localhost$p" >"$f" 2>"$f.err" || true
}

# What each request should leave behind: one line per request in the
# expectations of this daemon run (the audit records) and of this usage
# epoch (the usage counters, which survive restarts).
run_expect='' usage_expect=''
expect_served() { # kind json|sse, file, tenant, uid, gid
  local line
  if line=$(helper served "$@"); then
    echo "$line" >>"$run_expect"; echo "$line" >>"$usage_expect"
  else
    bad "not an answer with usage: $2" "$2"
  fi
}
expect_refused() { # tenant|-, uid, gid, text in the refusal, reason|-
  local line
  line=$(helper refused "$@")
  echo "$line" >>"$run_expect"; echo "$line" >>"$usage_expect"
}
new_run() { run_expect=$tmp/expect-$1.jsonl; : >"$run_expect"; }
audit_src() { # the audit records of the daemon just run
  if [ "$journald" = yes ]; then echo "journal:$1"; else echo "log:$2"; fi
}
usage_check() { # uid|root, caller's tenant, all|own
  get "$1" /v1/moed/usage
  if [ "$code" != 200 ]; then bad "GET /v1/moed/usage as $1: HTTP $code" "$tmp/resp"; return; fi
  cp "$tmp/resp" "$tmp/usage-now.json"
  tap usage "$tmp/usage-now.json" "$usage_expect" "$2" "$3"
}

# ---- the model, the prompts, the tenants ----
section "set-up"

if [ -S /run/systemd/journal/socket ]; then
  journald=yes
  echo "# journald runs here: the audit records are read back with journalctl"
else
  journald=no
  ok "no journald socket (/run/systemd/journal/socket): audit records go to stderr"
fi

vocab=()
[ -n "${MOED_VOCAB_JSON:-}" ] && vocab=(--vocab "$MOED_VOCAB_JSON")
"$fixture" --shape tiny --type Q8_0 "${vocab[@]}" -o "$tmp/models/tiny.gguf" >"$tmp/fixture.out" 2>&1 ||
  { cat "$tmp/fixture.out"; die "moed-fixture could not write the model"; }
chmod 644 "$tmp/models/tiny.gguf"
model=tiny

ntok() { # text: its prompt tokens as /v1/completions counts them (with BOS)
  "$tokenize" --model "$tmp/models/tiny.gguf" "$1" | "$py" -c 'import json,sys; print(len(json.load(sys.stdin)))'
}
# alice's prompt: long, so that once her minute bucket is empty it takes
# many seconds of refill before the next one fits.
prompt_a="The quick brown fox jumps over the lazy dog while the tenants of a shared machine wait for their turn at the engine, each counting the tokens it has left for this minute and the next"
# carol's: long too, so that after her stream is cut she stays refused for
# well over the time a restart takes.
prompt_c="Once upon a time a daemon served many users on one machine and kept an honest account of every token each of them used, so that nobody could take more than their share of it"
max_a=8
n_a=$(ntok "$prompt_a")
n_c=$(ntok "$prompt_c")
# Room for two of alice's answers: after them the bucket holds at most 2
# tokens and refills at tpm_a/60 per second, so the third needs
# (n_a - 1) / (tpm_a / 60) seconds, far longer than the test takes.
tpm_a=$((2 * (n_a + max_a) + 2))
# carol: the prompt and ten tokens of answer.
tpm_c=$((n_c + 10))
echo "# prompts: alice $n_a tokens (TokensPerMinute=$tpm_a), carol $n_c tokens (TokensPerMinute=$tpm_c)"
if [ "$n_a" -le 20 ] || [ "$n_c" -le 20 ]; then die "the prompts are too short ($n_a, $n_c tokens)"; fi

token_c="moed-test-carol-$RANDOM$RANDOM"
hash_c=sha256:$(printf '%s' "$token_c" | sha256sum | cut -d' ' -f1)

write_tenants() { # alice's TokensPerMinute
  printf '[Tenant]\nUsers=root\nTokensPerMinute=%s\n' "$1" >"$tmp/tenants/alice.conf"
  printf '[Tenant]\nUsers=nobody\n' >"$tmp/tenants/bob.conf"
  chmod 644 "$tmp/tenants/"*.conf
}
write_tenants "$tpm_a"
write_conf() { # file, socket, residency, state dir, audit file ('' none)
  {
    echo "[Daemon]"
    echo "Socket=$2"
    echo "TenantsDirectory=$tmp/tenants"
    echo "StateDirectory=$4"
    echo "ModelDirectories=$tmp/models"
    echo "Residency=$3"
    [ -n "$5" ] && echo "AuditFile=$5"
    echo
    echo "[Model $model]"
    echo "Path=$tmp/models/tiny.gguf"
  } >"$1"
}
audit_file=$tmp/audit/audit.jsonl
write_conf "$tmp/moed.conf" "$tmp/run/moed.sock" relaxed "$tmp/state" "$audit_file"
write_conf "$tmp/strict.conf" "$tmp/run/strict.sock" strict "$tmp/strict" ''

chat_body() { # max_tokens, content[, extra JSON members]
  printf '{"model":"%s","messages":[{"role":"user","content":"%s"}],"max_tokens":%s,"temperature":0%s}' \
    "$model" "$2" "$1" "${3:-}"
}
completion_body() { # max_tokens, prompt[, extra JSON members]
  printf '{"model":"%s","prompt":"%s","max_tokens":%s,"temperature":0%s}' "$model" "$2" "$1" "${3:-}"
}

# =====================================================================
section "residency"

# The interfaces other than loopback that are up (IFF_UP), as the kernel says.
up_ifs=()
for d in /sys/class/net/*; do
  n=$(basename "$d")
  [ "$n" = lo ] && continue
  flags=$(cat "$d/flags" 2>/dev/null || echo 0)
  if [ $((flags & 1)) = 1 ]; then up_ifs+=("$n"); fi
done
echo "# interfaces up besides lo: ${up_ifs[*]:-none}"

rc=0
"$moed" --check-residency >"$tmp/residency.out" 2>&1 || rc=$?
if [ ${#up_ifs[@]} -gt 0 ]; then
  expect_eq "moed --check-residency exits 1 with ${up_ifs[0]} up" 1 "$rc"
  if grep -q 'NOT OK' "$tmp/residency.out" && grep -q "interface ${up_ifs[0]} is up" "$tmp/residency.out"; then
    ok "moed --check-residency prints the findings (interface ${up_ifs[0]} is up)"
  else
    bad "moed --check-residency does not name interface ${up_ifs[0]}" "$tmp/residency.out"
  fi
else
  echo "# this machine has no network beyond loopback: strict mode must serve"
  expect_eq "moed --check-residency exits 0 without a network" 0 "$rc"
fi

# Residency=strict in this network namespace.
sock=$tmp/run/strict.sock
start_moed strict '' --config "$tmp/strict.conf" --no-bus
post "$nb_uid" /v1/chat/completions "$(chat_body 4 'Hello there')"
if [ ${#up_ifs[@]} -gt 0 ]; then
  expect_code "strict residency with ${up_ifs[0]} up: a request is refused" 503
  expect_true "... with an error naming what was found (interface ${up_ifs[0]})" \
    "j['error']['code'] == 'not_serving' and j['error']['type'] == 'server_error' and 'interface ${up_ifs[0]} is up' in j['error']['message']"
  get "$nb_uid" /health
  expect_code "strict residency: /health says so" 503
  expect_true "... status refusing" "j == {'status': 'refusing'}"
  get "$nb_uid" /v1/moed/status
  expect_true "strict residency: /v1/moed/status reports the finding" \
    "j['residency']['mode'] == 'strict' and j['residency']['ok'] is False and 'interface ${up_ifs[0]} is up' in j['residency']['detail']"
  check "strict residency: the log says it refuses to serve" \
    grep -q "residency (strict): interface ${up_ifs[0]} is up.*refusing to serve" "$log"
else
  expect_code "strict residency without a network: served" 200
fi
stop_moed "strict residency"

# Residency=strict in a network namespace of its own: only a loopback,
# down, so nothing leaves the machine and moed serves.
if unshare -n true 2>"$tmp/unshare.err"; then
  rc=0
  unshare -n "$moed" --check-residency >"$tmp/residency-ns.out" 2>&1 || rc=$?
  expect_eq "moed --check-residency in an empty network namespace exits 0" 0 "$rc"
  start_moed strict-netns "unshare -n" --config "$tmp/strict.conf" --no-bus
  post "$nb_uid" /v1/chat/completions "$(chat_body 4 'Hello there')"
  expect_code "strict residency in an empty network namespace: served" 200
  get "$nb_uid" /v1/moed/status
  expect_true "... and /v1/moed/status says residency ok" \
    "j['residency']['mode'] == 'strict' and j['residency']['ok'] is True"
  stop_moed "strict residency in a network namespace"
else
  echo "ok - # SKIP strict residency in an empty network namespace: unshare -n failed: $(cat "$tmp/unshare.err")"
fi

# =====================================================================
section "tenants and quotas"

if "$moed" --config "$tmp/moed.conf" --check-config >"$tmp/check.out" 2>&1; then
  ok "moed --check-config accepts the test config"
else
  bad "moed --check-config rejects the test config" "$tmp/check.out"
fi
sock=$tmp/run/moed.sock
usage_expect=$tmp/expect-epoch1.jsonl; : >"$usage_expect"
new_run run1
start_moed run1 '' --config "$tmp/moed.conf" --no-bus
run1_pid=$moed_pid run1_log=$log
check "the log says 2 tenants were read" grep -q "^moed: 2 tenants from $tmp/tenants" "$log"
get root /v1/moed/status
res_ok=True
[ ${#up_ifs[@]} -gt 0 ] && res_ok=False
expect_true "system mode, relaxed residency (ok: $res_ok), serving" \
  "j['mode'] == 'system' and j['state'] == 'serving' and j['residency']['mode'] == 'relaxed' and j['residency']['ok'] is $res_ok"

post root /v1/moed/tokenize "{\"model\":\"$model\",\"prompt\":\"$prompt_a\",\"add_special\":true}"
expect_true "tokenize (free of quota) agrees with moed-tokenize: $n_a tokens" "j['count'] == $n_a"

# alice (root) until her TokensPerMinute is used up.
used_a=0 n_ok=0 got429=no
for i in 1 2 3 4 5 6; do
  post root /v1/completions "$(completion_body "$max_a" "$prompt_a")"
  if [ "$code" = 200 ]; then
    expect_served json "$tmp/resp" alice 0 0
    used_a=$((used_a + $(jr "j['usage']['total_tokens']")))
    n_ok=$((n_ok + 1))
  elif [ "$code" = 429 ]; then
    got429=yes
    break
  else
    bad "alice's request $i: HTTP $code" "$tmp/resp"
    break
  fi
done
echo "# alice: $n_ok answers, $used_a tokens, then HTTP $code"
check "alice's first request is served" test "$n_ok" -ge 1
expect_eq "alice gets 429 once her TokensPerMinute=$tpm_a is used up" yes "$got429"
if [ "$got429" = yes ]; then
  cp "$tmp/resp" "$tmp/resp.429"; cp "$tmp/hdr" "$tmp/hdr.429"
  expect_refused alice 0 0 TokensPerMinute TokensPerMinute
  check "... only when what she used ($used_a) leaves no room for a prompt of $n_a and one token" \
    test $((used_a + n_a + 1)) -gt "$tpm_a"
  ra=$(header Retry-After)
  if [[ "$ra" =~ ^[0-9]+$ ]] && [ "$ra" -ge 1 ] && [ "$ra" -le 60 ]; then
    ok "the 429 has Retry-After: $ra (1..60 s for a minute bucket)"
  else
    bad "the 429 has no usable Retry-After ('$ra')" "$tmp/hdr"
  fi
  expect_true "the 429 is an OpenAI error naming TokensPerMinute and the tenant" \
    "sorted(j) == ['error'] and j['error']['type'] == 'rate_limit_error' and j['error']['code'] == 'TokensPerMinute' and 'TokensPerMinute' in j['error']['message'] and 'alice' in j['error']['message']"
  post root /v1/chat/completions "$(chat_body 4 'Hello there')"
  expect_code "alice is refused for chat too" 429
  [ "$code" = 429 ] && expect_refused alice 0 0 TokensPerMinute TokensPerMinute
fi

# Meanwhile bob (nobody) is served.
for i in 1 2; do
  post "$nb_uid" /v1/chat/completions "$(chat_body 8 'Hello there')"
  expect_code "bob is served while alice is over her limit ($i)" 200
  if [ "$code" = 200 ]; then expect_served json "$tmp/resp" bob "$nb_uid" "$nb_gid"; fi
done
post "$nb_uid" /v1/completions "$(completion_body 6 'Tell me about the sea')"
expect_code "bob's completion is served" 200
if [ "$code" = 200 ]; then expect_served json "$tmp/resp" bob "$nb_uid" "$nb_gid"; fi

# A uid of no tenant (there is no default tenant) gets 403.
post 65533 /v1/chat/completions "$(chat_body 4 'Hello there')"
expect_code "uid 65533 belongs to no tenant" 403
expect_true "... an OpenAI permission error naming the uid" \
  "j['error']['code'] == 'no_tenant' and j['error']['type'] == 'permission_error' and '65533' in j['error']['message']"
expect_refused - 65533 65533 'no tenant' -
get 65533 /v1/moed/usage
expect_code "uid 65533 may not read usage" 403

# Usage: bob sees only bob; root (an admin) sees both, each counted apart.
usage_check "$nb_uid" bob own
usage_check root alice all

# =====================================================================
section "reload (SIGHUP)"

post root /v1/chat/completions "$(chat_body 4 'Hello there')" -H "Authorization: Bearer $token_c"
expect_code "carol's token before she exists" 401
expect_true "... invalid_api_key" "j['error']['code'] == 'invalid_api_key'"
expect_refused - 0 0 'bearer token' -

# A stream running across the reload is not disturbed.
stream "$nb_uid" /v1/chat/completions \
  "$(chat_body 48 'Write a long story' ',"stream":true,"stream_options":{"include_usage":true}')" \
  "$tmp/bob-hup.sse" &
bob_stream=$!
# SIGHUP once the stream is under way.
for i in $(seq 300); do
  grep -qE '"content":"[^"]' "$tmp/bob-hup.sse" 2>/dev/null && break
  sleep 0.1
done
check "bob's stream is under way before the reload" grep -qE '"content":"[^"]' "$tmp/bob-hup.sse"
write_tenants 1000000
printf '[Tenant]\nTokens=%s\nTokensPerMinute=%s\n' "$hash_c" "$tpm_c" >"$tmp/tenants/carol.conf"
chmod 644 "$tmp/tenants/carol.conf"
kill -HUP "$moed_pid"
reloaded=no
for i in $(seq 100); do
  get root /v1/moed/usage
  if [ "$code" = 200 ] && [ "$(jr "any(t['name'] == 'carol' for t in j['tenants'])")" = true ]; then
    reloaded=yes; break
  fi
  sleep 0.1
done
expect_eq "SIGHUP: the new tenant carol is listed within 10 s" yes "$reloaded"
check "SIGHUP: the log says 3 tenants were read" grep -q "^moed: 3 tenants from $tmp/tenants" "$log"

post root /v1/completions "$(completion_body "$max_a" "$prompt_a")"
expect_code "SIGHUP: alice's raised TokensPerMinute applies to her next request" 200
if [ "$code" = 200 ]; then expect_served json "$tmp/resp" alice 0 0; fi

timeout 120 tail --pid="$bob_stream" -f /dev/null || true
helper sse "$tmp/bob-hup.sse" >"$tmp/bob-hup.sum"
expect_eq "the stream running across the reload ends whole" "" "$(jv "$tmp/bob-hup.sum" "'; '.join(j['errors'])")"
expect_eq "... with all of its 48 tokens" "length 48" \
  "$(jv "$tmp/bob-hup.sum" "'%s %s' % (j['finish'], (j['usage'] or {}).get('completion_tokens'))")"
if [ "$(jv "$tmp/bob-hup.sum" "j['usage'] is not None")" = true ]; then
  expect_served sse "$tmp/bob-hup.sum" bob "$nb_uid" "$nb_gid"
fi

# A stream that crosses carol's TokensPerMinute ends as "length" and says why.
stream root /v1/completions \
  "$(completion_body 200 "$prompt_c" ',"stream":true,"stream_options":{"include_usage":true}')" \
  "$tmp/carol.sse" -H "Authorization: Bearer $token_c"
helper sse "$tmp/carol.sse" >"$tmp/carol.sum"
expect_eq "carol's stream ends whole" "" "$(jv "$tmp/carol.sum" "'; '.join(j['errors'])")"
expect_eq "carol's stream crossing TokensPerMinute=$tpm_c ends with finish_reason length" length \
  "$(jv "$tmp/carol.sum" "j['finish']")"
if [ "$(jv "$tmp/carol.sum" "'TokensPerMinute' in ((j['moed'] or {}).get('finish_detail') or '') and 'carol' in j['moed']['finish_detail']")" = true ]; then
  ok "... and its last chunk's moed.finish_detail names TokensPerMinute: $(jv "$tmp/carol.sum" "j['moed']['finish_detail']")"
else
  bad "carol's last chunk does not name TokensPerMinute" "$tmp/carol.sse"
fi
expect_eq "... after about ten of the 200 tokens asked for" true \
  "$(jv "$tmp/carol.sum" "j['usage']['prompt_tokens'] == $n_c and 5 <= j['usage']['completion_tokens'] <= 20")"
if [ "$(jv "$tmp/carol.sum" "j['usage'] is not None")" = true ]; then
  expect_served sse "$tmp/carol.sum" carol 0 0
fi
get root /v1/moed/usage
expect_true "usage counts carol's stream as limited once" \
  "[t for t in j['tenants'] if t['name'] == 'carol'][0]['limited'] == 1"

usage_check root alice all
tap audit "$(audit_src "$run1_pid" "$run1_log")" "$audit_file" "$run_expect" "$model"

# =====================================================================
section "usage across a restart"

get root /v1/moed/usage
cp "$tmp/resp" "$tmp/usage-before.json"
stop_moed "run 1"
check "SIGTERM: the socket file is removed" test ! -e "$sock"
if [ -f "$tmp/state/usage.json" ]; then
  ok "usage.json is written at exit"
  expect_eq "usage.json is moed-usage version 1 with alice's count" true \
    "$(jv "$tmp/state/usage.json" "j['format'] == 'moed-usage' and j['version'] == 1 and j['tenants']['alice']['requests'] == $(jv "$tmp/usage-before.json" "[t for t in j['tenants'] if t['name'] == 'alice'][0]['requests']")")"
else
  bad "no $tmp/state/usage.json after SIGTERM" "$log"
fi
n_audit_logs=$(grep -c "^MESSAGE_ID=740c0de242704d41b9c8eaab7f3f9bf7 " "$run1_log" || true)

new_run run2
start_moed run2 '' --config "$tmp/moed.conf" --no-bus
run2_pid=$moed_pid run2_log=$log
get root /v1/moed/usage
cp "$tmp/resp" "$tmp/usage-after.json"
tap same-usage "$tmp/usage-before.json" "$tmp/usage-after.json"
# carol's minute bucket was empty at exit: it still is.
post root /v1/completions "$(completion_body 4 "$prompt_c")" -H "Authorization: Bearer $token_c"
expect_code "carol's spent TokensPerMinute survives the restart" 429
if [ "$code" = 429 ]; then expect_refused carol 0 0 TokensPerMinute TokensPerMinute; fi
post "$nb_uid" /v1/chat/completions "$(chat_body 4 'Hello again')"
expect_code "bob is served after the restart" 200
if [ "$code" = 200 ]; then expect_served json "$tmp/resp" bob "$nb_uid" "$nb_gid"; fi
usage_check root alice all
tap audit "$(audit_src "$run2_pid" "$run2_log")" "$audit_file" "$run_expect" "$model"
stop_moed "run 2"
n_audit_logs=$((n_audit_logs + $(grep -c "^MESSAGE_ID=740c0de242704d41b9c8eaab7f3f9bf7 " "$run2_log" || true)))

# =====================================================================
section "a corrupt usage.json"

cp "$tmp/state/usage.json" "$tmp/usage-good.json"
helper flip "$tmp/state/usage.json" >"$tmp/flip.json" || die "could not change usage.json"
echo "# changed usage.json: $(cat "$tmp/flip.json") (still valid JSON)"
cp "$tmp/state/usage.json" "$tmp/usage-flipped.json"
usage_expect=$tmp/expect-epoch2.jsonl; : >"$usage_expect"
new_run run3
start_moed run3 '' --config "$tmp/moed.conf" --no-bus
run3_pid=$moed_pid run3_log=$log
ok "moed starts with a corrupt usage.json"
corrupt=$(find "$tmp/state" -maxdepth 1 -name 'usage.json.corrupt-*' | head -n 1)
if [ -n "$corrupt" ]; then
  ok "the corrupt file is set aside as $(basename "$corrupt")"
  check "... unchanged" cmp -s "$corrupt" "$tmp/usage-flipped.json"
else
  bad "no usage.json.corrupt-* in $tmp/state" "$log"
fi
check "no usage.json is left in place" test ! -e "$tmp/state/usage.json"
if grep -q "^moed: usage: .*usage.json is corrupt.*usage.json.corrupt-" "$log"; then
  ok "the log says usage.json was corrupt and where it went"
else
  bad "the log does not report the corrupt usage.json" "$log"
fi
post "$nb_uid" /v1/chat/completions "$(chat_body 4 'Hello there')"
expect_code "moed serves after setting the corrupt file aside" 200
if [ "$code" = 200 ]; then expect_served json "$tmp/resp" bob "$nb_uid" "$nb_gid"; fi
usage_check root alice all
tap audit "$(audit_src "$run3_pid" "$run3_log")" "$audit_file" "$run_expect" "$model"
stop_moed "run 3"
n_audit_logs=$((n_audit_logs + $(grep -c "^MESSAGE_ID=740c0de242704d41b9c8eaab7f3f9bf7 " "$run3_log" || true)))
if [ -f "$tmp/state/usage.json" ]; then
  expect_eq "a new usage.json counts from zero (bob: 1 request)" true \
    "$(jv "$tmp/state/usage.json" "j['tenants']['bob']['requests'] == 1 and j['tenants']['alice']['requests'] == 0")"
else
  bad "no usage.json after run 3" "$run3_log"
fi

# =====================================================================
section "the audit file"

n_lines=$(wc -l <"$audit_file")
if [ "$journald" = no ]; then
  expect_eq "the audit file has as many records as the three runs logged" "$n_audit_logs" "$n_lines"
fi
if "$moectl" audit verify "$audit_file" >"$tmp/verify.out" 2>&1; then
  ok "moectl audit verify: the chain of $n_lines records is intact"
else
  bad "moectl audit verify fails on the daemon's own file" "$tmp/verify.out"
fi
cp "$audit_file" "$tmp/audit-cut.jsonl"
sed -i 3d "$tmp/audit-cut.jsonl"
rc=0
"$moectl" audit verify "$tmp/audit-cut.jsonl" >"$tmp/verify-cut.out" 2>&1 || rc=$?
expect_eq "moectl audit verify fails with line 3 deleted" 1 "$rc"
if grep -q "audit-cut.jsonl:3: removed" "$tmp/verify-cut.out"; then
  ok "... naming the place: audit-cut.jsonl:3 removed"
else
  bad "moectl audit verify does not name line 3 as removed" "$tmp/verify-cut.out"
fi
cp "$audit_file" "$tmp/audit-edit.jsonl"
sed -i '2s/"completion_tokens":\([0-9]\)/"completion_tokens":9\1/' "$tmp/audit-edit.jsonl"
rc=0
"$moectl" audit verify "$tmp/audit-edit.jsonl" >"$tmp/verify-edit.out" 2>&1 || rc=$?
if cmp -s "$audit_file" "$tmp/audit-edit.jsonl"; then
  bad "could not alter line 2 of the audit file" "$tmp/audit-edit.jsonl"
else
  expect_eq "moectl audit verify fails with line 2 altered" 1 "$rc"
  if grep -q "audit-edit.jsonl:2: altered" "$tmp/verify-edit.out"; then
    ok "... naming the place: audit-edit.jsonl:2 altered"
  else
    bad "moectl audit verify does not name line 2 as altered" "$tmp/verify-edit.out"
  fi
fi

echo "# $((SECONDS - t_start)) s"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
