#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv on first use, installs the project into it,
# then runs the demo or the tests.
#
#   bash scripts/run.sh demo [grerank demo options]   # the embedded end-to-end demo (CPU)
#   bash scripts/run.sh test [pytest options]         # the test suite (what CI runs)
#   bash scripts/run.sh setup                         # only create/refresh the environment
#
# On a CPU machine it installs torch==2.13.0 (CPU build) when the venv has no torch. On a GPU
# cluster, create the venv yourself and install your CUDA build of torch first; this script
# then keeps it (GRERANK_VENV points it at another venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv="${GRERANK_VENV:-.venv}"
python_bin="${PYTHON:-python3}"
if [[ ! -x "$venv/bin/python" ]]; then
  echo "creating $venv" >&2
  "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "installing torch ${GRERANK_TORCH_VERSION:-2.13.0} (CPU build)" >&2
  "$py" -m pip install -q --disable-pip-version-check "torch==${GRERANK_TORCH_VERSION:-2.13.0}"
fi
stamp="$venv/.grerank-installed"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  echo "installing grerank_dist and its dependencies into $venv" >&2
  "$py" -m pip install -q --disable-pip-version-check -e ".[test]"
  touch "$stamp"
fi

command="${1:-}"
[[ $# -gt 0 ]] && shift
case "$command" in
  demo) exec "$venv/bin/grerank" demo "$@" ;;
  test) exec "$py" -m pytest "$@" ;;
  setup) echo "environment ready: source $venv/bin/activate" ;;
  *) echo "usage: bash scripts/run.sh demo|test|setup [args...]" >&2; exit 2 ;;
esac
