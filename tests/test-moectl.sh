#!/usr/bin/env bash
# test-moectl: moectl end to end against tests/fake-moed.py, a stand-in for
# moed's HTTP API on a Unix socket: the tables and --json of each command,
# streaming into a pipe, chat turns and Ctrl-C, the socket search order,
# and the message and exit status of every kind of failure.
set -euo pipefail
build=${1:?usage: test-moectl.sh BUILD_DIR}
moectl=$build/cli/moectl
here=$(cd "$(dirname "$0")" && pwd)
test -x "$moectl" || { echo "not ok - no moectl at $moectl"; exit 1; }
command -v python3 >/dev/null || { echo "not ok - python3 is needed for the fake server"; exit 1; }

# A short path: Unix socket paths are limited to 108 bytes.
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moectl-XXXXXX")
server_pid=
chat_pid=
cleanup() {
  if [ -n "$chat_pid" ]; then kill "$chat_pid" 2>/dev/null || true; fi
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
unset MOED_SOCKET MOED_TOKEN
export XDG_RUNTIME_DIR=$tmp/xdg
mkdir -p "$tmp/xdg/moed"
sock=$tmp/xdg/moed/moed.sock
log=$tmp/requests.jsonl

passed=0 failed=0
ok() { echo "ok - $1"; passed=$((passed + 1)); }
bad() { # description, files to show
  echo "not ok - $1"; shift
  for f; do echo "  --- $(basename "$f"):"; sed 's/^/  | /' "$f" 2>/dev/null || true; done
  failed=$((failed + 1))
}
# mctl ARGS...: runs moectl on the fake's socket with stdin from $input
# (default /dev/null); sets rc, leaves stdout in $tmp/out, stderr in $tmp/err.
rc=0
mctl() { rc=0; "$moectl" "$@" <"${input:-/dev/null}" >"$tmp/out" 2>"$tmp/err" || rc=$?; }
expect_rc() { # description, expected status
  if [ "$rc" -eq "$2" ]; then ok "$1 (exit $2)"; else bad "$1: exit $rc, expected $2" "$tmp/out" "$tmp/err"; fi
}
expect_out() { # description, exact expected stdout (no newline added)
  printf '%s' "$2" >"$tmp/want"
  if cmp -s "$tmp/want" "$tmp/out"; then ok "$1"; else bad "$1" "$tmp/want" "$tmp/out" "$tmp/err"; fi
}
expect_has() { # description, file, fixed string
  if grep -qF -- "$3" "$2"; then ok "$1"; else bad "$1: no '$3' in $(basename "$2")" "$2"; fi
}
expect_lacks() { # description, file, fixed string
  if grep -qF -- "$3" "$2"; then bad "$1: unexpected '$3' in $(basename "$2")" "$2"; else ok "$1"; fi
}
expect_eq() { # description, expected, actual
  if [ "$2" == "$3" ]; then ok "$1"; else echo "not ok - $1"; printf '  expected: %s\n  actual:   %s\n' "$2" "$3"; failed=$((failed + 1)); fi
}
# req N EXPR: EXPR (Python; r is the N-th last request the fake recorded)
# printed as compact JSON.
req() {
  python3 - "$log" "$1" "$2" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1], encoding="utf-8")]
rows = [r for r in rows if "method" in r]
r = rows[-int(sys.argv[2])]
print(json.dumps(eval(sys.argv[3]), ensure_ascii=False, separators=(",", ":")))
PY
}
nreq() { python3 -c 'import sys; print(sum(1 for l in open(sys.argv[1]) if "\"method\"" in l))' "$log"; }
json_same() { # file with one JSON line, Python expression it must equal
  python3 - "$1" "$2" <<'PY'
import json, sys
lines = open(sys.argv[1], encoding="utf-8").read().splitlines()
sys.exit(0 if len(lines) == 1 and json.loads(lines[0]) == eval(sys.argv[2]) else 1)
PY
}

# --- commands that need no daemon
mctl --version
expect_rc "--version" 0
expect_has "--version names moectl" "$tmp/out" "moectl "
mctl --help
expect_rc "--help" 0
expect_has "--help shows the usage" "$tmp/out" "Usage: moectl"
mctl hash-token abc
expect_out "hash-token abc" "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
"
printf 'abc\n' >"$tmp/in"
input=$tmp/in mctl hash-token
expect_out "hash-token reads the token from stdin" "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
"
printf '\n' >"$tmp/in"
input=$tmp/in mctl hash-token
expect_rc "hash-token refuses an empty token" 2

