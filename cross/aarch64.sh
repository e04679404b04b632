#!/usr/bin/env bash
# Builds scout for aarch64 edge boxes and runs tests under qemu-aarch64 (which exercises
# tract's NEON kernels). Debian/Ubuntu host:
#
#   cross/aarch64.sh                 # release binary -> target/aarch64-unknown-linux-gnu/release/scout
#   cross/aarch64.sh test [FILTER]   # + the backbone parity tests (or: test ingest, test --lib ...)
#   cross/aarch64.sh check           # CI: compiles and links everything for aarch64, unoptimised
#
# People who use `cross` instead: CROSS_CONFIG=cross/Cross.toml cross build --release \
#   --target aarch64-unknown-linux-gnu
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu

missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
if [ "${1:-build}" = test ]; then
  command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
fi
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  # CI's test command has just updated the package lists: once is enough.
  if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -60 2>/dev/null | head -n 1)" ]; then
    $sudo apt-get update -qq
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
rustup target list --installed | grep -qx "$TARGET" || rustup target add "$TARGET"

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc

if [ "${1:-build}" = test ]; then
  shift
  args=("$@")
  [ ${#args[@]} -gt 0 ] || args=(--test backbone)
  cargo test --target "$TARGET" "${args[@]}"
else
  profile=release
  [ "${1:-build}" = check ] && profile=cross-check
  cargo build --profile "$profile" --target "$TARGET"
  file "target/$TARGET/$profile/scout" 2>/dev/null || ls -la "target/$TARGET/$profile/scout"
fi
