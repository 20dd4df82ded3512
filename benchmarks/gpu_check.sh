#!/usr/bin/env bash
# One-shot check for a GPU machine without network, in under 8 minutes from a cold cache:
#   1 env       nvidia-smi, versions, every import it needs (nothing installed from the network)
#   2 smoke     compile and launch every kernel at a tiny shape (registers, spills, shared memory)
#   3 accuracy  every path against a chunked float64 reference, with the error
#   4 kernels   our kernels alone at the stated shapes (bf16, tf32) against the device's floors
#   5 peers     eager, torch.compile, Liger, Cut Cross-Entropy, each with its own limit
#   6 tests     the test suite on CUDA (no -x), --durations, junit XML
#   7 dist      the torchrun trainer's step on this one GPU (W = 1, NCCL), with and without
#               --shard-items (benchmarks/bench_dist.py)
# Every step has its own time limit and a failure never stops the rest. Every measurement is
# appended to OUT/gpu_check.jsonl as it is made (one line each, fsynced): a step killed at its
# limit keeps what it had measured.
#
#   bash benchmarks/gpu_check.sh [--rehearse] [OUT_DIR]    (default OUT_DIR: benchmarks/results/gpu_check)
#
# --rehearse runs every step on the CPU at tiny shapes, the kernels in Triton's interpreter (and a
# few test files instead of the suite), in under 5 minutes: the tests run it.
#
# A GPU machine gets only the tree and the ignored paths the caller carries. Copy the peer wheels
# and the data into ignored folders and carry them:
#   mkdir -p .whl .data && cp ../shared/wheels/*.whl .whl/ && cp ../shared/data/Beauty.txt .data/
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
if [ "${1:-}" = "--rehearse" ]; then REHEARSE=1; shift; fi
OUT="${1:-${S4REC_RESULTS:-benchmarks/results}/gpu_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
JSONL="$OUT/gpu_check.jsonl"
LOG="$OUT/gpu_check.log"
: > "$LOG"

export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="$OUT/triton-cache"
export GPU_CHECK_JSONL="$JSONL"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$OUT/site" \
    .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:$OUT/site"
fi
[ -d .data ] && export S4REC_DATA_DIR="$PWD/.data"
MODE=()
if [ $REHEARSE -eq 1 ]; then MODE=(--rehearse); export TRITON_INTERPRET=1; fi

row() {  # row STEP NAME OK JSON-FIELDS: one line to the JSONL, synced
  printf '{"t": %s, "step": "%s", "name": "%s", "ok": %s%s}\n' "$(date +%s)" "$1" "$2" "$3" "$4" \
    >> "$JSONL"
  sync "$JSONL" 2>/dev/null || sync
}

step() {  # step NAME SECONDS COMMAND...: run with a time limit; its end is a row of its own
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log" >> "$LOG"
  local ok=true
  [ $rc -eq 0 ] || ok=false
  row "$name" "step ended" "$ok" ", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"timed_out\": $([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo true || echo false)"
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
}

GC=(python3 -m benchmarks.gpu_check --out "$OUT" "${MODE[@]}")

row start "gpu_check" null ", \"rehearse\": $REHEARSE, \"out\": \"$OUT\""
if [ $REHEARSE -eq 1 ]; then
  # limits for a loaded 2-core CPU; every step at tiny shapes in the interpreter
  step env 60 "${GC[@]}" env
  step smoke 120 "${GC[@]}" smoke
  step accuracy 120 "${GC[@]}" accuracy
  step kernels 90 "${GC[@]}" kernels
  for p in eager compiled liger cce; do step "peers-$p" 60 "${GC[@]}" peers --provider "$p"; done
  step tests 180 python3 -m pytest -q -p no:cacheprovider -p benchmarks.gpu_check \
    --durations=10 --junitxml="$OUT/junit.xml" tests/test_metrics.py
  step dist 120 "${GC[@]}" dist
else
  # 470 s of limits in all (8 minutes with the start-up)
  step env 20 "${GC[@]}" env
  step smoke 60 "${GC[@]}" smoke
  step accuracy 70 "${GC[@]}" accuracy
  step kernels 80 "${GC[@]}" kernels
  step peers-eager 15 "${GC[@]}" peers --provider eager
  step peers-compiled 35 "${GC[@]}" peers --provider compiled
  step peers-liger 20 "${GC[@]}" peers --provider liger
  step peers-cce 20 "${GC[@]}" peers --provider cce
  # the compile tests (they compile for sm_80/sm_90 on the CPU) and this script's own
  # rehearsal are CPU checks: left out here
  step tests 150 python3 -m pytest -q -p no:cacheprovider -p benchmarks.gpu_check \
    --durations=25 --junitxml="$OUT/junit.xml" --ignore=tests/test_compile.py \
    --ignore=tests/test_gpu_check.py tests
fi
if [ $REHEARSE -eq 0 ]; then
  # after the 8-minute one-shot steps: a session short of time loses only these two
  step dist 200 "${GC[@]}" dist
  step scale 300 python3 -m benchmarks.bench_scale --out "$OUT" \
    --sizes 10000,100000,1000000,10000000 --workloads "SR only,eval" --providers ours,eager
fi
"${GC[@]}" summary
status=$?
echo "== done (status $status); rows in $JSONL, logs in $OUT" | tee -a "$LOG"
exit $status
