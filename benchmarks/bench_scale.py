"""The cost curve against the catalogue size V: time and peak memory of one training step (SR only,
and the full S4Rec objective), one evaluation batch, and the SR loss alone.

    python -m benchmarks.bench_scale [--sizes 10000,100000,1000000] [--out DIR | --save]
                                     [--providers ours,eager,torch.compile,torch-lce]
                                     [--threads 1] [--mem-limit-gb 8] [--quick]

Every point runs in a fresh subprocess, so one point's memory does not count against the next and
a provider that runs out of memory is a result ("OOM"), not a crash. On the CPU the subprocess
gets an address-space limit (``--mem-limit-gb``; torch itself maps about 2.5 GB of it) and its
peak is the resident set (``ru_maxrss``); on CUDA the peak is ``max_memory_allocated``.

Workloads. "SR only" and "S4Rec": a whole training step (batch assembly, forward, backward, Adam)
of the default model (d = 64, 2 layers, K = 128; B = 512 users or --batch-size) on the synthetic data set with V
items. "eval": one evaluation batch, 1024 users encoded and ranked against all V items (history
excluded). "SR loss": item_softmax_ce forward and backward alone on N = 4096 rows, the place
where torch's own ``linear_cross_entropy`` can stand in.

Providers. "ours": backend "auto" (the Triton kernels on CUDA; on the CPU the chunked ops once the
logits pass the 256 MB budget). "eager": the eager references. "torch.compile": the references
under ``torch.compile(dynamic=True)``. "torch-lce": ``F.linear_cross_entropy`` with its chunked
options ("SR loss" only).

The table (<device>-scale.md and .json) and the plot (.png) go to runs/benchmarks/, to ``--out DIR``,
or with ``--save`` to benchmarks/results/, the committed ones.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ._harness import (SCRATCH, add_out_flags, device_label, device_slug, is_oom, parse_choices,
                       run_in_process, write_table)

SIZES = {"cpu": (10_000, 100_000, 1_000_000), "cuda": (10_000, 100_000, 1_000_000, 10_000_000)}
WORKLOADS = ("SR only", "S4Rec", "eval", "SR loss")
PROVIDERS = ("ours", "eager", "torch.compile", "torch-lce")
LOSS_ROWS = 4096  # rows of the "SR loss" workload (about 512 users x 8 positions)
EVAL_USERS = 1024
BATCH_SIZE = 512  # users per training step (--batch-size)
COLUMNS = ["V", "workload", "provider", "status", "median_s", "p20_s", "p80_s", "peak_mb",
           "base_mb", "step_extra_mb"]


# ----------------------------------------------------------------------------------------------
# one point, in its own process
# ----------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    """The resident set now (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KB on Linux


def _patch_compiled() -> None:
    """Replace the references of the item ops by their torch.compile'd selves (the public
    functions look them up in the module at every call)."""
    from s4rec_kernels import reference

    for name in ("item_softmax_ce", "item_rank", "item_topk"):
        setattr(reference, name, torch.compile(getattr(reference, name), dynamic=True))


def _workload(v: int, workload: str, provider: str, device: torch.device, batch_size: int,
              loss_rows: int):
    """The call to time for one point, built (model, data, inputs) outside the timing."""
    import torch.nn.functional as F

    from s4rec.batches import make_augmenter, make_batch
    from s4rec.config import Config
    from s4rec.data import head_users, synthetic
    from s4rec.metrics import compute_ranks
    from s4rec.model import S4Rec
    from s4rec.train import train_step
    from s4rec_kernels import item_softmax_ce

    torch.manual_seed(0)
    if workload == "SR loss":
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(loss_rows, 64, generator=g).to(device).requires_grad_(True)
        items = (0.1 * torch.randn(v, 64, generator=g)).to(device).requires_grad_(True)
        targets = torch.randint(0, v, (loss_rows,), generator=g).to(device)
        if provider == "torch-lce":
            options = torch.nn.LinearCrossEntropyOptions()
            loss = lambda: F.linear_cross_entropy(hidden, items, targets, options=options)  # noqa: E731
        else:
            loss = lambda: item_softmax_ce(hidden, items, targets)  # noqa: E731
        return lambda: torch.autograd.grad(loss(), (hidden, items))
    weights = {"SR only": dict(alpha=0.0, beta1=0.0, beta2=0.0, lam=0.0)}.get(workload, {})
    cfg = Config(**weights, batch_size=batch_size)
    data = synthetic(n_users=EVAL_USERS + 76, n_items=v)
    model = S4Rec.from_config(v, cfg).to(device)
    if workload == "eval":
        users = np.arange(EVAL_USERS)
        return lambda: compute_ranks(model, data, "valid", EVAL_USERS, users=users)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    augmenter = make_augmenter(cfg, data, model.encoder.mask_id)
    head = head_users(data, cfg.head_frac)
    rng = np.random.default_rng(0)
    trainable = np.flatnonzero(data.lengths >= 4)
    steps = iter(range(10**6))

    def step():
        users = rng.choice(trainable, cfg.batch_size, replace=False)
        batch = make_batch(data, users, head, cfg, augmenter, rng, device)
        train_step(model, optimizer, batch, cfg, next(steps))
    return step


def run_point(v: int, workload: str, provider: str, reps: int, batch_size: int = BATCH_SIZE,
              loss_rows: int = LOSS_ROWS) -> Dict:
    """Time ``reps`` calls after one warm-up call; the peak memory and the memory before them."""
    from s4rec_kernels._dispatch import default_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if provider == "torch.compile":
        _patch_compiled()
    backend = "auto" if provider in ("ours", "torch-lce") else "reference"
    try:
        with default_backend(backend):
            fn = _workload(v, workload, provider, device, batch_size, loss_rows)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                base = torch.cuda.memory_allocated(device) / 2**20
            else:
                base = _rss_mb()
            fn()  # warm-up: compiles, allocates the optimiser state (counted in the extra)
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                samples.append(time.perf_counter() - t0)
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not (is_oom(err) or "allocate" in str(err)):
            raise
        return {"status": "OOM"}
    peak = _peak_mb(device)
    return {"status": "ok", "median_s": float(np.median(samples)),
            "p20_s": float(np.percentile(samples, 20)), "p80_s": float(np.percentile(samples, 80)),
            "peak_mb": peak, "base_mb": base, "step_extra_mb": peak - base}


# ----------------------------------------------------------------------------------------------
# the parent: one subprocess per point
# ----------------------------------------------------------------------------------------------


def spawn_point(v: int, workload: str, provider: str, reps: int, threads: int,
                mem_limit_gb: Optional[float], timeout_s: float, batch_size: int = BATCH_SIZE,
                loss_rows: int = LOSS_ROWS) -> Dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--point", str(v), workload, provider,
           "--reps", str(reps), "--threads", str(threads), "--batch-size", str(batch_size),
           "--loss-rows", str(loss_rows)]
    result, proc = run_in_process(cmd, timeout_s, mem_limit_gb)
    if result is not None:
        return result
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if proc.returncode < 0 or "MemoryError" in proc.stderr or "allocate" in proc.stderr:
        return {"status": "OOM", "detail": tail[:200]}  # killed, or failed outside the step
    raise RuntimeError(f"point V={v} {workload} {provider} failed: {tail}")