# --- bad usage: exit 2, and no request is tried
mctl frobnicate
expect_rc "an unknown command" 2
expect_has "an unknown command is named" "$tmp/err" "unknown command 'frobnicate'"
mctl run tiny
expect_rc "run without a prompt" 2
mctl models extra
expect_rc "models with an argument" 2
mctl --temp abc run tiny hi
expect_rc "--temp abc" 2
expect_has "a bad number names its option" "$tmp/err" "--temperature: bad value 'abc'"
mctl --top-p 0 run tiny hi
expect_rc "--top-p 0" 2
mctl -n 0 run tiny hi
expect_rc "--max-tokens 0" 2
mctl --bogus models
expect_rc "an unknown option" 2
mctl run --raw --system x tiny hi
expect_rc "--system with --raw" 2
mctl
expect_rc "no command" 2
mctl --socket "$tmp/none.sock" run tiny $'bad \xff byte'
expect_rc "a prompt that is not UTF-8 (refused before connecting)" 2
expect_has "a prompt that is not UTF-8 is explained" "$tmp/err" "not valid UTF-8"

# --- moed not running: exit 3 and what to do
mctl --socket "$tmp/none.sock" models
expect_rc "no socket" 3
expect_out "no socket: nothing on stdout" ""
expect_eq "no socket: the message says what to do" \
  "moectl: moed is not running (no socket at $tmp/none.sock): start it with \`systemctl start moed\`, or \`moed --user\`" \
  "$(cat "$tmp/err")"
# A socket file with nobody behind it (a daemon that died).
python3 -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.close()' "$tmp/dead.sock"
mctl --socket "$tmp/dead.sock" status
expect_rc "a dead socket" 3
expect_has "a dead socket: moed is not running" "$tmp/err" "moed is not running (nothing listening at $tmp/dead.sock)"
if [ ! -e /run/moed/moed.sock ]; then
  XDG_RUNTIME_DIR=$tmp/empty mctl models
  expect_rc "no per-user socket: the system socket is tried" 3
  expect_has "the system socket is named" "$tmp/err" "no socket at /run/moed/moed.sock"
else
  ok "the system-socket fallback # SKIP /run/moed/moed.sock exists on this machine"
fi

# --- the fake daemon, on the per-user socket path
python3 "$here/fake-moed.py" "$sock" "$log" 2>"$tmp/server.err" &
server_pid=$!
for _ in $(seq 100); do
  [ -S "$sock" ] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if [ ! -S "$sock" ]; then
  bad "the fake server did not come up within 10 s" "$tmp/server.err"
  exit 1
fi

# The socket search order: --socket, $MOED_SOCKET, $XDG_RUNTIME_DIR/moed/moed.sock.
mctl health
expect_rc "the per-user socket is found through XDG_RUNTIME_DIR" 0
expect_out "health" "ok
"
MOED_SOCKET=$tmp/none.sock mctl health
expect_rc "\$MOED_SOCKET comes before the per-user socket" 3
MOED_SOCKET=$tmp/none.sock mctl --socket "$sock" health
expect_rc "--socket comes before \$MOED_SOCKET" 0
MOED_SOCKET=$sock XDG_RUNTIME_DIR=$tmp/empty mctl health
expect_rc "\$MOED_SOCKET alone" 0
touch "$sock.draining"
mctl health
expect_rc "health while draining" 1
expect_has "health while draining says why" "$tmp/err" "moed is not ready: draining"
mctl --json health
expect_rc "health --json while draining" 1
expect_out "health --json while draining prints the answer" '{"status":"draining"}
'
rm -f "$sock.draining"

# --- models, status, usage, tokenize: tables and --json
mctl models
expect_rc "models" 0
expect_out "models table" "MODEL             CREATED               OWNED BY
tiny              2024-11-05T10:00:00Z  moed
deepseek-v2-lite  2024-11-05T11:00:00Z  moed
"
mctl models --json
expect_rc "models --json" 0
if json_same "$tmp/out" '{"object":"list","data":[{"id":"tiny","object":"model","created":1730800800,"owned_by":"moed"},{"id":"deepseek-v2-lite","object":"model","created":1730804400,"owned_by":"moed"}]}'; then
  ok "models --json is the server's JSON on one line"
