#!/usr/bin/env bash
# Builds the ringfenced .deb and .rpm into dist/ (or $DIST_DIR).
#
#   packaging/build.sh                                  # version from Cargo.toml
#   RINGFENCE_VERSION=0.1.0~rc1 DIST_DIR=/tmp/old packaging/build.sh
#
# RINGFENCE_VERSION overrides the package version (the container upgrade test
# builds a "previous" package this way). SKIP_CARGO_BUILD=1 reuses the release
# binaries already in target/release.
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
    # Both binaries: the package ships the agent and the operator CLI.
    cargo build --release --locked -p ringfenced -p ringfence-coordinator
fi
for bin in ringfenced ringfence; do
    if [ ! -x "target/release/$bin" ]; then
        echo "build.sh: target/release/$bin is missing" >&2
        exit 1
    fi
done

deb_args=()
rpm_args=()
if [ -n "${RINGFENCE_VERSION:-}" ]; then
    deb_args+=(--deb-version "$RINGFENCE_VERSION")
    rpm_args+=(--set-metadata "version = \"${RINGFENCE_VERSION}\"")
fi

cargo deb -p ringfenced --no-build -o "$dist/" "${deb_args[@]}"
cargo generate-rpm -p agent -o "$dist/" "${rpm_args[@]}"

ls -l "$dist"
