#!/usr/bin/env bash
# Builds the two packages, .deb and .rpm each, into dist/ (or $DIST_DIR):
#   ringfenced  the agent for GPU hosts (binary, systemd unit, agent.toml)
#   ringfence   the operator CLI for operator machines (binary, examples)
# each with its man pages and bash/zsh/fish completions, written by
# integration/docgen (ringfence-docgen, not packaged) into
# target/release/docgen/.
#
#   packaging/build.sh                                  # version from Cargo.toml
#   RINGFENCE_VERSION=0.2.1~rc1 DIST_DIR=/tmp/rc packaging/build.sh
#
# RINGFENCE_VERSION overrides the package version. SKIP_CARGO_BUILD=1 reuses
# the release binaries already in target/release (ringfenced, ringfence and
# ringfence-docgen).
set -euo pipefail
cd "$(dirname "$0")/.."

dist="${DIST_DIR:-dist}"
mkdir -p "$dist"

for tool in cargo-deb cargo-generate-rpm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build.sh: $tool is not installed; run: cargo install --locked $tool --version $(awk -v t="$tool" '$1 == t {print $2}' packaging/tools.txt)" >&2
        exit 1
    fi
done

if [ "${SKIP_CARGO_BUILD:-0}" != 1 ]; then
    cargo build --release --locked -p ringfenced -p ringfence-coordinator
    # Separately, so that docgen's dependencies never change how the
    # packaged binaries are built (feature unification).
    cargo build --release --locked -p ringfence-docgen
fi
for bin in ringfenced ringfence ringfence-docgen; do
    if [ ! -x "target/release/$bin" ]; then
        echo "build.sh: target/release/$bin is missing" >&2
        exit 1
    fi
done

# Man pages and completions; the package metadata (agent/Cargo.toml,
# coordinator/Cargo.toml) takes them from here (under target/release/, the
# prefix cargo-deb and cargo-generate-rpm resolve to the Cargo target dir).
rm -rf target/release/docgen
target/release/ringfence-docgen target/release/docgen >/dev/null
# Compressed as Debian policy asks (cargo-deb treats files under
# target/release/ as build products and leaves them as they are).
gzip -9n target/release/docgen/*/man/*.1

deb_args=()
rpm_args=()
if [ -n "${RINGFENCE_VERSION:-}" ]; then
    deb_args+=(--deb-version "$RINGFENCE_VERSION")
    rpm_args+=(--set-metadata "version = \"${RINGFENCE_VERSION}\"")
fi

cargo deb -p ringfenced --no-build -o "$dist/" "${deb_args[@]}"
cargo deb -p ringfence-coordinator --no-build -o "$dist/" "${deb_args[@]}"
cargo generate-rpm -p agent -o "$dist/" "${rpm_args[@]}"
cargo generate-rpm -p coordinator -o "$dist/" "${rpm_args[@]}"

ls -l "$dist"
