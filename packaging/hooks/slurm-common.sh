# shellcheck shell=sh
# shellcheck disable=SC2034 # NODE, RF_REST, STATE, WHO, WHEN, REASON: read by the hooks
# Shared by ringfence's Slurm hooks (sourced, not run): option parsing and
# the node's state as slurmctld reports it.
#
# Options of every hook:
#   --node NAME   the Slurm node name (default: `hostname -s`)
#   --conf PATH   slurm.conf for scontrol/sinfo (exported as SLURM_CONF;
#                 the agent runs hooks with a clean environment)
#   --            end of options; what follows is the hook's free text
#
# Ownership (NHC's rule): ringfence's drain reason starts with
# "ringfence:"; a node drained under any other reason belongs to whoever
# drained it and ringfence never changes or clears that drain.

RF_PREFIX="ringfence:"

rf_die() {
    printf '%s: %s\n' "$RF_HOOK" "$*" >&2
    exit "${RF_EXIT:-1}"
}

# Parse the common options; sets NODE and leaves the rest in RF_REST
# (newline-free words joined by single spaces).
rf_parse() {
    NODE=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --node) [ $# -ge 2 ] || rf_die "--node needs a value"; NODE=$2; shift 2 ;;
            --node=*) NODE=${1#--node=}; shift ;;
            --conf) [ $# -ge 2 ] || rf_die "--conf needs a value"; SLURM_CONF=$2; export SLURM_CONF; shift 2 ;;
            --conf=*) SLURM_CONF=${1#--conf=}; export SLURM_CONF; shift ;;
            --) shift; break ;;
            -*) rf_die "unknown option $1 (options: --node NAME, --conf PATH, --)" ;;
            *) break ;;
        esac
    done
    RF_REST=$*
    if [ -z "$NODE" ]; then
        NODE=$(hostname -s) || rf_die "cannot read the host name; pass --node NAME"
    fi
}

# Read the node's state from slurmctld: sets STATE (sinfo's long state,
# lower case, flags such as `*` kept), WHO, WHEN and REASON ("none" when the
# node has no reason). Fails when slurmctld cannot be asked or does not
# know the node.
rf_read_node() {
    line=$(sinfo --noheader --Node --nodes="$NODE" --format='%T %u %H %E' 2>&1) ||
        rf_die "cannot read node $NODE from slurmctld: $(printf '%s' "$line" | tail -n 1)"
    line=$(printf '%s\n' "$line" | head -n 1)
    [ -n "$line" ] || rf_die "slurmctld does not know node $NODE (pass --node NAME)"
    STATE=${line%% *}; line=${line#* }
    WHO=${line%% *}; line=${line#* }
    WHEN=${line%% *}
    REASON=${line#* }
}

# True when the node carries a drain (draining or drained).
rf_is_drain() {
    case "$STATE" in
        drain*) return 0 ;;
        *) return 1 ;;
    esac
}

# True when the node's reason is ringfence's own.
rf_is_ours() {
    case "$REASON" in
        "$RF_PREFIX"*) return 0 ;;
        *) return 1 ;;
    esac
}
