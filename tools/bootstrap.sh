#!/usr/bin/env bash
# From a fresh clone to generated text: installs what is missing, builds,
# writes the built-in demo model and generates from it (or from $MODEL).
set -euo pipefail
cd "$(dirname "$0")/.."

./tools/install-deps.sh
if [ -f build/release/build.ninja ]; then
  meson setup --reconfigure build/release >/dev/null
else
  meson setup build/release --buildtype=release >/dev/null
fi
ninja -C build/release

model=${MODEL:-build/demo.gguf}
if [ -z "${MODEL:-}" ] && [ ! -f "$model" ]; then
  echo "bootstrap: writing the demo model (random weights, DeepSeek-V3 vocabulary) to $model"
  build/release/tools/moed-fixture --shape tiny --type Q8_0 -o "$model"
fi
exec build/release/tools/moed-run --model "$model" --prompt "${PROMPT:-The future of local AI is}" \
  -n "${N:-48}" --temp 0.8 --seed 1 -v
