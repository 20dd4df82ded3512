"""What a run prints and writes beside its checkpoints: the epoch line, log.jsonl, TensorBoard."""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Dict, List

from .checkpoint import atomic_write_bytes
from .data import SequenceData
from .losses import TERMS


def default_run_dir(data: SequenceData) -> Path:
    return Path("runs") / f"{data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def epoch_line(stats: Dict, n_clusters: int) -> str:
    line = f"epoch {stats['epoch']:3d} " + " ".join(
        f"{k[5:]}={stats[k]:.4f}" for k in ["loss_total"] + [f"loss_{t}" for t in TERMS] if k in stats)
    if "cluster_entropy" in stats:
        line += (f" | clusters entropy={stats['cluster_entropy']:.3f}/{math.log(n_clusters):.3f}"
                 f" empty={stats['empty_clusters']}")
    shares = [t for t in TERMS if f"grad_share_{t}" in stats]
    if len(shares) > 1:
        line += (" | grad share " + "/".join(shares) + "="
                 + "/".join(f"{stats[f'grad_share_{t}']:.2f}" for t in shares))
    line += f" | padding={stats['padding_share']:.1%} {stats['train_seconds']:.1f}s"
    if "valid" in stats:
        v = stats["valid"]
        line += (f" | valid hit@20={v['hit@20']:.4f} ndcg@20={v['ndcg@20']:.4f}"
                 f" ({stats['eval_seconds']:.1f}s)")
    return line


def write_log(run_dir: Path, history: List[Dict]) -> None:
    """log.jsonl: one JSON object per finished epoch (rewritten whole, so a resume never duplicates)."""
    text = "".join(json.dumps(entry) + "\n" for entry in history)
    atomic_write_bytes(run_dir / "log.jsonl", lambda tmp: tmp.write_text(text))


def tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("--tensorboard needs the tensorboard package (pip install tensorboard); "
                      "logging to log.jsonl only", stacklevel=2)
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def log_tensorboard(writer, stats: Dict) -> None:
    if writer is None:
        return
    for key, value in stats.items():
        if isinstance(value, (int, float)) and key != "epoch":
            writer.add_scalar(key, value, stats["epoch"])
    for key, value in stats.get("valid", {}).items():
        writer.add_scalar(f"valid/{key}", value, stats["epoch"])
