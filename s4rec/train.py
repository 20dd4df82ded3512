"""Train S4Rec and report full-ranking metrics: `python -m s4rec.train [--data PATH] [flags]`.

With no --data it trains on an embedded synthetic data set (planted intents, long-tailed popularity,
head/tail lengths) in about a minute on a laptop CPU. `--help` lists every flag.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from s4rec_kernels._dispatch import (default_backend, deferred_errors, interpreter_enabled,
                                     logits_budget)

from . import checkpoint, distributed, precision
from .checkpoint import Interrupted, StopFlag
from .config import Config, ConfigError, parse_seeds, resolve, to_dict  # noqa: F401 (resolve)
from .batches import make_augmenter, make_batch, training_pool, window  # noqa: F401 (tests)
from .data import DataError, head_users, save_mapping
from .losses import compute_losses, gradient_shares, total_loss
from .metrics import (cluster_report, evaluate, format_table, protocol, prototypes_trained,
                      sr_loss_name)
from .model import S4Rec
from .runtime import cluster_health, load_data, resolve_device, seed_everything, warn_clusters
from .prototypes import fit_kmeans
from .runlog import default_run_dir, epoch_line, log_tensorboard, tensorboard_writer, write_log


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite; the run stops and keeps its best checkpoint."""


def train_step(model: S4Rec, optimizer, batch, cfg: Config, step: int, where: str = "",
               shares: Optional[Dict[str, float]] = None):
    """One optimiser step on `batch`: (total loss, unweighted terms, assigned clusters or None).
    A non-finite loss raises NonFiniteLoss naming the terms, before any parameter changes.
    `shares`, when given, receives each term's share of the encoder's gradient. The forward runs
    at --precision (bf16: under autocast); the backward follows the forward's dtypes."""
    device = model.prototypes.device
    with precision.autocast(precision.resolve(cfg.precision, device)[0], device):
        terms, assign = compute_losses(model, batch, cfg)
        loss = total_loss(terms, cfg)
    if not torch.isfinite(loss):  # the step's one wait for the device
        bad = [name for name, value in terms.items() if not torch.isfinite(value)]
        causes = "".join(f"; {e}" for e in deferred_errors())  # inputs the kernels got wrong
        raise NonFiniteLoss(f"loss term {', '.join(bad) or 'total'} became non-finite at {where}"
                            f"step {step}{causes}")
    if shares is not None:
        shares.update(gradient_shares(terms, cfg, list(model.encoder.parameters())))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if step < cfg.freeze_protos_steps or cfg.prototypes == "kmeans":
        model.prototypes.grad = None
    optimizer.step()
    if cfg.proto_renorm:
        model.renormalize_prototypes()
    return loss, terms, assign


def train_epoch(model: S4Rec, optimizer, data, trainable, head, cfg, augmenter, rng, device,
                step: int, epoch: int, stop: StopFlag):
    """One pass over the trainable users in random batches; returns (epoch stats, step).
    The loss terms and cluster sizes are summed on the device and read once, at the end, so a
    step waits for the device only in its non-finite check (and, with --progress, at most once a
    second for the bar's loss)."""
    model.train()
    n_batches = max(1, math.ceil(len(trainable) / cfg.batch_size))
    batches = np.array_split(rng.permutation(trainable), n_batches)
    sums = counts = None
    real = encoded = 0
    bar = tqdm(batches, desc=f"epoch {epoch}", disable=not cfg.progress, leave=False, file=sys.stdout)
    next_postfix = time.monotonic()
    shares = {} if cfg.grad_share else None
    extra = {}
    if cfg.prototypes == "kmeans" and (cfg.beta1 > 0 or cfg.beta2 > 0):
        extra["kmeans_inertia"] = fit_kmeans(model, data, trainable, cfg.eval_batch_size,
                                             cfg.seed * 100003 + epoch, cfg.threads, cfg.max_pad)
    for i, users in enumerate(bar):
        stop.check()
        batch = make_batch(data, users, head, cfg, augmenter, rng, device)
        loss, terms, assign = train_step(model, optimizer, batch, cfg, step, f"epoch {epoch}, ",
                                         shares if i == 0 else None)
        step += 1
        values = torch.stack([v.detach().to(torch.float64) for v in (*terms.values(), loss)])
        sums = values if sums is None else sums + values
        if assign is not None:
            sizes = torch.bincount(assign, minlength=cfg.n_clusters)
            counts = sizes if counts is None else counts + sizes
        real += batch.original.n_real
        encoded += batch.original.n_encoded
        if cfg.progress and time.monotonic() >= next_postfix:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            next_postfix = time.monotonic() + 1.0
    names = [*terms, "total"]  # the same terms every step
    stats = {f"loss_{k}": v / len(batches) for k, v in zip(names, sums.tolist())}
    stats.update({f"grad_share_{k}": v for k, v in (shares or {}).items()}, **extra)
    if counts is not None and counts.sum():
        stats.update(cluster_health(counts.cpu().numpy()))
    stats["padding_share"] = 1.0 - real / max(encoded, 1)
    return stats, step


