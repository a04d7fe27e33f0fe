#!/usr/bin/env bash
# Clean-host package tests in containers.
#
#   integration/container/run.sh
#
# 1. Builds the current packages, ringfenced (agent) and ringfence (operator
#    CLI), .deb and .rpm, and the previous single `ringfenced` package of
#    0.1.0 (which also carried /usr/bin/ringfence) from the frozen "single"
#    variant in agent/Cargo.toml with the same release binaries (no git
#    history needed); checks the Breaks/Replaces/Conflicts bound covers it;
#    lintian on both current .debs, systemd-analyze verify and exposure
#    score.
# 2. In a fresh Debian bookworm container (base image from base-image.sh):
#    install the previous single .deb, check files, owners, modes, conffile
#    and enablement; edit the config and put an agent key and journal in
#    place; upgrade to both current .debs in one dpkg run (config, key and
#    journal kept; /usr/bin/ringfence now from ringfence; man pages,
#    completions and the Slurm hooks in place, the hooks failing with their
#    own message where there is no Slurm); remove (state kept); purge
#    (state gone).
#    A workstation: only the ringfence .deb (no agent, no unit, no config;
#    `man ringfence-wave-run` renders; completions in place).
# 3. Under real systemd as PID 1 (see packaging/README.md): install, check
#    the unit is enabled and skipped (not failed) until the operator
#    installs a certificate. Then the real ringfenced from the package, run
#    by the packaged unit on the fake NVML library (2 GPUs): READY and
#    STATUS from the agent, host.key 0600; from this host over mTLS with
#    the `ringfence` CLI: enroll, attested HEALTHY 2/2; a client of another
#    CA refused; a revoked client refused after `systemctl reload` (new
#    CRL); watchdog restart after SIGSTOP; upgrade with the agent running
#    (restarted on the new binary, config and key kept); a self-upgrade
#    wave whose patch profile runs dpkg inside the unit (the agent exits
#    75, systemd restarts it once, the task finishes); remove.
# 4. .rpm: contents, modes, %config(noreplace) and scriptlets via rpm -qp;
#    in a container: install the previous single .rpm, upgrade to both
#    current .rpms in one transaction (config, key, journal kept); the CLI
#    alone over the single package is refused.
#
# Without a Docker engine this prints SKIP and exits 0, unless CI=true.
# Exits non-zero on the first failed check.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=integration/container

if ! docker info >/dev/null 2>&1; then
    if [ "${CI:-}" = true ]; then
        echo "FAIL: container package tests: no Docker engine reachable (docker info failed) and CI=true" >&2
        exit 1
    fi
    echo "SKIP: container package tests: no Docker engine reachable (docker info failed); set up Docker to run them"
    exit 0
fi

start=$(date +%s)
containers=()
work=$(mktemp -d /var/tmp/ringfence-ct.XXXXXX)
cleanup() {
    for c in "${containers[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
    rm -rf "$work"
}
trap cleanup EXIT

fail() {
    echo "FAIL: $*" >&2
    exit 1
}
pass() { echo "ok: $*"; }

# The last release of the single `ringfenced` package (agent and operator
# CLI in one package); 0.2.0 split it in two.
prev_version="0.1.0"
# [workspace.package] version, the first version line of the root manifest.
cur_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
[ -n "$cur_version" ] || fail "no version in Cargo.toml"

echo "== packages: $prev_version (previous, single package) and $cur_version (current)"
# The fake NVML library the agent loads in the container (debug build).
cargo build --locked -q -p fake-nvml
DIST_DIR="$work/cur" packaging/build.sh >/dev/null
# The previous package: the "single" variant of agent/Cargo.toml's package
# metadata (0.1.0's layout, frozen there for this test), today's release
# binaries (only the packaging and the version differ).
mkdir -p "$work/prev"
cargo deb -p ringfenced --no-build --variant single --deb-version "$prev_version" -o "$work/prev/" >/dev/null \
    || fail "cargo deb --variant single (the previous single .deb)"
cargo generate-rpm -p agent --variant single -s "version = \"$prev_version\"" -o "$work/prev/" >/dev/null \
    || fail "cargo generate-rpm --variant single (the previous single .rpm)"
cur_deb=$(ls "$work"/cur/ringfenced_*.deb)
cli_deb=$(ls "$work"/cur/ringfence_*.deb)
prev_deb=$(ls "$work"/prev/ringfenced_*.deb)
cur_rpm=$(ls "$work"/cur/ringfenced-[0-9]*.rpm)
cli_rpm=$(ls "$work"/cur/ringfence-[0-9]*.rpm)
prev_rpm=$(ls "$work"/prev/ringfenced-[0-9]*.rpm)
[ "$(ls "$work"/prev/*.deb | wc -l)" = 1 ] || fail "the previous packaging should build one .deb: $(ls "$work"/prev)"
chmod -R a+rX "$work"
# The pages and completions docgen wrote for the packages (build.sh).
man_pages() { (cd "target/release/docgen/$1/man" && ls -- *.1.gz) | sort; }
# Debian versions as built (cargo-deb may append a revision).
cur_deb_version=$(dpkg-deb -f "$cur_deb" Version)
prev_deb_version=$(dpkg-deb -f "$prev_deb" Version)
dpkg --compare-versions "$prev_deb_version" lt "$cur_deb_version" \
    || fail "previous .deb version $prev_deb_version is not older than $cur_deb_version"
# ringfence's Breaks/Replaces bound: every single package (up to
# $prev_version) below it, no pre-release of the current version
# (${cur_version}~rc1) at or above it.
for field in Breaks Replaces; do
    got=$(dpkg-deb -f "$cli_deb" "$field")
    bound=$(sed -n 's/^ringfenced (<< \(.*\))$/\1/p' <<<"$got")
    [ -n "$bound" ] || fail "ringfence .deb $field: expected 'ringfenced (<< VERSION)', got '$got'"
    dpkg --compare-versions "$prev_deb_version" lt "$bound" \
        || fail "ringfence $field ringfenced << $bound does not cover the single package $prev_deb_version"
    dpkg --compare-versions "${cur_version}~rc1-1" ge "$bound" \
        || fail "ringfence $field ringfenced << $bound would also hit ringfenced ${cur_version}~rc1"
