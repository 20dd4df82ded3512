"""Train S4Rec and report full-ranking metrics: `python -m s4rec.train [--data PATH] [flags]`.

With no --data it trains on an embedded synthetic data set (planted intents, long-tailed popularity,
head/tail lengths) in about a minute on a laptop CPU. `--help` lists every flag.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from .augment import Augmenter
from .config import Config, ConfigError, check_config, parse_config, to_dict
from .data import DataError, SequenceData, head_users, load_sequences, synthetic, train_sequences
from .losses import TERMS, Batch, compute_losses, needs_views, total_loss
from .metrics import evaluate, format_table, protocol
from .model import S4Rec, pack


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite; the run stops and keeps its best checkpoint."""


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def load_data(cfg: Config) -> SequenceData:
    data = synthetic() if cfg.data is None else load_sequences(cfg.data, cfg.n_items)
    print(f"data {data.name}: {len(data)} users, {data.n_items} items, "
          f"{int(data.lengths.sum())} interactions")
    if data.n_skipped:
        print(f"skipped {data.n_skipped} users with fewer than 3 items (they cannot be split)")
    return data


def training_pool(data: SequenceData) -> np.ndarray:
    """Every training interaction (the last two items of each user held out): draws by popularity."""
    keep = np.ones(len(data.items), dtype=bool)
    keep[data.offsets[1:] - 1] = False
    keep[data.offsets[1:] - 2] = False
    return data.items[keep]


def make_batch(data: SequenceData, users: np.ndarray, head: np.ndarray, cfg: Config,
               augmenter: Augmenter, rng: np.random.Generator, device) -> Batch:
    """Next-item pairs S[:-3] -> S[1:-2] for each user, and two augmented views of the inputs."""
    cut = [s[-(cfg.max_len + 1):] for s in train_sequences(data, users)]
    inputs = [s[:-1] for s in cut]
    targets = [s[1:] for s in cut]
    original = pack(inputs, cfg.max_len, cfg.max_pad, device, targets)
    view1 = view2 = None
    if needs_views(cfg):
        view1 = pack(augmenter.views(inputs, rng), cfg.max_len, cfg.max_pad, device)
        view2 = pack(augmenter.views(inputs, rng), cfg.max_len, cfg.max_pad, device)
    labels = torch.as_tensor(head[users].astype(np.int64), device=device)
    return Batch(original, view1, view2, labels)


def cluster_health(counts: np.ndarray) -> Dict[str, float]:
    """Entropy of cluster usage (ln K when even) and the number of prototypes nobody was assigned to."""
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    return {"cluster_entropy": float(-(nz * np.log(nz)).sum()), "empty_clusters": int((counts == 0).sum())}


