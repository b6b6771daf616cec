# shellcheck shell=bash
# Shared body of the mmr SLURM batch scripts (sourced, not run). See docs/cluster.md.
#
# Contract, all optional environment variables:
#   MMR_GPUS_PER_NODE   processes per node (default: SLURM_GPUS_ON_NODE, else the count in SLURM_GPUS_PER_NODE)
#   MMR_RUN_DIR         hostfile + preemption flag (default: $SLURM_SUBMIT_DIR/runs/slurm/$SLURM_JOB_ID,
#                       stable across requeues and on the shared file system)
#   MMR_PYTHON          python that has mmr_core (default: python)
#   MMR_DEEPSPEED       the deepspeed launcher command (default: deepspeed)
#   MMR_DRY_RUN=1       print the hostfile and the exact launch command, run nothing
#   MASTER_ADDR/PORT    rendezvous (default: first node, 20000 + job id % 20000)
# Exported to the training processes: MMR_DS_PRESET, MMR_DS_CONFIG, MMR_PRECISION, MMR_ATTN_IMPL (set by
# the calling script) and MMR_PREEMPT_FILE (mmr_core.distributed.PreemptionHandler polls it).

# Exit status of a training run that saved a checkpoint and stopped on request (PREEMPTED_EXIT_CODE).
MMR_PREEMPTED_EXIT_CODE=75

_mmr_die() {
    echo "[mmr] error: $*" >&2
    exit 2
}

_mmr_on_usr1() {
    # Only the batch shell gets --signal=B:USR1; a flag file on the shared file system reaches every rank.
    MMR_PREEMPTED=1
    echo "[mmr] USR1: asking the training processes to checkpoint and stop"
    touch "$MMR_PREEMPT_FILE"
}

_mmr_on_term() {
    # SLURM sends TERM to the batch shell too (scancel, time limit, preemption with a grace time). Without
    # this trap bash would die at once, returning 143 while the ranks are still saving; instead pass the
    # signal to the launcher wrapper (which passes it to every rank) and keep waiting for it.
    MMR_TERMINATED=1
    echo "[mmr] $1: passing it to the training processes and waiting for them to save and stop"
    [[ -n ${MMR_LAUNCH_PID:-} ]] && kill -s "$1" "$MMR_LAUNCH_PID" 2>/dev/null
}

mmr_slurm_main() {
    [[ $# -ge 1 ]] || _mmr_die "usage: sbatch ${0##*/} TRAIN_SCRIPT [ARGS...]"
    [[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_JOB_NODELIST:-} ]] || _mmr_die "SLURM_JOB_ID/SLURM_JOB_NODELIST unset: submit with sbatch"
    local python=${MMR_PYTHON:-python}
    local nodes=()
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    [[ ${#nodes[@]} -ge 1 ]] || _mmr_die "scontrol returned no hosts for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    local gpus=${MMR_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    if [[ -z $gpus && -n ${SLURM_GPUS_PER_NODE:-} ]]; then
        gpus=${SLURM_GPUS_PER_NODE##*:} # "v100:8" -> 8
    fi
    [[ $gpus =~ ^[1-9][0-9]*$ ]] || _mmr_die "GPUs per node unknown ('$gpus'): set MMR_GPUS_PER_NODE"

    export MASTER_ADDR=${MASTER_ADDR:-${nodes[0]}}
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    # The deepspeed launcher leaves OMP_NUM_THREADS unset; one thread per rank avoids oversubscription.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    local run_dir=${MMR_RUN_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/runs/slurm/$SLURM_JOB_ID}
    mkdir -p "$run_dir"
    export MMR_PREEMPT_FILE=${MMR_PREEMPT_FILE:-$run_dir/preempt}
    rm -f "$MMR_PREEMPT_FILE" # left over from the run before a requeue
    local hostfile=$run_dir/hostfile
    : >"$hostfile"
    local node
    for node in "${nodes[@]}"; do
        echo "$node slots=$gpus" >>"$hostfile"
    done

    local build=("$python" -m mmr_core.distributed.command --null --launcher "${MMR_DEEPSPEED:-deepspeed}"
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
    # The deepspeed launcher returns before its ranks on SIGTERM and never reports their 75; this wrapper
    # forwards signals to the ranks, waits for every one of them and exits 75 when they saved on preemption.
    local supervise=("$python" -m mmr_core.distributed.supervise --)
    local launch=() ds=()
    if [[ ${#nodes[@]} -eq 1 ]]; then
        mapfile -d '' ds < <("${build[@]}" --num-gpus "$gpus" -- "$@")
        [[ ${#ds[@]} -gt 0 ]] && launch=("${supervise[@]}" "${ds[@]}")
    else
        # One deepspeed launcher per node under srun (no ssh/pdsh needed); each one fills in its node rank.
        mapfile -d '' ds < <("${build[@]}" --hostfile "$hostfile" --no-ssh --node-rank __NODE_RANK__ -- "$@")
        if [[ ${#ds[@]} -gt 0 ]]; then
            launch=(srun --nodes="${#nodes[@]}" --ntasks="${#nodes[@]}" --ntasks-per-node=1 --kill-on-bad-exit=1)
            # srun no longer inherits --cpus-per-task (SLURM >= 22.05): without it all ranks of a node share one core.
            [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && launch+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
            # shellcheck disable=SC2016  # expanded by the per-node bash, not here
            launch+=(bash -c 'exec "${@//__NODE_RANK__/$SLURM_NODEID}"' mmr-node "${supervise[@]}" "${ds[@]}")
        fi
    fi
    [[ ${#launch[@]} -gt 0 ]] || _mmr_die "could not build the launch command (is mmr_core importable by $python?)"

    echo "[mmr] hostfile $hostfile:"
    cat "$hostfile"
    local shown
    shown=$(printf '%q ' "${launch[@]}")
    echo "[mmr] launch: ${shown% }"
    if [[ ${MMR_DRY_RUN:-0} == 1 ]]; then
        return 0
    fi

    MMR_PREEMPTED=0 MMR_TERMINATED=0
    trap _mmr_on_usr1 USR1
    trap '_mmr_on_term TERM' TERM
    trap '_mmr_on_term INT' INT
    "${launch[@]}" &
    MMR_LAUNCH_PID=$!
    local rc
    # `wait` returns early (status > 128) whenever a trap runs; keep waiting until the launcher is gone.
    while :; do
        wait "$MMR_LAUNCH_PID"
        rc=$?
        kill -0 "$MMR_LAUNCH_PID" 2>/dev/null || break
    done
    if [[ $rc -gt 128 ]]; then
        wait "$MMR_LAUNCH_PID" 2>/dev/null
        local final=$?
        [[ $final -ne 127 ]] && rc=$final
    fi
    trap - USR1 TERM INT
    echo "[mmr] launcher exited with $rc"
    if [[ $rc -eq $MMR_PREEMPTED_EXIT_CODE || ($MMR_PREEMPTED == 1 && $rc -ne 0) ]]; then
        if [[ $MMR_PREEMPTED == 0 && $MMR_TERMINATED == 1 ]]; then
            # TERM means scancel, the time limit, or a preemption that SLURM requeues itself: not ours to requeue.
            echo "[mmr] stopped on SIGTERM after saving (exit $rc); not requeueing job $SLURM_JOB_ID"
        else
            echo "[mmr] stopped on preemption (exit $rc): requeueing job $SLURM_JOB_ID"
            scontrol requeue "$SLURM_JOB_ID" || echo "[mmr] scontrol requeue $SLURM_JOB_ID failed" >&2
        fi
    fi
    return "$rc"
}
