# Sourced by slurm/train.sbatch and slurm/train_multinode.sbatch, in the batch shell (first node).
# Inputs (environment): CONFIG, RUN_DIR, and optionally OVERRIDES, CPU_PROCS_PER_NODE, HEAD_PORT.
set -uo pipefail

: "${CONFIG:?set CONFIG, the dist-mtl config file}"
: "${RUN_DIR:?set RUN_DIR, the output_dir of the run}"
OVERRIDES=${OVERRIDES:-}
DIST_MTL_HOME=${DIST_MTL_HOME:-$SLURM_SUBMIT_DIR}

# The head node's address: the first host of the allocation, as SLURM reaches it (NodeAddr).
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(scontrol show node "$head_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
HEAD_ADDR=${HEAD_ADDR:-$head_node}
# A port from the job id, so two jobs sharing a node do not collide.
HEAD_PORT=${HEAD_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# Processes per node: the node's GPUs, or on a CPU-only cluster CPU_PROCS_PER_NODE (default 1).
if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" -gt 0 ]; then
  PROCS_PER_NODE=$SLURM_GPUS_ON_NODE
elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  PROCS_PER_NODE=$(nvidia-smi -L | wc -l)
else
  PROCS_PER_NODE=${CPU_PROCS_PER_NODE:-1}
  threads=$(( ${SLURM_CPUS_ON_NODE:-1} / PROCS_PER_NODE ))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}  # share the node's cores
fi
export NUM_NODES=$SLURM_JOB_NUM_NODES NUM_PROCESSES=$((SLURM_JOB_NUM_NODES * PROCS_PER_NODE)) HEAD_ADDR HEAD_PORT
GROUP=${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}  # W&B group: the job (an array's tasks share one)

mkdir -p "$RUN_DIR/logs"
echo "[$(date +%T)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NUM_NODES node(s) x $PROCS_PER_NODE" \
     "process(es), head $HEAD_ADDR:$HEAD_PORT, logs in $RUN_DIR/logs/"

# Preemption: SLURM signals this shell (--signal=B:USR1@<secs>); srun forwards the signal to each
# node's launch_node.sh, which hands it to the training processes. They checkpoint, rank 0
# requeues the job, and all exit 3. SIGTERM (time limit, scancel) is forwarded the same way.
forward() { echo "[$(date +%T)] batch script: $1 -> srun"; kill "-$1" "$srun_pid" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# OVERRIDES is a list of key=value words: left unquoted on purpose.
srun --nodes "$NUM_NODES" --ntasks-per-node 1 --kill-on-bad-exit=1 --open-mode=append \
     --output "$RUN_DIR/logs/%j-node%n.out" \
     "$DIST_MTL_HOME/slurm/launch_node.sh" "$CONFIG" "output_dir=$RUN_DIR" "log.group=$GROUP" $OVERRIDES &
srun_pid=$!
source "$DIST_MTL_HOME/slurm/wait.sh"
wait_for "$srun_pid"
rc=$?
echo "[$(date +%T)] job $SLURM_JOB_ID: training exited with $rc"
exit "$rc"