done
pass "previous single package $prev_deb_version (variant single), current $cur_deb_version; ringfence Breaks/Replaces ringfenced << $bound"

echo "== lintian and unit checks"
command -v lintian >/dev/null 2>&1 || fail "lintian is not installed (apt-get install lintian)"
for deb in "$cur_deb" "$cli_deb"; do
    if ! out=$(lintian --fail-on error,warning "$deb" 2>&1); then
        echo "$out" >&2
        fail "lintian reports errors or warnings on $deb"
    fi
done
pass "lintian: no errors or warnings on either package (overrides in packaging/lintian/)"
packaging/security-score.sh || fail "packaging/security-score.sh"

echo "== base image"
image=$("$here/base-image.sh")
echo "image: $image"

# ---------------------------------------------------------------- helpers
ct=""
# Reads all of its input (grep -q would stop early and, under pipefail, the
# writer's SIGPIPE would fail the pipe although the line was there).
has() { grep -c -- "$1" >/dev/null; }
in_ct() { docker exec "$ct" "$@"; }
new_container() { # name, extra docker run args...
    local name="$1"
    shift
    docker rm -f "$name" >/dev/null 2>&1 || true
    docker run -d --name "$name" -v "$work:/pkgs:ro" "$@" >/dev/null
    containers+=("$name")
    ct="$name"
}
# expect_stat PATH "MODE USER:GROUP TYPE"
expect_stat() {
    local got
    got=$(in_ct stat -c '%a %U:%G %F' "$1" 2>/dev/null) || fail "$1 is missing"
    [ "$got" = "$2" ] || fail "$1: expected '$2', got '$got'"
}
expect_absent() {
    if in_ct test -e "$1" || in_ct test -L "$1"; then fail "$1 still exists ($2)"; fi
}
# shellcheck disable=SC2016 # dpkg-query format fields, not shell expansions
pkg_status() { in_ct dpkg-query -W -f='${db:Status-Abbrev}${Version}' "${1:-ringfenced}" 2>/dev/null || true; }
owner() { in_ct dpkg -S "$1" 2>/dev/null | cut -d: -f1; }
sha() { in_ct sha256sum "$1" | cut -d' ' -f1; }

wants=/etc/systemd/system/multi-user.target.wants/ringfenced.service

# The agent package; "single": the previous package, which also carried
# the operator CLI and no man pages.
check_installed_files() { # version [single]
    local st bin
    st=$(pkg_status)
    [ "$st" = "ii $1" ] || fail "dpkg status: expected 'ii $1', got '$st'"
    expect_stat /usr/bin/ringfenced "755 root:root regular file"
    if [ "${2:-}" = single ]; then
        expect_stat /usr/bin/ringfence "755 root:root regular file"
        [ "$(owner /usr/bin/ringfence)" = ringfenced ] || fail "the single package does not own /usr/bin/ringfence"
        expect_absent /usr/lib/ringfence "the single package of $prev_version had no hooks"
        expect_absent /usr/share/man/man1/ringfenced.1.gz "the single package of $prev_version had no man pages"
    else
        [ "$(owner /usr/bin/ringfence)" != ringfenced ] || fail "ringfenced $1 still ships /usr/bin/ringfence"
        check_docs ringfenced
        check_hooks
        for hook in $slurm_hooks slurm-common.sh; do
            [ "$(owner "$hooks_dir/$hook")" = ringfenced ] || fail "$hooks_dir/$hook is not owned by ringfenced"
        done
    fi
    expect_stat /lib/systemd/system/ringfenced.service "644 root:root regular file"
    expect_stat /etc/ringfence "755 root:root directory"
    expect_stat /etc/ringfence/agent.toml "644 root:root regular file"
    expect_stat /etc/ringfence/tls "755 root:root directory"
    expect_stat /var/lib/ringfence "700 root:root directory"
    expect_stat /usr/share/doc/ringfenced/README.md "644 root:root regular file"
    expect_stat /usr/share/doc/ringfenced/copyright "644 root:root regular file"
    expect_stat /usr/share/doc/ringfenced/changelog.Debian.gz "644 root:root regular file"
    # shellcheck disable=SC2016 # dpkg-query format field
    in_ct dpkg-query -W -f='${Conffiles}\n' ringfenced | grep -q '^ /etc/ringfence/agent.toml ' \
        || fail "/etc/ringfence/agent.toml is not a conffile"
    [ "$(in_ct readlink "$wants")" = /lib/systemd/system/ringfenced.service ] \
        || fail "unit not enabled: $wants does not point at the unit"
    for bin in ringfenced ${2:+ringfence}; do
        if in_ct ldd "/usr/bin/$bin" | grep -q 'not found'; then
            fail "/usr/bin/$bin needs a library the clean host lacks: $(in_ct ldd "/usr/bin/$bin")"
        fi
    done
    in_ct systemd-analyze verify /lib/systemd/system/ringfenced.service \
        || fail "systemd-analyze verify of the installed unit"
    pass "installed ringfenced $1${2:+ ($2)}: files, owners, modes, conffile, unit enabled, unit verifies"
}

