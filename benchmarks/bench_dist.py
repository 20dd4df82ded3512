"""Training under torchrun: time of one training step and peak memory per rank, against the number
of ranks W and the catalogue size V, data parallel ("dp": every rank holds the whole item table)
and vocabulary parallel ("shard": `--shard-items`, each rank holds V / W rows of it).

    python -m benchmarks.bench_dist [--worlds 1,2] [--sizes 10000,100000,1000000]
                                    [--modes dp,shard] [--steps 3] [--batch-size 128]
                                    [--threads 1] [--backend auto] [--mem-limit-gb 8]
                                    [--quick] [--out DIR | --save]

Every point is its own `torchrun --standalone --nproc_per_node W` launch, so one point's memory
does not count against the next, and each rank runs the trainer's own step
(s4rec.distributed.global_step: batch assembly, forward, backward, the gradient all-reduce, Adam)
on the synthetic data set with V items and the default model (d = 64, 2 layers, K = 128, all five
loss terms) with a global batch of --batch-size users. One warm-up step (it allocates Adam's
state), then --steps timed steps, each between two barriers. Peak memory per rank: the resident
set (``ru_maxrss``) on the CPU, ``max_memory_allocated`` on CUDA; base_mb is the memory before the
first step (torch, the data, the model and its slice).

The table (<device>-dist.md and .json) goes to runs/benchmarks/, to ``--out DIR``, or with
``--save`` to benchmarks/results/, the committed ones.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from ._harness import (SCRATCH, add_out_flags, device_label, parse_choices, run_in_process,
                       write_table)

SIZES = {"cpu": (10_000, 100_000, 1_000_000), "cuda": (1_000_000, 10_000_000)}
MODES = ("dp", "shard")
BATCH_SIZE = 128
COLUMNS = ["W", "V", "mode", "status", "median_s", "p20_s", "p80_s", "users_per_s",
           "sent_mb", "rows_per_rank", "base_mb", "peak_mb", "peak_mb_per_rank"]
COLLECTIVES = ("all_reduce", "all_gather", "gather", "broadcast")


# ----------------------------------------------------------------------------------------------
# one point: every rank of a torchrun launch
# ----------------------------------------------------------------------------------------------


def _memory_mb(device: torch.device, peak: bool) -> float:
    if device.type == "cuda":
        fn = torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated
        return fn(device) / 2**20
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KB on Linux
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class SentBytes:
    """Counts the bytes this rank sends in the collectives it calls, as ring algorithms send them:
    all_reduce of S bytes 2 (W - 1) / W S, all_gather of S bytes in all (W - 1) / W S, gather
    and broadcast the rank's own tensor (root: none). Payload only: headers and the object
    collectives (all_gather_object) are not counted."""

    def __init__(self):
        self.bytes = 0.0
        self._saved = {}

    def __enter__(self):
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()

        def size(t):
            return t.numel() * t.element_size()

        cost = {
            "all_reduce": lambda t, *a, **k: 2 * (world - 1) / world * size(t),
            "all_gather": lambda out, t, *a, **k: (world - 1) / world * sum(map(size, out)),
            "gather": lambda t, *a, **k: 0 if rank == k.get("dst", a[1] if len(a) > 1 else 0)
            else size(t),
            "broadcast": lambda t, *a, **k: size(t) if rank == k.get("src", a[0] if a else 0)
            else 0,
        }
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self._saved[name] = original

            def counted(*args, _original=original, _cost=cost[name], **kwargs):
                self.bytes += _cost(*args, **kwargs)
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, original in self._saved.items():
            setattr(dist, name, original)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_point(v: int, mode: str, steps: int, batch_size: int, threads: int,
              backend: str) -> Optional[Dict]:
    """This rank's part of one point; rank 0 returns the row (every rank's figures), the others
    None."""
    import torch.distributed as dist

    from s4rec import distributed as trainer
    from s4rec import sharded_items
    from s4rec.batches import make_augmenter
    from s4rec.config import Config
    from s4rec.data import head_users, synthetic
    from s4rec.model import S4Rec

    torch.set_num_threads(threads)
    cfg = Config(batch_size=batch_size, threads=threads, shard_items=mode == "shard",
                 dist_backend=backend, progress=False)
    device = trainer.setup(cfg)
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(cfg.seed)
    data = synthetic(n_users=batch_size * (steps + 1) + 100, n_items=v)
    model = S4Rec.from_config(v, cfg)
    if cfg.shard_items:
        sharded_items.shard_model(model, world, rank)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    augmenter = make_augmenter(cfg, data, model.encoder.mask_id)
    head = head_users(data, cfg.head_frac)
    batches = trainer.epoch_batches(np.flatnonzero(data.lengths >= 4), batch_size, cfg.seed, 0)
    table = sharded_items.sharded(model)
    rows = (table.stop - table.start) if table is not None else v

    def step(i: int) -> None:
        trainer.global_step(model, optimizer, data, batches[i % len(batches)], head, cfg,
                            augmenter, 0, i, device)

    _sync(device)
    base = _memory_mb(device, peak=False)
    step(0)  # warm-up: allocates Adam's state
    samples = []
    with SentBytes() as sent:
        for i in range(1, steps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            step(i)
            _sync(device)
            dist.barrier()
            samples.append(time.perf_counter() - t0)
    mine = {"base_mb": base, "peak_mb": _memory_mb(device, peak=True), "rows": rows,
            "median_s": float(np.median(samples)), "sent_mb": sent.bytes / steps / 2**20}
    every: List[Optional[Dict]] = [None] * world
    dist.all_gather_object(every, mine)
    used = dist.get_backend()
    dist.destroy_process_group()
    if rank:
        return None
    return {"status": "ok", "median_s": float(np.median(samples)),
            "p20_s": float(np.percentile(samples, 20)), "p80_s": float(np.percentile(samples, 80)),
            "users_per_s": batch_size / float(np.median(samples)),
            "sent_mb": max(r["sent_mb"] for r in every),
            "rows_per_rank": " / ".join(str(r["rows"]) for r in every),
            "base_mb": max(r["base_mb"] for r in every),
            "peak_mb": max(r["peak_mb"] for r in every),
            "peak_mb_per_rank": " / ".join(f"{r['peak_mb']:.0f}" for r in every),
            "backend": used}


# ----------------------------------------------------------------------------------------------
# the parent: one torchrun launch per point
# ----------------------------------------------------------------------------------------------


def spawn_point(world: int, v: int, mode: str, steps: int, batch_size: int, threads: int,
                backend: str, mem_limit_gb: Optional[float], timeout_s: float) -> Dict:
    """One point under torchrun; an out-of-memory or timed-out point is a result."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(world), "-m", "benchmarks.bench_dist", "--point", str(v), mode, "--steps",
           str(steps), "--batch-size", str(batch_size), "--threads", str(threads), "--backend",
           backend]
    # the limit holds for torchrun and each rank it starts
    result, proc = run_in_process(cmd, timeout_s, mem_limit_gb,
                                  env={"OMP_NUM_THREADS": str(threads)})
    if result is not None:
        return result
    text = proc.stderr + proc.stdout
    lines = [ln for ln in text.strip().splitlines() if ln.strip()] or ["no output"]
    # what an allocation failure prints (torch's "Tried to allocate", the allocator's "failed to
    # allocate"), not any traceback that quotes a line with the word in it
    if "MemoryError" in text or "out of memory" in text.lower() or \
            re.search(r"(?i)(tried|failed|unable) to allocate", text) or "SIGKILL" in text:
        return {"status": "OOM", "detail": lines[-1][:200]}
    raise RuntimeError(f"point W={world} V={v} {mode} failed: {lines[-1][:500]}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--point", nargs=2, metavar=("V", "MODE"),
                        help=argparse.SUPPRESS)  # one point, on every rank of a torchrun launch
    parser.add_argument("--worlds", default="1,2", help="comma-separated numbers of ranks")
    parser.add_argument("--sizes", default=None, help="comma-separated V (default: 10K, 100K, 1M "
                        "on the CPU; 1M, 10M on CUDA)")
    parser.add_argument("--modes", default=",".join(MODES), help="dp, shard or both")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help=f"global users per step (default {BATCH_SIZE})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    parser.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                        help="process group backend (auto: nccl on CUDA, gloo on the CPU)")
    parser.add_argument("--mem-limit-gb", type=float, default=8.0,
                        help="address-space limit of each CPU process (default 8)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per point")
    parser.add_argument("--quick", action="store_true",
                        help="V = 2000 only, 1 timed step, batch 64 (seconds per point)")
    add_out_flags(parser)
    args = parser.parse_args(argv)
    if args.point:
        row = run_point(int(args.point[0]), args.point[1], args.steps, args.batch_size,
                        args.threads, args.backend)
        if row is not None:
            print("RESULT " + json.dumps(row), flush=True)
        return 0
    torch.set_num_threads(args.threads)  # as each rank: the device label names it
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.steps, args.batch_size = 1, 64
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes
             else [2000] if args.quick else list(SIZES[device.type]))
    worlds = [int(w) for w in args.worlds.split(",") if w]
    try:
        modes = parse_choices("mode", args.modes, MODES)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if device.type == "cuda" and max(worlds) > torch.cuda.device_count():
        print(f"error: W={max(worlds)} needs as many GPUs, {torch.cuda.device_count()} here",
              file=sys.stderr)
        return 2
    rows = []
    for v in sizes:
        for world in worlds:
            for mode in modes:
                t0 = time.time()
                res = spawn_point(world, v, mode, args.steps, args.batch_size, args.threads,
                                  args.backend, args.mem_limit_gb, args.timeout)
                rows.append({"W": world, "V": v, "mode": mode, **res})
                print(f"W={world} V={v:>9} {mode:<6} {res['status']:<8} "
                      f"{res.get('median_s', math.nan):9.3f} s  sent "
                      f"{res.get('sent_mb', math.nan):8.2f} MB  peak "
                      f"{res.get('peak_mb_per_rank', '-')} MB  ({time.time() - t0:.0f} s wall)",
                      flush=True)
    memory = "resident set (ru_maxrss)" if device.type == "cpu" else "max_memory_allocated"
    note = (f"{device_label(device)}, torch {torch.__version__}, {args.threads} thread(s) per "
            f"rank; each point one `torchrun --standalone --nproc_per_node W` launch: one warm-up "
            f"step, then {args.steps} timed steps of the trainer's own global_step (global batch "
            f"B = {args.batch_size} users, d = 64, 2 layers, K = 128, all five loss terms, "
            f"synthetic data with V items), each between barriers. dp: every rank holds the whole "
            f"item table and all-reduces its gradient; shard: --shard-items, rank r holds "
            f"rows_per_rank of it. median_s: rank 0's median step; sent_mb: the largest rank's "
            f"bytes sent per step in its collectives, counted as ring algorithms send them "
            f"(all-reduce of S: 2 (W - 1) / W S; all-gather of S in all: (W - 1) / W S); "
            f"peak_mb: the largest rank's "
            f"peak {memory}; base_mb: the largest rank's memory before the first step.")
    write_table("dist", rows, COLUMNS, device, args.out or SCRATCH, note=note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
