"""End-to-end training throughput: seconds per step and per epoch, users per second, peak memory.

    python -m benchmarks.bench_train [--data PATH] [--quick] [--steps N] [--out DIR]

Rows: each provider (eager references; the same with the encoder under torch.compile; the fused
Triton kernels, CUDA only) times each objective (SR only, the full S4Rec objective). A step is the
whole training step: batch assembly with augmentations, forward, backward and the optimiser.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from s4rec.augment import Augmenter
from s4rec.config import Config
from s4rec.data import head_users, load_sequences, synthetic
from s4rec.losses import compute_losses, total_loss
from s4rec.model import S4Rec
from s4rec.train import make_batch, training_pool
from s4rec_kernels._dispatch import default_backend

from ._harness import device_label, peak_extra_mb, write_table

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Beauty.txt"
OBJECTIVES = {
    "SR only": dict(alpha=0.0, beta1=0.0, beta2=0.0, lam=0.0),
    "S4Rec": {},
}


def time_steps(data, cfg: Config, provider: str, steps: int, warmup: int, device) -> Dict:
    """Median seconds of a full training step, after `warmup` untimed steps."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = S4Rec(data.n_items, cfg.hidden, cfg.heads, cfg.layers, cfg.dropout, cfg.max_len,
                  cfg.n_clusters).to(device)
    if provider == "torch.compile":
        model.encoder.compile(dynamic=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    augmenter = Augmenter(mask_id=model.encoder.mask_id, pool=training_pool(data))
    head = head_users(data, cfg.head_frac)
    trainable = np.flatnonzero(data.lengths >= 4)
    batch_size = min(cfg.batch_size, len(trainable))

    def step():
        users = rng.choice(trainable, batch_size, replace=False)
        batch = make_batch(data, users, head, cfg, augmenter, rng, device)
        terms, _ = compute_losses(model, batch, cfg)
        loss = total_loss(terms, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.renormalize_prototypes()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return batch.original.padding_share

    kernels = "triton" if provider == "fused (ours)" else "reference"
    with default_backend(kernels):
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        warm_s = time.perf_counter() - t0
        samples, padding = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            padding.append(step())
            samples.append(time.perf_counter() - t0)
        peak = peak_extra_mb(step, device)
    median = float(np.median(samples))
    per_epoch = math.ceil(len(trainable) / batch_size)
    return {"s_per_step": median, "p20_s": float(np.percentile(samples, 20)),
            "p80_s": float(np.percentile(samples, 80)), "s_per_epoch": median * per_epoch,
            "users_per_s": batch_size / median, "warmup_s": warm_s,
            "peak_mb": peak, "padding_share": float(np.mean(padding))}


def run(quick: bool = True, out_dir: Optional[Path] = None, data_path: Optional[str] = None,
        steps: Optional[int] = None, compile_: Optional[bool] = None) -> List[Dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(data_path) if data_path else DEFAULT_DATA
    data = load_sequences(path) if path.exists() else synthetic()
    cfg = Config()
    steps = steps or (3 if quick else 20)
    providers = ["eager"]
    if compile_ if compile_ is not None else device.type == "cuda":
        providers.append("torch.compile")
    if device.type == "cuda":
        providers.append("fused (ours)")
    rows = []
    for objective, weights in OBJECTIVES.items():
        cfg_obj = Config(**{**cfg.__dict__, **weights})
        eager_s = None
        for provider in providers:
            try:
                res = time_steps(data, cfg_obj, provider, steps, warmup=1 if quick else 3,
                                 device=device)
            except torch.cuda.OutOfMemoryError:
                res = {"s_per_step": None, "note": "OOM"}
            if provider == "eager":
                eager_s = res["s_per_step"]
            speedup = eager_s / res["s_per_step"] if eager_s and res["s_per_step"] else None
            rows.append({"data": data.name, "objective": objective, "provider": provider,
                         "batch": cfg.batch_size, **res, "speedup_vs_eager": speedup})
    columns = ["data", "objective", "provider", "batch", "s_per_step", "p20_s", "p80_s",
               "s_per_epoch", "users_per_s", "speedup_vs_eager", "peak_mb", "padding_share",
               "warmup_s"]
    write_table("train", rows, columns, device, out_dir,
                note=f"{steps} timed steps of B={cfg.batch_size} on {data.name}, d={cfg.hidden}, "
                     f"{cfg.layers} layers, K={cfg.n_clusters}; {device_label(device)}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help=f"line-format file (default {DEFAULT_DATA})")
    parser.add_argument("--quick", action="store_true", help="few steps (the CPU default)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row")
    parser.add_argument("--compile", dest="compile_", action="store_true", default=None,
                        help="also time torch.compile on CPU (slow to compile)")
    parser.add_argument("--out", default=None, help="folder for the tables")
    args = parser.parse_args()
    quick = args.quick or not torch.cuda.is_available()
    run(quick, args.out, args.data, args.steps, args.compile_)


if __name__ == "__main__":
    main()