# The Slurm hooks (packaging/hooks/): executables, and the file they source.
hooks_dir=/usr/lib/ringfence/hooks
slurm_hooks="slurm-drain slurm-wait-drained slurm-resume slurm-health-check"
# expect_hook_error EXIT-STATUS MESSAGE-PREFIX HOOK ARGS...: run with the
# clean environment the agent gives hooks, in an image without Slurm.
expect_hook_error() {
    local want_rc="$1" prefix="$2" hook="$3" out rc=0
    shift 3
    out=$(in_ct env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$hooks_dir/$hook" "$@" 2>&1) || rc=$?
    [ "$rc" = "$want_rc" ] || fail "$hook $*: expected exit $want_rc, got $rc: $out"
    [ "$(printf '%s\n' "$out" | wc -l)" = 1 ] || fail "$hook $*: expected one line of error, got: $out"
    case "$out" in "$prefix"*) ;; *) fail "$hook $*: expected '$prefix...', got: $out" ;; esac
}
check_hooks() {
    local hook
    for hook in $slurm_hooks; do
        expect_stat "$hooks_dir/$hook" "755 root:root regular file"
    done
    # Sourced by the hooks from their own directory, not run.
    expect_stat "$hooks_dir/slurm-common.sh" "644 root:root regular file"
    # No Slurm here: each hook stops with its own message (and found
    # slurm-common.sh next to it), not with a shell error.
    expect_hook_error 3 "slurm-wait-drained: unknown option --help (options: --node NAME, --conf PATH, --)" \
        slurm-wait-drained --help
    expect_hook_error 3 "slurm-wait-drained: cannot read node ct-node from slurmctld: " \
        slurm-wait-drained --node ct-node
    expect_hook_error 1 "slurm-drain: cannot read node ct-node from slurmctld: " \
        slurm-drain --node ct-node -- test
    expect_hook_error 1 "slurm-resume: cannot read node ct-node from slurmctld: " \
        slurm-resume --node ct-node
}

# `man PAGE` as plain text, runs of spaces (justification) squeezed.
man_page() { in_ct env MANWIDTH=200 man -P cat "$1" 2>/dev/null | tr -s ' '; }
# Man pages (one per command and subcommand, as docgen wrote them) and
# bash/zsh/fish completions of BIN, owned by package BIN.
check_docs() { # bin
    local bin="$1" page n=0
    for page in $(man_pages "$bin"); do
        expect_stat "/usr/share/man/man1/$page" "644 root:root regular file"
        [ "$(owner "/usr/share/man/man1/$page")" = "$bin" ] || fail "$page is not owned by $bin"
        n=$((n + 1))
    done
    [ "$n" -gt 1 ] || fail "$bin: no subcommand man pages"
    expect_stat "/usr/share/bash-completion/completions/$bin" "644 root:root regular file"
    expect_stat "/usr/share/zsh/vendor-completions/_$bin" "644 root:root regular file"
    expect_stat "/usr/share/fish/vendor_completions.d/$bin.fish" "644 root:root regular file"
    man_page "$bin" | has "$bin" || fail "man $bin does not render"
}

# The operator CLI package.
check_cli_files() { # version
    local st
    st=$(pkg_status ringfence)
    [ "$st" = "ii $1" ] || fail "dpkg status of ringfence: expected 'ii $1', got '$st'"
    expect_stat /usr/bin/ringfence "755 root:root regular file"
    [ "$(owner /usr/bin/ringfence)" = ringfence ] || fail "/usr/bin/ringfence is not owned by ringfence"
    for f in copyright changelog.Debian.gz README.md examples/inventory.toml examples/wave.toml examples/ringfence.toml; do
        expect_stat "/usr/share/doc/ringfence/$f" "644 root:root regular file"
    done
    if in_ct ldd /usr/bin/ringfence | grep -q 'not found'; then
        fail "/usr/bin/ringfence needs a library the clean host lacks: $(in_ct ldd /usr/bin/ringfence)"
    fi
    in_ct ringfence --version | has "$cur_version" || fail "ringfence --version"
    check_docs ringfence
    man_page ringfence-wave-run | has "ringfence wave run" \
        || fail "man ringfence-wave-run does not show 'ringfence wave run'"
    in_ct grep -q -- 'wave' /usr/share/bash-completion/completions/ringfence || fail "bash completion lacks 'wave'"
    pass "installed ringfence $1: /usr/bin/ringfence, examples, man pages (man ringfence-wave-run), completions"
}

# ------------------------------------------- install / upgrade / remove / purge
echo "== deb lifecycle in a fresh container (no init)"
new_container ringfence-pkg-lifecycle "$image" sleep infinity
in_ct dpkg -i "/pkgs/prev/$(basename "$prev_deb")" >/dev/null || fail "dpkg -i of the previous .deb"
check_installed_files "$prev_deb_version" single

# The operator edits the config; the agent has created its key.
in_ct sed -i 's/^host_id = "gpu-0001"/host_id = "ct-host-1"/' /etc/ringfence/agent.toml
in_ct grep -q '^host_id = "ct-host-1"' /etc/ringfence/agent.toml || fail "could not edit agent.toml"
# A stand-in for the key the agent creates at first start (same path and mode).
in_ct sh -c 'umask 077; head -c 32 /dev/urandom > /var/lib/ringfence/host.key'
in_ct sh -c 'echo journal > /var/lib/ringfence/journal.redb'
cfg_sum=$(sha /etc/ringfence/agent.toml)
key_sum=$(sha /var/lib/ringfence/host.key)
journal_sum=$(sha /var/lib/ringfence/journal.redb)

# The CLI alone cannot take /usr/bin/ringfence from the single package:
# ringfence Breaks ringfenced (<< 0.2.0~), so dpkg refuses it.
if out=$(in_ct dpkg -i "/pkgs/cur/$(basename "$cli_deb")" 2>&1); then
    fail "dpkg installed ringfence alone over the single ringfenced package (Breaks missing)"
fi
grep -qF 'ringfence breaks ringfenced' <<<"$out" || fail "dpkg refused ringfence alone, but not for its Breaks: $out"
in_ct dpkg --configure -a >/dev/null 2>&1 || true
[ "$(owner /usr/bin/ringfence)" = ringfenced ] || fail "the refused install took /usr/bin/ringfence"
# Both new packages in one dpkg run: ringfence Replaces the old ringfenced's
# /usr/bin/ringfence.
in_ct dpkg -i "/pkgs/cur/$(basename "$cur_deb")" "/pkgs/cur/$(basename "$cli_deb")" >/dev/null \
    || fail "dpkg -i upgrade to the current ringfenced and ringfence .debs"
