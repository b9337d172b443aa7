# shellcheck shell=bash
# shellcheck disable=SC2034  # the settings assigned here are read by the scripts that source it
# Helpers shared by the launch scripts; sourced, never run on its own.
#
# Every launcher builds each node's command line as a bash array and either runs it or, with
# --dry-run, prints it shell-quoted. Both paths read the same array, so a dry run shows exactly
# what a real run executes.

# `python -m grerank_dist.cli train|eval ...` is the `grerank` console command.
readonly GRERANK_TRAINER_MODULE="grerank_dist.cli"
readonly GRERANK_DEFAULT_PORT=29500

# The interpreter that has grerank_dist, torch and deepspeed; looked up after GRERANK_ENV_SETUP ran.
LAUNCH_PYTHON="${GRERANK_PYTHON:-python3}"

launch_die() {
  printf '%s: error: %s\n' "${LAUNCH_NAME:-launch}" "$*" >&2
  exit 2
}

# Rewrite "--name=value" as "--name" "value" (up to a lone "--") into LAUNCH_ARGV, so the option
# parsers only handle one spelling.
normalize_options() {
  LAUNCH_ARGV=()
  while (($#)); do
    if [[ $1 == -- ]]; then
      LAUNCH_ARGV+=("$@")
      return
    fi
    if [[ $1 == --*=* ]]; then
      LAUNCH_ARGV+=("${1%%=*}" "${1#*=}")
    else
      LAUNCH_ARGV+=("$1")
    fi
    shift
  done
}

# True when -h/--help appears before "--" (trainer arguments may contain their own --help).
wants_help() {
  local arg
  for arg in "$@"; do
    [[ $arg == -- ]] && return 1
    [[ $arg == -h || $arg == --help ]] && return 0
  done
  return 1
}

# need_value "$@": the option in $1 must be followed by a value (not by the next option).
need_value() {
  if (($# < 2)) || [[ $2 == --* ]]; then
    launch_die "option $1 needs a value"
  fi
}

require_int() { # require_int NAME VALUE MIN
  if ! [[ $2 =~ ^[0-9]+$ ]] || ((10#$2 < $3)); then
    launch_die "$1 must be an integer >= $3 (got '$2')"
  fi
}

require_trainer_command() {
  [[ $1 == train || $1 == eval ]] || launch_die "--command must be 'train' or 'eval' (got '$1')"
}

require_endpoint() { # require_endpoint NAME HOST:PORT
  if ! [[ $2 =~ ^[^:[:space:]]+:[0-9]+$ ]]; then
    launch_die "$1 must look like HOST:PORT (got '$2')"
  fi
}

# One shell-quoted line that can be pasted into a shell as is.
print_command() {
  local quoted
  printf -v quoted '%q ' "$@"
  printf '%s\n' "${quoted% }"
}

# GRERANK_ENV_SETUP names a file (venv activate, `module load ...`) sourced once per process tree
# before anything runs; site-specific setup stays out of the scripts.
source_env_setup() {
  [[ -n ${GRERANK_ENV_SETUP:-} && -z ${GRERANK_ENV_SETUP_DONE:-} ]] || return 0
  [[ -f $GRERANK_ENV_SETUP ]] || launch_die "GRERANK_ENV_SETUP=$GRERANK_ENV_SETUP: no such file"
  # Site scripts (module, conda) often read unset variables or return non-zero: relax the strict
  # mode only while they run.
  set +eu
  # shellcheck source=/dev/null
  source "$GRERANK_ENV_SETUP"
  set -eu
  export GRERANK_ENV_SETUP_DONE=1
  LAUNCH_PYTHON="${GRERANK_PYTHON:-python3}"
}

# The dry-run form of source_env_setup: the line each node runs first.
print_env_setup() {
  [[ -z ${GRERANK_ENV_SETUP:-} ]] || print_command source "$GRERANK_ENV_SETUP"
}

# GPUs this node may use: CUDA_VISIBLE_DEVICES when set (Slurm sets it to the allocation),
# otherwise what nvidia-smi lists; 0 on a machine without NVIDIA GPUs.
count_local_gpus() {
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    local -a ids
    IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

# CPU cores one node gives this job: Slurm's per-task count inside an allocation, else nproc.
default_cpus_per_node() {
  echo "${SLURM_CPUS_PER_TASK:-$(nproc)}"
}

# OMP_NUM_THREADS for each process: the user's value, else the node's cores split evenly. The
# DeepSpeed launcher sets nothing and torchrun sets 1; both starve or oversubscribe the CPU ops.
omp_threads_per_process() { # omp_threads_per_process CPUS PROCS
  if [[ -n ${OMP_NUM_THREADS:-} ]]; then
    echo "$OMP_NUM_THREADS"
  else
    local threads=$(($1 / $2))
    echo $((threads > 0 ? threads : 1))
  fi
}

# Prepend "--resume auto" unless the trainer arguments already choose --resume: a requeued or
# restarted training job must continue from its last checkpoint.
add_resume_auto() { # add_resume_auto ARGS... -> RESUME_ARGS
  local arg
  for arg in "$@"; do
    if [[ $arg == --resume || $arg == --resume=* ]]; then
      RESUME_ARGS=("$@")
      return
    fi
  done
  RESUME_ARGS=(--resume auto "$@")
}

# ---------------------------------------------------------------------------------------------
# torchrun: option parsing shared by launch/torchrun.sh and the scheduler templates that call it.
# ---------------------------------------------------------------------------------------------

TORCHRUN_OPTIONS_HELP="Options (each also accepted as --name=value):
  --command train|eval      grerank subcommand (default: train)
  --nnodes N                number of nodes (default: 1)
  --nproc-per-node G        processes per node (default: GPUs visible on this node, else 1)
  --node-rank R             this node's rank, used by --rdzv-backend static
                            (default: \$SLURM_NODEID, else 0)
  --rdzv-backend c10d|static
                            c10d (default) lets the nodes join in any order; static fixes
                            node R's ranks to R*G..R*G+G-1
  --rdzv-endpoint HOST:PORT rendezvous host (the first node) and a free port there; required
                            with --nnodes > 1; without it one node runs --standalone
  --rdzv-id ID              job id shared by all nodes (default: grerank)
  --max-restarts N          worker-group restarts torchrun allows (default: 0)
  --cpus-per-node N         cores per node, split into OMP_NUM_THREADS per process
                            (default: \$SLURM_CPUS_PER_TASK, else nproc); OMP_NUM_THREADS wins
  --dry-run                 print the command of every node and exit
  -h, --help                show this help"

# parse_torchrun_options ARGS... : sets the TR_* settings, DRY_RUN and TRAINER_ARGS.
parse_torchrun_options() {
  TR_COMMAND=train
  TR_NNODES=1
  TR_NPROC=""
  TR_NODE_RANK="${SLURM_NODEID:-0}"
  TR_BACKEND=c10d
  TR_ENDPOINT=""
  TR_ID=grerank
  TR_MAX_RESTARTS=0
  TR_CPUS=""
  DRY_RUN=0
  TRAINER_ARGS=()
  normalize_options "$@"
  set -- ${LAUNCH_ARGV[@]+"${LAUNCH_ARGV[@]}"}
  while (($#)); do
    case $1 in
      --command) need_value "$@"; TR_COMMAND=$2; shift 2 ;;
      --nnodes) need_value "$@"; TR_NNODES=$2; shift 2 ;;
      --nproc-per-node | --nproc_per_node) need_value "$@"; TR_NPROC=$2; shift 2 ;;
      --node-rank | --node_rank) need_value "$@"; TR_NODE_RANK=$2; shift 2 ;;
      --rdzv-backend) need_value "$@"; TR_BACKEND=$2; shift 2 ;;
      --rdzv-endpoint) need_value "$@"; TR_ENDPOINT=$2; shift 2 ;;
      --rdzv-id) need_value "$@"; TR_ID=$2; shift 2 ;;
      --max-restarts) need_value "$@"; TR_MAX_RESTARTS=$2; shift 2 ;;
      --cpus-per-node) need_value "$@"; TR_CPUS=$2; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; TRAINER_ARGS=("$@"); break ;;
      *) launch_die "unknown option '$1' (trainer arguments go after '--'; see --help)" ;;
    esac
  done

  require_trainer_command "$TR_COMMAND"
  require_int --nnodes "$TR_NNODES" 1
  if [[ -z $TR_NPROC ]]; then
    TR_NPROC=$(count_local_gpus)
    ((TR_NPROC > 0)) || TR_NPROC=1
  fi
  require_int --nproc-per-node "$TR_NPROC" 1
  require_int --node-rank "$TR_NODE_RANK" 0
  require_int --max-restarts "$TR_MAX_RESTARTS" 0
  [[ -n $TR_CPUS ]] || TR_CPUS=$(default_cpus_per_node)
  require_int --cpus-per-node "$TR_CPUS" 1
  [[ $TR_BACKEND == c10d || $TR_BACKEND == static ]] ||
    launch_die "--rdzv-backend must be 'c10d' or 'static' (got '$TR_BACKEND')"
  if [[ -n $TR_ENDPOINT ]]; then
    require_endpoint --rdzv-endpoint "$TR_ENDPOINT"
  elif ((TR_NNODES > 1)); then
    launch_die "--rdzv-endpoint HOST:PORT is required with --nnodes $TR_NNODES"
  fi
  if [[ $TR_BACKEND == static ]] && ((10#$TR_NODE_RANK >= 10#$TR_NNODES)); then
    launch_die "--node-rank $TR_NODE_RANK is out of range for --nnodes $TR_NNODES"
  fi
  TR_OMP_THREADS=$(omp_threads_per_process "$TR_CPUS" "$TR_NPROC")
}

# torchrun_node_command NODE_RANK : the command node NODE_RANK runs, into NODE_COMMAND.
torchrun_node_command() {
  NODE_COMMAND=(env "OMP_NUM_THREADS=$TR_OMP_THREADS" "$LAUNCH_PYTHON" -m torch.distributed.run
    --nnodes "$TR_NNODES" --nproc-per-node "$TR_NPROC")
  if [[ -z $TR_ENDPOINT ]]; then
    NODE_COMMAND+=(--standalone)
  else
    NODE_COMMAND+=(--rdzv-backend "$TR_BACKEND" --rdzv-endpoint "$TR_ENDPOINT" --rdzv-id "$TR_ID")
    [[ $TR_BACKEND != static ]] || NODE_COMMAND+=(--node-rank "$1")
  fi
  NODE_COMMAND+=(--max-restarts "$TR_MAX_RESTARTS" -m "$GRERANK_TRAINER_MODULE" "$TR_COMMAND"
    ${TRAINER_ARGS[@]+"${TRAINER_ARGS[@]}"})
}

# print_node_header INDEX COUNT PROCS [WHERE] : the rank block of one node.
print_node_header() {
  local first=$(($1 * $3)) world=$(($2 * $3)) where=""
  [[ -z ${4:-} ]] || where=" ($4)"
  printf '# node %d of %d%s: global ranks %d-%d, world size %d\n' \
    "$1" "$2" "$where" "$first" $((first + $3 - 1)) "$world"
}

# print_torchrun_plan [LABEL...] : header, then every node's command; LABEL i names node i.
print_torchrun_plan() {
  local world=$((TR_NNODES * TR_NPROC)) node
  local -a labels=("$@")
  if [[ -z $TR_ENDPOINT ]]; then
    printf '# plan: 1 node x %d processes, world size %d, standalone rendezvous\n' "$TR_NPROC" "$world"
  else
    printf '# plan: %d node(s) x %d processes, world size %d, %s rendezvous at %s (id %s)\n' \
      "$TR_NNODES" "$TR_NPROC" "$world" "$TR_BACKEND" "$TR_ENDPOINT" "$TR_ID"
  fi
  if [[ $TR_BACKEND == c10d ]] && ((TR_NNODES > 1)); then
    echo "# c10d numbers the nodes as they join: each node gets one block of $TR_NPROC consecutive ranks"
  fi
  for ((node = 0; node < TR_NNODES; node++)); do
    print_node_header "$node" "$TR_NNODES" "$TR_NPROC" "${labels[node]:-}"
    print_env_setup
    torchrun_node_command "$node"
    print_command "${NODE_COMMAND[@]}"
  done
}
