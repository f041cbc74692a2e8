#!/usr/bin/env bash
# The GPU checks in one run, for a machine with one CUDA GPU and a short time on it.
#
#   scripts/gpu-check.sh [STAGE ...]      # stages: tests, bench, memory, two-models (default: the first three)
#
# - tests:  the GPU-only tests (pytest -m gpu), the hub-id edit test, the reproducibility tests,
#           whether a GPU worker can fork from the forkserver (test_worker_start.py)
# - bench:  bench/gpu.py on the full-size random-weight Qwen-Image, the key settings only
#           (BENCH_SETTINGS overrides the list; BENCH_RUNS the warm runs per setting)
# - memory: bench/memory_modes.py on random:Qwen/Qwen-Image (MEMORY_MODES, MEMORY_CARDS, MEMORY_STEPS)
# - two-models (not in the default set): bench/two_models.py, Qwen-Image + Qwen-Image-Edit-2509 on one
#           GPU, a mixed stream of 20 requests per design (TWO_MODEL_DESIGNS, TWO_MODEL_REQUESTS)
#
# Results go to $OUT (default ./gpu-results): each stage's log, the benchmarks' JSON lines.
# When the machine lacks this project's dependencies, build the wheels on a machine with
# package access first (`WHEELS=.whl scripts/gpu-check.sh` then installs them into
# /tmp/site without network, the way the GPU machines of this project are set up).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible"; print(torch.cuda.get_device_name(0), torch.__version__)' \
  | tee "$OUT/gpu.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$OUT/gpu.txt" 2>&1 || true

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(tests bench memory)
status=0
for stage in "${stages[@]}"; do
  started=$(date +%s)
  case "$stage" in
    tests)
      python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit -rs >"$OUT/tests-gpu.log" 2>&1 || status=1
      python3 -m pytest -q -p no:cacheprovider tests/e2e/test_hub_models.py tests/e2e/test_reproducibility.py tests/e2e/test_worker_start.py -rs \
        >"$OUT/tests-e2e.log" 2>&1 || status=1
      tail -n 3 "$OUT/tests-gpu.log" "$OUT/tests-e2e.log"
      ;;
    bench)
      python3 bench/gpu.py --settings "${BENCH_SETTINGS:-eager,compile-fp8-cfgbatch,compile-fp8-cfgbatch-cache,lightning-compile,first-vs-warm}" \
        --runs "${BENCH_RUNS:-2}" --out "$OUT/gpu.jsonl" 2>&1 | tee "$OUT/bench.log" || status=1
      ;;
    memory)
      python3 bench/memory_modes.py random:Qwen/Qwen-Image --modes "${MEMORY_MODES:-none,fp8,group+fp8}" \
        --cards "${MEMORY_CARDS:-80,48,24}" --steps "${MEMORY_STEPS:-8}" --json "$OUT/memory.jsonl" 2>&1 | tee "$OUT/memory.log" || status=1
      ;;
    two-models)
      python3 bench/two_models.py --designs "${TWO_MODEL_DESIGNS:-separate,shared}" --requests "${TWO_MODEL_REQUESTS:-20}" \
        --json "$OUT/two-models.jsonl" 2>&1 | tee "$OUT/two-models.log" || status=1
      ;;
    *)
      echo "unknown stage: $stage (tests, bench, memory, two-models)" >&2
      exit 2
      ;;
  esac
  echo "stage $stage: $(($(date +%s) - started)) s" | tee -a "$OUT/stages.txt"
done
exit $status