check_installed_files "$cur_deb_version"
check_cli_files "$cur_deb_version"
[ "$(sha /etc/ringfence/agent.toml)" = "$cfg_sum" ] || fail "upgrade changed the edited /etc/ringfence/agent.toml"
[ "$(sha /var/lib/ringfence/host.key)" = "$key_sum" ] || fail "upgrade changed /var/lib/ringfence/host.key"
[ "$(sha /var/lib/ringfence/journal.redb)" = "$journal_sum" ] || fail "upgrade changed the journal"
expect_stat /var/lib/ringfence/host.key "600 root:root regular file"
expect_absent /etc/ringfence/agent.toml.dpkg-dist "no conffile prompt expected"
pass "upgrade of the single package $prev_deb_version -> ringfenced + ringfence $cur_deb_version kept the edited config, the agent key and the journal"

in_ct dpkg -r ringfenced ringfence >/dev/null || fail "dpkg -r"
st=$(pkg_status)
[ "${st:0:2}" = "rc" ] || fail "after remove: expected status rc, got '$st'"
case "$(pkg_status ringfence)" in "" | un* | rc*) ;; *) fail "ringfence still installed after dpkg -r" ;; esac
expect_absent /usr/bin/ringfenced "removed package"
expect_absent /usr/bin/ringfence "removed package"
expect_absent /lib/systemd/system/ringfenced.service "removed package"
expect_absent "$hooks_dir" "removed package"
expect_absent "$wants" "unit must be disabled on remove"
[ "$(sha /var/lib/ringfence/host.key)" = "$key_sum" ] || fail "remove lost /var/lib/ringfence/host.key"
in_ct test -f /var/lib/ringfence/journal.redb || fail "remove lost the journal"
[ "$(sha /etc/ringfence/agent.toml)" = "$cfg_sum" ] || fail "remove lost the edited config"
pass "remove: binaries and unit gone, unit disabled, key, journal and config kept"

in_ct dpkg -P ringfenced >/dev/null || fail "dpkg -P"
st=$(pkg_status)
case "$st" in "" | un*) ;; *) fail "after purge: dpkg still knows the package: '$st'" ;; esac
expect_absent /var/lib/ringfence "purge deletes state"
expect_absent /etc/ringfence "purge deletes config"
expect_absent /var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/ringfenced.service "purge forgets enablement"
pass "purge: /var/lib/ringfence and /etc/ringfence deleted"

echo "== workstation: only the ringfence .deb"
new_container ringfence-pkg-workstation "$image" sleep infinity
in_ct dpkg -i "/pkgs/cur/$(basename "$cli_deb")" >/dev/null || fail "dpkg -i of the ringfence .deb alone"
check_cli_files "$cur_deb_version"
case "$(pkg_status ringfenced)" in "" | un*) ;; *) fail "installing ringfence pulled in ringfenced" ;; esac
expect_absent /usr/bin/ringfenced "no agent on a workstation"
expect_absent /lib/systemd/system/ringfenced.service "no unit on a workstation"
expect_absent /etc/ringfence/agent.toml "no agent config on a workstation"
expect_absent /var/lib/ringfence "no agent state on a workstation"
if in_ct sh -c 'ls /etc/systemd/system/*.wants/ringfenced.service' >/dev/null 2>&1; then fail "a unit is enabled on a workstation"; fi
if dpkg-deb -f "$cli_deb" Depends Recommends | grep -q ringfenced; then fail "ringfence depends on ringfenced"; fi
pass "workstation: ringfence without agent, unit, agent config or state"

# ------------------------------------------------------ real systemd as PID 1
echo "== deb under systemd as PID 1"
# --privileged is refused here (the engine itself lacks CAP_SYS_RESOURCE:
# "unable to apply caps"); every other capability, no seccomp/AppArmor
# profile and the host's cgroup v1 tree are enough for systemd.
new_container ringfence-pkg-systemd --cap-add ALL --cap-drop SYS_RESOURCE \
    --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
    --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock \
    --stop-signal SIGRTMIN+3 -e container=docker "$image" /lib/systemd/systemd
booted=""
for _ in $(seq 1 60); do
    state=$(in_ct systemctl is-system-running 2>/dev/null || true)
    case "$state" in running | degraded) booted=1; break ;; esac
    sleep 0.5
done
[ -n "$booted" ] || fail "systemd did not boot in the container (last state: '${state:-none}'); see packaging/README.md"
pass "systemd is PID 1 in the container ($state)"
in_ct dpkg -i "/pkgs/prev/$(basename "$prev_deb")" >/dev/null || fail "dpkg -i under systemd"
[ "$(in_ct systemctl is-enabled ringfenced.service)" = enabled ] || fail "unit not enabled after install"
# No certificate yet: postinst's start must be a condition skip, not a failure.
in_ct systemctl start ringfenced.service || fail "systemctl start without certificate"
active=$(in_ct systemctl is-active ringfenced.service || true)
[ "$active" = inactive ] || fail "without /etc/ringfence/tls/host.pem the unit must stay inactive, got '$active'"
in_ct systemctl show -p ConditionResult --value ringfenced.service | grep -qx no \
    || fail "unit was not skipped by its condition"
if in_ct systemctl is-failed ringfenced.service >/dev/null; then fail "unit is failed after install without certificate"; fi
pass "fresh install under systemd: enabled, skipped by ConditionPathExists, not failed"

# --------------------------------------- the real agent under systemd PID 1
# ringfenced from the package, run by the packaged unit, on the fake NVML
# library with 2 GPUs, talked to from this host over mTLS with the
# `ringfence` CLI. A drop-in shortens WatchdogSec and RestartSec only, so
# the watchdog phase takes seconds; every other line of the unit applies.
#
# Start limit: the unit allows 5 starts in 600 s (StartLimitBurst). Here:
# first start, watchdog restart, upgrade restart (3), then reset-failed
# (which clears the counter), then downgrade restart and the self-upgrade's
# exit-75 restart (2). A condition-skipped start does not count.
echo "== ringfenced under systemd: mTLS health, CRL reload, watchdog, upgrade, self-upgrade"
rf=target/release/ringfence
td=gpu.example.com
hid="ct-host-1"
pki="$work/pki"
mkdir -p "$pki" "$work/other-pki" "$work/coord"
"$rf" pki init --dir "$pki" --trust-domain "$td" >/dev/null
"$rf" pki issue --dir "$pki" --role host --name "$hid" >/dev/null
for name in coordinator revokee retired; do
    "$rf" pki issue --dir "$pki" --role ops --name "$name" >/dev/null
