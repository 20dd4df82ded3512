"""End-to-end training throughput: seconds per step and per epoch, users per second, peak memory.

    python -m benchmarks.bench_train [--data PATH] [--quick] [--steps N] [--out DIR | --save]

Rows: each provider (eager references; the same with the encoder under torch.compile; the fused
Triton kernels, CUDA only) times each objective (SR only, the full S4Rec objective). A step is the
whole training step: batch assembly with augmentations, forward, backward and the optimiser.

When `recbole` is installed (an optional benchmark dependency), the SR-only objective also gets a
row for RecBole's SASRec with the CE loss at the same settings, on the same interactions (see
benchmarks/_recbole.py). Its epoch is not ours: ours is one pass over the users, each user's
training sequence encoded once with every position a next-item target; RecBole's is one pass over
one training sample per prefix of every user's sequence, each scored at its last position only.
Both epochs cover the same next-item targets (ours keeps each user's last max_len), so s/epoch and
targets/s compare, while s/step and users/s count different things.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from s4rec.augment import Augmenter
from s4rec.config import Config
from s4rec.data import head_users, load_sequences, synthetic
from s4rec.model import S4Rec
from s4rec.train import make_batch, train_step, training_pool
from s4rec_kernels._dispatch import default_backend

from . import _recbole
from ._harness import add_out_flags, device_label, peak_extra_mb, write_table

DATA_DIR = Path(os.environ.get("S4REC_DATA_DIR",
                              Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT_DATA = DATA_DIR / "Beauty.txt"
OBJECTIVES = {
    "SR only": dict(alpha=0.0, beta1=0.0, beta2=0.0, lam=0.0),
    "S4Rec": {},
}
RESULT_KEYS = ("s_per_step", "p20_s", "p80_s", "steps_per_epoch", "s_per_epoch", "users_per_s",
               "targets_per_s", "warmup_s", "peak_mb", "padding_share")
COLUMNS = ["data", "objective", "provider", "batch", "s_per_step", "p20_s", "p80_s",
           "steps_per_epoch", "s_per_epoch", "users_per_s", "targets_per_s", "speedup_vs_eager",
           "peak_mb", "padding_share", "warmup_s"]


def time_steps(data, cfg: Config, provider: str, steps: int, warmup: int, device) -> Dict:
    """Median seconds of a full training step, after `warmup` untimed steps.

    Returns RESULT_KEYS: the median and 20th/80th percentile seconds per step; steps per epoch (one
    pass over the trainable users) and seconds per epoch (median x steps); users and next-item
    targets (positions scored by the SR loss) per second; the warmup's seconds; peak extra memory
    in MB (CUDA only, else None); the share of encoded positions that were padding.
    """
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = S4Rec.from_config(data.n_items, cfg).to(device)
    if provider == "torch.compile":
        model.encoder.compile(dynamic=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    augmenter = Augmenter(mask_id=model.encoder.mask_id, pool=training_pool(data))
    head = head_users(data, cfg.head_frac)
    trainable = np.flatnonzero(data.lengths >= 4)
    batch_size = min(cfg.batch_size, len(trainable))

    counter = itertools.count()

    def step():
        users = rng.choice(trainable, batch_size, replace=False)
        batch = make_batch(data, users, head, cfg, augmenter, rng, device)
        train_step(model, optimizer, batch, cfg, next(counter))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return batch.original.padding_share, batch.original.n_real

    kernels = "triton" if provider == "fused (ours)" else "reference"
    with default_backend(kernels):
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        warm_s = time.perf_counter() - t0
        samples, padding, targets = [], [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            share, n_targets = step()
            samples.append(time.perf_counter() - t0)
            padding.append(share)
            targets.append(n_targets)
        peak = peak_extra_mb(step, device)
    median = float(np.median(samples))
    per_epoch = math.ceil(len(trainable) / batch_size)
    return {"s_per_step": median, "p20_s": float(np.percentile(samples, 20)),
            "p80_s": float(np.percentile(samples, 80)), "steps_per_epoch": per_epoch,
            "s_per_epoch": median * per_epoch, "users_per_s": batch_size / median,
            "targets_per_s": float(np.mean(targets)) / median, "warmup_s": warm_s,
            "peak_mb": peak, "padding_share": float(np.mean(padding))}


def measure(data, cfg: Config, providers: List[str], steps: int, warmup: int, device,
            recbole: bool = True) -> List[Dict]:
    """One row per (objective, provider); plus RecBole's SASRec for SR only when it is importable.

    speedup_vs_eager is eager's s/epoch over the row's: for our providers, which share an epoch,
    it is the per-step ratio too.
    """
    skip = _recbole.unavailable() if recbole else "not asked for"
    if recbole and skip:
        print(f"{_recbole.PROVIDER}: skipped, {skip}")
    rows = []
    for objective, weights in OBJECTIVES.items():
        cfg_obj = Config(**{**cfg.__dict__, **weights})
        runs = [(provider, time_steps, (provider,)) for provider in providers]
        if objective == "SR only" and not skip:
            runs.append((_recbole.PROVIDER, _recbole.time_steps, ()))
        eager_epoch = None
        for provider, timer, extra in runs:
            try:
                res = timer(data, cfg_obj, *extra, steps=steps, warmup=warmup, device=device)
            except torch.cuda.OutOfMemoryError:
                res = {"s_per_step": None, "note": "OOM"}
            except Exception as err:  # a peer's own failure must not take our rows with it
                if provider != _recbole.PROVIDER:
                    raise
                print(f"{provider}: failed, {type(err).__name__}: {err}")
                continue
            if provider == "eager":
                eager_epoch = res.get("s_per_epoch")
            epoch = res.get("s_per_epoch")
            speedup = eager_epoch / epoch if eager_epoch and epoch else None
            rows.append({"data": data.name, "objective": objective, "provider": provider,
                         "batch": cfg.batch_size, **res, "speedup_vs_eager": speedup})
    return rows


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
    rows = measure(data, cfg, providers, steps, 1 if quick else 3, device)
    note = (f"{steps} timed steps of B={cfg.batch_size} on {data.name}, d={cfg.hidden}, "
            f"{cfg.layers} layers, K={cfg.n_clusters}; {device_label(device)}. An epoch is one "
            "pass over the users; targets_per_s counts the next-item targets the SR loss scores.")
    if any(row["provider"] == _recbole.PROVIDER for row in rows):
        note += (f" {_recbole.PROVIDER}: hidden_size={cfg.hidden}, inner_size={4 * cfg.hidden}, "
                 f"n_layers={cfg.layers}, n_heads={cfg.heads}, dropout {cfg.dropout} (hidden and "
                 f"attention), MAX_ITEM_LIST_LENGTH={cfg.max_len}, train_batch_size="
                 f"{cfg.batch_size}, Adam lr={cfg.lr}, split LS valid_and_test, autograd anomaly "
                 "detection off (RecBole 1.2.1 turns it on at import). Its epoch is not ours: ours "
                 "encodes each user's training sequence once, every position a next-item target; "
                 "RecBole's is one sample per prefix of each user's training sequence, scored at "
                 "its last position only, hence its many more steps per epoch. Both cover the same "
                 "next-item targets (ours keeps each user's last max_len), so s_per_epoch and "
                 "targets_per_s compare; users_per_s is users for ours and prefix sequences for "
                 "RecBole. speedup_vs_eager = eager's s_per_epoch / the row's.")
    write_table("train", rows, COLUMNS, device, out_dir, note=note)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help=f"line-format file (default {DEFAULT_DATA})")
    parser.add_argument("--quick", action="store_true", help="few steps (the CPU default)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row")
    parser.add_argument("--compile", dest="compile_", action="store_true", default=None,
                        help="also time torch.compile on CPU (slow to compile)")
    add_out_flags(parser)
    args = parser.parse_args()
    quick = args.quick or not torch.cuda.is_available()
    run(quick, args.out, args.data, args.steps, args.compile_)


if __name__ == "__main__":
    main()
