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
say "== tests"
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log" | tail -n 25 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

say "== benchmarks"
timeout 260 python3 -m benchmarks --out "$OUT" 2>&1 | tee "$OUT/benchmarks.log" | tail -n 200 >>"$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
say "== done (status $status); tables in $OUT"
exit $status