else
  bad "models --json is the server's JSON on one line" "$tmp/out"
fi
expect_eq "models asks GET /v1/models" '"GET /v1/models"' "$(req 1 'r["method"] + " " + r["path"]')"

mctl status
expect_rc "status" 0
expect_out "status table" "version:    0.1.0
state:      serving
uptime:     1h 2m 5s
queue:      1 waiting, 2 running, 3 active requests
residency:  strict, ok: loopback only
devices:    cpu (16 threads)

MODEL             NAME                   CONTEXT  WEIGHTS   KV BLOCKS  PATH
tiny              moed tiny demo         4096     12.0 MiB  3/512      /var/lib/moed/models/tiny.gguf
deepseek-v2-lite  DeepSeek-V2-Lite-Chat  32768    10.2 GiB  0/8192     /var/lib/moed/models/v2-lite.gguf
"
mctl -j status
expect_rc "status --json" 0
if python3 -c 'import json,sys; l=open(sys.argv[1]).read().splitlines(); d=json.loads(l[0]); sys.exit(0 if len(l)==1 and d["state"]=="serving" and d["queue"]["waiting"]==1 and d["devices"][0]["threads"]==16 else 1)' "$tmp/out"; then
  ok "status --json carries the server's fields on one line"
else
  bad "status --json carries the server's fields on one line" "$tmp/out"
fi

mctl usage
expect_rc "usage" 0
expect_out "usage table (the caller's tenant)" "tenant: research
TENANT    REQUESTS  REFUSALS  PROMPT TOKENS  COMPLETION TOKENS  ACTIVE  QUEUED
research  12        1         3456           7890               1       0
"
expect_eq "no token: no Authorization header" 'null' "$(req 1 'r["auth"]')"
mctl usage --token admin-token
expect_out "usage with an admin token shows all tenants" "tenant: research
TENANT    REQUESTS  REFUSALS  PROMPT TOKENS  COMPLETION TOKENS  ACTIVE  QUEUED
research  12        1         3456           7890               1       0
default   3         0         40             200                0       0
"
expect_eq "--token is sent as a bearer token" '"Bearer admin-token"' "$(req 1 'r["auth"]')"
MOED_TOKEN=admin-token mctl usage --json
expect_eq "\$MOED_TOKEN is sent as a bearer token" '"Bearer admin-token"' "$(req 1 'r["auth"]')"
if json_same "$tmp/out" '{"tenant":"research","tenants":[{"name":"research","requests":12,"refusals":1,"prompt_tokens":3456,"completion_tokens":7890,"active":1,"queued":0},{"name":"default","requests":3,"refusals":0,"prompt_tokens":40,"completion_tokens":200,"active":0,"queued":0}]}'; then
  ok "usage --json is the server's JSON"
else
  bad "usage --json is the server's JSON" "$tmp/out"
fi

mctl tokenize tiny hi
expect_rc "tokenize" 0
expect_out "tokenize prints the ids and their count" "0 104 105
3 tokens
"
expect_eq "tokenize sends model, prompt and add_special" \
  '{"model":"tiny","prompt":"hi","add_special":true}' "$(req 1 'r["body"]')"
mctl --json tokenize tiny hi
expect_out "tokenize --json" '{"model":"tiny","tokens":[0,104,105],"count":3}
'
printf 'ab' >"$tmp/in"
input=$tmp/in mctl tokenize tiny -
expect_out "tokenize - reads stdin" "0 97 98
3 tokens
"

# --- run: streamed into a pipe, exactly the text
mctl run tiny "hello world"
expect_rc "run" 0
expect_out "run into a pipe gives exactly the streamed text" "Echo «hello world» ✓"
expect_eq "run asks for a stream of a chat" \
  '{"path":"/v1/chat/completions","accept":"text/event-stream","stream":true,"messages":[{"role":"user","content":"hello world"}]}' \
  "$(req 1 '{"path": r["path"], "accept": r["accept"], "stream": r["body"]["stream"], "messages": r["body"]["messages"]}')"
