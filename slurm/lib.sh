# Functions for slurm/common.sh and slurm/launch_node.sh (sourced; defines nothing else).
#
# They use bash and coreutils only: the scripts may run inside a container (enroot/pyxis,
# Apptainer) that has neither SLURM's client tools (scontrol) nor procps (pkill).

# die MESSAGE: one line on stderr, exit 2 (bad usage, as the CLI's), before anything trains.
die() {
  echo "dist-mtl: error: $*" >&2
  exit 2
}

# is_override WORD: whether WORD is a key.path=value override. A '/' before the first '=' makes
# it a path (configs/lr=0.1.yaml), not an override.
is_override() {
  [[ $1 =~ ^[^=/]+= ]]
}

# first_host NODELIST: the first host of a SLURM node list, as `scontrol show hostnames` would
# list it first, without scontrol: n[1-2] -> n1, a,b -> a, gpu[01-04,07] -> gpu01,
# r[1-2]-n[3-4] -> r1-n3. In a bracket the first item's first number is the first host's, zero
# padding kept; a ',' outside brackets ends the first host.
first_host() {
  local list=$1 host="" c i inside=0 skip=0
  for ((i = 0; i < ${#list}; i++)); do
    c=${list:i:1}
    if ((inside)); then
      case $c in
        "]") inside=0 skip=0 ;;
        ,|-) skip=1 ;;
        *) ((skip)) || host+=$c ;;
      esac
    else
      case $c in
        ,) break ;;
        "[") inside=1 ;;
        *) host+=$c ;;
      esac
    fi
  done
  printf '%s\n' "$host"
}

# signal_children SIGNAL PID: send SIGNAL to PID's child processes. pkill where there is one,
# else the parent pids in /proc: without procps the preemption warning would otherwise never reach
# the training processes, and the job would end without its checkpoint.
signal_children() {
  if command -v pkill >/dev/null; then
    pkill "-$1" -P "$2" 2>/dev/null
    return 0
  fi
  local status key value pid
  for status in /proc/[0-9]*/status; do
    pid=${status#/proc/} pid=${pid%/status}
    while read -r key value; do
      if [ "$key" = PPid: ]; then
        [ "$value" = "$2" ] && kill "-$1" "$pid" 2>/dev/null
        break
      fi
    done 2>/dev/null <"$status"  # a process that has just ended is skipped
  done
  return 0
}
