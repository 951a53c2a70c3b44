#!/usr/bin/env bash
# test-daemon: the real moed over HTTP on temporary sockets with a fixture
# model, driven by curl --unix-socket, moectl, and the raw-socket clients of
# tests/daemon-client.py. Every endpoint; chat and completion, streamed and
# not (SSE shape, usage, max_tokens, stop strings, greedy determinism,
# streamed == whole); 32 clients at once; disconnects cancelling; SIGHUP
# during a stream; the SIGTERM drain; bad input of every kind, slow clients
# and a flood of connections. A second daemon runs in system mode from a
# config file (short idle and drain timeouts: the idle drop and the drain
# deadline), a third with --max-context 64 (prompts over the context).
# The D-Bus door is tests/test-dbus.sh.
set -euo pipefail
build=${1:?usage: test-daemon.sh BUILD_DIR}
here=$(cd "$(dirname "$0")" && pwd)
moed=$build/daemon/moed
moectl=$build/cli/moectl
fixture=$build/tools/moed-fixture

# Unix socket paths are limited to 108 bytes: fall back to /tmp when the
# build's temporary directory is deep.
base=${MOED_TEST_TMP:-${TMPDIR:-/tmp}}
mkdir -p "$base"
tmp=$(mktemp -d "$base/daemon-XXXXXX")
if [ ${#tmp} -gt 70 ]; then
  rmdir "$tmp"
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/moed-daemon-XXXXXX")
fi
moed_pid=''
cleanup() { # every background job of this shell (curls, clients, moed), then the files
  local p
  for p in $(jobs -p); do [ "$p" = "$moed_pid" ] || kill "$p" 2>/dev/null || true; done
  if [ -n "$moed_pid" ]; then kill -KILL "$moed_pid" 2>/dev/null || true; fi
  for p in $(jobs -p); do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
t_start=$SECONDS
section() { echo "# -- $1 (at $((SECONDS - t_start)) s)"; }
passed=0 failed=0

ok() { echo "ok - $1"; passed=$((passed + 1)); }
bad() { # description, files to show
  echo "not ok - $1"; shift
  local f
  for f; do
    echo "  --- $(basename "$f"):"
    head -c 2000 "$f" 2>/dev/null | sed 's/^/  | /' || true
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

for b in "$moed" "$moectl" "$fixture"; do test -x "$b" || die "no executable $b"; done
# A python that any uid can run (a pyenv shim under /root cannot).
py=python3
[ -x /usr/bin/python3 ] && py=/usr/bin/python3
command -v "$py" >/dev/null || die "python3 is needed"
command -v curl >/dev/null || die "curl is needed"
client() { "$py" "$here/daemon-client.py" "$@"; }

# ---- the daemon ----

sock='' log=''
start_moed() { # name, moed args...: starts moed and waits for "ready"
  local name=$1; shift
  log=$tmp/$name.log
  "$moed" "$@" >"$log" 2>&1 &
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
  local pid=$1 limit=$(($2 * 10)) i
  for i in $(seq "$limit"); do
    if ! kill -0 "$pid" 2>/dev/null; then
      exit_status=0
      wait "$pid" || exit_status=$?
      return 0
    fi
    sleep 0.1
  done
  return 1
}
stop_moed() { # SIGTERM with nothing running: exits 0 promptly
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
  check "$what: the socket file is removed at exit" test ! -e "$sock"
  if grep -qE 'ERROR: (Address|Leak)Sanitizer|runtime error:' "$log"; then
    bad "$what: the sanitizers reported errors" "$log"
  fi
}

# ---- requests ----

code=''
call() { # method, path, body file ('' for none), curl args...: HTTP status in $code, body in $tmp/resp
  local m=$1 p=$2 f=$3
  shift 3
  local data=()
  [ -n "$f" ] && data=(-H 'Content-Type: application/json' --data-binary "@$f")
  code=$(curl -sS --max-time 120 --unix-socket "$sock" -X "$m" "${data[@]}" "$@" \
           -o "$tmp/resp" -w '%{http_code}' "http://localhost$p" 2>"$tmp/curl.err") ||
    code="curl-exit-$?"
}
post() { printf '%s' "$2" >"$tmp/req.json"; call POST "$1" "$tmp/req.json" "${@:3}"; }
get() { call GET "$1" '' "${@:2}"; }
jv() { client json "$1" "$2"; }             # file, Python expression of j
jr() { client json "$tmp/resp" "$1"; }      # the last response
sse() { client sse "$1" "$2"; }             # chat|completion, stream file: summary JSON
expect_code() { # description, wanted HTTP status
  if [ "$code" = "$2" ]; then ok "$1 (HTTP $2)"; else bad "$1: HTTP $code, expected $2" "$tmp/resp" "$tmp/curl.err"; fi
}
expect_true() { # description, Python expression of j (the last response) that must be True
  local v
  v=$(jr "$2" 2>&1) || true
  if [ "$v" = true ]; then ok "$1"; else bad "$1: $2 is $v" "$tmp/resp"; fi
}
# An OpenAI-shaped error: status, error.code, error.param ('' for null,
# '*' for any); error.message must say something.
expect_error() { # description, status, code, param
  local what=$1 param
  if [ "$code" != "$2" ]; then bad "$what: HTTP $code, expected $2" "$tmp/resp"; return; fi
  # One python run: "ok:PARAM" for an error object of the right shape.
  param=$(jr "'ok:' + (j['error']['param'] or '') if sorted(j) == ['error'] and sorted(j['error']) == ['code', 'message', 'param', 'type'] and len(j['error']['message']) > 10 and j['error']['type'] == ('invalid_request_error' if $2 < 500 else 'server_error') and j['error']['code'] == '$3' else 'bad'" 2>&1) || true
  if [ "${param#ok:}" = "$param" ]; then
    bad "$what: not an OpenAI error object with code $3" "$tmp/resp"
  elif param=${param#ok:} && [ "$4" != '*' ] && [ "$param" != "$4" ]; then
    bad "$what: param '$param', expected '$4'" "$tmp/resp"
  else
    ok "$what (HTTP $2, $3${4:+, param $4})"
  fi
}
# After each bad request: a good one still works.
still_serving() { # description
  local c0=$code
  cp "$tmp/resp" "$tmp/resp.bad"
  post /v1/moed/tokenize "{\"model\":\"$model\",\"prompt\":\"still here\"}"
  if [ "$code" = 200 ] && [ "$(jr 'j["count"] > 1')" = true ]; then
    ok "... and moed still serves after $1"
  else
    bad "moed does not serve after $1: HTTP $code" "$tmp/resp" "$log"
  fi
  code=$c0
  cp "$tmp/resp.bad" "$tmp/resp"
}
# Waits until a stream file holds a chunk with text (the engine is under way).
wait_first_text() { # file, seconds
  local i
  for i in $(seq $(($2 * 10))); do
    grep -qE '"(content|text)":"[^"]' "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
wait_pids() { # seconds, pids...: 0 when all ended in time
  local limit=$(($1 * 10)) i p alive
  shift
  for i in $(seq "$limit"); do
    alive=0
    for p; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
  return 1
}
status_field() { # Python expression of j = /v1/moed/status
  curl -sS --max-time 10 --unix-socket "$sock" http://localhost/v1/moed/status >"$tmp/status.json" &&
    jv "$tmp/status.json" "$1"
}
my_completion_tokens() {
  curl -sS --max-time 10 --unix-socket "$sock" http://localhost/v1/moed/usage >"$tmp/usage.json" &&
    jv "$tmp/usage.json" 'sum(t["completion_tokens"] for t in j["tenants"] if t["name"] == j["tenant"])'
}
# Microseconds of the wall clock (EPOCHREALTIME's decimal point follows the
# locale), and seconds since such a time as "S.CC".
now_us() { echo "${EPOCHREALTIME//[!0-9]/}"; }
since() { local d=$(($(now_us) - $1)); printf '%d.%02d' $((d / 1000000)) $((d % 1000000 / 10000)); }
# Polls until /v1/moed/status shows no active request; prints the seconds.
wait_idle() { # seconds
  local t0 end
  t0=$(now_us) end=$(($(now_us) + $1 * 1000000))
  while [ "$(now_us)" -lt "$end" ]; do
    if [ "$(status_field 'j["queue"]["active_requests"]')" = 0 ]; then
      since "$t0"
      return 0
    fi
    sleep 0.05
  done
  return 1
}
metrics_snapshot() { # file
  curl -sS --max-time 10 --unix-socket "$sock" http://localhost/metrics >"$1.txt"
  client metrics "$1.txt" >"$1"
}
metric() { # snapshot, sample name with labels
  jv "$1" "j['samples'].get('$2', 0)"
}
metric_sum() { # snapshot, metric name, tenant: the sum over its other labels
  jv "$1" "sum(v for k, v in j['samples'].items() if k.startswith('$2{') and 'tenant=\"$3\"' in k)"
}

# ---- the model ----
section "the model"

vocab=()
[ -n "${MOED_VOCAB_JSON:-}" ] && vocab=(--vocab "$MOED_VOCAB_JSON")
# A long context (16384) so that a "long" request outlasts every check even
# in a release build.
"$fixture" --shape tiny --type Q8_0 --ctx 16384 "${vocab[@]}" -o "$tmp/tiny.gguf" >/dev/null 2>&1 ||
  die "moed-fixture could not write the model"
model=tiny

# =====================================================================
# Daemon A: per-user mode, default limits.
section "Daemon A"
sock=$tmp/a.sock
start_moed a --user --no-bus --model "$tmp/tiny.gguf" --socket "$sock"
me=$(id -un)

# ---- the read-only endpoints ----
section "the read-only endpoints"
get /health
expect_code "GET /health" 200
expect_true "/health says ok" 'j == {"status": "ok"}'
get /v1/models
expect_code "GET /v1/models" 200
expect_true "/v1/models lists the model" \
  "j['object'] == 'list' and [m['id'] for m in j['data']] == ['$model'] and j['data'][0]['object'] == 'model' and j['data'][0]['owned_by'] == 'moed' and isinstance(j['data'][0]['created'], int)"
get /v1/moed/status
expect_code "GET /v1/moed/status" 200
expect_true "status: version, state, uptime, mode" \
  "isinstance(j['version'], str) and j['state'] == 'serving' and j['uptime_s'] >= 0 and j['mode'] == 'user' and isinstance(j['devices'], list) and len(j['devices']) >= 1"
expect_true "status: the model with its context, format and KV cache" \
  "len(j['models']) == 1 and j['models'][0]['id'] == '$model' and j['models'][0]['context'] == 16384 and j['models'][0]['chat_format'] == 'deepseek3' and j['models'][0]['kv_blocks_total'] > 0 and j['models'][0]['kv_blocks_used'] == 0 and j['models'][0]['weight_bytes'] > 0 and j['models'][0]['path'].endswith('tiny.gguf')"
expect_true "status: queue and engine counters" \
  "j['queue'] == {'waiting': 0, 'running': 0, 'active_requests': 0} and all(isinstance(j['engine'][k], int) for k in ('steps', 'tokens_prefilled', 'tokens_generated'))"
get /v1/moed/usage
expect_code "GET /v1/moed/usage" 200
expect_true "usage names the caller's tenant (the user, in per-user mode)" \
  "j['tenant'] == '$me' and isinstance(j['tenants'], list)"
get /metrics
expect_code "GET /metrics" 200
metrics_snapshot "$tmp/m0"
for name in moed_queue_depth moed_running_sequences "moed_kv_blocks_used{model=\"$model\"}" \
    "moed_kv_blocks_free{model=\"$model\"}" 'moed_step_seconds_bucket{le="+Inf"}' \
    moed_step_seconds_sum moed_step_seconds_count moed_tokens_generated_total \
    moed_tokens_prefilled_total moed_tokens_per_second moed_preemptions_total; do
  if [ "$(jv "$tmp/m0" "'$name' in j['samples']")" = true ]; then ok "/metrics has $name"; else
    bad "/metrics has no $name" "$tmp/m0.txt"; fi
done
for name in moed_requests_total moed_refusals_total moed_prompt_tokens_total \
    moed_completion_tokens_total moed_active_requests; do
  check "/metrics declares $name" grep -q "^# TYPE $name " "$tmp/m0.txt"
done
errs=$(jv "$tmp/m0" "'; '.join(j['errors'])")
if [ -z "$errs" ]; then ok "/metrics is valid Prometheus text"; else
  bad "/metrics is not valid Prometheus text: $errs" "$tmp/m0.txt"; fi
curl -sS --unix-socket "$sock" -o /dev/null -w '%{content_type}' http://localhost/metrics >"$tmp/ctype"
check "/metrics is served as text/plain; version=0.0.4" grep -q '^text/plain; version=0.0.4' "$tmp/ctype"

post /v1/moed/tokenize "{\"model\":\"$model\",\"prompt\":\"The capital of France is\"}"
expect_code "POST /v1/moed/tokenize" 200
expect_true "tokenize: token ids with their count, BOS first" \
  "j['model'] == '$model' and j['count'] == len(j['tokens']) > 2 and j['tokens'][0] == 0 and all(isinstance(t, int) for t in j['tokens'])"
n_prompt=$(jr 'j["count"]')
tok_ids=$(jr 'j["tokens"]')
post /v1/moed/tokenize "{\"model\":\"$model\",\"prompt\":\"The capital of France is\",\"add_special\":false}"
expect_true "tokenize with add_special false: the same ids without BOS" "j['tokens'] == ${tok_ids}[1:]"

# ---- generation: completions ----
section "generation: completions"
P1='The capital of France is'
greedy1="{\"model\":\"$model\",\"prompt\":\"$P1\",\"max_tokens\":16,\"temperature\":0"
post /v1/completions "$greedy1}"
expect_code "a greedy completion" 200
cp "$tmp/resp" "$tmp/g1.json"
expect_true "completion: id, object, model, created" \
  "j['id'].startswith('cmpl-') and j['object'] == 'text_completion' and j['model'] == '$model' and isinstance(j['created'], int) and len(j['choices']) == 1 and j['choices'][0]['index'] == 0"
expect_true "completion: max_tokens 16 gives exactly 16 tokens, finish_reason length" \
  "j['choices'][0]['finish_reason'] == 'length' and j['usage']['completion_tokens'] == 16"
expect_true "completion: usage prompt_tokens is the tokenize count ($n_prompt)" \
  "j['usage']['prompt_tokens'] == $n_prompt"
expect_true "completion: usage total = prompt + completion" \
  "j['usage']['total_tokens'] == j['usage']['prompt_tokens'] + j['usage']['completion_tokens']"
expect_true "completion: the moed object has the timings and finish_detail" \
  "sorted(j['moed']) == ['finish_detail', 'first_token_s', 'queue_s', 'total_s'] and 0 <= j['moed']['queue_s'] <= j['moed']['total_s'] and 0 < j['moed']['first_token_s'] <= j['moed']['total_s']"
text1=$(jr 'j["choices"][0]["text"]')
check "completion: the text is not empty" test -n "$text1"
# Tokens per second of one stream: sizes the requests that must outlast a
# signal (about 1.5 s of generation).
tps=$(jr 'int(15 / max(1e-6, j["moed"]["total_s"] - j["moed"]["first_token_s"]))')
if [ "$tps" -gt 100 ]; then
  # A fast build: 16 tokens are too few to time.
  post /v1/completions "{\"model\":\"$model\",\"prompt\":\"Calibrate\",\"max_tokens\":400,\"temperature\":0}"
  tps=$(jr 'int(399 / max(1e-6, j["moed"]["total_s"] - j["moed"]["first_token_s"]))')
fi
n_mid=$("$py" -c "print(max(24, min(3000, int($tps * 1.5))))")
echo "# one stream generates about $tps tokens/s; mid-length requests: $n_mid tokens"

post /v1/completions "$greedy1}"
expect_eq "the same greedy completion twice gives the same text" "$text1" "$(jr 'j["choices"][0]["text"]')"

curl -sS -N --max-time 120 --unix-socket "$sock" http://localhost/v1/completions \
  -d "$greedy1,\"stream\":true}" >"$tmp/g1.sse"
sse completion "$tmp/g1.sse" >"$tmp/g1.sum"
expect_eq "streamed completion: a well-formed SSE stream" "" "$(jv "$tmp/g1.sum" "'; '.join(j['errors'])")"
expect_eq "streamed completion: the text equals the non-streamed one" "$text1" "$(jv "$tmp/g1.sum" 'j["text"]')"
expect_eq "streamed completion: finish_reason length" length "$(jv "$tmp/g1.sum" 'j["finish"]')"
expect_eq "streamed completion: no usage chunk unless asked" None "$(jv "$tmp/g1.sum" 'str(j["usage"])')"
expect_eq "streamed completion: the final chunk carries the moed object" true \
  "$(jv "$tmp/g1.sum" "j['moed'] is not None and j['moed']['total_s'] > 0 and 'finish_detail' in j['moed']")"
check "streamed completion: data: [DONE] is the last line" \
  test "$(tail -n 2 "$tmp/g1.sse" | head -n 1)" = "data: [DONE]"

post /v1/completions "{\"model\":\"$model\",\"prompt\":\"$P1\",\"max_tokens\":1,\"temperature\":0}"
expect_true "max_tokens 1: one token, finish_reason length" \
  "j['usage']['completion_tokens'] == 1 and j['choices'][0]['finish_reason'] == 'length'"

# A stop string taken from the greedy text, so that it really occurs.
stop=$("$py" -c '
import sys
t = sys.argv[1]
for at in range(len(t) // 2, len(t) - 2):
    s = t[at:at + 3]
    if t.find(s) > 0 and s.strip() and all(c >= " " and c not in "\"\\" for c in s):
        print(s)
        break
' "$text1")
check "a stop string was found in the greedy text" test -n "$stop"
want=$("$py" -c 'import sys; t, s = sys.argv[1:]; print(t[:t.find(s)], end="")' "$text1" "$stop")
post /v1/completions "$greedy1,\"stop\":[\"$stop\"]}"
expect_code "a completion with a stop string" 200
expect_eq "stop: the text ends just before the stop string" "$want" "$(jr 'j["choices"][0]["text"]')"
expect_true "stop: finish_reason stop, fewer than 16 tokens" \
  "j['choices'][0]['finish_reason'] == 'stop' and j['usage']['completion_tokens'] < 16"
curl -sS -N --max-time 120 --unix-socket "$sock" http://localhost/v1/completions \
  -d "$greedy1,\"stop\":\"$stop\",\"stream\":true}" >"$tmp/stop.sse"
sse completion "$tmp/stop.sse" >"$tmp/stop.sum"
expect_eq "stop, streamed: the same text, without the stop string" "$want" "$(jv "$tmp/stop.sum" 'j["text"]')"
expect_eq "stop, streamed: finish_reason stop" stop "$(jv "$tmp/stop.sum" 'j["finish"]')"

seeded="{\"model\":\"$model\",\"prompt\":\"Once upon a time\",\"max_tokens\":12,\"temperature\":0.9,\"top_p\":0.95,\"seed\":1234}"
post /v1/completions "$seeded"
s1=$(jr 'j["choices"][0]["text"]')
post /v1/completions "$seeded"
expect_eq "a seeded sampled completion is reproducible" "$s1" "$(jr 'j["choices"][0]["text"]')"

# ---- generation: chat ----
section "generation: chat"
chat1="{\"model\":\"$model\",\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},{\"role\":\"user\",\"content\":\"Name three colours.\"}],\"max_tokens\":12,\"temperature\":0"
post /v1/chat/completions "$chat1}"
expect_code "a greedy chat completion" 200
expect_true "chat: id, object, the assistant's message, finish_reason length" \
  "j['id'].startswith('chatcmpl-') and j['object'] == 'chat.completion' and j['choices'][0]['message']['role'] == 'assistant' and isinstance(j['choices'][0]['message']['content'], str) and j['choices'][0]['finish_reason'] == 'length'"
expect_true "chat: usage adds up, 12 completion tokens" \
  "j['usage']['completion_tokens'] == 12 and j['usage']['total_tokens'] == j['usage']['prompt_tokens'] + 12 and j['usage']['prompt_tokens'] > 5"
chat_text=$(jr 'j["choices"][0]["message"]["content"]')
chat_usage=$(jr 'j["usage"]')
curl -sS -N --max-time 120 --unix-socket "$sock" http://localhost/v1/chat/completions \
  -d "$chat1,\"stream\":true,\"stream_options\":{\"include_usage\":true}}" >"$tmp/c1.sse"
sse chat "$tmp/c1.sse" >"$tmp/c1.sum"
expect_eq "streamed chat: a well-formed SSE stream (role chunk first, one finish, usage, [DONE] last)" \
  "" "$(jv "$tmp/c1.sum" "'; '.join(j['errors'])")"
expect_eq "streamed chat: the text equals the non-streamed one" "$chat_text" "$(jv "$tmp/c1.sum" 'j["text"]')"
expect_eq "streamed chat: finish_reason length" length "$(jv "$tmp/c1.sum" 'j["finish"]')"
expect_eq "streamed chat: the usage chunk equals the non-streamed usage" true \
  "$(jv "$tmp/c1.sum" "j['usage'] == $chat_usage")"

# ---- 32 clients at once ----
section "32 clients at once"
# Four requests (two completions, two chats), each once alone for its
# reference answer; then 32 at once, half of them streamed.
reqs=(
  "/v1/completions|{\"model\":\"$model\",\"prompt\":\"Once upon a time\",\"max_tokens\":8,\"temperature\":0"
  "/v1/completions|{\"model\":\"$model\",\"prompt\":\"1, 2, 3,\",\"max_tokens\":8,\"temperature\":0"
  "/v1/chat/completions|{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}],\"max_tokens\":8,\"temperature\":0"
  "/v1/chat/completions|{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"What is 2+2?\"}],\"max_tokens\":8,\"temperature\":0"
)
textof='j["choices"][0]["text"] if "text" in j["choices"][0] else j["choices"][0]["message"]["content"]'
refs=()
for k in 0 1 2 3; do
  post "${reqs[$k]%%|*}" "${reqs[$k]#*|}}"
  [ "$code" = 200 ] || bad "reference answer $k: HTTP $code" "$tmp/resp"
  refs[k]=$(jr "$textof")
done
pids=()
t0=$SECONDS
for i in $(seq 0 31); do
  k=$((i % 4)) path=${reqs[$((i % 4))]%%|*} body=${reqs[$((i % 4))]#*|}
  if [ $((i / 4 % 2)) = 1 ]; then body="$body,\"stream\":true}"; else body="$body}"; fi
  curl -sS -N --max-time 120 --unix-socket "$sock" -o "$tmp/many$i.out" -w '%{http_code}' \
    "http://localhost$path" -d "$body" >"$tmp/many$i.code" 2>"$tmp/many$i.err" &
  pids+=($!)
done
wait_pids 150 "${pids[@]}" || bad "32 clients: not all answered within 150 s"
echo "# 32 clients took $((SECONDS - t0)) s"
good=0 wrong=()
for i in $(seq 0 31); do
  k=$((i % 4))
  if [ "$(cat "$tmp/many$i.code" 2>/dev/null)" != 200 ]; then wrong+=("$i: HTTP $(cat "$tmp/many$i.code" 2>/dev/null)"); continue; fi
  if [ $((i / 4 % 2)) = 1 ]; then
    kind=completion; [ "$k" -ge 2 ] && kind=chat
    sse "$kind" "$tmp/many$i.out" >"$tmp/many$i.sum"
    e=$(jv "$tmp/many$i.sum" "'; '.join(j['errors'])")
    got=$(jv "$tmp/many$i.sum" 'j["text"]')
    fin=$(jv "$tmp/many$i.sum" 'j["finish"]')
  else
    e='' got=$(jv "$tmp/many$i.out" "$textof") fin=$(jv "$tmp/many$i.out" 'j["choices"][0]["finish_reason"]')
  fi
  if [ -n "$e" ]; then wrong+=("$i: $e");
  elif [ "$got" != "${refs[$k]}" ]; then wrong+=("$i: '$got' is not '${refs[$k]}'");
  elif [ "$fin" != length ]; then wrong+=("$i: finish_reason $fin");
  else good=$((good + 1)); fi
done
if [ "$good" = 32 ]; then ok "32 clients at once all got complete answers equal to their answers alone"; else
  bad "32 clients at once: $good of 32 right; $(printf '%s; ' "${wrong[@]:0:4}")"; fi

# ---- moectl against the daemon ----
section "moectl against the daemon"
mc() { "$moectl" --socket "$sock" "$@" </dev/null >"$tmp/mc.out" 2>"$tmp/mc.err"; }
if mc models && grep -q "$model" "$tmp/mc.out"; then ok "moectl models lists the model"; else
  bad "moectl models" "$tmp/mc.out" "$tmp/mc.err"; fi
if mc --json models && [ "$(jv "$tmp/mc.out" "[m['id'] for m in j['data']] == ['$model']")" = true ]; then
  ok "moectl --json models is moed's JSON"; else bad "moectl --json models" "$tmp/mc.out" "$tmp/mc.err"; fi
if mc status && grep -q "$model" "$tmp/mc.out"; then ok "moectl status"; else
  bad "moectl status" "$tmp/mc.out" "$tmp/mc.err"; fi
if mc --json status && [ "$(jv "$tmp/mc.out" "j['state'] == 'serving'")" = true ]; then
  ok "moectl --json status says serving"; else bad "moectl --json status" "$tmp/mc.out" "$tmp/mc.err"; fi
if mc usage; then ok "moectl usage"; else bad "moectl usage" "$tmp/mc.out" "$tmp/mc.err"; fi
if mc health; then ok "moectl health"; else bad "moectl health" "$tmp/mc.out" "$tmp/mc.err"; fi
if mc --json tokenize "$model" "$P1" && [ "$(jv "$tmp/mc.out" "j['tokens'] == $tok_ids")" = true ]; then
  ok "moectl tokenize gives the API's ids"; else bad "moectl tokenize" "$tmp/mc.out" "$tmp/mc.err"; fi
if mc --temp 0 -n 16 --raw run "$model" "$P1"; then
  expect_eq "moectl run --raw streams the API's greedy completion" "$text1" "$(cat "$tmp/mc.out")"
else bad "moectl run --raw" "$tmp/mc.out" "$tmp/mc.err"; fi
post /v1/chat/completions "{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"Name three colours.\"}],\"max_tokens\":16,\"temperature\":0}"
want=$(jr 'j["choices"][0]["message"]["content"]')
if mc --temp 0 -n 16 run "$model" "Name three colours."; then
  expect_eq "moectl run streams the API's greedy chat answer" "$want" "$(cat "$tmp/mc.out")"
else bad "moectl run" "$tmp/mc.out" "$tmp/mc.err"; fi

# ---- the counters moved ----
section "the counters moved"
metrics_snapshot "$tmp/m1"
for name in "moed_requests_total{tenant=\"$me\"}" "moed_completion_tokens_total{tenant=\"$me\"}" \
    "moed_prompt_tokens_total{tenant=\"$me\"}" moed_tokens_generated_total \
    moed_tokens_prefilled_total moed_step_seconds_count 'moed_step_seconds_bucket{le="+Inf"}'; do
  a=$(metric "$tmp/m0" "$name") b=$(metric "$tmp/m1" "$name")
  if "$py" -c "import sys; sys.exit(0 if $b > $a else 1)"; then ok "/metrics: $name grew ($a -> $b)"; else
    bad "/metrics: $name did not grow ($a -> $b)" "$tmp/m1.txt"; fi
done
expect_eq "/metrics is still valid Prometheus text after traffic" "" "$(jv "$tmp/m1" "'; '.join(j['errors'])")"
get /v1/moed/usage
expect_true "usage counts this tenant's requests and tokens" \
  "[t for t in j['tenants'] if t['name'] == '$me'][0]['requests'] >= 40 and [t for t in j['tenants'] if t['name'] == '$me'][0]['completion_tokens'] > 300 and [t for t in j['tenants'] if t['name'] == '$me'][0]['active'] == 0"

# ---- a disconnect cancels ----
section "a disconnect cancels"
long="{\"model\":\"$model\",\"prompt\":\"Count to ten thousand:\",\"max_tokens\":8000,\"temperature\":0"
u0=$(my_completion_tokens)
curl -sS -N --max-time 300 --unix-socket "$sock" http://localhost/v1/completions \
  -d "$long,\"stream\":true}" >"$tmp/long.sse" 2>/dev/null &
cpid=$!
if wait_first_text "$tmp/long.sse" 60; then
  kill "$cpid"
  wait "$cpid" 2>/dev/null || true
  if secs=$(wait_idle 2); then ok "a stream whose client left is cancelled (no active request after ${secs} s)"; else
    bad "a stream whose client left was still active 2 s later" "$log"; fi
  u1=$(my_completion_tokens)
  sleep 0.5
  u2=$(my_completion_tokens)
  expect_eq "the cancelled stream's tokens stop growing" "$u1" "$u2"
  check "the cancelled stream stopped well below max_tokens ($((u1 - u0)) of 8000)" test $((u1 - u0)) -lt 4000
  expect_eq "its KV cache blocks are freed" 0 "$(status_field 'j["models"][0]["kv_blocks_used"]')"
else
  bad "the long stream sent no text within 60 s" "$tmp/long.sse"
fi
u0=$(my_completion_tokens)
rc=0
curl -sS --max-time 1 --unix-socket "$sock" http://localhost/v1/completions -d "$long}" \
  >/dev/null 2>&1 || rc=$?
expect_eq "a long non-streamed request: curl gives up after 1 s" 28 "$rc"
if secs=$(wait_idle 2); then ok "a non-streamed request whose client left is cancelled (idle ${secs} s later)"; else
  bad "a non-streamed request whose client left was still active 2 s later" "$log"; fi
u1=$(my_completion_tokens)
check "the cancelled request stopped well below max_tokens ($((u1 - u0)) of 8000)" test $((u1 - u0)) -lt 4000
expect_eq "its KV cache blocks are freed" 0 "$(status_field 'j["models"][0]["kv_blocks_used"]')"

# ---- SIGHUP while a stream runs ----
section "SIGHUP while a stream runs"
mid="{\"model\":\"$model\",\"prompt\":\"In the beginning\",\"max_tokens\":$n_mid,\"temperature\":0"
post /v1/completions "$mid}"
ref_mid=$(jr 'j["choices"][0]["text"]')
curl -sS -N --max-time 300 --unix-socket "$sock" http://localhost/v1/completions \
  -d "$mid,\"stream\":true}" >"$tmp/hup.sse" 2>/dev/null &
cpid=$!
if wait_first_text "$tmp/hup.sse" 60; then
  kill -HUP "$moed_pid"
  if grep -q 'data: \[DONE\]' "$tmp/hup.sse"; then
    bad "the stream had ended before SIGHUP (the check proves nothing)"; fi
  if wait_pids 120 "$cpid"; then
    sse completion "$tmp/hup.sse" >"$tmp/hup.sum"
    expect_eq "SIGHUP during a stream: the stream stays well-formed to [DONE]" "" \
      "$(jv "$tmp/hup.sum" "'; '.join(j['errors'])")"
    expect_eq "SIGHUP during a stream: finish_reason length" length "$(jv "$tmp/hup.sum" 'j["finish"]')"
    expect_eq "SIGHUP during a stream: the whole text arrives" "$ref_mid" "$(jv "$tmp/hup.sum" 'j["text"]')"
  else
    bad "SIGHUP during a stream: the stream did not end within 120 s" "$tmp/hup.sse"
  fi
  check "SIGHUP: moed logged the reload" grep -q 'reloading' "$log"
  get /health
  expect_code "after SIGHUP moed is healthy" 200
  post /v1/completions "{\"model\":\"$model\",\"prompt\":\"$P1\",\"max_tokens\":16,\"temperature\":0}"
  expect_eq "after SIGHUP moed answers as before" "$text1" "$(jr 'j["choices"][0]["text"]')"
else
  bad "the SIGHUP stream sent no text within 60 s" "$tmp/hup.sse"
fi

# ---- large requests within the limits are read at socket speed ----
section "large requests within the limits"
"$py" -c 'import sys; sys.stdout.write("{\"model\":\"tiny\",\"prompt\":\"x\",\"pad\":\"" + "a" * 900000 + "\"}")' >"$tmp/pad.json"
t0=$(now_us)
call POST /v1/moed/tokenize "$tmp/pad.json" --max-time 5
secs=$(since "$t0")
if [ "$code" = 200 ]; then ok "a 900 KB body is read promptly (${secs} s)"; else
  bad "a 900 KB body (under the 1 MiB limit) was not answered within 5 s: HTTP $code after ${secs} s" "$tmp/curl.err"; fi
pad=$(head -c 15000 /dev/zero | tr '\0' x)
t0=$(now_us)
get /health --max-time 5 -H "X-Pad: $pad"
secs=$(since "$t0")
if [ "$code" = 200 ]; then ok "a 15 KB header (under the 16 KiB limit) is read promptly (${secs} s)"; else
  bad "a 15 KB header (under the 16 KiB limit) was not answered within 5 s: HTTP $code after ${secs} s" "$tmp/curl.err"; fi

# ---- bad input: each gets a clear error, and moed goes on serving ----
section "bad input: each gets a clear error, and moed goes on serving"
m0=$(my_completion_tokens)
metrics_snapshot "$tmp/m2"
post /v1/completions "{\"model\":\"$model\",\"prompt\":"
expect_error "malformed JSON" 400 invalid_json ''
still_serving "malformed JSON"
post /v1/completions ''
expect_error "an empty body" 400 invalid_json ''
post /v1/completions '[1, 2]'
expect_error "a body that is not an object" 400 invalid_type ''
post /v1/completions "{\"model\":\"$model\",\"prompt\":\"x\",\"max_tokens\":\"ten\"}"
expect_error "max_tokens as a string" 400 invalid_type max_tokens
post /v1/completions "{\"model\":\"$model\",\"prompt\":\"x\",\"temperature\":\"hot\"}"
expect_error "temperature as a string" 400 invalid_type temperature
post /v1/completions "{\"model\":\"$model\",\"prompt\":\"x\",\"stream\":\"yes\"}"
expect_error "stream as a string" 400 invalid_type stream
post /v1/chat/completions "{\"model\":\"$model\",\"messages\":\"hi\"}"
expect_error "messages as a string" 400 invalid_type messages
post /v1/chat/completions "{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":5}]}"
expect_error "a message's content as a number" 400 invalid_type 'messages[0].content'
post /v1/completions "{\"model\":7,\"prompt\":\"x\"}"
expect_error "model as a number" 400 invalid_type model
still_serving "wrong types"
post /v1/completions '{"prompt":"x"}'
expect_error "no model" 400 missing_required_parameter model
post /v1/completions "{\"model\":\"$model\",\"prompt\":\"x\",\"max_tokens\":0}"
expect_error "max_tokens 0" 400 invalid_value max_tokens
post /v1/completions "{\"model\":\"$model\",\"prompt\":\"x\",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}"
expect_error "five stop strings" 400 invalid_value stop
post /v1/completions "{\"model\":\"$model\",\"prompt\":\"x\",\"n\":2}"
expect_error "n=2" 400 invalid_value n
post /v1/completions "{\"model\":\"$model\",\"prompt\":[1, 999999999]}"
expect_error "a token id outside the vocabulary" 400 invalid_value prompt
still_serving "bad values"
post /v1/completions "{\"model\":\"$model\",\"prompt\":\"x\",\"max_tokens\":1,\"temperature\":0,\"frobnicate\":{\"a\":[1]}}"
expect_code "unknown fields are ignored" 200
"$py" -c 'import sys; sys.stdout.write("{\"model\":\"tiny\",\"prompt\":\"" + "a" * (1 << 20) + "\"}")' >"$tmp/big.json"
call POST /v1/completions "$tmp/big.json"
expect_error "a body over 1 MiB" 413 body_too_large ''
still_serving "a body over 1 MiB"
call POST /v1/completions "$tmp/big.json" -H 'Transfer-Encoding: chunked'
expect_error "a chunked body over 1 MiB (no Content-Length)" 413 body_too_large ''
still_serving "a chunked body over 1 MiB"
"$py" -c 'import sys; sys.stdout.write("{\"model\":\"tiny\",\"prompt\":\"x\",\"deep\":" + "[" * 17 + "]" * 17 + "}")' >"$tmp/deep.json"
call POST /v1/completions "$tmp/deep.json"
expect_error "JSON nested 18 deep (limit 16)" 400 too_deep ''
"$py" -c 'import sys; sys.stdout.write("{\"model\":\"tiny\",\"prompt\":\"x\",\"deep\":" + "[" * 14 + "]" * 14 + ",\"max_tokens\":1}")' >"$tmp/deep.json"
call POST /v1/completions "$tmp/deep.json"
expect_code "JSON nested 15 deep is accepted" 200
"$py" -c 'import sys; sys.stdout.write("{\"deep\":" + "[" * 100000 + "]" * 100000 + "}")' >"$tmp/deep.json"
call POST /v1/completions "$tmp/deep.json"
expect_error "JSON nested 100000 deep" 400 too_deep ''
still_serving "deep nesting"
printf '{"model":"%s","prompt":"a\xffb"}' "$model" >"$tmp/utf8.json"
call POST /v1/completions "$tmp/utf8.json"
expect_error "invalid UTF-8 in a string" 400 invalid_json ''
printf '{"model":"%s","messages":[{"role":"user","content":"\xed\xa0\x80"}]}' "$model" >"$tmp/utf8.json"
call POST /v1/chat/completions "$tmp/utf8.json"
expect_error "a UTF-8-encoded surrogate in a message" 400 invalid_json ''
post /v1/completions "{\"model\":\"$model\",\"prompt\":\"a\\u0000b\"}"
expect_error "a NUL character in a string" 400 invalid_json ''
still_serving "invalid UTF-8"
post /v1/completions '{"model":"no-such-model","prompt":"x"}'
expect_error "an unknown model" 404 model_not_found model
check "the unknown model's error names it" grep -q "no-such-model" "$tmp/resp"
post /v1/moed/tokenize '{"model":"no-such-model","prompt":"x"}'
expect_error "tokenize with an unknown model" 404 model_not_found model
still_serving "an unknown model"
get /v1/nope
expect_error "an unknown endpoint" 404 not_found ''
post /v1/chat/completion "{\"model\":\"$model\",\"prompt\":\"x\"}"
expect_error "a misspelt endpoint" 404 not_found ''
get /v1/chat/completions
expect_error "GET on a POST endpoint" 405 method_not_allowed ''
call DELETE /v1/models ''
expect_error "DELETE on a GET endpoint" 405 method_not_allowed ''
still_serving "unknown endpoints and methods"
get /health -H "X-Big: $(head -c 20000 /dev/zero | tr '\0' x)"
if [ "$code" = 431 ] || [ "$code" = 413 ]; then ok "a 20 KB header is refused (HTTP $code)"; else
  bad "a 20 KB header: HTTP $code, expected 431 or 413" "$tmp/resp"; fi
still_serving "a huge header"
metrics_snapshot "$tmp/m3"
a=$(metric_sum "$tmp/m2" moed_refusals_total "$me") b=$(metric_sum "$tmp/m3" moed_refusals_total "$me")
check "/metrics counts the refusals ($a -> $b)" test "${b%.*}" -gt "${a%.*}"
expect_eq "no bad request generated anything but the 2 accepted tokens" $((m0 + 2)) "$(my_completion_tokens)"

# ---- a flood of connections (more than MaxConnections=512) ----
section "a flood of connections (more than MaxConnections=512)"
client flood "$sock" 600 60 >"$tmp/flood.json"
echo "# flood: $(cat "$tmp/flood.json")"
expect_eq "flood: every connection was answered or closed within 60 s" true \
  "$(jv "$tmp/flood.json" "j['pending'] == 0 and j['opened'] + j['connect_failed'] == 600")"
expect_eq "flood: connections within the limit were served" true \
  "$(jv "$tmp/flood.json" "j['status'].get('200', 0) >= 100")"
kill -0 "$moed_pid" 2>/dev/null || die "moed died in the flood"
get /health
expect_code "after the flood moed is healthy" 200
post /v1/completions "{\"model\":\"$model\",\"prompt\":\"$P1\",\"max_tokens\":16,\"temperature\":0}"
expect_eq "after the flood moed answers as before" "$text1" "$(jr 'j["choices"][0]["text"]')"
expect_eq "after the flood no request is left active" 0 "$(status_field 'j["queue"]["active_requests"]')"

# ---- SIGTERM drains ----
section "SIGTERM drains"
# The stream outlasts the probe below (about 6 s of generation).
n_drain=$((n_mid * 4))
curl -sS -N --max-time 300 --unix-socket "$sock" http://localhost/v1/completions \
  -d "{\"model\":\"$model\",\"prompt\":\"In the beginning\",\"max_tokens\":$n_drain,\"temperature\":0,\"stream\":true,\"stream_options\":{\"include_usage\":true}}" \
  >"$tmp/drain.sse" 2>/dev/null &
cpid=$!
if wait_first_text "$tmp/drain.sse" 60; then
  t0=$SECONDS
  client drainprobe "$sock" "$moed_pid" >"$tmp/probe.json"
  echo "# drain probe: $(cat "$tmp/probe.json")"
  expect_eq "drain: /health answered 200 before SIGTERM" 200 "$(jv "$tmp/probe.json" 'j["before"]')"
  expect_eq "drain: /health on an open connection says 503 draining" 503 "$(jv "$tmp/probe.json" 'j["kept"]')"
  expect_eq "drain: a new request on an open connection gets 503 draining" "503 draining" \
    "$(jv "$tmp/probe.json" "'%s %s' % (j.get('kept_post'), j.get('kept_post_code'))")"
  if grep -q 'data: \[DONE\]' "$tmp/drain.sse"; then
    bad "drain: the stream had ended before the probe finished (the checks prove less)"; fi
  new=$(jv "$tmp/probe.json" 'j["new"]')
  if [ "$new" = refused ] || [ "$new" = 503 ]; then ok "drain: a new connection is refused ($new)"; else
    why=''
    [ "$new" = timeout ] && why=' (the listening socket stays open while moed drains: new clients wait in its backlog, unanswered)'
    bad "drain: a new connection is neither refused nor answered 503 but got '$new'$why"; fi
  if wait_pids 120 "$cpid"; then
    sse completion "$tmp/drain.sse" >"$tmp/drain.sum"
    expect_eq "drain: the running stream completes to [DONE]" "" "$(jv "$tmp/drain.sum" "'; '.join(j['errors'])")"
    expect_eq "drain: the running stream ends with finish_reason length" length "$(jv "$tmp/drain.sum" 'j["finish"]')"
    expect_eq "drain: the running stream is whole ($n_drain tokens)" "$n_drain" \
      "$(jv "$tmp/drain.sum" "(j['usage'] or {}).get('completion_tokens')")"
  else
    bad "drain: the running stream did not end within 120 s" "$tmp/drain.sse"
  fi
  if wait_exit "$moed_pid" 30; then
    expect_eq "drain: moed exits with status 0" 0 "$exit_status"
    echo "# drained and exited $((SECONDS - t0)) s after SIGTERM"
  else
    bad "drain: moed did not exit within 30 s after its requests ended" "$log"
  fi
  moed_pid=''
  check "drain: moed logged the drain" grep -q 'drained; exiting' "$log"
  check "drain: the socket file is removed" test ! -e "$sock"
  if grep -qE 'ERROR: (Address|Leak)Sanitizer|runtime error:' "$log"; then
    bad "daemon A: the sanitizers reported errors" "$log"; fi
else
  bad "the drain stream sent no text within 60 s" "$tmp/drain.sse"
  stop_moed "daemon A"
fi

# =====================================================================
# Daemon B: system mode from a config file, with short idle and drain
# timeouts and a tenant for this uid.
section "Daemon B"
mkdir -p "$tmp/tenants"
printf '[Tenant]\nUsers=%s\nAdmin=yes\n' "$(id -u)" >"$tmp/tenants/default.conf"
sock=$tmp/b.sock
cat >"$tmp/moed.conf" <<EOF
[Daemon]
Socket=$sock
IdleTimeoutSec=2
DrainTimeoutSec=1
TenantsDirectory=$tmp/tenants
StateDirectory=$tmp/state
ModelDirectories=$tmp
# The test machine has a network: log it rather than refuse to serve.
Residency=relaxed

[Model tiny]
Path=$tmp/tiny.gguf
EOF
if "$moed" --config "$tmp/moed.conf" --check-config >"$tmp/check.out" 2>&1; then
  ok "moed --check-config accepts the test config"; else bad "moed --check-config" "$tmp/check.out"; fi
start_moed b --config "$tmp/moed.conf" --no-bus
get /v1/moed/status
expect_true "system mode: status says so" "j['mode'] == 'system' and j['state'] == 'serving'"
get /v1/moed/usage
expect_true "system mode: the caller maps to the tenant 'default'" "j['tenant'] == 'default'"

# A client silent for longer than IdleTimeoutSec=2 is dropped.
client silent "$sock" 8 >"$tmp/silent.json"
expect_eq "a client silent for longer than IdleTimeoutSec is dropped (after 1.5-5 s)" true \
  "$(jv "$tmp/silent.json" "j['closed'] and 1.5 <= j['after_s'] <= 5")"
# A client sending its headers a byte every 0.15 s (3.6 s in all) does not
# hold up others.
client trickle "$sock" 0.15 >"$tmp/trickle.json" &
tpid=$!
sleep 1
t0=$(now_us)
post /v1/completions "{\"model\":\"$model\",\"prompt\":\"$P1\",\"max_tokens\":4,\"temperature\":0}"
expect_code "while a client trickles its headers, others are served" 200
secs=$(since "$t0")
check "... promptly (${secs} s, under 5 s)" test "${secs%.*}" -lt 5
if wait_pids 30 "$tpid"; then
  echo "# trickling client: $(cat "$tmp/trickle.json")"
  expect_eq "the trickling client is answered or dropped, never left hanging" true \
    "$(jv "$tmp/trickle.json" "j['status'] is None or isinstance(j['status'], int)")"
else
  bad "the trickling client did not finish within 30 s"
fi
# Headers are due within IdleTimeoutSec of connecting, however steadily
# they trickle: a byte every 0.5 s (12 s for the request) is cut off.
client trickle "$sock" 0.5 >"$tmp/trickle-slow.json"
echo "# slow trickling client: $(cat "$tmp/trickle-slow.json")"
expect_eq "a client trickling its headers past IdleTimeoutSec is dropped (within 5 s)" true \
  "$(jv "$tmp/trickle-slow.json" "j['status'] is None and j['sent'] < j['of'] and j['seconds'] < 5")"

# The drain deadline: a stream longer than DrainTimeoutSec=1 is cancelled
# with a reason, and moed exits 0.
curl -sS -N --max-time 300 --unix-socket "$sock" http://localhost/v1/completions \
  -d "$long,\"stream\":true}" >"$tmp/deadline.sse" 2>/dev/null &
cpid=$!
if wait_first_text "$tmp/deadline.sse" 60; then
  t0=$SECONDS
  kill -TERM "$moed_pid"
  if wait_pids 30 "$cpid"; then
    sse completion "$tmp/deadline.sse" >"$tmp/deadline.sum"
    expect_eq "drain deadline: the stream still ends with [DONE]" "" "$(jv "$tmp/deadline.sum" "'; '.join(j['errors'])")"
    expect_eq "drain deadline: finish_reason cancelled" cancelled "$(jv "$tmp/deadline.sum" 'j["finish"]')"
    expect_eq "drain deadline: finish_detail says why" true \
      "$(jv "$tmp/deadline.sum" "'drain deadline' in (j['moed'] or {}).get('finish_detail', '')")"
  else
    bad "drain deadline: the stream did not end within 30 s" "$tmp/deadline.sse"
  fi
  if wait_exit "$moed_pid" 15; then
    expect_eq "drain deadline: moed exits with status 0" 0 "$exit_status"
    check "drain deadline: moed exits within DrainTimeoutSec and a step ($((SECONDS - t0)) s)" test $((SECONDS - t0)) -le 8
  else
    bad "drain deadline: moed did not exit within 15 s" "$log"
  fi
  moed_pid=''
  check "drain deadline: moed logged the deadline" grep -q 'drain deadline passed' "$log"
  if grep -qE 'ERROR: (Address|Leak)Sanitizer|runtime error:' "$log"; then
    bad "daemon B: the sanitizers reported errors" "$log"; fi
else
  bad "the deadline stream sent no text within 60 s" "$tmp/deadline.sse"
  stop_moed "daemon B"
fi

# =====================================================================
# Daemon C: per-user mode, --max-context 64 and a small KV cache.
section "Daemon C"
sock=$tmp/c.sock
start_moed c --user --no-bus --model "$tmp/tiny.gguf" --socket "$sock" --max-context 64 --kv-cache 1M
get /v1/moed/status
expect_true "--max-context 64: status shows the context" "j['models'][0]['context'] == 64"
expect_true "--kv-cache 1M: status shows 1 MiB of blocks" \
  "0 < j['models'][0]['kv_blocks_total'] < 64 and j['models'][0]['kv_blocks_total'] * j['models'][0]['kv_block_tokens'] >= 64"
many=$("$py" -c 'print(" a" * 100)')
post /v1/completions "{\"model\":\"$model\",\"prompt\":\"$many\"}"
expect_error "a prompt over the context" 400 context_length_exceeded prompt
check "the context error gives the numbers" grep -q "at most 63" "$tmp/resp"
post /v1/chat/completions "{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"$many\"}]}"
expect_error "a chat over the context" 400 context_length_exceeded messages
still_serving "a prompt over the context"
post /v1/completions "{\"model\":\"$model\",\"prompt\":\"Hi\",\"max_tokens\":1000,\"temperature\":0}"
expect_code "max_tokens beyond the context" 200
expect_true "... stops at the context: finish_reason length, prompt + completion = 64, finish_detail says so" \
  "j['choices'][0]['finish_reason'] == 'length' and j['usage']['total_tokens'] == 64 and 'context' in j['moed']['finish_detail']"
stop_moed "daemon C"

echo "# $((SECONDS - t_start)) s in all"
echo "$passed passed, $failed failed"
test "$failed" -eq 0
