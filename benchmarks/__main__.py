"""Run every benchmark, providers side by side, tables to the terminal and to one folder.

    python -m benchmarks [--quick] [--out DIR | --save]
                         [--only sinkhorn,info_nce,item_softmax,train]

`--quick` (small shapes, few repetitions) is the default without a GPU. Tables go to
runs/benchmarks/ (ignored by git), to DIR with --out, and to the committed benchmarks/results/ only
with --save (or --out benchmarks/results).
"""
import argparse
import importlib
import sys
import time
import traceback

import torch

from benchmarks._harness import add_out_flags

BENCHES = ("sinkhorn", "info_nce", "item_softmax", "train")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the s4rec benchmarks.")
    parser.add_argument("--quick", action="store_true", help="small shapes (default without a GPU)")
    parser.add_argument("--full", action="store_true", help="full shapes even without a GPU")
    add_out_flags(parser)
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset")
    args = parser.parse_args(argv)
    quick = args.quick or (not args.full and not torch.cuda.is_available())
    failed = []
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        if name not in BENCHES:
            print(f"error: unknown benchmark {name!r}; expected some of {', '.join(BENCHES)}",
                  file=sys.stderr)
            return 2
        t0 = time.time()
        print(f"== bench_{name} ({'quick' if quick else 'full'})", flush=True)
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            module.run(quick, args.out)
        except Exception:  # one broken benchmark must not hide the others' tables
            traceback.print_exc()
            failed.append(name)
        print(f"== bench_{name} took {time.time() - t0:.0f}s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
