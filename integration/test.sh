#!/usr/bin/env bash
# The README's test command: every test of the workspace (unit, property,
# multi-process fleet tests against the fake NVML library), then the
# clean-host package tests in containers.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== the packaged ringfence links neither the agent nor NVML nor the test fleet"
tree=$(cargo tree --locked -p ringfence-coordinator -e normal --prefix none)
if printf '%s\n' "$tree" | grep -E '^(ringfenced|nvml-wrapper|nvml-wrapper-sys|sysinfo|sd-notify|ringfence-devfleet) '; then
  echo "test.sh: ringfence-coordinator's normal dependencies include the crates above" >&2
  exit 1
fi

echo "== cargo build (binaries and the fake NVML library used by the tests)"
cargo build --workspace --bins --lib

echo "== cargo nextest run --workspace"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

if [ -x integration/container/run.sh ]; then
  echo "== container install/upgrade/remove/purge tests"
  integration/container/run.sh
fi
