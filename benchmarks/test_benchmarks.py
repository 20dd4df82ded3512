"""Every microbenchmark as a pytest-benchmark case:

    python -m pytest benchmarks --benchmark-only [--benchmark-json out.json] [--benchmark-compare]

Cases come from each bench module's `cases(quick)`; full shapes on CUDA, small ones on CPU
(`S4REC_BENCH_QUICK=1` forces small ones). On CUDA every timed call ends with a synchronisation,
so the figures are device time, not launch time. `python -m benchmarks` gives the same
measurements as tables with percentiles, peak memory and agreement checks.
"""
import importlib
import os

import pytest
import torch

OPS = ("sinkhorn", "info_nce", "item_softmax")
QUICK = os.environ.get("S4REC_BENCH_QUICK") == "1" or not torch.cuda.is_available()


def _cases():
    out = []
    for op in OPS:
        module = importlib.import_module(f"benchmarks.bench_{op}")
        if hasattr(module, "cases"):
            out += [pytest.param(make, id=f"{op}-{case_id}")
                    for case_id, make in module.cases(QUICK)]
    return out


@pytest.mark.parametrize("make", _cases())
def test_op(benchmark, make):
    call = make()
    if torch.cuda.is_available():
        def timed():
            out = call()
            torch.cuda.synchronize()
            return out
    else:
        timed = call
    benchmark(timed)