def run_one(cfg: Config) -> Dict:
    """Train one seed in cfg.run_dir (resuming from its last.pt when cfg.resume), then test."""
    rng = seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if cfg.kernels == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise ConfigError("--kernels triton needs a CUDA device (or TRITON_INTERPRET=1, which runs "
                          "the kernels slowly on the CPU)")
    prec, note = precision.resolve(cfg.precision, device)
    if note:
        print(note)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    data = load_data(cfg)
    head = head_users(data, cfg.head_frac)
    trainable = np.flatnonzero(data.lengths >= 4)  # training input S[:-3] must hold an item
    if len(trainable) < len(data):
        print(f"{len(data) - len(trainable)} users with 3 items have no training pair "
              "(they are still evaluated)")
    if len(trainable) == 0:
        raise DataError(f"{data.name}: no user has the 4 items a training pair needs")
    warn_clusters(cfg, len(trainable))
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(data)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(run_dir)  # recorded in config.json, and named by the resume hint

    model = S4Rec.from_config(data.n_items, cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    augmenter = make_augmenter(cfg, data, model.encoder.mask_id)
    eval_args = dict(batch_size=cfg.eval_batch_size, exclude_history=cfg.exclude_history,
                     max_pad=cfg.max_pad, precision=prec)
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    state = checkpoint.new_state()
    if cfg.resume:
        ckpt = checkpoint.restore(last_path, model, optimizer, device, cfg.patience)
        state = ckpt["state"]
        if ckpt["rng"] is not None:
            checkpoint.set_rng_state(ckpt["rng"], rng)
        else:  # a torchrun run's draws come from (seed, epoch, user): go on from a fresh stream
            rng = seed_everything(cfg.seed + 1_000_003 * state["epoch"])
            print(f"note: {run_dir} was trained under torchrun; this process continues it with "
                  "its own random stream, not the one a torchrun resume would use")
        write_log(run_dir, state["history"])
        print(f"resumed {run_dir} at epoch {state['epoch']}")
    checkpoint.save_json(to_dict(cfg), run_dir / "config.json")
    save_mapping(data, run_dir)  # original user and item tokens, for .inter input
    writer = tensorboard_writer(run_dir) if cfg.tensorboard else None

    def save_last():
        checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": None, "state": state, "rng": checkpoint.rng_state(rng),
                         "config": to_dict(cfg)}, last_path)

    epochs = cfg.resolved_epochs()
    with checkpoint.catch_signals() as stop, precision.settings(prec, device):
        while state["epoch"] < epochs and not state["stopped"]:
            save_last()  # the start of this epoch: what a resume after a crash replays from
            epoch = state["epoch"]
            t0 = time.time()
            stats, state["step"] = train_epoch(model, optimizer, data, trainable, head, cfg,
                                               augmenter, rng, device, state["step"], epoch, stop)
            stats = {"epoch": epoch, **stats, "train_seconds": time.time() - t0,
                     "lr": optimizer.param_groups[0]["lr"]}
            if (epoch + 1) % cfg.eval_every == 0:
                t0 = time.time()
                stats["valid"] = evaluate(model, data, "valid", head, **eval_args)["overall"]
                stats["eval_seconds"] = time.time() - t0
                if stats["valid"]["ndcg@20"] > state["best_score"]:
                    state.update(best_score=stats["valid"]["ndcg@20"], best_epoch=epoch, bad_evals=0)
                    checkpoint.save({"model": model.state_dict(), "config": to_dict(cfg),
                                     "epoch": epoch, "valid": stats["valid"]}, best_path)
                else:
                    state["bad_evals"] += 1
            print(epoch_line(stats, cfg.n_clusters) + (" *" if state["best_epoch"] == epoch else ""),
                  flush=True)
            state["history"].append(stats)
            state["epoch"] = epoch + 1
            write_log(run_dir, state["history"])
            log_tensorboard(writer, stats)
            if state["bad_evals"] >= cfg.patience:
                print(f"early stop: no better valid ndcg@20 for {cfg.patience} evaluations")
                state["stopped"] = True
        save_last()
    if writer is not None:
        writer.close()
    with precision.settings(prec, device):
        return finish(model, data, head, cfg, run_dir, state, device, eval_args)


