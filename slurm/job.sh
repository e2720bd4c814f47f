# xdrec's Slurm job body, sourced by slurm/train.sbatch and slurm/multinode.sbatch (one copy of
# the logic; the two scripts differ only in their #SBATCH defaults). Not meant to run alone.
#
# Process model: srun starts one task per GPU (per CPU process with XDREC_DEVICE=cpu); each task
# maps SLURM_PROCID -> RANK, SLURM_LOCALID -> LOCAL_RANK, SLURM_STEP_NUM_TASKS -> WORLD_SIZE
# (launch/env.py). Slurm then owns every rank: it delivers signals to each of them, accounts
# and cleans up each process, and one failing rank stops the step (--kill-on-bad-exit) instead
# of leaving the others hanging in a collective. The same line serves 1 or N nodes.
#
# Knobs (environment, exported to the job by sbatch):
#   XDREC_DEVICE=gpu|cpu   cpu: DeepSpeed on the CPU with gloo (testing on a CPU cluster)
#   XDREC_VENV=path        virtual environment to activate (default <repo>/.venv if it exists)
#   XDREC_RESUME=never|auto  first start of the job (a requeued or restarted job always resumes)
#   XDREC_MAX_RESTARTS=N   requeue after a preemption at most N times (default 20)
#   MASTER_PORT            default: 20000 + job id mod 20000
# Preemption: SIGUSR1 (from `#SBATCH --signal=B:USR1@<s>` or `scancel --signal=USR1 --batch`)
# reaches this shell, which forwards it to srun and so to every rank; the trainer writes a
# resume checkpoint at the next optimizer step, exits 75, and this script requeues the job.

xdrec_env() {
    # MASTER_ADDR: the first host of the allocation; every node resolves the same name.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
    case ${XDREC_DEVICE:-gpu} in
        cpu) export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" ;;
        gpu) ;;
        *) echo "xdrec job: XDREC_DEVICE=${XDREC_DEVICE} is not gpu or cpu" >&2; return 2 ;;
    esac
}

xdrec_job() {
    local home=${XDREC_HOME:-$SLURM_SUBMIT_DIR}
    cd "$home" || return 2
    local venv=${XDREC_VENV:-$home/.venv}
    if [[ -f $venv/bin/activate ]]; then
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
    fi
    command -v xdrec >/dev/null || { echo "xdrec job: no xdrec on PATH (make setup, or set XDREC_VENV)" >&2; return 2; }
    (($# >= 1)) || { echo "usage: sbatch slurm/<script>.sbatch configs/experiment/<x>.yaml [key=value ...]" >&2; return 2; }
    xdrec_env || return 2

    local restarts=${SLURM_RESTART_COUNT:-0} resume=${XDREC_RESUME:-never}
    ((restarts > 0)) && resume=auto
    echo "xdrec job $SLURM_JOB_ID (restart $restarts) on $SLURM_JOB_NUM_NODES node(s), $SLURM_NTASKS task(s);" \
        "MASTER $MASTER_ADDR:$MASTER_PORT; device ${XDREC_DEVICE:-gpu}; resume $resume; $(date -Is)"

    local pid caught rc
    trap 'caught=1; echo "xdrec job: SIGUSR1 at $(date -Is), forwarding to the ranks"; kill -USR1 "$pid" 2>/dev/null' USR1
    srun --kill-on-bad-exit=1 xdrec train "$@" --resume "$resume" &
    pid=$!
    # `wait` returns early when the trap runs; wait again until srun itself has exited.
    while :; do
        caught=0
        wait "$pid" && rc=0 || rc=$?
        ((caught)) || break
    done
    trap - USR1
    echo "xdrec job: srun exited $rc at $(date -Is)"
    if ((rc == 75)); then
        if ((restarts >= ${XDREC_MAX_RESTARTS:-20})); then
            echo "xdrec job: preempted after $restarts restarts (XDREC_MAX_RESTARTS); not requeueing" >&2
            return 75
        fi
        echo "xdrec job: checkpoint written; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || return 75
        sleep 30  # scontrol requeue ends this batch step; do not report an exit status before it does
        return 0
    fi
    return "$rc"
}
