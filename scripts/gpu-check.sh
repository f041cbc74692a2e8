#!/usr/bin/env bash
# The GPU checks in one run, for a machine with one CUDA GPU and a short time on it.
#
#   scripts/gpu-check.sh [STAGE ...]      # stages, in the order given: tests, vae, bench, memory, first-vs-warm, two-models
#                                         # (default: tests vae bench memory first-vs-warm, most informative first)
#
# - tests:  the GPU-only tests (pytest -m gpu), the hub-id edit test, the reproducibility tests,
#           whether a GPU worker can fork from the forkserver (test_worker_start.py)
# - vae:    bench/vae_fast.py, the full-size VAE at 1024x1024 in bf16: diffusers' 3-D convolutions vs. the
#           server's 2-D route for images (decode and encode times, peak memory, largest difference);
#           then, whether or not that failed, bench/text_encoder.py, the full Qwen2.5-VL-7B text encoder on a
#           1024-token prompt: the stock forward vs. the last hidden state only (times, TFLOP, weights, peak
#           memory); each one's JSON line goes to vae.jsonl / text_encoder.jsonl
# - bench:  bench/gpu.py on the full-size random-weight Qwen-Image: eager 50 steps, the fast setting
#           (compile + FP8 + batched CFG), with the step cache, Lightning compiled
#           (BENCH_SETTINGS overrides the list; BENCH_RUNS the warm runs per setting, default 1)
# - memory: bench/memory_modes.py on random:Qwen/Qwen-Image, each card with the mode meant for it
#           (MEMORY_PAIRS, default none@80,fp8@48,group+fp8@24,group+fp8+cfgbatch@24,int4+fp8+te@24,group+fp8+tiling@16,int4+fp8+te+tiling@16;
#           MEMORY_STEPS)
# - first-vs-warm: bench/gpu.py's first request after /ready vs warm ones, at two warmed sizes and a new
#           prompt length (two compiles at start: the slowest setting to start)
# - two-models: bench/two_models.py, Qwen-Image + Qwen-Image-Edit-2509 on one GPU, a mixed stream of
#           requests per design (TWO_MODEL_DESIGNS, TWO_MODEL_REQUESTS)
#
# The whole run keeps within GPU_BUDGET seconds (default 540: one call to a lent GPU may run 600 s, the
# wheels' install included): each stage gets what is left, at most its own cap (STAGE_SECONDS_<STAGE>, the
# stage's name in capitals with _ for -; defaults below), so that one slow stage leaves time to the next;
# a stage that runs out is stopped (SIGTERM, SIGKILL 15 s later), and stages with too little time left are
# skipped with a line saying so. Benchmarks write each result as soon as it is measured, so a stopped stage
# keeps what it finished.
# Results: each stage writes its log and the benchmarks' JSON lines into GPU_RESULTS (default a new folder
# under /tmp); after each stage they are gathered into three files in $OUT (default ./gpu-results), as few
# as a machine that returns only some of a run's files brings back whole:
#   stages.txt     the GPU, then each stage's seconds and exit status
#   results.jsonl  every benchmark record, one per line: {"file": "gpu.jsonl", "record": {...}}
#   results.tgz    everything: the stages' logs, the servers' logs, the JSON lines
# When the machine lacks this project's dependencies, build the wheels on a machine with
# package access first (`WHEELS=.whl scripts/gpu-check.sh` then installs them into
# /tmp/site without network, the way the GPU machines of this project are set up). An image
# with torch, transformers, accelerate, peft and pytest also lacks what EXTRA_WHEELS names
# below: the server does not import without prometheus-client, diffusers refuses to import
# without requests, and without `isal` PNG responses fall back to the standard zlib, several
# times slower, so the benchmarks' encode figures would not be the server's. Before any stage
# the script imports what the stages need and stops at once, naming what is missing.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
KNOWN_STAGES=" tests vae bench memory first-vs-warm two-models "
for stage in "$@"; do  # before anything runs: a misspelt last stage must not cost the GPU time of the first ones
  case "$KNOWN_STAGES" in
    *" $stage "*) ;;
    *)
      echo "unknown stage: $stage (tests, vae, bench, memory, first-vs-warm, two-models)" >&2
      exit 2
      ;;
  esac
done
started_all=$(date +%s)
deadline=$((started_all + ${GPU_BUDGET:-540}))
OUT="${OUT:-gpu-results}"
RESULTS="${GPU_RESULTS:-$(mktemp -d /tmp/gpu-check.XXXXXX)}"
mkdir -p "$OUT" "$RESULTS"
case "$(cd "$RESULTS" && pwd -P)/" in
  "$(cd "$OUT" && pwd -P)/"*)
    echo "gpu-check: GPU_RESULTS ($RESULTS) must not be \$OUT ($OUT) or inside it: the results are packed into \$OUT" >&2
    exit 2
    ;;