def finish(model, data, head, cfg, run_dir, state, device, eval_args) -> Dict:
    """Reload the best checkpoint, evaluate valid and test, and write metrics.json."""
    best_path = run_dir / "best.pt"
    if best_path.exists():
        model.load_state_dict(torch.load(best_path, map_location=device)["model"])
    t0 = time.time()
    valid = evaluate(model, data, "valid", head, **eval_args)
    test = evaluate(model, data, "test", head, **eval_args)
    clusters = cluster_report(model, data, head, cfg.eval_batch_size, cfg.max_pad,
                              prototypes_trained(cfg), eval_args["precision"])
    eval_seconds = time.time() - t0
    print(format_table(valid, f"valid (best epoch {state['best_epoch']})"))
    print(format_table(test, "test"))
    quart = clusters["head_rate_quartiles"]
    if quart:
        print(f"head rate per cluster: quartiles {quart[0]:.3f} / {quart[1]:.3f} / {quart[2]:.3f} "
              f"(head share {clusters['head_share']:.3f}, {clusters['empty_clusters']} empty clusters)")
    results = {
        "dataset": data.name, "seed": cfg.seed,
        "users": len(data), "items": data.n_items, "head_users": int(head.sum()),
        "best_epoch": state["best_epoch"], "epochs_run": len(state["history"]),
        "train_seconds": round(sum(h["train_seconds"] + h.get("eval_seconds", 0.0)
                                   for h in state["history"]), 1),
        "eval_seconds": round(eval_seconds, 1), "device": str(device),
        "protocol": protocol(cfg.exclude_history, sr_loss_name(cfg),
                             precision.describe(eval_args["precision"], cfg.precision)),
        "valid": valid, "test": test, "clusters": clusters, "config": to_dict(cfg),
    }
    checkpoint.save_json(results, run_dir / "metrics.json")
    print(f"wrote {run_dir / 'metrics.json'}")
    return results


def run_seeds(cfg: Config, seeds: List[int]) -> Dict:
    """One run per seed in <run_dir>/seed-<s>, then the mean and standard deviation of test."""
    base = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / f"seeds-{time.strftime('%Y%m%d-%H%M%S')}"
    runs = []
    for seed in seeds:
        print(f"== seed {seed}")
        runs.append(run_one(replace(cfg, seed=seed, seeds=None, run_dir=str(base / f"seed-{seed}"))))
    summary = {"seeds": seeds, "test": {}, "valid": {}}
    for split in ("valid", "test"):
        for group in runs[0][split]:
            values = {m: [r[split][group][m] for r in runs] for m in runs[0][split][group]}
            summary[split][group] = {m: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1))
                                         if len(v) > 1 else 0.0} for m, v in values.items()}
    print(f"test over seeds {seeds} (mean ± std):")
    for m, v in summary["test"]["overall"].items():
        print(f"  {m:<8} {v['mean']:.4f} ± {v['std']:.4f}")
    checkpoint.save_json(summary, base / "summary.json")
    print(f"wrote {base / 'summary.json'}")
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    cfg = None
    try:
        cfg = resolve(argv)
        with default_backend(cfg.kernels), logits_budget(cfg.logits_budget_mb):
            if distributed.launched():  # torchrun: data parallel over its ranks
                return distributed.main(cfg)
            if cfg.shard_items:
                raise ConfigError("--shard-items splits the item table across the ranks of a "
                                  "torchrun run; start it with torchrun --nproc_per_node W -m "
                                  "s4rec.train, or give --shard-items false")
            if cfg.seeds:
                run_seeds(cfg, parse_seeds(cfg.seeds))
            else:
                run_one(cfg)
    except (DataError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        print(f"error: {err}; the best checkpoint so far is kept", file=sys.stderr)
        return 3
    except OSError as err:  # e.g. a run directory that cannot be written
        print(f"error: {err.filename or ''}: {err.strerror or err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        where = cfg.run_dir if cfg and cfg.run_dir else "the run directory"
        print(f"stopped by {err}; continue with: python -m s4rec.train --resume {where}",
              file=sys.stderr)
        return 128 + err.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