done
# An operator certificate from a CA the agent does not trust.
"$rf" pki init --dir "$work/other-pki" --trust-domain "$td" >/dev/null
"$rf" pki issue --dir "$work/other-pki" --role ops --name coordinator >/dev/null
# The agent starts with a CRL (revoking a retired certificate) configured.
"$rf" pki revoke --dir "$pki" --cert "$pki/ops-retired.pem" >/dev/null
pubkey() { "$rf" keys new --out "$1" | sed -n 's/^public key: *//p'; }
coord_pub=$(pubkey "$work/coord/coord.key")
approver_pub=$(pubkey "$work/coord/approver.key")
cat >"$work/trust.toml" <<TOML
[policy]
protected_rings = [2, 3, 4]
approver_threshold = 1

[[coordinator]]
id = "ct-coord"
key = "$coord_pub"

[[approver]]
id = "ct-approver"
key = "$approver_pub"
TOML
settings() { # name cert-pem key-pem
    cat >"$work/coord/$1.toml" <<TOML
state_dir = "$work/coord/state"
trust_file = "$work/trust.toml"
[signing]
key = "$work/coord/coord.key"
key_id = "ct-coord"
[tls]
cert = "$2"
key = "$3"
ca_bundle = "$pki/ca.pem"
[timeouts]
connect_s = 3
rpc_s = 10
TOML
}
settings ops "$pki/ops-coordinator.pem" "$pki/ops-coordinator.key"
settings revokee "$pki/ops-revokee.pem" "$pki/ops-revokee.key"
settings other "$work/other-pki/ops-coordinator.pem" "$work/other-pki/ops-coordinator.key"

# Agent config: the packaged conffile, edited by the operator.
agent_conf="$work/agent.toml"
cat >"$agent_conf" <<TOML
# Edited by the container test (operator's config).
host_id = "$hid"
ring = 0
listen = "0.0.0.0:7443"
state_dir = "/var/lib/ringfence"
trust_file = "/etc/ringfence/trust.toml"

[tls]
cert = "/etc/ringfence/tls/host.pem"
key = "/etc/ringfence/tls/host.key"
ca_bundle = "/etc/ringfence/tls/ca.pem"
crl = "/etc/ringfence/tls/crl.pem"
trust_domain = "$td"

[gpu]
backend = "nvml"
nvml_library = "/usr/local/lib/ringfence-test/libnvidia-ml.so.1"
expected_gpus = 2
poll_interval_s = 2

[drain]
timeout_s = 30

# Upgrades ringfenced itself from a local .deb, as a fleet would from its
# mirror: dpkg runs inside the unit, the agent exits 75, systemd restarts it.
[patch.profiles.ringfenced-self]
argv = ["/usr/bin/dpkg", "-i", "/var/cache/ringfence-test/ringfenced_{version}.deb"]
version_pattern = '^[0-9]+\.[0-9]+\.[0-9]+$'
timeout_s = 300
restarts_agent = true
TOML
in_ct mkdir -p /usr/local/lib/ringfence-test /var/cache/ringfence-test /etc/systemd/system/ringfenced.service.d
docker cp target/debug/libnvidia_ml.so "$ct:/usr/local/lib/ringfence-test/libnvidia-ml.so.1" >/dev/null
in_ct sh -c 'printf "[[gpu]]\n[[gpu]]\n" > /usr/local/lib/ringfence-test/fake-nvml-scenario.toml'
docker cp "$agent_conf" "$ct:/etc/ringfence/agent.toml"
docker cp "$work/trust.toml" "$ct:/etc/ringfence/trust.toml"
docker cp "$pki/ca.pem" "$ct:/etc/ringfence/tls/ca.pem"
docker cp "$pki/crl.pem" "$ct:/etc/ringfence/tls/crl.pem"
docker cp "$pki/host-$hid.pem" "$ct:/etc/ringfence/tls/host.pem"
docker cp "$pki/host-$hid.key" "$ct:/etc/ringfence/tls/host.key"
in_ct chown -R root:root /etc/ringfence /usr/local/lib/ringfence-test
in_ct chmod 600 /etc/ringfence/tls/host.key
in_ct cp "/pkgs/cur/$(basename "$cur_deb")" "/var/cache/ringfence-test/ringfenced_${cur_version}.deb"
in_ct sh -c 'printf "%s\n" "[Service]" "WatchdogSec=6s" "RestartSec=1s" > /etc/systemd/system/ringfenced.service.d/test-timing.conf'
in_ct systemctl daemon-reload
in_ct /usr/bin/ringfenced check-config >/dev/null || fail "ringfenced check-config: $(in_ct /usr/bin/ringfenced check-config 2>&1)"
expect_absent /var/lib/ringfence/host.key "check-config must not create the key"

unit_prop() { in_ct systemctl show -p "$1" --value ringfenced.service; }
journal() { in_ct journalctl -u ringfenced.service --no-pager -o cat; }
wait_active() { # what
    for _ in $(seq 1 60); do
        [ "$(in_ct systemctl is-active ringfenced.service || true)" = active ] && return 0
        sleep 0.5
    done
    fail "$1: unit not active: $(in_ct systemctl status --no-pager ringfenced.service 2>&1 | tail -n 20)"
}

in_ct systemctl start ringfenced.service || fail "systemctl start ringfenced: $(journal | tail -n 20)"
wait_active "first start"
# Type=notify with NotifyAccess=main: only the agent's own READY=1 can make
# the unit active, and only its STATUS= sets the status text.
status_text=$(unit_prop StatusText)
[ -n "$status_text" ] || fail "no STATUS= from the agent"
journal | has "ringfenced serving" || fail "the agent did not log that it serves"
expect_stat /var/lib/ringfence/host.key "600 root:root regular file"
pass "ringfenced active under systemd: READY from the agent (status: $status_text), host.key 0600"

ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$ct")
[ -n "$ip" ] || fail "no IP address for container $ct"
inv="$work/coord/inventory.toml"
cat >"$inv" <<TOML
trust_domain = "$td"

