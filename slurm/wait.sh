# Sourced by slurm/common.sh and slurm/launch_node.sh.
#
# wait_for PID: wait until PID has exited and return its exit code. A plain `wait` returns early
# (with 128+signal) whenever a trapped signal arrives, which is exactly when these scripts are
# forwarding USR1/TERM and must keep waiting for the checkpoint to be written.
wait_for() {
  local rc
  while true; do
    wait "$1"
    rc=$?
    kill -0 "$1" 2>/dev/null || return "$rc"
  done
}
