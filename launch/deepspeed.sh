#!/usr/bin/env bash
# Start grerank training or evaluation on one or many nodes through DeepSpeed's launcher
# (the `deepspeed` command), which reaches the other hosts of a hostfile over ssh (pdsh).
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAUNCH_NAME="launch/deepspeed.sh"
# shellcheck source=launch/lib.sh
source "$LAUNCH_DIR/lib.sh"

usage() {
  cat <<EOF
Usage: launch/deepspeed.sh [OPTIONS] -- TRAINER_ARGS...

Runs \`grerank COMMAND TRAINER_ARGS...\` on every node of a DeepSpeed hostfile (or on this
machine without one). Start it once, on the first node; DeepSpeed sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each process (--no_local_rank: the trainer reads
LOCAL_RANK from the environment).

Options (each also accepted as --name=value):
  --command train|eval   grerank subcommand (default: train)
  --hostfile FILE        DeepSpeed hostfile, lines "HOST slots=N" (see launch/hostfile.example);
                         without it the job runs on this machine only
  --num-nodes N          use the first N hosts of the hostfile (default: all)
  --num-gpus G           processes per node (default: every slot/GPU; on a machine without
                         GPUs 1, because DeepSpeed would otherwise start one per NUMA node)
  --include SPEC         DeepSpeed's host/slot filter, e.g. "worker-0@worker-1:0,2"
  --exclude SPEC         the opposite filter; neither combines with --num-nodes/--num-gpus
  --master-addr ADDR     address of the first node (default: first active host; 127.0.0.1
                         without a hostfile)
  --master-port PORT     free port on that node (default: $GRERANK_DEFAULT_PORT)
  --cpus-per-node N      cores per node, split into OMP_NUM_THREADS per process
                         (default: nproc here); an exported OMP_NUM_THREADS wins
  --dry-run              print the launcher command and what runs on each node, then exit
  -h, --help             show this help

Environment:
  GRERANK_ENV_SETUP      file sourced first here and, through --venv_script, on every remote node
  GRERANK_PYTHON         interpreter with DeepSpeed (default: python3 after GRERANK_ENV_SETUP)
  DS_ENV_FILE            DeepSpeed's file of extra variables for remote nodes (default
                         .deepspeed_env in ~ and .); its lines are kept, OMP_NUM_THREADS added
  NCCL_*                 exported to remote nodes by DeepSpeed itself on CUDA machines

Examples:
  # two CPU processes on this machine
  launch/deepspeed.sh --num-gpus 2 -- --config configs/tiny_cpu.yaml
  # every host of a hostfile, 8 GPUs each
  launch/deepspeed.sh --hostfile launch/hostfile.example --num-gpus 8 -- \\
      --config configs/cepe7b_nq.yaml --resume auto
EOF
}

if wants_help "$@"; then
  usage
  exit 0
fi

trainer_command=train
hostfile=""
num_nodes=""
num_gpus=""
include=""
exclude=""
master_addr=""
master_port=$GRERANK_DEFAULT_PORT
cpus_per_node=""
DRY_RUN=0
TRAINER_ARGS=()
normalize_options "$@"
set -- ${LAUNCH_ARGV[@]+"${LAUNCH_ARGV[@]}"}
while (($#)); do
  case $1 in
    --command) need_value "$@"; trainer_command=$2; shift 2 ;;
    --hostfile) need_value "$@"; hostfile=$2; shift 2 ;;
    --num-nodes | --num_nodes) need_value "$@"; num_nodes=$2; shift 2 ;;
    --num-gpus | --num_gpus) need_value "$@"; num_gpus=$2; shift 2 ;;
    --include) need_value "$@"; include=$2; shift 2 ;;
    --exclude) need_value "$@"; exclude=$2; shift 2 ;;
    --master-addr | --master_addr) need_value "$@"; master_addr=$2; shift 2 ;;
    --master-port | --master_port) need_value "$@"; master_port=$2; shift 2 ;;
    --cpus-per-node) need_value "$@"; cpus_per_node=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; TRAINER_ARGS=("$@"); break ;;
    *) launch_die "unknown option '$1' (trainer arguments go after '--'; see --help)" ;;
  esac
done

require_trainer_command "$trainer_command"
require_int --master-port "$master_port" 1
[[ -z $num_nodes ]] || require_int --num-nodes "$num_nodes" 1
[[ -z $num_gpus ]] || require_int --num-gpus "$num_gpus" 1
[[ -n $cpus_per_node ]] || cpus_per_node=$(default_cpus_per_node)
require_int --cpus-per-node "$cpus_per_node" 1
[[ -z $hostfile || -f $hostfile ]] || launch_die "--hostfile $hostfile: no such file"
if [[ -n $include || -n $exclude ]]; then
  [[ -z $include || -z $exclude ]] || launch_die "--include and --exclude cannot be combined"
  [[ -z $num_nodes && -z $num_gpus ]] ||
    launch_die "--include/--exclude cannot be combined with --num-nodes/--num-gpus (DeepSpeed rejects it)"
  [[ -n $hostfile ]] || launch_die "--include/--exclude need --hostfile (they name its hosts and slots)"
fi
# Without GPUs DeepSpeed counts NUMA nodes as devices: say how many processes to start.
if [[ -z $num_gpus && -z $include && -z $exclude ]] && (($(count_local_gpus) == 0)); then
  num_gpus=1
fi

runner_args=()
[[ -z $hostfile ]] || runner_args+=(--hostfile "$hostfile")
[[ -z $include ]] || runner_args+=(--include "$include")
[[ -z $exclude ]] || runner_args+=(--exclude "$exclude")
[[ -z $num_nodes ]] || runner_args+=(--num_nodes "$num_nodes")
[[ -z $num_gpus ]] || runner_args+=(--num_gpus "$num_gpus")
runner_args+=(--master_port "$master_port")
[[ -z $master_addr ]] || runner_args+=(--master_addr "$master_addr")
trainer_tail=(--module --no_local_rank "$GRERANK_TRAINER_MODULE" "$trainer_command"
  ${TRAINER_ARGS[@]+"${TRAINER_ARGS[@]}"})

# The plan needs DeepSpeed's Python, so the environment hook runs even for a dry run. Its first
# line is "MASTER_HOST MAX_SLOTS NUM_NODES", the rest describes each node.
source_env_setup
plan_lines=()
mapfile -t plan_lines < <("$LAUNCH_PYTHON" "$LAUNCH_DIR/deepspeed_plan.py" "${runner_args[@]}" "${trainer_tail[@]}")
((${#plan_lines[@]} > 1)) || launch_die "could not resolve the hosts (see the message above)"
read -r planned_master max_slots active_nodes <<<"${plan_lines[0]}"
if [[ -z $master_addr ]]; then
  master_addr=$planned_master
  runner_args+=(--master_addr "$master_addr")
fi
if ((active_nodes > 1)) && [[ -n ${GRERANK_ENV_SETUP:-} ]]; then
  runner_args+=(--venv_script "$GRERANK_ENV_SETUP")
fi
omp_threads=$(omp_threads_per_process "$cpus_per_node" "$max_slots")

# DeepSpeed exports only a few variable prefixes to remote nodes; OMP_NUM_THREADS goes through
# a DS_ENV_FILE that also keeps the lines of the user's own .deepspeed_env.
remote_env_lines() {
  echo "OMP_NUM_THREADS=$omp_threads"
  local name=${DS_ENV_FILE:-.deepspeed_env} dir file
  for dir in "$HOME" .; do
    if [[ $name == /* ]]; then file=$name; else file=$dir/$name; fi
    [[ ! -f $file ]] || grep -v '^[[:space:]]*$' "$file" || true
  done
}

launch_env=(env "OMP_NUM_THREADS=$omp_threads")
env_file_template="${TMPDIR:-/tmp}/grerank-ds-env.XXXXXX"
env_file=""
if ((active_nodes > 1)); then
  if ((DRY_RUN)); then
    env_file=$env_file_template
  else
    env_file=$(mktemp "$env_file_template")
    trap 'rm -f "$env_file"' EXIT
    remote_env_lines >"$env_file"
  fi
  launch_env+=("DS_ENV_FILE=$env_file")
fi
command=("${launch_env[@]}" "$LAUNCH_PYTHON" -m deepspeed.launcher.runner "${runner_args[@]}" "${trainer_tail[@]}")

if ((DRY_RUN)); then
  echo "# the launch node runs:"
  print_env_setup
  print_command "${command[@]}"
  if [[ -n $env_file ]]; then
    echo "# DS_ENV_FILE is a temporary file holding:"
    remote_env_lines | sed 's/^/#   /'
  fi
  echo "# and DeepSpeed starts on each node:"
  printf '%s\n' "${plan_lines[@]:1}"
  exit 0
fi

if [[ -n $env_file ]]; then
  "${command[@]}" # not exec: the EXIT trap removes the temporary DS_ENV_FILE afterwards
else
  exec "${command[@]}"
fi
