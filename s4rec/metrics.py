"""Full-ranking evaluation: every item is a candidate, ranks come from `item_rank`.

No (users x items) score matrix larger than one evaluation batch is ever built, and the ranks are
integers computed per user, so the metrics do not depend on the evaluation batch size.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from s4rec_kernels import item_rank

from .data import SequenceData, history_csr, split_input, split_target
from .model import S4Rec, pack

KS = (5, 10, 20)


def protocol(exclude_history: str, loss: str = "full softmax over all items") -> Dict[str, str]:
    """How the numbers were measured; stored beside every metrics file."""
    return {
        "candidates": "all items (full ranking, no sampled negatives)",
        "history": "the user's input history is excluded from the ranking" if exclude_history == "all"
        else "the user's input history is ranked like any other item",
        "ties": "pessimistic: every other item scoring >= the target ranks above it",
        "split": "leave-one-out: valid target = second to last item, test target = last item",
        "selection": "best validation ndcg@20",
        "loss": loss,
    }


def rank_metrics(ranks: np.ndarray, ks=KS) -> Dict[str, float]:
    """hit@k = [rank < k], ndcg@k = 1 / log2(rank + 2) if rank < k, averaged over users."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hit@{k}"] = float(hit.mean()) if len(ranks) else float("nan")
    for k in ks:
        gain = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
        out[f"ndcg@{k}"] = float(gain.mean()) if len(ranks) else float("nan")
    return out


@torch.no_grad()
def compute_ranks(model: S4Rec, data: SequenceData, split: str, batch_size: int,
                  exclude_history: str = "all", max_pad: float = 1 / 3,
                  users: Optional[np.ndarray] = None) -> np.ndarray:
    """The rank (0 = best) of every user's held-out item of `split` ("valid" or "test")."""
    if exclude_history not in ("all", "none"):
        raise ValueError(f"exclude_history must be 'all' or 'none', got {exclude_history!r}")
    was_training = model.training
    model.eval()
    encoder = model.encoder
    device = encoder.item_emb.weight.device
    items = encoder.item_table()
    users = np.arange(len(data)) if users is None else np.asarray(users)
    ranks = np.empty(len(users), dtype=np.int64)
    try:
        for start in range(0, len(users), batch_size):
            batch = users[start:start + batch_size]
            packed = pack(split_input(data, batch, split), encoder.max_len, max_pad, device)
            z, _ = encoder.encode(packed)  # (b, d)
            targets = torch.as_tensor(split_target(data, batch, split) - 1, device=device)
            if exclude_history == "all":
                indptr, indices = history_csr(data, batch, split)
            else:
                indptr, indices = np.zeros(len(batch) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
            rank = item_rank(z, items, targets, torch.as_tensor(indptr, device=device),
                             torch.as_tensor(indices, device=device))
            ranks[start:start + len(batch)] = rank.cpu().numpy()
    finally:
        model.train(was_training)
    return ranks


def evaluate(model: S4Rec, data: SequenceData, split: str, head: np.ndarray, batch_size: int,
             exclude_history: str = "all", max_pad: float = 1 / 3) -> Dict[str, Dict[str, float]]:
    """Metrics overall and for head and tail users: {"overall": {"hit@5": ...}, "head": ..., ...}."""
    ranks = compute_ranks(model, data, split, batch_size, exclude_history, max_pad)
    return {
        "overall": rank_metrics(ranks),
        "head": rank_metrics(ranks[head]),
        "tail": rank_metrics(ranks[~head]),
    }


def format_table(results: Dict[str, Dict[str, float]], title: str = "") -> str:
    """A fixed-width table: one row per user group, one column per metric."""
    names = [f"hit@{k}" for k in KS] + [f"ndcg@{k}" for k in KS]
    lines = [title] if title else []
    lines.append(f"{'users':<8}" + "".join(f"{n:>10}" for n in names))
    for group, values in results.items():
        lines.append(f"{group:<8}" + "".join(f"{values[n]:>10.4f}" for n in names))
    return "\n".join(lines)
