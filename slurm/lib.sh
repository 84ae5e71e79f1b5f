# shellcheck shell=bash
# Shared by the fnscale SLURM batch scripts (sourced, not run): environment, rendezvous, launching
# under srun with signal forwarding, and requeueing after a pre-emption/time-limit signal.
#
# Signal path (see docs/cluster.md): `#SBATCH --signal=B:USR1@<lead>` sends USR1 to this batch shell
# only; the trap below forwards it to the srun step (srun passes it on to its tasks: one
# `accelerate launch` per node, exec'd so it is the task itself). torchrun's agent inside accelerate
# handles USR1 because PET_SIGNALS_TO_HANDLE lists it, and passes it to the training processes, which
# checkpoint and exit 0 (fnscale's StopRequested). SLURM pre-emption sends SIGTERM to every process of
# the job; that takes the same path. Then the batch shell requeues the job, and the rerun continues with
# --resume-from-checkpoint auto.

FNS_STOP=0      # set when a stop signal reached this shell
FNS_CHILD=""    # pid of the running srun step
FNS_START=$(date +%s)

fns_log() { echo "[fnscale-slurm $(date '+%F %T')] $*" >&2; }

fns_forward() {
    FNS_STOP=1
    fns_log "got SIG$1: forwarding it to the training step, which checkpoints and exits"
    if [ -n "$FNS_CHILD" ]; then
        kill -s "$1" "$FNS_CHILD" 2>/dev/null || true
    fi
}

fns_trap_signals() {
    trap 'fns_forward USR1' USR1
    trap 'fns_forward TERM' TERM
}

# Environment for NCCL, torchrun's signal handling and threads. Every value can be preset by the caller.
fns_setup_env() {
    local lead=${SIGNAL_LEAD_S:-120}
    # torchrun (inside accelerate launch) forwards these signals to the training processes ...
    export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
    # ... and waits this long for them to save a checkpoint before it kills them.
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$((lead > 30 ? lead - 15 : lead))}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
    export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # Pick the interface or disable InfiniBand only where the cluster needs it, e.g.
    #   NCCL_SOCKET_IFNAME=ib0  or  NCCL_IB_DISABLE=1
    # DeepSpeed's JIT ops (cpu_adam for offload) build once into this folder; keep it on shared storage.
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
    # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch.
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
        export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
    fi
}

# GPUs per node: $GPUS_PER_NODE, else what SLURM granted, else nvidia-smi, else 1.
fns_gpus_per_node() {
    if [ -n "${GPUS_PER_NODE:-}" ]; then echo "$GPUS_PER_NODE"; return; fi
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "${SLURM_GPUS_ON_NODE##*:}"; return; fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        local n
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        if [ "${n:-0}" -gt 0 ]; then echo "$n"; return; fi
    fi
    echo 1
}

# The rendezvous host: the first node of the allocation.
fns_head_node() {
    scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM allocation}" | head -n 1
}

# A port that differs between jobs sharing a head node (override with MAIN_PORT).
fns_port() {
    echo "${MAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
}

# Run `accelerate launch --config_file $CONFIG ... -m fnscale "$@"` under srun, one launcher per node
# (exec'd, so the srun task is the launcher and receives forwarded signals); waits through signals.
fns_launch() {
    local nnodes=${SLURM_NNODES:-1} gpn
    gpn=$(fns_gpus_per_node)
    export FNS_CONFIG=${CONFIG:?set CONFIG to a launch config, e.g. launch_configs/deepspeed_zero2.yaml}
    export FNS_NNODES=$nnodes FNS_NPROC=$((nnodes * gpn))
    FNS_PORT=$(fns_port)
    FNS_HEAD=127.0.0.1
    if [ "$nnodes" -gt 1 ]; then
        FNS_HEAD=$(fns_head_node)
    fi
    export FNS_PORT FNS_HEAD
    fns_log "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): $nnodes node(s) x $gpn process(es), config $FNS_CONFIG, rendezvous $FNS_HEAD:$FNS_PORT"
    # shellcheck disable=SC2016  # expanded by the bash that srun starts on each node
    fns_run srun --nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
        set -eu
        multi=()
        if [ "$FNS_NNODES" -gt 1 ]; then
            multi=(--machine_rank "$SLURM_NODEID" --main_process_ip "$FNS_HEAD" --rdzv_backend c10d)
        fi
        exec accelerate launch --config_file "$FNS_CONFIG" --num_machines "$FNS_NNODES" --num_processes "$FNS_NPROC" \
            --main_process_port "$FNS_PORT" "${multi[@]}" -m fnscale "$@"' fnscale-launch "$@"
}

# Run a command in the background and wait for it through trapped signals; returns its exit status.
fns_run() {
    "$@" &
    FNS_CHILD=$!
    local rc=0
    while :; do
        rc=0
        wait "$FNS_CHILD" || rc=$?
        # wait returns early (status > 128) when a trapped signal arrives; keep waiting while the step runs.
        kill -0 "$FNS_CHILD" 2>/dev/null || break
    done
    FNS_CHILD=""
    return "$rc"
}

# The value of --output-dir in the given arguments (empty if absent).
fns_output_dir() {
    local prev=""
    for a in "$@"; do
        case "$a" in
            --output-dir=*) echo "${a#--output-dir=}"; return ;;
        esac
        if [ "$prev" = "--output-dir" ]; then echo "$a"; return; fi
        prev=$a
    done
}

# After the step: requeue when a stop signal came and the run did not finish. $1: the step's exit status,
# $2: the output folder (its summary.json, written at the end of a completed training, means done; "" for
# jobs without one). Exits the script.
fns_finish() {
    local rc=$1 out=${2:-}
    if [ "$FNS_STOP" != 1 ]; then
        fns_log "step exited with status $rc"
        exit "$rc"
    fi
    if [ -n "$out" ] && [ -f "$out/summary.json" ] && [ "$(stat -c %Y "$out/summary.json")" -ge "$FNS_START" ]; then
        fns_log "the run finished before the signal took effect; not requeueing"
        exit 0
    fi
    local restarts=${SLURM_RESTART_COUNT:-0} max=${MAX_REQUEUES:-20}
    if [ "$restarts" -ge "$max" ]; then
        fns_log "stopped by a signal after $restarts requeues (MAX_REQUEUES=$max): not requeueing again"
        exit 1
    fi
    fns_log "stopped by a signal (step status $rc): requeueing job ${SLURM_JOB_ID:-?} to resume from the last checkpoint"
    # A pre-empted job (SIGTERM) may already be requeued by SLURM itself; then this fails harmlessly.
    scontrol requeue "${SLURM_JOB_ID:?}" || fns_log "scontrol requeue failed (already requeued by SLURM?)"
    exit 0
}
