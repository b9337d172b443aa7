#!/usr/bin/env bash
# Fill launch/k8s/pytorchjob.yaml for one run and print the manifest (pipe it to
# `kubectl apply -f -`), or, with --dry-run, print the command every pod will run.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAUNCH_NAME="launch/k8s/render.sh"
TEMPLATE="$LAUNCH_DIR/k8s/pytorchjob.yaml"
# shellcheck source=launch/lib.sh
source "$LAUNCH_DIR/lib.sh"

# Variables of the rendering shell copied into every container: the network and thread
# settings, and the environment hook the pods' launch/torchrun.sh sources.
readonly FORWARDED_ENV='^(NCCL_[A-Z0-9_]+|TORCH_NCCL_[A-Z0-9_]+|GLOO_SOCKET_IFNAME|OMP_NUM_THREADS|GRERANK_ENV_SETUP|GRERANK_PYTHON)$'

usage() {
  cat <<EOF
Usage: launch/k8s/render.sh [OPTIONS] -- TRAINER_ARGS... > job.yaml

Renders a Kubeflow PyTorchJob (training operator v1) that runs \`grerank COMMAND TRAINER_ARGS...\`
on NODES pods, one launch/torchrun.sh each, rendezvous on pod NAME-worker-0.
A train job gets --resume auto unless TRAINER_ARGS choose --resume: a recreated pod continues
from the last checkpoint in the shared volume.

Required:
  --image IMAGE          container image with the repository and its Python environment
  --workdir DIR          the repository's path inside the image
  --pvc CLAIM            PersistentVolumeClaim shared by all pods (data, checkpoints)
  --mount DIR            where the claim is mounted (point the config's paths there)
Options (each also accepted as --name=value):
  --command train|eval   grerank subcommand (default: train)
  --name NAME            job name, a DNS label (default: grerank-COMMAND)
  --namespace NS         (default: default)
  --nodes N              pods, one per node (default: 1)
  --gpus-per-node G      GPUs and processes per pod (default: 8)
  --cpus-per-node C      CPU cores per pod, split into OMP_NUM_THREADS (default: 32)
  --memory Q             memory per pod (default: 256Gi)
  --shm-size Q           /dev/shm per pod (default: 64Gi)
  --port P               rendezvous port (default: $GRERANK_DEFAULT_PORT)
  --time SECONDS         activeDeadlineSeconds (default: 86400)
  --backoff-limit N      pod restarts before the job fails (default: 3)
  --dry-run              print the command each pod runs instead of the manifest
  -h, --help             show this help

Copied from this shell into every pod when set: NCCL_*, TORCH_NCCL_*, GLOO_SOCKET_IFNAME,
OMP_NUM_THREADS, GRERANK_ENV_SETUP, GRERANK_PYTHON.

Example:
  NCCL_SOCKET_IFNAME=eth0 launch/k8s/render.sh --image REGISTRY/grerank:TAG --workdir /app \\
      --pvc grerank-data --mount /data --nodes 2 -- --config configs/cepe7b_nq.yaml | kubectl apply -f -
EOF
}

# A double-quoted YAML scalar. Kubernetes expands $(VAR) in args and env values; $$( keeps a
# literal "$(".
yaml_string() {
  local value=$1
  [[ $value != *[[:cntrl:]]* ]] || launch_die "a value contains a control character: '$value'"
  value=${value//\\/\\\\}
  value=${value//\"/\\\"}
  value=${value//\$(/\$\$(}
  printf '"%s"' "$value"
}

require_match() { # require_match OPTION VALUE REGEX WHAT
  [[ $2 =~ $3 ]] || launch_die "$1 must be $4 (got '$2')"
}

if wants_help "$@"; then
  usage
  exit 0
fi

trainer_command=train
name=""
namespace=default
image=""
workdir=""
pvc=""
mount=""
nodes=1
gpus=8
cpus=32
memory=256Gi
shm_size=64Gi
port=$GRERANK_DEFAULT_PORT
deadline=86400
backoff_limit=3
dry_run=0
trainer_args=()
normalize_options "$@"
set -- ${LAUNCH_ARGV[@]+"${LAUNCH_ARGV[@]}"}
while (($#)); do
  case $1 in
    --command) need_value "$@"; trainer_command=$2; shift 2 ;;
    --name) need_value "$@"; name=$2; shift 2 ;;
    --namespace) need_value "$@"; namespace=$2; shift 2 ;;
    --image) need_value "$@"; image=$2; shift 2 ;;
    --workdir) need_value "$@"; workdir=$2; shift 2 ;;
    --pvc) need_value "$@"; pvc=$2; shift 2 ;;
    --mount) need_value "$@"; mount=$2; shift 2 ;;
    --nodes) need_value "$@"; nodes=$2; shift 2 ;;
    --gpus-per-node) need_value "$@"; gpus=$2; shift 2 ;;
    --cpus-per-node) need_value "$@"; cpus=$2; shift 2 ;;
    --memory) need_value "$@"; memory=$2; shift 2 ;;
    --shm-size) need_value "$@"; shm_size=$2; shift 2 ;;
    --port) need_value "$@"; port=$2; shift 2 ;;
    --time) need_value "$@"; deadline=$2; shift 2 ;;
    --backoff-limit) need_value "$@"; backoff_limit=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; trainer_args=("$@"); break ;;
    *) launch_die "unknown option '$1' (trainer arguments go after '--'; see --help)" ;;
  esac
done

require_trainer_command "$trainer_command"
name=${name:-grerank-$trainer_command}
# Pod and service names append "-worker-N" and must stay within 63 characters.
require_match --name "$name" '^[a-z]([-a-z0-9]{0,43}[a-z0-9])?$' "a lowercase DNS label of at most 45 characters"
require_match --namespace "$namespace" '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$' "a lowercase DNS label"
for required in image workdir pvc mount; do
  [[ -n ${!required} ]] || launch_die "--$required is required (see --help)"
done
require_match --image "$image" '^[^[:space:]"\\]+$' "an image reference without spaces or quotes"
require_match --workdir "$workdir" '^/[^"\\[:cntrl:]]*$' "an absolute path without quotes"
require_match --mount "$mount" '^/[^"\\[:cntrl:]]*$' "an absolute path without quotes"
require_match --pvc "$pvc" '^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$' "a PersistentVolumeClaim name"
quantity='^[0-9]+(\.[0-9]+)?([KMGTPE]i|[kMGTPE])?$'
require_match --memory "$memory" "$quantity" "a Kubernetes quantity such as 256Gi"
require_match --shm-size "$shm_size" "$quantity" "a Kubernetes quantity such as 64Gi"
require_int --nodes "$nodes" 1
require_int --gpus-per-node "$gpus" 1
require_int --cpus-per-node "$cpus" 1
require_int --port "$port" 1
((port <= 65535)) || launch_die "--port must be at most 65535 (got '$port')"
require_int --time "$deadline" 1
require_int --backoff-limit "$backoff_limit" 0

if [[ $trainer_command == train ]]; then
  add_resume_auto ${trainer_args[@]+"${trainer_args[@]}"}
  trainer_args=(${RESUME_ARGS[@]+"${RESUME_ARGS[@]}"})
fi
# The pods' launch/torchrun.sh options; parsed here too, so a bad value fails now, not in a pod.
pod_options=(--command "$trainer_command" --nnodes "$nodes" --nproc-per-node "$gpus"
  --rdzv-backend c10d --rdzv-endpoint "$name-worker-0:$port" --rdzv-id "$name" --cpus-per-node "$cpus"
  -- ${trainer_args[@]+"${trainer_args[@]}"})
parse_torchrun_options "${pod_options[@]}"

if ((dry_run)); then
  printf '# PyTorchJob %s in namespace %s: %d pod(s), %d GPU(s) each; every pod runs, in %s:\n' \
    "$name" "$namespace" "$nodes" "$gpus" "$workdir"
  print_command bash launch/torchrun.sh "${pod_options[@]}"
  echo "# and launch/torchrun.sh runs in each pod:"
  pods=()
  for ((pod = 0; pod < nodes; pod++)); do
    pods+=("pod $name-worker-$pod")
  done
  print_torchrun_plan "${pods[@]}"
  exit 0
fi

launch_args="["
for arg in "${pod_options[@]}"; do
  launch_args+="$(yaml_string "$arg"), "
done
launch_args="${launch_args%, }]"

declare -A values=(
  [JOB_NAME]=$name [NAMESPACE]=$namespace [IMAGE]=$image [WORKDIR]=$workdir [PVC]=$pvc
  [MOUNT]=$mount [NNODES]=$nodes [GPUS_PER_NODE]=$gpus [CPUS_PER_NODE]=$cpus [MEMORY]=$memory
  [SHM_SIZE]=$shm_size [PORT]=$port [DEADLINE_SECONDS]=$deadline [BACKOFF_LIMIT]=$backoff_limit
  [LAUNCH_ARGS]=$launch_args
)

# Print the EXTRA_ENV block: one env entry per forwarded variable, at the placeholder's indent.
print_extra_env() { # print_extra_env INDENT
  local variable
  for variable in $(compgen -e | grep -E "$FORWARDED_ENV" || true); do
    printf '%s- name: %s\n%s  value: %s\n' "$1" "$variable" "$1" "$(yaml_string "${!variable}")"
  done
}

line_number=0
while IFS= read -r line || [[ -n $line ]]; do
  line_number=$((line_number + 1))
  if [[ $line =~ ^([[:space:]]*)\$\{EXTRA_ENV\}$ ]]; then
    print_extra_env "${BASH_REMATCH[1]}"
    continue
  fi
  for key in "${!values[@]}"; do
    placeholder="\${$key}"
    line=${line//"$placeholder"/"${values[$key]}"}
  done
  if [[ $line =~ \$\{([A-Za-z_][A-Za-z0-9_]*)\} ]]; then
    launch_die "$TEMPLATE:$line_number: unknown placeholder \${${BASH_REMATCH[1]}}"
  fi
  printf '%s\n' "$line"
done <"$TEMPLATE"
