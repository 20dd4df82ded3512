"""Full-ranking evaluation: every item is a candidate, ranks come from `item_rank`.

No (users x items) score matrix larger than one evaluation batch is ever built, and the ranks are
integers computed per user, so the metrics do not depend on the evaluation batch size.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from s4rec_kernels import item_rank

from .data import SequenceData, history_csr, split_input, split_target
from .model import S4Rec, pack
from .precision import autocast, op_inputs

KS = (5, 10, 20)


def protocol(exclude_history: str, loss: str = "full softmax over all items",
             precision: Optional[str] = None) -> Dict[str, str]:
    """How the numbers were measured; stored beside every metrics file. ``precision`` is
    precision.describe's line for the run (left out when None)."""
    out = {
        "candidates": "all items (full ranking, no sampled negatives)",
        "history": "the user's input history is excluded from the ranking" if exclude_history == "all"
        else "the user's input history is ranked like any other item",
        "ties": "pessimistic: every other item scoring >= the target ranks above it",
        "split": "leave-one-out: valid target = second to last item, test target = last item",
        "selection": "best validation ndcg@20",
        "loss": loss,
    }
    if precision is not None:
        out["precision"] = precision
    return out


def sr_loss_name(cfg) -> str:
    """The training loss in words, for the protocol block."""
    if cfg.sr_loss == "bce":
        return "binary cross-entropy, one negative per position outside the user's training items"
    if cfg.sr_loss == "sampled":
        return (f"sampled softmax over {cfg.n_negatives} shared {cfg.negative_sampler} negatives, "
                "log-Q corrected")
    return "full softmax over all items"


def user_gains(ranks: np.ndarray, k: int) -> Dict[str, np.ndarray]:
    """Per user: hit@k = [rank < k] and ndcg@k = 1 / log2(rank + 2) if rank < k, else 0."""
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = ranks < k
    return {"hit": hit.astype(np.float64), "ndcg": np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)}


def rank_metrics(ranks: np.ndarray, ks=KS) -> Dict[str, float]:
    """user_gains averaged over users, for each k: {"hit@5": ..., "ndcg@5": ...}."""
    out = {}
    gains = {k: user_gains(ranks, k) for k in ks}
    for metric in ("hit", "ndcg"):
        for k in ks:
            out[f"{metric}@{k}"] = float(gains[k][metric].mean()) if len(ranks) else float("nan")
    return out


def encode_users(model: S4Rec, data: SequenceData, users: np.ndarray, split: str,
                 batch_size: int, max_pad: float = 1 / 3) -> Iterator[Tuple[np.ndarray, torch.Tensor]]:
    """(users of the batch, z (b, d)) for each batch of `split` inputs; call in eval mode."""
    encoder = model.encoder
    device = encoder.item_emb.weight.device
    for start in range(0, len(users), batch_size):
        batch = users[start:start + batch_size]
        packed = pack(split_input(data, batch, split), encoder.max_len, max_pad, device)
        z, _ = encoder.encode(packed)  # (b, d)
        yield batch, z


@torch.no_grad()
def compute_ranks(model: S4Rec, data: SequenceData, split: str, batch_size: int,
                  exclude_history: str = "all", max_pad: float = 1 / 3,
                  users: Optional[np.ndarray] = None, precision: str = "fp32") -> np.ndarray:
    """The rank (0 = best) of every user's held-out item of `split` ("valid" or "test");
    encoded and scored at `precision` (a resolved one: "bf16" autocasts, see s4rec.precision)."""
    if exclude_history not in ("all", "none"):
        raise ValueError(f"exclude_history must be 'all' or 'none', got {exclude_history!r}")
    was_training = model.training
    model.eval()
    device = model.encoder.item_emb.weight.device
    items = model.encoder.item_table()
    users = np.arange(len(data)) if users is None else np.asarray(users)
    ranks = np.empty(len(users), dtype=np.int64)
    done = 0
    try:
        with autocast(precision, device):
            for batch, z in encode_users(model, data, users, split, batch_size, max_pad):
                targets = torch.as_tensor(split_target(data, batch, split) - 1, device=device)
                if exclude_history == "all":
                    indptr, indices = history_csr(data, batch, split)
                else:
                    indptr = np.zeros(len(batch) + 1, dtype=np.int64)
                    indices = np.zeros(0, dtype=np.int64)
                rank = item_rank(*op_inputs(z, items), targets,
                                 torch.as_tensor(indptr, device=device),
                                 torch.as_tensor(indices, device=device))
                ranks[done:done + len(batch)] = rank.cpu().numpy()
                done += len(batch)
    finally:
        model.train(was_training)
    return ranks


def prototypes_trained(cfg) -> bool:
    """Whether a run's prototypes learnt anything: from L_clust, from the contrast (they are its
    negatives), or from K-means. Otherwise they are the random initialisation."""
    return cfg.alpha > 0 or cfg.beta1 > 0 or getattr(cfg, "prototypes", "online") == "kmeans"


@torch.no_grad()
def cluster_report(model: S4Rec, data: SequenceData, head: np.ndarray, batch_size: int,
                   max_pad: float = 1 / 3, trained: bool = True, precision: str = "fp32") -> Dict:
    """Each user's cluster (the prototype of highest cosine score with the user's projected
    training-sequence vector) and, per cluster, its size and share of head users (the paper's
    Fig. 3). Not the Sinkhorn target, which forces equal sizes. Empty for untrained prototypes."""
    k = model.prototypes.shape[0]
    if not trained:
        return {"k": k, "assignment": "none: the prototypes were never trained", "size": [],
                "head_rate": [], "head_rate_quartiles": None, "head_share": float(head.mean()),
                "empty_clusters": None}
    was_training = model.training
    model.eval()
    try:
        with autocast(precision, model.prototypes.device):
            z = torch.cat([model.project(z) for _, z in encode_users(
                model, data, np.arange(len(data)), "valid", batch_size, max_pad)])
    finally:
        model.train(was_training)
    z = z.float()  # the cosine scores in fp32, whatever z's dtype
    scores = F.normalize(z, dim=1) @ F.normalize(model.prototypes, dim=1).T  # (U, K)
    assign = scores.argmax(1).cpu().numpy()
    size = np.bincount(assign, minlength=k)
    heads = np.bincount(assign, weights=head.astype(np.float64), minlength=k)
    rate = [float(h / n) if n else None for h, n in zip(heads, size)]
    used = np.array([r for r in rate if r is not None])
    return {
        "k": k,
        "assignment": "argmax over prototypes of the cosine score of every user's training sequence",
        "size": size.tolist(),
        "head_rate": rate,
        "head_rate_quartiles": np.percentile(used, [25, 50, 75]).tolist() if len(used) else None,
        "head_share": float(head.mean()),
        "empty_clusters": int((size == 0).sum()),
    }


def evaluate(model: S4Rec, data: SequenceData, split: str, head: np.ndarray, batch_size: int,
             exclude_history: str = "all", max_pad: float = 1 / 3,
             precision: str = "fp32") -> Dict[str, Dict[str, float]]:
    """Metrics overall and for head and tail users: {"overall": {"hit@5": ...}, "head": ..., ...}."""
    ranks = compute_ranks(model, data, split, batch_size, exclude_history, max_pad,
                          precision=precision)
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
