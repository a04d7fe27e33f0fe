#!/usr/bin/env bash
# Checks systemd/ringfenced.service and prints its systemd-analyze exposure
# score (packaging/README.md states the current number and why it is not lower).
#
#   packaging/security-score.sh            # verify + score; exit 1 on a verify error
#   packaging/security-score.sh --details  # also the per-directive table
set -euo pipefail
cd "$(dirname "$0")/.."

unit=systemd/ringfenced.service
# The highest score the unit may reach before this script fails: a change
# that weakens the hardening must be deliberate.
max_score="${RINGFENCE_MAX_EXPOSURE:-4.4}"

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "security-score.sh: systemd-analyze is not installed (apt-get install systemd)" >&2
    exit 1
fi

# Verify against a throw-away root laid out like an installed host (this
# host's systemd units, /bin/kill, an executable at ExecStart's path), so the
# result does not depend on whether ringfenced is installed here.
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/usr/lib/systemd" "$root/lib/systemd/system" "$root/etc/systemd/system"
ln -s usr/bin "$root/bin"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp /bin/kill "$root/usr/bin/kill"
cp "$unit" "$root/lib/systemd/system/ringfenced.service"
printf '#!/bin/sh\n' > "$root/usr/bin/ringfenced"
chmod 755 "$root/usr/bin/ringfenced"
if ! out=$(systemd-analyze verify --root="$root" ringfenced.service 2>&1) || [ -n "$out" ]; then
    echo "systemd-analyze verify $unit:" >&2
    echo "$out" >&2
    exit 1
fi
echo "systemd-analyze verify: clean"

table=$(systemd-analyze security --offline=yes --root="$root" ringfenced.service 2>&1)
if [ "${1:-}" = --details ]; then
    echo "$table"
fi
score=$(sed -n 's/.*Overall exposure level for ringfenced.service: \([0-9.]*\).*/\1/p' <<<"$table")
if [ -z "$score" ]; then
    echo "security-score.sh: no exposure score in systemd-analyze output:" >&2
    echo "$table" >&2
    exit 1
fi
echo "exposure score: $score (systemd-analyze security ringfenced.service)"
if awk -v s="$score" -v m="$max_score" 'BEGIN { exit !(s > m) }'; then
    echo "security-score.sh: exposure $score is above the accepted $max_score" >&2
    exit 1
fi