def train_epoch(model: S4Rec, optimizer, data, trainable, head, cfg, augmenter, rng, device,
                step: int, epoch: int):
    """One pass over the trainable users in random batches; returns (epoch stats, step)."""
    model.train()
    n_batches = max(1, math.ceil(len(trainable) / cfg.batch_size))
    batches = np.array_split(rng.permutation(trainable), n_batches)
    sums = {}
    counts = np.zeros(cfg.n_clusters, dtype=np.int64)
    real = encoded = 0
    bar = tqdm(batches, desc=f"epoch {epoch}", disable=not cfg.progress, leave=False, file=sys.stdout)
    for users in bar:
        batch = make_batch(data, users, head, cfg, augmenter, rng, device)
        terms, assign = compute_losses(model, batch, cfg)
        loss = total_loss(terms, cfg)
        if not torch.isfinite(loss):
            bad = [name for name, value in terms.items() if not torch.isfinite(value)]
            raise NonFiniteLoss(f"loss term {', '.join(bad) or 'total'} became non-finite at epoch "
                                f"{epoch}, step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step < cfg.freeze_protos_steps:
            model.prototypes.grad = None
        optimizer.step()
        if cfg.proto_renorm:
            model.renormalize_prototypes()
        step += 1
        for name, value in [*terms.items(), ("total", loss)]:
            sums[name] = sums.get(name, 0.0) + value.item()
        if assign is not None:
            counts += np.bincount(assign.cpu().numpy(), minlength=cfg.n_clusters)
        real += batch.original.n_real
        encoded += batch.original.n_encoded
        bar.set_postfix(loss=f"{loss.item():.4f}")
    stats = {f"loss_{k}": v / len(batches) for k, v in sums.items()}
    if counts.sum():
        stats.update(cluster_health(counts))
    stats["padding_share"] = 1.0 - real / max(encoded, 1)
    return stats, step


def save_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def default_run_dir(data: SequenceData) -> Path:
    return Path("runs") / f"{data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(cfg: Config) -> Dict:
    check_config(cfg)
    rng = seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    head = head_users(data, cfg.head_frac)
    trainable = np.flatnonzero(data.lengths >= 4)  # training input S[:-3] must hold an item
    if len(trainable) < len(data):
        print(f"{len(data) - len(trainable)} users with 3 items have no training pair "
              "(they are still evaluated)")
    if len(trainable) == 0:
        raise DataError(f"{data.name}: no user has the 4 items a training pair needs")
    if cfg.batch_size < cfg.n_clusters or len(trainable) < cfg.n_clusters:
        warnings.warn(f"batches of {min(cfg.batch_size, len(trainable))} users are smaller than "
                      f"K={cfg.n_clusters} prototypes: the equipartition target cannot use them all")
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(data)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(run_dir / "config.json", to_dict(cfg))

    model = S4Rec(data.n_items, cfg.hidden, cfg.heads, cfg.layers, cfg.dropout, cfg.max_len,
                  cfg.n_clusters).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    augmenter = Augmenter(crop_ratio=cfg.crop_ratio, mask_ratio=cfg.mask_ratio,
                          reorder_ratio=cfg.reorder_ratio, insert_ratio=cfg.insert_ratio,
                          mask_id=model.encoder.mask_id, pool=training_pool(data))
    eval_args = dict(batch_size=cfg.eval_batch_size, exclude_history=cfg.exclude_history,
                     max_pad=cfg.max_pad)
    best_path = run_dir / "best.pt"
    best_score, best_epoch, bad_evals, step = -1.0, -1, 0, 0
    history: List[Dict] = []
    started = time.time()
    for epoch in range(cfg.resolved_epochs()):
        t0 = time.time()
        stats, step = train_epoch(model, optimizer, data, trainable, head, cfg, augmenter, rng,
                                  device, step, epoch)
        stats["train_seconds"] = time.time() - t0
        line = f"epoch {epoch:3d} " + " ".join(
            f"{k[5:]}={stats[k]:.4f}" for k in ["loss_total"] + [f"loss_{t}" for t in TERMS]
            if k in stats)
        if "cluster_entropy" in stats:
            line += (f" | clusters entropy={stats['cluster_entropy']:.3f}/{math.log(cfg.n_clusters):.3f}"
                     f" empty={stats['empty_clusters']}")
        line += f" | padding={stats['padding_share']:.1%} {stats['train_seconds']:.1f}s"
        if (epoch + 1) % cfg.eval_every == 0:
            t0 = time.time()
            valid = evaluate(model, data, "valid", head, **eval_args)["overall"]
            stats["eval_seconds"] = time.time() - t0
            stats["valid"] = valid
            line += (f" | valid hit@20={valid['hit@20']:.4f} ndcg@20={valid['ndcg@20']:.4f}"
                     f" ({stats['eval_seconds']:.1f}s)")
            if valid["ndcg@20"] > best_score:
                best_score, best_epoch, bad_evals = valid["ndcg@20"], epoch, 0
                torch.save({"model": model.state_dict(), "config": to_dict(cfg), "epoch": epoch,
                            "valid": valid}, best_path)
                line += " *"
            else:
                bad_evals += 1
        print(line, flush=True)
        history.append({"epoch": epoch, **stats})
        if bad_evals >= cfg.patience:
            print(f"early stop: no better valid ndcg@20 for {cfg.patience} evaluations")
            break
    train_seconds = time.time() - started

    if best_path.exists():
        model.load_state_dict(torch.load(best_path, map_location=device)["model"])
    t0 = time.time()
    valid = evaluate(model, data, "valid", head, **eval_args)
    test = evaluate(model, data, "test", head, **eval_args)
    eval_seconds = time.time() - t0
    print(format_table(valid, f"valid (best epoch {best_epoch})"))
    print(format_table(test, "test"))
    results = {
        "dataset": data.name,
        "users": len(data), "items": data.n_items, "head_users": int(head.sum()),
        "best_epoch": best_epoch, "epochs_run": len(history),
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        "device": str(device),
        "protocol": protocol(cfg.exclude_history),
        "valid": valid, "test": test, "history": history, "config": to_dict(cfg),
    }
    save_json(run_dir / "metrics.json", results)
    print(f"wrote {run_dir / 'metrics.json'}")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    try:
        cfg = parse_config(argv)
        run(cfg)
    except (DataError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        print(f"error: {err}; the best checkpoint so far is kept", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