"$moectl" run tiny "through a pipe" </dev/null | cat >"$tmp/out"
expect_out "run | cat" "Echo «through a pipe» ✓"
mctl run tiny "x" --temp 0 -n 16 --seed 7 --top-p 0.5 --system "Be brief."
expect_eq "run sends the sampling options" '[0.0,0.5,16,7]' \
  "$(req 1 '[r["body"]["temperature"], r["body"]["top_p"], r["body"]["max_tokens"], r["body"]["seed"]]')"
expect_eq "run --system sends a system message first" \
  '[{"role":"system","content":"Be brief."},{"role":"user","content":"x"}]' "$(req 1 'r["body"]["messages"]')"
printf 'from stdin\nline two' >"$tmp/in"
input=$tmp/in mctl run tiny -
expect_out "run MODEL - reads the prompt from stdin" "Echo «from stdin
line two» ✓"
mctl run --raw tiny "once upon"
expect_rc "run --raw" 0
expect_out "run --raw streams a completion (CRLF events)" "<<once upon>>"
expect_eq "run --raw uses /v1/completions with a prompt" '["/v1/completions","once upon"]' \
  "$(req 1 '[r["path"], r["body"]["prompt"]]')"
mctl run --json tiny "hi"
expect_rc "run --json" 0
if python3 -c 'import json,sys; l=open(sys.argv[1]).read().splitlines(); d=json.loads(l[0]); sys.exit(0 if len(l)==1 and d["choices"][0]["message"]["content"]=="Echo «hi» ✓" else 1)' "$tmp/out"; then
  ok "run --json prints the whole answer as one JSON line"
else
  bad "run --json prints the whole answer as one JSON line" "$tmp/out"
fi
expect_eq "run --json asks for no stream" 'false' "$(req 1 'r["body"]["stream"]')"

# --- refusals and failures
mctl run busy "hi"
expect_rc "429" 1
expect_eq "429 shows the message and Retry-After" \
  "moectl: tenant research: 2 requests in flight, limit 2 (retry after 7 s)" "$(cat "$tmp/err")"
mctl run forbidden "hi"
expect_rc "403" 1
expect_has "403 shows the server's message" "$tmp/err" "moectl: access denied: no tenant for uid $(id -u)"
expect_has "403 explains the missing tenant" "$tmp/err" "moed has no tenant for your user"
mctl run missing "hi"
expect_rc "404 unknown model" 1
expect_eq "an unknown model points at moectl models" \
  "moectl: model 'missing' does not exist (see \`moectl models\`)" "$(cat "$tmp/err")"
mctl run broken "hi"
expect_rc "an error event mid-stream" 1
expect_out "an error event mid-stream: the text before it was shown" "partial"
expect_eq "an error event mid-stream: its message" "moectl: engine failed: out of KV blocks" "$(cat "$tmp/err")"
mctl run cut "hi"
expect_rc "a stream that stops early" 1
expect_has "a stream that stops early is reported" "$tmp/err" "before the answer was complete"
mctl run drain "hi"
expect_rc "finish_reason cancelled" 1
expect_has "finish_reason cancelled is reported" "$tmp/err" "moed cancelled the answer"

# --- chat from a pipe: turns carry the conversation
printf 'hello\n\nhow are you\n' >"$tmp/in"
input=$tmp/in mctl chat tiny
expect_rc "chat from a pipe" 0
expect_out "chat prints one answer per turn, no prompt when stdin is no tty" "Echo «hello» ✓
Echo «how are you» ✓
"
expect_eq "the second turn sends the first answer back" \
  '[{"role":"user","content":"hello"},{"role":"assistant","content":"Echo «hello» ✓"},{"role":"user","content":"how are you"}]' \
  "$(req 1 'r["body"]["messages"]')"
expect_eq "chat streams" 'true' "$(req 1 'r["body"]["stream"]')"
printf 'a\n/reset\nb\n/exit\nnot sent\n' >"$tmp/in"
input=$tmp/in mctl chat --system "Be brief."
expect_rc "chat with /reset and /exit" 0
expect_eq "chat without MODEL takes the first served model" '"tiny"' "$(req 1 'r["body"]["model"]')"
expect_eq "/reset keeps only the system message" \
  '[{"role":"system","content":"Be brief."},{"role":"user","content":"b"}]' "$(req 1 'r["body"]["messages"]')"
