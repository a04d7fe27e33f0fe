#!/usr/bin/env bash
# The README's test command: every test of the workspace (unit, property,
# multi-process fleet tests against the fake NVML library), then the
# clean-host package tests in containers.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== the packaged ringfence links neither the agent nor NVML nor the test fleet"
tree=$(cargo tree --locked -p ringfence-coordinator -e normal --prefix none)
if printf '%s\n' "$tree" | grep -E '^(ringfenced|nvml-wrapper|nvml-wrapper-sys|sysinfo|sd-notify|ringfence-devfleet|ringfence-testkit) '; then
  echo "test.sh: ringfence-coordinator's normal dependencies include the crates above" >&2
  exit 1
fi
echo "== the packaged ringfenced links neither the test fleet nor the test fixtures"
tree=$(cargo tree --locked -p ringfenced -e normal --prefix none)
if printf '%s\n' "$tree" | grep -E '^(ringfence-devfleet|ringfence-testkit) '; then
  echo "test.sh: ringfenced's normal dependencies include the crates above" >&2
  exit 1
fi

echo "== cargo build (binaries and the fake NVML library used by the tests)"
cargo build --workspace --bins --lib

echo "== cargo nextest run --workspace (groups and timeouts: .config/nextest.toml)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  # Each crate's integration tests share one binary (tests/it/), and some
  # need a process of their own (a SIGHUP to the test process, a global log
  # subscriber): nextest gives every test one; cargo test, one at a time.
  cargo test --workspace --no-fail-fast -- --test-threads=1
fi

if [ -x integration/container/run.sh ]; then
  echo "== container install/upgrade/remove/purge tests"
  integration/container/run.sh
fi
