"""The S4Rec objective (paper eq. 14), one function per term.

L = L_SR + alpha L_clust + beta1 L_SCL + beta2 L_CKD + lam L_adv. A term whose weight is 0 is not
computed at all, so the ablations are settings, not code paths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from s4rec_kernels import info_nce_proto, item_softmax_ce, sinkhorn
from s4rec_kernels._dispatch import resolve_backend

from .config import Config
from .model import Packed, S4Rec
from .precision import op_inputs

TERMS = ("sr", "clust", "scl", "ckd", "adv")


@dataclass
class Batch:
    """One training step's input: the sequences, two augmented views, and head/tail labels."""

    original: Packed  # next-item inputs with their targets
    view1: Optional[Packed]  # None when no term needs views
    view2: Optional[Packed]
    head: Tensor  # (B,) int64, 1 = head user
    shared: Optional[Tuple[Tensor, Tensor]] = None  # --sr-loss sampled: ids (M,), log Q (V + 1,)


def weights(cfg: Config) -> Dict[str, float]:
    return {"sr": 1.0, "clust": cfg.alpha, "scl": cfg.beta1, "ckd": cfg.beta2, "adv": cfg.lam}


def needs_views(cfg: Config) -> bool:
    return cfg.beta1 > 0 or cfg.beta2 > 0


def sr_loss(item_table: Tensor, hidden: List[Tensor], targets: List[Tensor], kind: str = "ce",
            negatives: Optional[List[Tensor]] = None,
            shared: Optional[Tuple[Tensor, Tensor]] = None, shard=None) -> Tensor:
    """L_SR over every non-padded position; padding is never scored.

    "ce": softmax over every item (eq. 1). "bce": SASRec's binary cross-entropy on the target and
    one negative per position (`negatives`, aligned with `targets`). "sampled": softmax over the
    target and M negatives shared by the batch (`shared` = item ids (M,) and log Q of every item id
    (V + 1,), Q the probability that one draw gives the item), every logit corrected
    by -log(M Q), and a negative equal to the target left out.

    `shard` (a VocabShard, "ce" only): `item_table` is this rank's rows of the table, and the
    loss is this rank's share of the vocabulary-parallel softmax (its rows' sum over the count of
    every rank's rows)."""
    if shard is not None and kind != "ce":
        raise ValueError(f"sr_loss: a sharded item table supports kind 'ce' only, got {kind!r}")
    if kind == "ce" and resolve_backend("item_softmax_ce", "auto", item_table) == "triton":
        # every position, padding (id 0 -> row -1) ignored by the kernels, which skip it
        # without waiting for the device (selecting the real positions here would wait)
        h = torch.cat([hb.flatten(0, 1) for hb in hidden])  # (B L, d)
        t = torch.cat([tb.flatten() for tb in targets]) - 1
        return item_softmax_ce(*op_inputs(h, item_table), t, ignore_index=-1, shard=shard)
    h = torch.cat([hb[tb > 0] for hb, tb in zip(hidden, targets)])  # (N, d)
    t = torch.cat([tb[tb > 0] for tb in targets]) - 1  # item id -> row of the item table
    if kind == "ce":
        return item_softmax_ce(*op_inputs(h, item_table), t, shard=shard)
    pos = (h * item_table[t]).sum(1)  # (N,)
    if kind == "bce":
        n = torch.cat([nb[tb > 0] for nb, tb in zip(negatives, targets)]) - 1
        neg = (h * item_table[n]).sum(1)  # (N,)
        valid = (n >= 0).to(neg.dtype)  # 0 = the user has seen every item: no negative
        return (F.softplus(-pos) + valid * F.softplus(neg)).mean()
    if kind == "sampled":
        ids, log_q = shared  # (M,) item ids, (V + 1,) log Q of every item id
        log_m = math.log(len(ids))  # log(M Q) is the log of each item's expected count in M draws
        neg = h @ item_table[ids - 1].T - (log_q[ids] + log_m)  # (N, M)
        neg = neg.masked_fill(ids[None, :] - 1 == t[:, None], float("-inf"))
        pos = pos - (log_q[t + 1] + log_m)
        logits = torch.cat([pos[:, None], neg], dim=1)  # (N, 1 + M)
        return (torch.logsumexp(logits, dim=1) - pos).mean()
    raise ValueError(f"sr_loss: kind must be 'ce', 'bce' or 'sampled', got {kind!r}")


def cluster_scores(z: Tensor, prototypes: Tensor, eps: float, n_iters: int,
                   group=None, group_rows=None) -> Tuple[Tensor, Tensor]:
    """Cosine scores (B, K) and the Sinkhorn equipartition target Q (B, K), no gradient (eqs. 3-6).
    With a process group, Q is this rank's rows of the target over every rank's users
    (``group_rows``: each rank's user count, if known)."""
    scores = F.normalize(z, dim=1) @ F.normalize(prototypes, dim=1).T  # (B, K)
    return scores, sinkhorn(*op_inputs(scores.detach()), eps, n_iters, group=group,
                            group_rows=group_rows)