expect_lacks "/exit ends the chat" "$tmp/out" "not sent"
printf '//slash\n/nope\n' >"$tmp/in"
input=$tmp/in mctl chat tiny
expect_eq "// sends a line that starts with /" '"/slash"' "$(req 1 'r["body"]["messages"][-1]["content"]')"
expect_has "an unknown /command is explained" "$tmp/err" "unknown command /nope"
n0=$(nreq)
printf 'one\ntwo\n' >"$tmp/in"
input=$tmp/in mctl chat forbidden
expect_rc "chat refused with 403" 1
expect_eq "a 403 ends the chat (one request, not one per line)" $((n0 + 1)) "$(nreq)"
printf 'one\nhello\n' >"$tmp/in"
input=$tmp/in mctl chat busy
expect_rc "chat with refused turns ends with status 1" 1
mctl --json chat tiny
expect_rc "chat --json" 2

# --- Ctrl-C while an answer streams cancels that answer, not the chat
printf 'slow\nhello\n' >"$tmp/in"
"$moectl" chat tiny <"$tmp/in" >"$tmp/chat.out" 2>"$tmp/chat.err" &
chat_pid=$!
for _ in $(seq 100); do
  grep -q tick "$tmp/chat.out" 2>/dev/null && break
  sleep 0.1
done
expect_has "the slow answer started" "$tmp/chat.out" "tick"
t0=$(date +%s%N)
kill -INT "$chat_pid"
for _ in $(seq 100); do
  kill -0 "$chat_pid" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$chat_pid" 2>/dev/null; then
  bad "moectl went on after Ctrl-C for 10 s" "$tmp/chat.out" "$tmp/chat.err"
  kill "$chat_pid"
fi
rc=0
wait "$chat_pid" || rc=$?
chat_pid=
t1=$(date +%s%N)
echo "# Ctrl-C to exit (cancel + one more turn): $(((t1 - t0) / 1000000)) ms"
expect_rc "after Ctrl-C, EOF ends the chat" 0
expect_lacks "Ctrl-C cut the answer short" "$tmp/chat.out" "END"
expect_has "Ctrl-C says the answer was cancelled" "$tmp/chat.err" "moectl: answer cancelled"
expect_has "the chat went on after Ctrl-C" "$tmp/chat.out" "Echo «hello» ✓"
expect_eq "the cancelled turn is not part of the conversation" \
  '[{"role":"user","content":"hello"}]' "$(req 1 'r["body"]["messages"]')"
for _ in $(seq 50); do
  grep -q '"disconnected"' "$log" && break
  sleep 0.1
done
expect_has "the cancelled stream's connection was closed" "$log" '"event": "disconnected"'

# --- chat on a terminal: the prompt, Ctrl-D, and Ctrl-C at the prompt
python3 - "$moectl" >"$tmp/pty.out" 2>&1 <<'PY' && ok "chat on a terminal: prompt, answer, Ctrl-D and Ctrl-C at the prompt exit 0" || bad "chat on a terminal" "$tmp/pty.out"
import os, pty, select, signal, sys, time

def session(keys):
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.argv[1], [sys.argv[1], "chat", "tiny"])
    out = b""
    def read_until(token, start, limit=10):
        """Reads until token appears after offset start, or the child closes."""
        nonlocal out
        end = time.time() + limit
        while token not in out[start:] and time.time() < end:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    break
                if not data:
                    break
                out += data
        return token in out[start:]
    try:
        assert read_until(b"> ", 0), out
        mark = len(out)
        os.write(fd, "hello\n".encode())
        assert read_until("Echo «hello» ✓".encode(), mark), out
        mark = out.index("Echo «hello» ✓".encode())
        assert read_until(b"> ", mark), out
        os.write(fd, keys)
        read_until(b"\0", len(out))            # until moectl closes the terminal
        for _ in range(100):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.1)
        assert done, ("moectl did not exit", out)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, out)
        print(out.decode(errors="replace"))
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

session(b"\x04")   # Ctrl-D
session(b"\x03")   # Ctrl-C
PY

echo "$passed passed, $failed failed"
test "$failed" -eq 0
