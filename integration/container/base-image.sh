#!/usr/bin/env bash
# Builds the clean-host base image (Debian bookworm, minbase + systemd) with
# debootstrap from this machine's configured apt mirror and `docker import`s
# it. No image registry is used. Cached by tag: an existing tag is reused.
#
#   integration/container/base-image.sh        # prints the image tag
set -euo pipefail

# Bump the tag when the package list changes.
tag="ringfence-test/bookworm-base:2"
# man-db and groff-base: `man ringfence-wave-run` in the package test; rpm:
# installs the .rpm packages (upgrade from the single package) in the image.
packages="systemd,systemd-sysv,init-system-helpers,procps,iproute2,man-db,groff-base,rpm"

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "$tag"
    exit 0
fi

# The first Debian mirror configured for apt (deb822 or one-line format).
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    mirror=$(awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}' "$f")
    [ -n "$mirror" ] && break
done
if [ -z "$mirror" ]; then
    mirror=$(grep -hsE '^deb +(\[[^]]*\] +)?https?://' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' | grep -m1 'debian/\?$' || true)
fi
if [ -z "$mirror" ]; then
    echo "base-image.sh: no Debian mirror found in /etc/apt/sources.list*" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "base-image.sh: debootstrap is not installed (apt-get install debootstrap)" >&2
    exit 1
fi

root=$(mktemp -d /var/tmp/ringfence-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base-image.sh: debootstrap bookworm from $mirror into $root" >&2
debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >&2
# Keep the image small and free of host state.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
: > "$root/etc/machine-id"
tar -C "$root" --numeric-owner -c . | docker import --change 'CMD ["/bin/bash"]' - "$tag" >&2
echo "$tag"
