# Sourced by slurm/train.sbatch and slurm/train_multinode.sbatch, in the batch shell (first node),
# with the script's arguments: [CONFIG] [key.path=value ...].
# Inputs (environment): DEFAULT_CONFIG, DEFAULT_RUN_DIR (from the script), and optionally CONFIG,
# RUN_DIR, OVERRIDES, CPU_PROCS_PER_NODE, HEAD_ADDR, HEAD_PORT.
set -uo pipefail

DIST_MTL_HOME=${DIST_MTL_HOME:-$SLURM_SUBMIT_DIR}
source "$DIST_MTL_HOME/slurm/lib.sh"
script=${script:-slurm/common.sh}  # which batch script, for messages (SLURM runs a copy of it)
[ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ] ||
  die "$script runs inside a SLURM job: submit it with sbatch"

# What to train. Arguments are the primary form; the environment variables still work:
# - the config: the first argument, unless it is key=value; else CONFIG; else DEFAULT_CONFIG. An
#   argument and CONFIG naming different files is an error (which one did the user mean?);
# - overrides: the words of OVERRIDES, then the arguments; the later wins for the same key, so the
#   command line beats the environment;
# - the run directory: RUN_DIR or an output_dir= override (they must agree), else DEFAULT_RUN_DIR.
# A requeued job runs the script again with the same arguments and environment.
usage="usage: sbatch [sbatch options] $script [CONFIG.yaml] [key.path=value ...]"
config_arg=""
if [ $# -gt 0 ] && ! is_override "$1"; then
  config_arg=$1
  shift
fi
[ -z "$config_arg" ] || [ -z "${CONFIG:-}" ] || [ "$(realpath -m -- "$config_arg")" = "$(realpath -m -- "$CONFIG")" ] ||
  die "$script: the argument $config_arg and CONFIG=$CONFIG name different config files; give one of them"
CONFIG=${config_arg:-${CONFIG:-$DEFAULT_CONFIG}}
read -r -a overrides <<<"${OVERRIDES:-}"  # words, not globbed (log.tags=[a,b] stays as written)
# ${a[@]+"${a[@]}"}: an empty array under set -u, which bash < 4.4 (CentOS 7) calls unbound
for word in ${overrides[@]+"${overrides[@]}"}; do
  is_override "$word" || die "$script: OVERRIDES holds '$word', which is not key.path=value; $usage"
done
for word in "$@"; do
  is_override "$word" || die "$script: the argument '$word' is not key.path=value" \
    "(only the first argument may be the config file); $usage"
done
overrides+=("$@")
[ -e "$CONFIG" ] || die "$script: the config file $CONFIG does not exist" \
  "(relative paths are from the submit directory, $PWD); $usage"
[ -f "$CONFIG" ] || die "$script: the config $CONFIG is not a file; $usage"
for word in ${overrides[@]+"${overrides[@]}"}; do
  [[ $word == output_dir=* ]] || continue
  [ -z "${RUN_DIR:-}" ] || [ "$(realpath -m -- "$RUN_DIR")" = "$(realpath -m -- "${word#output_dir=}")" ] ||
    die "$script: RUN_DIR=$RUN_DIR and the override $word name different run directories; give one of them"
  RUN_DIR=${word#output_dir=}
done
RUN_DIR=${RUN_DIR:-$DEFAULT_RUN_DIR}
[ -n "$RUN_DIR" ] || die "$script: the run directory (RUN_DIR, output_dir=) is empty"

# The head node: the allocation's first host, where this batch shell runs. Its address is the one
# SLURM reaches it at (its NodeAddr), unless HEAD_ADDR says. Without scontrol (some containers),
# launch_node.sh takes the address srun was started from, which is this node's.
HEAD_NODE=$(first_host "$SLURM_JOB_NODELIST")
if [ -z "${HEAD_ADDR:-}" ] && command -v scontrol >/dev/null; then
  HEAD_ADDR=$(scontrol show node "$HEAD_NODE" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
fi
HEAD_ADDR=${HEAD_ADDR:-}
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
export NUM_NODES=$SLURM_JOB_NUM_NODES NUM_PROCESSES=$((SLURM_JOB_NUM_NODES * PROCS_PER_NODE)) HEAD_NODE HEAD_ADDR HEAD_PORT
GROUP=${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}  # W&B group: the job (an array's tasks share one)

mkdir -p "$RUN_DIR/logs"
echo "[$(date +%T)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NUM_NODES node(s) x $PROCS_PER_NODE" \
     "process(es), head ${HEAD_ADDR:-$HEAD_NODE (no scontrol: the address srun reports)}:$HEAD_PORT, logs in $RUN_DIR/logs/"

# Preemption: SLURM signals this shell (--signal=B:USR1@<secs>); srun forwards the signal to each
# node's launch_node.sh, which hands it to the training processes. They checkpoint, rank 0
# requeues the job, and all exit 3. SIGTERM (time limit, scancel) is forwarded the same way.
forward() { echo "[$(date +%T)] batch script: $1 -> srun"; kill "-$1" "$srun_pid" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM

srun --nodes "$NUM_NODES" --ntasks-per-node 1 --kill-on-bad-exit=1 --open-mode=append \
     --output "$RUN_DIR/logs/%j-node%n.out" \
     "$DIST_MTL_HOME/slurm/launch_node.sh" "$CONFIG" "output_dir=$RUN_DIR" "log.group=$GROUP" ${overrides[@]+"${overrides[@]}"} &
srun_pid=$!
source "$DIST_MTL_HOME/slurm/wait.sh"
wait_for "$srun_pid"
rc=$?
echo "[$(date +%T)] job $SLURM_JOB_ID: training exited with $rc"
exit "$rc"