[[pool]]
name = "ct"
reserve_percent = 50

[[host]]
id = "$hid"
address = "$ip:7443"
pool = "ct"
ring = 0
expected_gpus = 2
TOML
"$rf" --config "$work/coord/ops.toml" inventory enroll --inventory "$inv" >/dev/null \
    || fail "ringfence inventory enroll against $ip:7443"
health_row() { # settings name
    "$rf" --config "$work/coord/$1.toml" hosts health --inventory "$inv" --json 2>&1 || true
}
expect_healthy() { # settings name, what
    local row
    for _ in $(seq 1 20); do
        row=$(health_row "$1")
        if grep -q '"verdict":"HEALTHY"' <<<"$row" && grep -q '"gpus_found":2,"gpus_expected":2' <<<"$row" \
            && grep -q '"attested":true' <<<"$row"; then
            return 0
        fi
        sleep 0.5
    done
    fail "$2: expected an attested HEALTHY 2/2 row, got: $row"
}
expect_refused() { # settings name, what
    local row
    row=$(health_row "$1")
    grep -q '"verdict":"UNREACHABLE"' <<<"$row" || fail "$2: expected the agent to refuse the client, got: $row"
}
expect_healthy ops "hosts health over mTLS from the host"
pass "enrolled; ringfence hosts health from the host: attested HEALTHY, 2/2 GPUs"

expect_refused other "client certificate from another CA"
expect_healthy revokee "not yet revoked client"
"$rf" pki revoke --dir "$pki" --cert "$pki/ops-revokee.pem" >/dev/null
docker cp "$pki/crl.pem" "$ct:/etc/ringfence/tls/crl.pem"
pid=$(unit_prop MainPID)
in_ct systemctl reload ringfenced.service || fail "systemctl reload ringfenced"
refused=""
for _ in $(seq 1 20); do
    if grep -q '"verdict":"UNREACHABLE"' <<<"$(health_row revokee)"; then refused=1; break; fi
    sleep 0.5
done
[ -n "$refused" ] || fail "a revoked client is still served after systemctl reload"
[ "$(unit_prop MainPID)" = "$pid" ] || fail "reload restarted the agent"
expect_healthy ops "after the CRL reload"
pass "another CA's client refused; revoked client refused after systemctl reload (same PID), others served"

restarts=$(unit_prop NRestarts)
in_ct kill -STOP "$pid"
restarted=""
for _ in $(seq 1 60); do
    if [ "$(unit_prop NRestarts)" -gt "$restarts" ] \
        && [ "$(in_ct systemctl is-active ringfenced.service || true)" = active ]; then
        restarted=1
        break
    fi
    sleep 0.5
done
[ -n "$restarted" ] || fail "no watchdog restart after SIGSTOP of ringfenced"
in_ct journalctl -u ringfenced.service --no-pager | has "Watchdog timeout" \
    || fail "restart was not caused by the watchdog"
[ "$(unit_prop MainPID)" != "$pid" ] || fail "main PID unchanged after the watchdog restart"
expect_healthy ops "after the watchdog restart"
pass "watchdog: frozen ringfenced killed, restarted (NRestarts $restarts -> $(unit_prop NRestarts)), serving again"

# Upgrade with the agent running (an operator's dpkg, outside the unit):
# the single package to both new ones.
cfg_sum=$(sha /etc/ringfence/agent.toml)
key_sum=$(sha /var/lib/ringfence/host.key)
journal_ino=$(in_ct stat -c %i /var/lib/ringfence/journal.redb) || fail "no task journal before the upgrade"
pid=$(unit_prop MainPID)
in_ct dpkg -i "/pkgs/cur/$(basename "$cur_deb")" "/pkgs/cur/$(basename "$cli_deb")" >/dev/null \
    || fail "dpkg -i upgrade to ringfenced + ringfence with the agent running"
[ "$(pkg_status)" = "ii $cur_deb_version" ] || fail "upgrade: dpkg status $(pkg_status)"
[ "$(pkg_status ringfence)" = "ii $cur_deb_version" ] || fail "upgrade: ringfence dpkg status $(pkg_status ringfence)"
[ "$(owner /usr/bin/ringfence)" = ringfence ] || fail "upgrade: /usr/bin/ringfence not owned by ringfence"
wait_active "after the upgrade"
new_pid=$(unit_prop MainPID)
[ "$new_pid" != "$pid" ] || fail "upgrade did not restart the agent (MainPID still $pid)"
[ "$(in_ct readlink "/proc/$new_pid/exe")" = /usr/bin/ringfenced ] \
    || fail "the agent does not run the installed binary: $(in_ct readlink "/proc/$new_pid/exe")"
[ "$(sha /etc/ringfence/agent.toml)" = "$cfg_sum" ] || fail "upgrade changed the edited agent.toml"
[ "$(sha /var/lib/ringfence/host.key)" = "$key_sum" ] || fail "upgrade changed host.key"
expect_absent /etc/ringfence/agent.toml.dpkg-dist "no conffile prompt expected"
expect_healthy ops "after the upgrade (enrolled key unchanged)"
# The journal the previous agent wrote is the one the new agent opened: the
# same file, not replaced (the agent may have appended to it since).
[ "$(in_ct stat -c %i /var/lib/ringfence/journal.redb)" = "$journal_ino" ] || fail "upgrade replaced the task journal"
"$rf" --config "$work/coord/ops.toml" hosts identity --inventory "$inv" --host "$hid" >/dev/null \
    || fail "hosts identity after the upgrade"
pass "upgrade single $prev_deb_version -> ringfenced + ringfence $cur_deb_version with the agent running: restarted on the new binary, config, key and journal kept"

