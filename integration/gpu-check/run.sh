#!/usr/bin/env bash
# Real-GPU check: run on a host with NVIDIA GPUs, from a copy of the working
# tree, with release binaries built elsewhere (no Rust toolchain needed here):
#
#   cargo build --release -p ringfenced -p ringfence-gpu-check     # on the build machine
#   # copy target/release/ringfenced and target/release/ringfence-gpu-check along
#   integration/gpu-check/run.sh                                   # on the GPU host
#
# It captures `ringfenced health --once --json` (NVML backend, a minimal
# generated config), `nvidia-smi -q -x` and `nvidia-smi nvlink -s`, compares
# them field by field, converts the report into a fake-NVML scenario (the
# fixture candidate), and times one health collection and single NVML calls
# beside `nvidia-smi -q`. Everything goes under $OUT.
#
# Environment (all optional):
#   OUT           output dir (default: ./gpu-check-out)
#   BIN_DIR       where ringfenced and ringfence-gpu-check are (default: <repo>/target/release)
#   NVIDIA_SMI    nvidia-smi program (default: nvidia-smi)
#   NVML_LIBRARY  libnvidia-ml.so.1 to load instead of the system's
#   HOST_ID       host id in the report (default: gpu-check)
#   COLLECTIONS, CALL_SECONDS, SMI_RUNS   timing sizes (default 20, 2, 5)
#   STEP_TIMEOUT  seconds any one step may take (default 120)
#
# Exit: 0 every field matched or was not comparable; 1 a mismatch; 2 a step failed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
OUT=${OUT:-$PWD/gpu-check-out}
BIN_DIR=${BIN_DIR:-$root/target/release}
NVIDIA_SMI=${NVIDIA_SMI:-nvidia-smi}
HOST_ID=${HOST_ID:-gpu-check}
COLLECTIONS=${COLLECTIONS:-20}
CALL_SECONDS=${CALL_SECONDS:-2}
SMI_RUNS=${SMI_RUNS:-5}
STEP_TIMEOUT=${STEP_TIMEOUT:-120}

agent=$BIN_DIR/ringfenced
kit=$BIN_DIR/ringfence-gpu-check

mkdir -p "$OUT" || exit 2
log=$OUT/run.log
: >"$log"
say() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$log" >&2; }
fail() { say "FAILED: $*"; exit 2; }
# step NAME STDOUT STDERR CMD...: runs CMD under the step timeout with its
# output in the two files (the same file twice for both), returns its status.
step() {
    local name=$1 out=$2 err=$3; shift 3
    local t0=$SECONDS rc
    if [ "$out" = "$err" ]; then
        timeout "$STEP_TIMEOUT" "$@" >"$out" 2>&1
    else
        timeout "$STEP_TIMEOUT" "$@" >"$out" 2>"$err"
    fi
    rc=$?
    say "$name: exit $rc in $((SECONDS - t0)) s"
    return "$rc"
}

for b in "$agent" "$kit"; do
    [ -x "$b" ] || fail "$b is missing (build with: cargo build --release -p ringfenced -p ringfence-gpu-check)"
done
command -v "$NVIDIA_SMI" >/dev/null || fail "$NVIDIA_SMI not found"

work=$(mktemp -d) || exit 2
trap 'rm -rf "$work"' EXIT

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "kernel: $(uname -srm)"
    echo "agent: $("$agent" --version 2>&1)"
    echo "kit: $("$kit" --version 2>&1)"
    echo "NVML_LIBRARY: ${NVML_LIBRARY:-system}"
    echo "nvidia-smi -L:"
    "$NVIDIA_SMI" -L 2>&1
} >"$OUT/env.txt"
gpus=$(grep -c '^GPU ' "$OUT/env.txt")
[ "$gpus" -gt 0 ] || fail "nvidia-smi -L lists no GPU (see $OUT/env.txt)"
say "$gpus GPU(s); output in $OUT"

mkdir -p "$work/state"
"$kit" agent-config --state-dir "$work/state" --expected-gpus "$gpus" --host-id "$HOST_ID" \
    ${NVML_LIBRARY:+--nvml-library "$NVML_LIBRARY"} >"$work/agent.toml" || fail "agent-config"
cp "$work/agent.toml" "$OUT/agent.toml"

# The two captures, back to back so that live values are close.
step health "$OUT/health.json" "$OUT/health.stderr" \
    "$agent" --config "$work/agent.toml" health --once --json
rc=$?
# 0 HEALTHY, 1 not HEALTHY (still a report); anything else is no report.
[ "$rc" -le 1 ] || fail "ringfenced health (see $OUT/health.stderr)"
step nvidia-smi-xml "$OUT/nvidia-smi.xml" "$OUT/nvidia-smi.stderr" "$NVIDIA_SMI" -q -x \
    || fail "nvidia-smi -q -x (see $OUT/nvidia-smi.stderr)"
nvlink_args=()
if step nvlink-status "$OUT/nvlink-status.txt" "$OUT/nvlink-status.txt" "$NVIDIA_SMI" nvlink -s \
    && [ -s "$OUT/nvlink-status.txt" ]; then
    nvlink_args=(--nvlink-status "$OUT/nvlink-status.txt")
fi
# For the record only (not compared).
step nvlink-errors "$OUT/nvlink-errors.txt" "$OUT/nvlink-errors.txt" "$NVIDIA_SMI" nvlink -e
step nvidia-smi-q "$OUT/nvidia-smi-q.txt" "$OUT/nvidia-smi-q.txt" "$NVIDIA_SMI" -q

step compare "$OUT/comparison.txt" "$OUT/compare.stderr" \
    "$kit" compare --health "$OUT/health.json" --smi "$OUT/nvidia-smi.xml" \
    "${nvlink_args[@]}" --markdown "$OUT/comparison.md"
compare_rc=$?
[ "$compare_rc" -le 1 ] || fail "compare (see $OUT/compare.stderr)"
cat "$OUT/comparison.txt"

step to-scenario /dev/null "$OUT/scenario.stderr" \
    "$kit" to-scenario --allow-lossy --health "$OUT/health.json" --out "$OUT/scenario.toml" \
    || fail "to-scenario (see $OUT/scenario.stderr)"
if [ -s "$OUT/scenario.stderr" ]; then
    say "the scenario cannot reproduce everything:"
    cat "$OUT/scenario.stderr" >&2
fi

step timing "$OUT/timing.json" "$OUT/timing.txt" \
    "$kit" time --config "$work/agent.toml" --collections "$COLLECTIONS" \
    --call-seconds "$CALL_SECONDS" --smi "$(command -v "$NVIDIA_SMI")" --smi-runs "$SMI_RUNS" \
    || fail "timing (see $OUT/timing.txt)"

{
    tail -n 1 "$OUT/comparison.txt"
    cat "$OUT/timing.txt"
} | tee "$OUT/summary.txt"
say "done: comparison exit $compare_rc"
exit "$compare_rc"