def plot(rows: List[Dict], path: Path, title: str) -> None:
    """Log-log time and peak memory against V, one line per (workload, provider), x = OOM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    keys = sorted({(r["workload"], r["provider"]) for r in rows})
    for workload, provider in keys:
        mine = sorted((r for r in rows if (r["workload"], r["provider"]) == (workload, provider)),
                      key=lambda r: r["V"])
        ok = [r for r in mine if r["status"] == "ok"]
        for ax, key in zip(axes, ("median_s", "peak_mb")):
            line, = ax.plot([r["V"] for r in ok], [r[key] for r in ok], marker="o",
                            label=f"{workload}: {provider}")
            failed = [r["V"] for r in mine if r["status"] != "ok"]
            if failed and ok:
                ax.scatter(failed, [ok[-1][key]] * len(failed), marker="x", s=80,
                           color=line.get_color())
    ran = any(r["status"] == "ok" for r in rows)
    for ax, label in zip(axes, ("seconds per call", "peak memory (MB)")):
        if ran:
            ax.set_xscale("log")
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no point ran", ha="center", transform=ax.transAxes)
        ax.set_xlabel("items V")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("time (x: out of memory, drawn at the last size that ran)")
    axes[1].set_title("peak memory")
    if ran:
        axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--point", nargs=3, metavar=("V", "WORKLOAD", "PROVIDER"),
                        help=argparse.SUPPRESS)  # one point, in the subprocess
    parser.add_argument("--sizes", default=None, help="comma-separated V (default: 10K, 100K, 1M "
                        "on the CPU, and 10M on CUDA)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--reps", type=int, default=3, help="timed calls per point, after one "
                        "warm-up call (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--mem-limit-gb", type=float, default=8.0,
                        help="address-space limit of each CPU point's process (default 8)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per point")
    parser.add_argument("--quick", action="store_true", help="V = 2000 and 20000 only")
    add_out_flags(parser)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help=f"users per training step (default {BATCH_SIZE})")
    parser.add_argument("--loss-rows", type=int, default=LOSS_ROWS,
                        help=f"rows of the SR loss workload (default {LOSS_ROWS})")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.point:
        v, workload, provider = int(args.point[0]), args.point[1], args.point[2]
        result = run_point(v, workload, provider, args.reps, args.batch_size, args.loss_rows)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes
             else [2000, 20000] if args.quick else list(SIZES[device.type]))
    try:
        workloads = parse_choices("workload", args.workloads, WORKLOADS)
        providers = parse_choices("provider", args.providers, PROVIDERS)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = []
    for workload in workloads:
        for provider in providers:
            if provider == "torch-lce" and workload != "SR loss":
                continue  # it stands in for the loss only
            stopped = None
            for v in sizes:
                if stopped:  # a larger V cannot fit where a smaller one did not
                    rows.append({"V": v, "workload": workload, "provider": provider,
                                 "status": f"{stopped} (not run: a smaller V did not fit)"})
                    continue
                t0 = time.time()
                res = spawn_point(v, workload, provider, args.reps, args.threads,
                                  args.mem_limit_gb, args.timeout, args.batch_size,
                                  args.loss_rows)
                rows.append({"V": v, "workload": workload, "provider": provider, **res})
                print(f"V={v:>9} {workload:<8} {provider:<14} {res['status']:<8} "
                      f"{res.get('median_s', math.nan):9.3f} s  peak {res.get('peak_mb', math.nan):8.0f}"
                      f" MB  ({time.time() - t0:.0f} s wall)", flush=True)
                if res["status"] != "ok":
                    stopped = res["status"].split(" ")[0]
    out = args.out or SCRATCH
    limit = f"{args.mem_limit_gb:g} GB address space per point" if device.type == "cpu" else \
        "max_memory_allocated"
    note = (f"{device_label(device)}, torch {torch.__version__}, {args.threads} thread(s); "
            f"{args.reps} timed calls after one warm-up per point, each point in a fresh process "
            f"({limit}). peak_mb: the process's peak resident set (CPU) or allocated memory "
            f"(CUDA); base_mb: before the first call (torch, model, data, inputs); "
            f"step_extra_mb = peak - base, which holds the optimiser state (2 x V x d floats) "
            f"and the gradients (V x d of the item table) besides the step's working memory. Training steps: "
            f"B = {args.batch_size} users; SR loss: N = {args.loss_rows} rows, d = 64; eval: "
            f"{EVAL_USERS} users.")
    write_table("scale", rows, COLUMNS, device, out, note=note)
    png = out / f"{device_slug(device)}-scale.png"
    plot(rows, png, f"s4rec cost against V on {device_label(device)}")
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