def cluster_loss(scores: Tensor, q: Tensor, tau: float) -> Tensor:
    """Cross-entropy of the soft assignment softmax(S / tau) against the target Q (eq. 7).
    Under autocast log_softmax computes in fp32, whatever the scores' dtype."""
    return -(q * F.log_softmax(scores / tau, dim=1)).sum(1).mean()


def contrast_loss(z1: Tensor, z2: Tensor, prototypes: Tensor, assign: Tensor, tau: float,
                  normalize: bool, group=None, group_rows=None) -> Tensor:
    """InfoNCE with in-batch and prototype negatives, the own cluster left out (eqs. 8-10).
    With a process group: this rank's share, its anchors against every rank's views."""
    if normalize:
        z1, z2, prototypes = (F.normalize(t, dim=1) for t in (z1, z2, prototypes))
    return info_nce_proto(*op_inputs(z1, z2, prototypes), assign, tau, group=group,
                          group_rows=group_rows)


def distill_loss(z1: Tensor, z2: Tensor, prototypes: Tensor, assign: Tensor, tau: float,
                 normalize: bool) -> Tensor:
    """KL(teacher || student) over the d dimensions, teacher = the assigned prototype (eqs. 11-12)."""
    teacher = prototypes[assign].detach()  # (B, d)
    if normalize:
        teacher = F.normalize(teacher, dim=1)
    log_t = F.log_softmax(teacher / tau, dim=1)
    total = z1.new_zeros(())
    for z in (z1, z2):
        if normalize:
            z = F.normalize(z, dim=1)
        log_s = F.log_softmax(z / tau, dim=1)
        total = total + (log_t.exp() * (log_t - log_s)).sum(1).mean()
    return total


def compute_losses(model: S4Rec, batch: Batch, cfg: Config, group=None, shard=None,
                   group_rows=None) -> Tuple[Dict[str, Tensor], Optional[Tensor]]:
    """Every active term of the objective, unweighted, and the users' assigned clusters h(u).

    The clustering, contrast and distillation terms see z through the projection head (identity
    with --proj-head none); the adversary sees z itself. With --prototypes kmeans the prototypes
    are fixed K-means centroids and h(u) is the nearest one. `group` runs Sinkhorn and the
    contrast across the ranks (`group_rows`: each rank's user count, which saves the ops a gather
    that waits for the device); `shard` is the VocabShard of a sharded item table (L_SR
    vocabulary parallel)."""
    w = weights(cfg)
    z, hidden = model.encoder.encode(batch.original)  # (B, d)
    terms = {"sr": sr_loss(model.encoder.item_table(), hidden, batch.original.targets, cfg.sr_loss,
                           batch.original.negatives, batch.shared, shard)}
    assign = None
    if w["clust"] > 0 or needs_views(cfg):
        zp = model.project(z)
        if cfg.prototypes == "kmeans":
            with torch.no_grad():
                assign = (F.normalize(zp, dim=1) @ F.normalize(model.prototypes, dim=1).T).argmax(1)
        else:
            scores, q = cluster_scores(zp, model.prototypes, cfg.eps, cfg.sinkhorn_iters, group,
                                       group_rows)
            assign = q.argmax(1)  # (B,)
            if w["clust"] > 0:
                # Q as Sinkhorn returns it (fp32, or fp64 for fp64 scores), not rounded to bf16
                terms["clust"] = cluster_loss(scores, q.to(torch.promote_types(scores.dtype,
                                                                                q.dtype)), cfg.tau1)
    if needs_views(cfg):
        z1 = model.project(model.encoder.encode(batch.view1)[0])
        z2 = model.project(model.encoder.encode(batch.view2)[0])
        if w["scl"] > 0:
            terms["scl"] = contrast_loss(z1, z2, model.prototypes, assign, cfg.tau2, cfg.normalize,
                                         group, group_rows)
        if w["ckd"] > 0:
            terms["ckd"] = distill_loss(z1, z2, model.prototypes, assign, cfg.tau3, cfg.normalize)
    if w["adv"] > 0:
        z_adv = F.normalize(z, dim=1) if cfg.normalize else z
        terms["adv"] = F.cross_entropy(model.head_logits(z_adv), batch.head)
    return terms, assign


def gradient_shares(terms: Dict[str, Tensor], cfg: Config, params: List[Tensor]) -> Dict[str, float]:
    """Each weighted term's share of the encoder's gradient: |grad w_t L_t| / sum_t |grad w_t L_t|
    over `params` (Euclidean norms), so a term that is on but moves nothing shows a share near 0.
    Leaves the graph in place for the step's own backward."""
    w = weights(cfg)
    norms = {}
    for name, value in terms.items():
        grads = torch.autograd.grad(w[name] * value, params, retain_graph=True, allow_unused=True)
        norms[name] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
    total = sum(norms.values()) or 1.0
    return {name: n / total for name, n in norms.items()}


def total_loss(terms: Dict[str, Tensor], cfg: Config) -> Tensor:
    w = weights(cfg)
    return sum(w[name] * value for name, value in terms.items())
