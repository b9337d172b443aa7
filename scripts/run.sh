#!/usr/bin/env bash
# One entry point for a fresh machine: creates a venv on first use, installs the project into it,
# then runs the demo or the tests.
#
#   bash scripts/run.sh demo [grerank demo options]   # the embedded end-to-end demo (CPU)
#   bash scripts/run.sh test [pytest options]         # the test suite on the lock (what CI runs)
#   bash scripts/run.sh test-latest [pytest options]  # the suite on the newest releases, no lock
#   bash scripts/run.sh test-floor [pytest options]   # the suite on the ranges' lower bounds
#   bash scripts/run.sh setup                         # only create/refresh the locked environment
#   bash scripts/run.sh lock                          # rewrite constraints.txt from .venv-latest
#
# demo, test and setup use .venv and install from constraints.txt, the exact versions the suite
# passed with. test-latest uses .venv-latest and installs the newest releases that pyproject.toml's
# ranges allow, so that the next upstream break shows up here as a named test failure.
#
# On a CPU machine it installs torch==2.13.0 (CPU build) when the venv has no torch. On a GPU
# cluster, create the venv yourself and install your CUDA build of torch first; this script
# then keeps it (GRERANK_VENV points it at another venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command="${1:-}"
[[ $# -gt 0 ]] && shift
case "$command" in
  demo | test | setup) venv="${GRERANK_VENV:-.venv}"; lock=(-c constraints.txt) ;;
  test-latest | lock) venv="${GRERANK_LATEST_VENV:-.venv-latest}"; lock=() ;;
  test-floor) venv="${GRERANK_FLOOR_VENV:-.venv-floor}"; lock=(-c constraints-floor.txt) ;;
  *) echo "usage: bash scripts/run.sh demo|test|test-latest|test-floor|setup|lock [args...]" >&2; exit 2 ;;
esac

python_bin="${PYTHON:-python3}"
if [[ ! -x "$venv/bin/python" ]]; then
  echo "creating $venv" >&2
  "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install -q --disable-pip-version-check)
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "installing torch ${GRERANK_TORCH_VERSION:-2.13.0} (CPU build)" >&2
  "${pip[@]}" "torch==${GRERANK_TORCH_VERSION:-2.13.0}"
fi
stamp="$venv/.grerank-installed"
if [[ "$command" == test-latest ]]; then
  echo "installing grerank_dist with the newest releases into $venv" >&2
  "${pip[@]}" --upgrade --upgrade-strategy eager -e ".[test]"
  "$py" -m pip list --format=freeze --disable-pip-version-check | grep -iE '^(transformers|deepspeed|torch|peft|datasets|sentence-transformers|flagembedding|tokenizers|safetensors)==' >&2
elif [[ "${#lock[@]}" -gt 0 && ( ! -f "$stamp" || pyproject.toml -nt "$stamp" || "${lock[1]}" -nt "$stamp" ) ]]; then
  echo "installing grerank_dist and its locked dependencies into $venv" >&2
  "${pip[@]}" -e ".[test]" "${lock[@]}"
  touch "$stamp"
fi

case "$command" in
  demo) exec "$venv/bin/grerank" demo "$@" ;;
  test | test-latest | test-floor) exec "$py" -m pytest "$@" ;;
  setup) echo "environment ready: source $venv/bin/activate" ;;
  lock)
    header=$(sed -n '/^#/p;/^[^#]/q' constraints.txt)
    { echo "$header"; "$py" -m pip freeze --exclude-editable --disable-pip-version-check |
        grep -viE '^(torch|nvidia-|triton|grerank)'; } > constraints.txt
    echo "wrote constraints.txt from $venv" >&2 ;;
esac
