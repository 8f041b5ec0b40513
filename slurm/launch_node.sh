#!/usr/bin/env bash
# One node's launcher, started by `srun` (one task per node) from slurm/common.sh.
#
# Why a wrapper: a SIGUSR1 that reaches the torchrun agent (inside `accelerate launch`) kills it,
# and with it the workers, before they can checkpoint. So the agent runs with SIGUSR1 ignored, and
# this shell, which srun forwards the signal to, hands it to the agent's children: the training
# processes, which catch it, checkpoint together and exit 3.
# The first node hosts the c10d rendezvous store, said explicitly: torch would guess it from the
# address, and nodes that share an address (or NAT) would all try to host it.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
# No head address from common.sh (no scontrol there): srun was started on the head node, and
# SLURM_LAUNCH_NODE_IPADDR is its address; the head node's name is the last resort.
HEAD_ADDR=${HEAD_ADDR:-${SLURM_LAUNCH_NODE_IPADDR:-$HEAD_NODE}}

if [ "$NUM_PROCESSES" -gt 1 ]; then
  launcher=(python -m accelerate.commands.launch --multi_gpu
            --num_machines "$NUM_NODES" --num_processes "$NUM_PROCESSES" --machine_rank "$SLURM_NODEID"
            --main_process_ip "$HEAD_ADDR" --main_process_port "$HEAD_PORT" --rdzv_backend c10d
            --rdzv_conf "is_host=$([ "$SLURM_NODEID" = 0 ] && echo 1 || echo 0)"
            --max_restarts 0 --mixed_precision no --dynamo_backend no)
else
  launcher=(python)  # one process in all: no launcher, no process group
fi
echo "[$(date +%T)] node $SLURM_NODEID (${HOSTNAME:-?}): ${launcher[*]} -m dist_mtl train $*"

forward() {
  echo "[$(date +%T)] node $SLURM_NODEID: $1 -> training processes"
  if [ "$NUM_PROCESSES" -gt 1 ]; then
    signal_children "$1" "$agent"  # the agent's children: the workers
  else  # no agent: the worker itself (not its children, such as W&B's service process)
    kill "-$1" "$agent" 2>/dev/null || true
  fi
}
(trap '' USR1; exec "${launcher[@]}" -m dist_mtl train "$@") &
agent=$!
trap 'forward USR1' USR1
trap 'forward TERM' TERM

source "$(dirname "$0")/wait.sh"
wait_for "$agent"
rc=$?
echo "[$(date +%T)] node $SLURM_NODEID: launcher exited with $rc"
exit "$rc"
