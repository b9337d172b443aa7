#!/usr/bin/env bash
# Start grerank training or evaluation on this node through torchrun (torch.distributed.run).
# Run it once per node; torchrun starts the node's processes and sets RANK, WORLD_SIZE,
# LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each of them.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAUNCH_NAME="launch/torchrun.sh"
# shellcheck source=launch/lib.sh
source "$LAUNCH_DIR/lib.sh"

usage() {
  cat <<EOF
Usage: launch/torchrun.sh [OPTIONS] -- TRAINER_ARGS...

Runs \`grerank COMMAND TRAINER_ARGS...\` under torchrun on this node. Start it on every node
with the same options (only --node-rank differs, and only for --rdzv-backend static).

$TORCHRUN_OPTIONS_HELP

Environment:
  GRERANK_ENV_SETUP   file sourced first (venv activate, module load ...)
  GRERANK_PYTHON      interpreter to run (default: python3 after GRERANK_ENV_SETUP)
  OMP_NUM_THREADS     threads per process (default: cores / processes per node)
  NCCL_*, GLOO_SOCKET_IFNAME
                      passed through untouched (network interface, InfiniBand settings)

Examples:
  # two CPU processes on this machine
  launch/torchrun.sh --nproc-per-node 2 -- --config configs/tiny_cpu.yaml
  # node 0 of 2, 8 GPUs each (run the same line on the other node)
  launch/torchrun.sh --nnodes 2 --nproc-per-node 8 --rdzv-endpoint node0:29500 \\
      --rdzv-id run1 -- --config configs/cepe7b_nq.yaml --resume auto
EOF
}

if wants_help "$@"; then
  usage
  exit 0
fi
parse_torchrun_options "$@"

if ((DRY_RUN)); then
  # shellcheck disable=SC2119  # node labels are optional: torchrun.sh does not know host names
  print_torchrun_plan
  exit 0
fi

source_env_setup
torchrun_node_command "$TR_NODE_RANK"
# exec: the scheduler's signals (SIGTERM before a time limit or preemption) reach torchrun,
# which forwards them to the trainer processes.
# SIGUSR1 (`scancel --signal=USR1`, `sbatch --signal=USR1@SECONDS`) goes to every process of the
# step; torchrun has no handler for it and would die, and srun would then kill the trainers
# before they checkpoint. Ignored here, it stays ignored in torchrun; the trainer installs its
# own handler and checkpoints.
trap '' USR1
exec "${NODE_COMMAND[@]}"