# Self-upgrade: the agent's own patch profile runs dpkg inside the unit.
# Back to the single package first: ringfence (Breaks ringfenced << 0.2.0~)
# goes, then the previous ringfenced; the profile installs the new agent
# package only (a GPU host without the operator CLI).
in_ct systemctl reset-failed ringfenced.service # clears the start-limit counter (see above)
in_ct dpkg -r ringfence >/dev/null || fail "dpkg -r ringfence before the downgrade"
in_ct dpkg -i "/pkgs/prev/$(basename "$prev_deb")" >/dev/null || fail "downgrade to $prev_deb_version"
[ "$(pkg_status)" = "ii $prev_deb_version" ] || fail "downgrade: dpkg status $(pkg_status)"
wait_active "after the downgrade"
expect_healthy ops "after the downgrade"
restarts=$(unit_prop NRestarts)
pid=$(unit_prop MainPID)
cat >"$work/coord/self-upgrade.toml" <<TOML
wave_id = "ct-self-upgrade"
profile = "ringfenced-self"
version = "$cur_version"
failure_budget = 0
[ring.0]
batch_size = 1
soak_s = 0
TOML
# One host in its pool: its reserve allows none out of service, so an
# approver signs a break-glass raising the pool's limit to 1.
"$rf" breakglass sign --wave ct-self-upgrade --pool ct --max-out 1 --reason "container test" \
    --key "$work/coord/approver.key" --out "$work/coord/bg.json" >/dev/null || fail "breakglass sign"
if ! out=$(timeout 300 "$rf" --config "$work/coord/ops.toml" wave run --inventory "$inv" \
    --spec "$work/coord/self-upgrade.toml" --break-glass "$work/coord/bg.json" 2>&1); then
    echo "$out" >&2
    journal | tail -n 40 >&2
    fail "self-upgrade wave did not succeed"
fi
[ "$(pkg_status)" = "ii $cur_deb_version" ] || fail "self-upgrade did not install $cur_deb_version: $(pkg_status)"
wait_active "after the self-upgrade"
[ "$(unit_prop NRestarts)" = $((restarts + 1)) ] \
    || fail "self-upgrade: expected exactly one restart (the agent's exit 75), NRestarts $restarts -> $(unit_prop NRestarts)"
[ "$(unit_prop MainPID)" != "$pid" ] || fail "self-upgrade: MainPID unchanged"
journal | has "upgraded by its own patch profile" \
    || fail "the postinst did not notice it ran inside ringfenced.service (patch output in the journal)"
journal | has "exiting with status 75" || fail "the agent did not exit 75 for the restart"
# SuccessExitStatus=75: a clean stop, not a failure (the watchdog kill above
# is logged as result 'watchdog', never 'exit-code').
if in_ct journalctl -u ringfenced.service --no-pager | has "Failed with result 'exit-code'"; then
    fail "systemd counted the exit-75 restart as a failure"
fi
journal | has "ringfenced restarted on version $cur_version" \
    || fail "the restarted agent did not finish the patch task"
expect_healthy ops "after the self-upgrade"
grep -q '"draining":false' <<<"$(health_row ops)" || fail "host still drained after the self-upgrade wave"
expect_absent /usr/bin/ringfence "the new ringfenced package does not carry the operator CLI"
pass "self-upgrade wave: dpkg inside the unit, agent exited 75, systemd restarted it once, task finished, host undrained"

in_ct dpkg -r ringfenced >/dev/null || fail "dpkg -r under systemd"
[ "$(in_ct systemctl is-active ringfenced.service || true)" = inactive ] || fail "remove did not stop the unit"
[ "$(sha /var/lib/ringfence/host.key)" = "$key_sum" ] || fail "remove under systemd lost host.key"
pass "remove under systemd: agent stopped, state kept"

# -------------------------------------------------------------------- rpm
echo "== rpm metadata and scriptlets"
command -v rpm >/dev/null 2>&1 || fail "rpm is not installed (apt-get install rpm)"
for f in "$prev_rpm" "$cur_rpm" "$cli_rpm"; do
    [ -s "$f" ] || fail "$f is empty"
done
for f in "$cur_rpm" "$cli_rpm"; do
    [ "$(rpm -qp --qf '%{VERSION}' "$f")" = "$cur_version" ] || fail "$f: rpm version is not $cur_version"
done
[ "$(rpm -qp --qf '%{VERSION}' "$prev_rpm")" = "${prev_version}" ] || fail "previous rpm version is not $prev_version"
files=""
expect_rpm_file() { # "perms owner flags path" regex
    grep -qE "^$1\$" <<<"$files" || fail "rpm: no entry matching '$1' in:
$files"
}
expect_rpm_docs() { # bin
    local page
    for page in $(man_pages "$1"); do
        expect_rpm_file "-rw-r--r-- root:root d /usr/share/man/man1/$page"
    done
    expect_rpm_file "-rw-r--r-- root:root  /usr/share/bash-completion/completions/$1"
    expect_rpm_file "-rw-r--r-- root:root  /usr/share/zsh/site-functions/_$1"
    expect_rpm_file "-rw-r--r-- root:root  /usr/share/fish/vendor_completions.d/$1.fish"
}
files=$(rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEFLAGS:fflags} %{FILENAMES}\n]' "$cur_rpm")
expect_rpm_file '-rwxr-xr-x root:root  /usr/bin/ringfenced'
expect_rpm_file '-rw-r--r-- root:root  /usr/lib/systemd/system/ringfenced.service'
expect_rpm_file '-rw-r--r-- root:root cn /etc/ringfence/agent.toml'
expect_rpm_file '-rw-r--r-- root:root d /usr/share/doc/ringfenced/README.md'
for hook in $slurm_hooks; do
    expect_rpm_file "-rwxr-xr-x root:root  $hooks_dir/$hook"
done
expect_rpm_file "-rw-r--r-- root:root  $hooks_dir/slurm-common.sh"
expect_rpm_docs ringfenced
if grep -q ' /usr/bin/ringfence$' <<<"$files"; then fail "the ringfenced rpm still ships /usr/bin/ringfence"; fi
files=$(rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEFLAGS:fflags} %{FILENAMES}\n]' "$cli_rpm")
expect_rpm_file '-rwxr-xr-x root:root  /usr/bin/ringfence'
expect_rpm_file '-rw-r--r-- root:root d /usr/share/doc/ringfence/examples/inventory.toml'
expect_rpm_file '-rw-r--r-- root:root d /usr/share/doc/ringfence/examples/wave.toml'
expect_rpm_file '-rw-r--r-- root:root d /usr/share/doc/ringfence/examples/ringfence.toml'
expect_rpm_docs ringfence
if grep -qE 'ringfenced|systemd|/etc/' <<<"$files"; then fail "the ringfence rpm ships agent files: $files"; fi
rpm -qp --conflicts "$cli_rpm" | grep -qx 'ringfenced < 0.2.0~' \
    || fail "the ringfence rpm does not conflict with the single package: $(rpm -qp --conflicts "$cli_rpm")"
