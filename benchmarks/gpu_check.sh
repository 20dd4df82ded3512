#!/usr/bin/env bash
# One-shot check for a GPU machine without network: the whole test suite on CUDA, then every
# benchmark at full shapes, with every table and log in one folder.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $S4REC_RESULTS or benchmarks/results)
#
# Before sending the tree to such a machine, put what it cannot download into ignored folders of
# the checkout and carry them along:
#   mkdir -p .whl .data && cp ../shared/wheels/*.whl .whl/ && cp ../shared/data/Beauty.txt .data/
# Without a GPU it runs the same steps on the CPU (quick shapes), which is how it is kept working.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${S4REC_RESULTS:-benchmarks/results}}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }

export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/s4rec-site \
    .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/s4rec-site"
fi
[ -d .data ] && export S4REC_DATA_DIR="$PWD/.data"

say "== $(date -u +%FT%TZ) s4rec gpu_check -> $OUT"
python3 - <<'PY' 2>&1 | tee -a "$LOG"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
for name in ("liger_kernel", "cut_cross_entropy", "ot"):
    try:
        __import__(name)
        print(name, "importable")
    except Exception as err:
        print(name, "absent:", type(err).__name__)
PY

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, remember a failure
  local name=$1 limit=$2; shift 2
  say "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 60 "$OUT/$name.log" >> "$LOG"
  say "== $name: exit $rc after $((SECONDS - t0))s"
  [ $rc -eq 0 ] || status=1
}

if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  # GPU: at most 470 s of limits (under 8 minutes); the shapes the kernel targets are stated at
  step tests 150 python3 -m pytest -q -x -p no:cacheprovider tests
  step item_softmax 110 python3 -m benchmarks.bench_item_softmax --out "$OUT" \
    --shapes 4096x12101x64,8192x1000000x64
  mkdir -p "$OUT/10M"
  step item_softmax_10M 50 python3 -m benchmarks.bench_item_softmax --out "$OUT/10M" \
    --shapes 8192x10000000x64 --providers ours,cce,cce_exact,liger --no-rank
  step info_nce 60 python3 -m benchmarks.bench_info_nce --out "$OUT" \
    --shapes 4096x128x64,4096x1024x128,65536x128x64
  step sinkhorn 40 python3 -m benchmarks.bench_sinkhorn --out "$OUT" --shapes 512x128,4096x1024
  step train 60 python3 -m benchmarks.bench_train --out "$OUT" --steps 10
else
  say "no CUDA device: the CPU path (interpreter tests, quick shapes)"
  step tests 1200 python3 -m pytest -q -x -p no:cacheprovider tests
  step benchmarks 600 python3 -m benchmarks --quick --out "$OUT"
fi
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' && step scale 300 python3 -m benchmarks.bench_scale --out "$OUT" --sizes 10000,100000,1000000,10000000 --workloads "SR only,eval" --providers ours,eager
say "== done (status $status); tables and logs in $OUT"
exit $status
