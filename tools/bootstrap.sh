#!/usr/bin/env bash
# From a fresh clone to a serving moed: installs what is missing, builds,
# and starts moed in per-user mode in the foreground on the built-in demo
# model (or on $MODEL). Talk to it from another terminal with
# build/release/cli/moectl, curl --unix-socket, or busctl --user.
set -euo pipefail
cd "$(dirname "$0")/.."

./tools/install-deps.sh
if [ -f build/release/build.ninja ]; then
  meson setup --reconfigure build/release >/dev/null
else
  meson setup build/release --buildtype=release >/dev/null
fi
ninja -C build/release

model_id=demo
[ -z "${MODEL:-}" ] || model_id=$(basename "${MODEL%.gguf}")
cat <<MSG
bootstrap: starting moed --user${MODEL:+ --model $MODEL}; Ctrl-C stops it. From another terminal:
  build/release/cli/moectl run $model_id "The future of local AI is"
  build/release/cli/moectl chat
  build/release/cli/moectl status
MSG
exec build/release/daemon/moed --user ${MODEL:+--model "$MODEL"}