if rpm -qp --requires "$cli_rpm" | grep -q ringfenced; then fail "the ringfence rpm requires ringfenced"; fi
scripts=$(rpm -qp --scripts "$cur_rpm")
expect_script() { # scriptlet header, fixed string that must follow it
    awk -v h="$1" 'index($0, h) == 1 {on = 1; next} /scriptlet \(using/ {on = 0} on' <<<"$scripts" \
        | grep -qF -- "$2" || fail "rpm $1 does not contain '$2'"
}
expect_script "postinstall scriptlet" "systemctl --no-reload enable ringfenced.service"
expect_script "postinstall scriptlet" "systemctl try-restart ringfenced.service"
expect_script "preuninstall scriptlet" "systemctl stop ringfenced.service"
expect_script "preuninstall scriptlet" "systemctl --no-reload disable ringfenced.service"
expect_script "postuninstall scriptlet" "systemctl --system daemon-reload"
if grep -q 'rm -rf /var/lib/ringfence' <<<"$scripts"; then fail "rpm erase must keep /var/lib/ringfence"; fi
for s in packaging/rpm/*.sh packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm; do
    sh -n "$s" || fail "shell syntax error in $s"
done
pass "rpm: contents, modes, %config(noreplace), doc, man pages, completions, scriptlets, Conflicts"

# Install in the Debian image with its rpm (no RPM distribution mirror here:
# --nodeps, as the image's rpm database knows none of Debian's packages).
echo "== rpm upgrade from the single package in a container"
new_container ringfence-pkg-rpm "$image" sleep infinity
rpm_in() { in_ct rpm --force-debian "$@"; }
rpm_in -i --nodeps "/pkgs/prev/$(basename "$prev_rpm")" >/dev/null 2>&1 || fail "rpm -i of the previous .rpm"
[ "$(in_ct rpm -qf /usr/bin/ringfence)" = "ringfenced-${prev_version}-1.x86_64" ] \
    || fail "previous rpm: /usr/bin/ringfence owned by '$(in_ct rpm -qf /usr/bin/ringfence)'"
in_ct sed -i 's/^host_id = "gpu-0001"/host_id = "ct-host-rpm"/' /etc/ringfence/agent.toml
in_ct sh -c 'umask 077; head -c 32 /dev/urandom > /var/lib/ringfence/host.key; echo journal > /var/lib/ringfence/journal.redb'
cfg_sum=$(sha /etc/ringfence/agent.toml)
key_sum=$(sha /var/lib/ringfence/host.key)
journal_sum=$(sha /var/lib/ringfence/journal.redb)
# rpm's resolver on the transactions (--test, with dependency checks: the
# unresolvable Debian requires are listed too and ignored here): the CLI
# alone conflicts with the single package, both new packages together do
# not. (No file conflict would stop it: the single package's
# /usr/bin/ringfence is the same file, and rpm lets identical files be
# shared.)
conflicts() { rpm_in -U --test "$@" 2>&1 | grep -F 'conflicts with' || true; }
alone=$(conflicts "/pkgs/cur/$(basename "$cli_rpm")")
grep -qF 'ringfenced < 0.2.0~ conflicts with ringfence-' <<<"$alone" \
    || fail "rpm: ringfence alone over the single package is not refused by its Conflicts: '$alone'"
both=$(conflicts "/pkgs/cur/$(basename "$cur_rpm")" "/pkgs/cur/$(basename "$cli_rpm")")
[ -z "$both" ] || fail "rpm: ringfenced + ringfence over the single package conflict: $both"
rpm_in -U --nodeps "/pkgs/cur/$(basename "$cur_rpm")" "/pkgs/cur/$(basename "$cli_rpm")" >/dev/null \
    || fail "rpm -U of ringfenced + ringfence over the single package"
[ "$(in_ct rpm -q ringfenced)" = "ringfenced-${cur_version}-1.x86_64" ] || fail "rpm: ringfenced not upgraded: $(in_ct rpm -q ringfenced)"
[ "$(in_ct rpm -qf /usr/bin/ringfence)" = "ringfence-${cur_version}-1.x86_64" ] \
    || fail "rpm: /usr/bin/ringfence owned by '$(in_ct rpm -qf /usr/bin/ringfence)'"
[ "$(sha /etc/ringfence/agent.toml)" = "$cfg_sum" ] || fail "rpm upgrade changed the edited agent.toml"
[ "$(sha /var/lib/ringfence/host.key)" = "$key_sum" ] || fail "rpm upgrade changed host.key"
[ "$(sha /var/lib/ringfence/journal.redb)" = "$journal_sum" ] || fail "rpm upgrade changed the journal"
expect_stat /usr/bin/ringfence "755 root:root regular file"
check_hooks
[ "$(in_ct rpm -qf "$hooks_dir/slurm-common.sh")" = "ringfenced-${cur_version}-1.x86_64" ] \
    || fail "rpm: $hooks_dir/slurm-common.sh owned by '$(in_ct rpm -qf "$hooks_dir/slurm-common.sh")'"
expect_stat /usr/share/man/man1/ringfence-wave-run.1.gz "644 root:root regular file"
man_page ringfence-wave-run | has "ringfence wave run" \
    || fail "rpm: man ringfence-wave-run does not render"
rpm_in -e ringfence >/dev/null 2>&1 || fail "rpm -e ringfence"
expect_absent /usr/bin/ringfence "ringfence erased"
expect_stat /usr/bin/ringfenced "755 root:root regular file"
pass "rpm: single package -> ringfenced + ringfence in one transaction (config, key, journal kept); the CLI alone conflicts; CLI erased, agent kept"

echo "container package tests passed in $(( $(date +%s) - start )) s"
