#!/usr/bin/env bash
# Every GPU figure in one call (grerank_dist/perf/gpu_check.py): attention backends against eager,
# CEPE-7B and Llama-3-8B G-Rerank steps (checkpointing on/off, naive), memory against the
# analytic model, generation throughput. Writes gpu_check.json and gpu_check.md under $OUT.
#
#   OUT=/some/dir bash scripts/gpu_check.sh        # default OUT=./gpu_check_out
#
# Without CUDA (or with GPU_CHECK_TINY=1) the same code runs at tiny shapes, in well under a
# minute on a CPU. GPU_CHECK_BUDGET_S (default 480) bounds the whole run; PYTHON picks the
# interpreter. A crash or a hung section ends the Python process after it recorded what it had;
# it is then started again and resumes after that section, within the same budget.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_check_out}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
deadline=$(( $(date +%s) + BUDGET_S ))
args=(--out "$OUT" --budget-s "$BUDGET_S" --deadline "$deadline" --run-id "$(date +%s)-$$")
if [ -n "${GPU_CHECK_TINY:-}" ]; then
    args+=(--tiny)
fi
status=1
for attempt in 1 2 3 4 5; do
    # the module ends itself at the deadline; the kill is for a process too stuck to do so
    timeout -k 10 $(( deadline - $(date +%s) + 60 )) \
        "$PYTHON" -m grerank_dist.perf.gpu_check "${args[@]}" 2>&1 | tee -a "$OUT/gpu_check.log"
    status=${PIPESTATUS[0]}
    if [ "$status" -eq 0 ] || [ "$(date +%s)" -ge "$deadline" ]; then
        break
    fi
    echo "gpu_check.sh: attempt $attempt ended with status $status; resuming after the section it was in" >&2
done
exit "$status"
