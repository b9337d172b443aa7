# shellcheck shell=bash
# The body of train.sbatch and eval.sbatch: one torchrun per node through
# `srun --ntasks-per-node=1 launch/torchrun.sh ...`, with a requeue on a near time limit.
#
# Settings, all optional (export them before sbatch; srun passes the environment on):
#   GRERANK_ENV_SETUP       file each node sources before torchrun (venv, module load)
#   GRERANK_PYTHON          interpreter (default: python3 after GRERANK_ENV_SETUP)
#   GRERANK_NPROC_PER_NODE  processes per node (default: the job's GPUs per node, else 1)
#   GRERANK_RDZV_BACKEND    c10d (default) or static (node ranks follow SLURM_NODEID)
#   MASTER_PORT             rendezvous port (default: 20000 + job id mod 10000, so that jobs
#                           sharing a first node do not collide)
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_DISABLE, NCCL_DEBUG, GLOO_SOCKET_IFNAME, ...
#                           network settings; none is set here, every one set by the user
#                           reaches all ranks (see docs/LAUNCH.md)

# GPUs per node as Slurm reports them; SLURM_GPUS_PER_NODE may carry a type ("a100:8").
slurm_gpus_per_node() {
  local gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
  gpus=${gpus##*:}
  ((gpus > 0)) || gpus=1
  echo "$gpus"
}

print_slurm_usage() { # print_slurm_usage TEMPLATE COMMAND
  cat <<EOF
Usage: sbatch [SBATCH_OPTIONS] launch/slurm/$1 [--] TRAINER_ARGS...
       bash launch/slurm/$1 --dry-run [--] TRAINER_ARGS...

Runs \`grerank $2 TRAINER_ARGS...\` on every node of the allocation: one torchrun per node
(srun --ntasks-per-node=1), $([[ $2 == train ]] && echo "resumed with --resume auto after a requeue, ")rendezvous on the first node.
Override the #SBATCH defaults on the sbatch command line or with SBATCH_* variables, e.g.
  sbatch --nodes=4 --gpus-per-node=8 --partition=PART --time=2-00:00:00 \\
      --output=logs/%x-%j.out launch/slurm/$1 --config configs/cepe7b_nq.yaml
Submit from the repository root, or export GRERANK_ROOT=/path/to/repository.

--dry-run prints the srun command and the command every node runs, for the allocation
described by SLURM_JOB_ID, SLURM_JOB_NODELIST (expanded with scontrol), SLURM_GPUS_ON_NODE
and SLURM_CPUS_PER_TASK, then exits.

Environment: GRERANK_ENV_SETUP, GRERANK_PYTHON, GRERANK_NPROC_PER_NODE, GRERANK_RDZV_BACKEND,
MASTER_PORT, NCCL_* (see launch/slurm/common.sh and docs/LAUNCH.md).
EOF
}

# slurm_main ROOT TEMPLATE COMMAND ARGS... : the whole job script.
slurm_main() {
  local root=$1 template=$2 trainer_command=$3
  shift 3
  LAUNCH_NAME="launch/slurm/$template"
  # shellcheck source=launch/lib.sh
  source "$root/launch/lib.sh"

  if wants_help "$@"; then
    print_slurm_usage "$template" "$trainer_command"
    return 0
  fi
  local dry_run=0
  if [[ ${1:-} == --dry-run ]]; then
    dry_run=1
    shift
  fi
  [[ ${1:-} != -- ]] || shift
  local -a trainer_args=("$@")
  if [[ $trainer_command == train ]]; then
    add_resume_auto ${trainer_args[@]+"${trainer_args[@]}"}
    trainer_args=(${RESUME_ARGS[@]+"${RESUME_ARGS[@]}"})
  fi

  [[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_JOB_NODELIST:-} ]] ||
    launch_die "SLURM_JOB_ID and SLURM_JOB_NODELIST are not set: submit with sbatch, or set them for --dry-run"
  command -v scontrol >/dev/null 2>&1 || launch_die "scontrol not found: run on a Slurm login or compute node"
  local -a hosts
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  ((${#hosts[@]} > 0)) || launch_die "scontrol expanded SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' to no host"
  local nnodes=${#hosts[@]}
  if [[ -n ${SLURM_JOB_NUM_NODES:-} ]] && ((SLURM_JOB_NUM_NODES != nnodes)); then
    launch_die "SLURM_JOB_NUM_NODES=$SLURM_JOB_NUM_NODES but SLURM_JOB_NODELIST names $nnodes host(s)"
  fi
  require_int SLURM_JOB_ID "$SLURM_JOB_ID" 0
  local port=${MASTER_PORT:-$((20000 + 10#$SLURM_JOB_ID % 10000))}
  local nproc=${GRERANK_NPROC_PER_NODE:-$(slurm_gpus_per_node)}
  local cpus=${SLURM_CPUS_PER_TASK:-}

  local -a torchrun_options=(--command "$trainer_command" --nnodes "$nnodes" --nproc-per-node "$nproc"
    --rdzv-backend "${GRERANK_RDZV_BACKEND:-c10d}" --rdzv-endpoint "${hosts[0]}:$port" --rdzv-id "$SLURM_JOB_ID")
  [[ -z $cpus ]] || torchrun_options+=(--cpus-per-node "$cpus")
  # Validates the options exactly as launch/torchrun.sh will on each node.
  parse_torchrun_options "${torchrun_options[@]}" -- ${trainer_args[@]+"${trainer_args[@]}"}

  # srun no longer passes the batch job's --cpus-per-task on to its steps: repeat it.
  local -a srun_command=(srun --nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
  [[ -z $cpus ]] || srun_command+=(--cpus-per-task="$cpus")
  srun_command+=(bash "$root/launch/torchrun.sh" "${torchrun_options[@]}" -- ${trainer_args[@]+"${trainer_args[@]}"})

  printf '# slurm job %s (restart %s): %d node(s): %s\n' \
    "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}" "$nnodes" "${hosts[*]}"
  local name
  for name in $(compgen -e | grep -E '^(NCCL_|GLOO_SOCKET_IFNAME$|TORCH_NCCL_)' || true); do
    printf '# network: %s=%s\n' "$name" "${!name}"
  done
  echo "# the batch shell runs:"
  print_command "${srun_command[@]}"
  echo "# and launch/torchrun.sh runs on each node:"
  print_torchrun_plan "${hosts[@]/#/host }"
  if ((dry_run)); then
    return 0
  fi

  run_srun_with_requeue "${srun_command[@]}"
}

# Ask the step to stop: srun forwards SIGUSR1 to every process of the step, and the trainers
# finish their step, checkpoint and exit 0 (torchrun ignores SIGUSR1, see launch/torchrun.sh).
# SIGTERM would not do: srun answers it by killing the step at once ("forcing job termination"),
# before any checkpoint is written.
stop_step() {
  [[ -z $SRUN_PID ]] || kill -USR1 "$SRUN_PID" 2>/dev/null || true
}

# Run srun in the background so the batch shell can take signals while it runs:
#   SIGUSR1 (sent by `#SBATCH --signal=B:USR1@SECONDS` before the time limit): stop the step as
#     above, wait until the trainers have checkpointed and srun has returned, then requeue the
#     job; the requeued run continues from that checkpoint with --resume auto.
#   SIGTERM (scancel, preemption): stop the step the same way, without requeueing; Slurm requeues
#     preempted --requeue jobs itself.
run_srun_with_requeue() {
  local requeue=0 status
  SRUN_PID=""
  # Traps first: a signal that arrives while srun starts must not kill the batch shell.
  trap 'requeue=1; stop_step' USR1
  trap 'stop_step' TERM
  "$@" &
  SRUN_PID=$!
  # wait returns early whenever a trap runs; bash keeps srun's exit status for the last wait.
  while kill -0 "$SRUN_PID" 2>/dev/null; do
    wait "$SRUN_PID" || true
  done
  wait "$SRUN_PID" && status=0 || status=$?
  trap - USR1 TERM
  if ((requeue)); then
    echo "# time limit near: requeueing job $SLURM_JOB_ID (srun exited with $status)"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  return "$status"
}