esac
export PYTHONUNBUFFERED=1

# pack: the results so far into $OUT's three files (see above)
pack() {
  cp "$RESULTS/stages.txt" "$OUT/stages.txt" 2>/dev/null
  for f in "$RESULTS"/*.jsonl; do
    [ -f "$f" ] || continue
    grep '^{' "$f" | sed "s|^|{\"file\": \"$(basename "$f")\", \"record\": |; s|\$|}|"
  done >"$OUT/results.jsonl"
  tar czf "$OUT/results.tgz" -C "$RESULTS" .
}
# whatever ends the run (a failed check before the stages too): what there is comes back
trap pack EXIT

if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible"; print(torch.cuda.get_device_name(0), torch.__version__)' \
  | tee "$RESULTS/stages.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$RESULTS/stages.txt" 2>&1 || true

#: What to download beside the wheels of diffusers and the FastAPI stack for an image that has only torch,
#: transformers, accelerate, peft and pytest (e.g. as arguments of a prepare-wheels script).
EXTRA_WHEELS="isal prometheus-client requests urllib3 certifi charset-normalizer hypothesis pytest-timeout sortedcontainers attrs"
# Every stage starts a server or loads pipelines: a missing module would fail each of them, minutes apart.
python3 - "$EXTRA_WHEELS" <<'PY' || exit 1
import importlib
import sys

failed = []
for module in ("qwen_image_server.cli", "qwen_image_server.api.app", "qwen_image_server.models.runner", "isal", "httpx",
               "pytest", "pytest_timeout", "hypothesis"):
    try:
        importlib.import_module(module)
    except Exception as exc:  # ModuleNotFoundError, or diffusers' own check of its dependencies
        failed.append(f"  {module}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
if failed:
    print("gpu-check: cannot import what the stages need:", *failed, sep="\n", file=sys.stderr)
    print(f"gpu-check: add the missing wheels (this image may need: {sys.argv[1]})", file=sys.stderr)
    sys.exit(1)
# The benchmarks and `serve --device auto` find GPUs as the server does (models.machine.discover_gpus: a driver's files,
# then a probe process): where that sees none they would measure nothing and exit 0, stage after stage.
from qwen_image_server.models.machine import discover_gpus

found = discover_gpus()
if not found:
    print(f"gpu-check: torch sees a GPU but the server's discovery found none ({found!r})", file=sys.stderr)
    sys.exit(1)
PY

#: The least a stage is started with; below it the stage is skipped.
MIN_STAGE_SECONDS="${MIN_STAGE_SECONDS:-45}"

#: Each stage's cap in seconds (STAGE_SECONDS_<STAGE> overrides it): the default stages' caps add up to more than
#: the budget, so the last one run gets what is left.
declare -A STAGE_CAPS=([tests]=240 [vae]=60 [bench]=240 [memory]=180 [first-vs-warm]=200 [two-models]=300)

# run_stage NAME LOG COMMAND...: COMMAND under what is left of the budget and the stage's cap (STAGE_SECONDS in its
# environment), its output in LOG (and the end of it on the console); then the results so far are packed into $OUT.
run_stage() {
  local name=$1 log=$2
  shift 2
  local budget=$((deadline - $(date +%s)))
  local override="STAGE_SECONDS_$(echo "$name" | tr 'a-z-' 'A-Z_')"
  local cap="${!override:-${STAGE_CAPS[$name]:-$budget}}"
  local left=$budget
  [ "$cap" -lt "$left" ] && left=$cap
  if [ "$left" -lt "$MIN_STAGE_SECONDS" ]; then
    echo "stage $name: skipped, ${left} s for it (${budget} s of the budget left, its cap ${cap} s; at least" \
      "${MIN_STAGE_SECONDS} s needed)" | tee -a "$RESULTS/stages.txt"
    pack
    return 0
  fi
  local began code
  began=$(date +%s)
  # Appended to, so that every writer is in append mode: a stage that copies its output to the log with
  # `tee -a /dev/stderr` adds to it (tee without -a reopens the log with O_TRUNC and wipes what came before).
  : >"$log"
  STAGE_SECONDS=$left timeout --kill-after=15 "$left" "$@" >>"$log" 2>&1
  code=$?
  tail -n 25 "$log"
  # 124: stopped by SIGTERM at the end of its time; 137: killed by SIGKILL, 15 s later when it had not stopped by
  # then, or, earlier, by someone else (the kernel's out-of-memory killer)
  local took=$(($(date +%s) - began))
  if [ "$code" -eq 124 ] || { [ "$code" -eq 137 ] && [ "$took" -ge "$left" ]; }; then
    echo "stage $name: stopped after its ${left} s" | tee -a "$RESULTS/stages.txt"
  elif [ "$code" -eq 137 ]; then
    echo "stage $name: killed (SIGKILL) after ${took} s, before its time ran out: out of host memory?" \
      | tee -a "$RESULTS/stages.txt"
  fi
  echo "stage $name: ${took} s, exit $code" | tee -a "$RESULTS/stages.txt"
  [ "$code" -eq 0 ] || status=1
  pack
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(tests vae bench memory first-vs-warm)
status=0
for stage in "${stages[@]}"; do
  case "$stage" in
    tests)
      # The e2e tests first (the hub-id edit on this machine's own processor loading, reproducibility, a GPU worker
      # forked from the forkserver), then the GPU-only unit tests, each pytest given its share of the stage's time
      # and stopped with SIGINT at its end, so that it still reports what failed; -rfEs lists failures and errors
      # beside the skips. test_hub_models.py's test on a server of seven models (one compiled) checks nothing
      # GPU-specific and takes the longest to start on a GPU (spawned workers, one load at a time, inductor
      # without a cache): left out.
      run_stage tests "$RESULTS/tests.log" bash -c 'end=$(( $(date +%s) + STAGE_SECONDS - 20 ))
        timeout -s INT $(( (STAGE_SECONDS - 20) * 2 / 5 )) python3 -m pytest -q -p no:cacheprovider -rfEs \
          tests/e2e/test_hub_models.py tests/e2e/test_reproducibility.py tests/e2e/test_worker_start.py \
          --deselect tests/e2e/test_hub_models.py::test_server_edits_with_hub_ids_offline_at_each_revision; b=$?
        timeout -s INT $(( end - $(date +%s) )) python3 -m pytest -q -p no:cacheprovider -rfEs \
          --continue-on-collection-errors -m gpu tests/unit; a=$?
        exit $((a || b))'
      ;;
    bench)
      run_stage bench "$RESULTS/bench.log" python3 bench/gpu.py \
        --settings "${BENCH_SETTINGS:-eager,compile-fp8-cfgbatch,compile-fp8-cfgbatch-cache,lightning-compile}" \
        --runs "${BENCH_RUNS:-1}" --out "$RESULTS/gpu.jsonl"
      ;;
    vae)
      # Each benchmark runs whether or not the other failed (the stage fails if either does); of its output only
      # its last JSON line is added to its .jsonl (one that failed midway ends with a progress line, no result).
      run_stage vae "$RESULTS/vae.log" bash -c 'set -o pipefail
        python3 bench/vae_fast.py --device cuda --size 1024x1024 --dtype bfloat16 --runs 5 | tee -a /dev/stderr \
          | { grep "^{" || true; } | tail -n 1 >>"$1/vae.jsonl"
        vae=$?
        python3 bench/text_encoder.py --device cuda --layers 28 --runs 5 | tee -a /dev/stderr \
          | { grep "^{" || true; } | tail -n 1 >>"$1/text_encoder.jsonl"
        text_encoder=$?
        exit $((vae || text_encoder))' vae "$RESULTS"
      ;;
    memory)
      run_stage memory "$RESULTS/memory.log" python3 bench/memory_modes.py random:Qwen/Qwen-Image \
        --pairs "${MEMORY_PAIRS:-none@80,fp8@48,group+fp8@24,group+fp8+cfgbatch@24,int4+fp8+te@24,group+fp8+tiling@16,int4+fp8+te+tiling@16}" --steps "${MEMORY_STEPS:-8}" --json "$RESULTS/memory.jsonl"
      ;;
    first-vs-warm)
      run_stage first-vs-warm "$RESULTS/first-vs-warm.log" python3 bench/gpu.py --settings first-vs-warm \
        --runs "${BENCH_RUNS:-1}" --out "$RESULTS/gpu.jsonl"
      ;;
    two-models)
      run_stage two-models "$RESULTS/two-models.log" python3 bench/two_models.py --designs "${TWO_MODEL_DESIGNS:-separate,shared,shared-int4}" \
        --requests "${TWO_MODEL_REQUESTS:-20}" --json "$RESULTS/two-models.jsonl"
      ;;
  esac  # (every name was checked at the start)
done
echo "all stages: $(($(date +%s) - started_all)) s" | tee -a "$RESULTS/stages.txt"
exit $status  # packed on exit (the trap)
