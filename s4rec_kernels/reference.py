"""Eager PyTorch definitions of every fused op: the meaning of "correct".

Same signatures as the public functions minus ``backend``. Inputs are assumed valid (the public
functions in sinkhorn.py, info_nce.py, item_softmax.py and item_ranking.py check them); index
tensors are int64.

Dtype rule, for every op: float64 inputs are computed in and returned as float64; float32, float16
and bfloat16 inputs are computed in and returned as float32. Autocast is disabled inside, so the
result does not depend on an enclosing ``torch.autocast`` region. Gradients reach the inputs in
their own dtype.
"""

from __future__ import annotations

import contextlib
import math
from typing import ContextManager, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

# item_rank and item_topk score users in chunks holding at most this many (user, item) scores
# (one user at a time when V alone is larger). Module level so tests can shrink it.
MAX_SCORES_PER_CHUNK = 2**24


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _no_autocast(t: torch.Tensor) -> ContextManager:
    """Disable autocast for ``t``'s device (a no-op where autocast does not exist)."""
    if not torch.amp.is_autocast_available(t.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=t.device.type, enabled=False)


# ----------------------------------------------------------------------------------------------
# Sinkhorn-Knopp equipartition (SwAV)
# ----------------------------------------------------------------------------------------------


def sinkhorn(scores: torch.Tensor, eps: float = 0.05, n_iters: int = 3) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp target for ``scores`` (B, K); returns Q (B, K), no gradient.

    Q starts proportional to exp(scores / eps) and is normalised to total 1; then ``n_iters``
    times: every column (prototype) is scaled to sum to 1/K, then every row (user) to sum to 1/B;
    finally Q is multiplied by B. After at least one iteration each row sums to 1 (exactly, up to
    rounding) and each column to about B/K. With ``n_iters=0`` Q is B times a softmax over all
    B*K entries. Computed in log space (log-sum-exp normalisations), so no eps or score magnitude
    under- or overflows; NaN or infinite scores give NaN.
    """
    with torch.no_grad(), _no_autocast(scores):
        n_rows, n_cols = scores.shape
        log_q = scores.to(compute_dtype(scores)) / eps
        log_q = log_q - torch.logsumexp(log_q.reshape(-1), dim=0)
        for _ in range(n_iters):
            log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(n_cols)
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n_rows)
        return torch.exp(log_q + math.log(n_rows))


# ----------------------------------------------------------------------------------------------
# InfoNCE with prototype negatives (SPEC eq. 10)
# ----------------------------------------------------------------------------------------------


def info_nce_proto(
    z1: torch.Tensor, z2: torch.Tensor, protos: torch.Tensor, assign: torch.Tensor, tau: float
) -> torch.Tensor:
    """Contrastive loss of two views with prototype negatives; scalar, differentiable in z1, z2
    and protos.

    z1, z2 (B, d), protos (K, d), assign (B,) int64 in [0, K). With Z = cat(z1, z2) (2B, d), the
    anchor Z[i] has positive Z[(i + B) mod 2B] and negatives the other 2B - 2 rows of Z (itself
    excluded) and every prototype except protos[assign[i mod B]]; all logits are dot / tau.
    loss = mean over the 2B anchors of logsumexp(positive and negative logits) - positive logit.
    Vectors are used as given (no normalisation).
    """
    with _no_autocast(z1):
        dtype = compute_dtype(z1)
        n = z1.shape[0]
        z = torch.cat([z1, z2], dim=0).to(dtype)  # (2B, d)
        view_logits = z @ z.t() / tau  # (2B, 2B)
        proto_logits = z @ protos.to(dtype).t() / tau  # (2B, K)
        rows = torch.arange(2 * n, device=z.device)
        positive = view_logits[rows, (rows + n) % (2 * n)]  # (2B,)
        drop_self = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        drop_own_proto = torch.zeros_like(proto_logits, dtype=torch.bool)
        drop_own_proto[rows, assign.repeat(2)] = True
        logits = torch.cat(
            [view_logits.masked_fill(drop_self, -math.inf),
             proto_logits.masked_fill(drop_own_proto, -math.inf)],
            dim=1,
        )  # (2B, 2B + K)
        return (torch.logsumexp(logits, dim=1) - positive).mean()


# ----------------------------------------------------------------------------------------------
# Full-item softmax, ranking and top-k
# ----------------------------------------------------------------------------------------------


def item_softmax_ce(
    hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
    ignore_index: int = -100, reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the softmax over all items; differentiable in hidden and items.

    hidden (N, d), items (V, d), targets (N,) int64 in [0, V) or ``ignore_index``. Row loss
    logsumexp(hidden @ items.T) - hidden . items[target]; reduced exactly like F.cross_entropy:
    "mean" over non-ignored rows (NaN when there are none), "sum", or "none" (N,) with 0 at
    ignored rows.
    """
    with _no_autocast(hidden):
        dtype = compute_dtype(hidden)
        logits = hidden.to(dtype) @ items.to(dtype).t()  # (N, V)
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def _user_chunks(n_users: int, n_items: int) -> Iterator[Tuple[int, int]]:
    step = max(1, MAX_SCORES_PER_CHUNK // max(1, n_items))
    for start in range(0, n_users, step):
        yield start, min(start + step, n_users)


def _excluded_mask(
    start: int, stop: int, n_items: int, indptr: Optional[torch.Tensor],
    indices: Optional[torch.Tensor], device: torch.device,
) -> torch.Tensor:
    """(stop - start, V) bool: True where the item is in the user's exclusion list."""
    mask = torch.zeros(stop - start, n_items, dtype=torch.bool, device=device)
    if indptr is None:
        return mask
    bounds = indptr[start:stop + 1]
    lo, hi = int(bounds[0]), int(bounds[-1])
    if hi > lo:
        counts = bounds[1:] - bounds[:-1]
        users = torch.repeat_interleave(torch.arange(stop - start, device=device), counts)
        mask[users, indices[lo:hi]] = True
    return mask


def item_rank(
    hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
    exclude_indptr: torch.Tensor, exclude_indices: torch.Tensor,
) -> torch.Tensor:
    """0-based full-ranking position of each user's target; (U,) int64, no gradient.

    hidden (U, d), items (V, d), targets (U,) int64 in [0, V). Excluded items of user u are
    exclude_indices[exclude_indptr[u]:exclude_indptr[u + 1]] (CSR; duplicates allowed; the target
    is never excluded, even when listed). rank[u] counts the items i != targets[u], not excluded,
    whose score hidden[u] . items[i] is >= the target's score: ties count against the target.
    NaN counts against the target too: an item with a NaN score is counted, and a user whose
    target score is NaN gets the worst rank, the number of non-target non-excluded items.

    Memory: users are scored in chunks of at most ``MAX_SCORES_PER_CHUNK`` (2**24) scores (one
    user at a time when V is larger), plus boolean masks of the same size.
    """
    with torch.no_grad(), _no_autocast(hidden):
        dtype = compute_dtype(hidden)
        n_items = items.shape[0]
        items_c = items.to(dtype)
        ranks = torch.empty(hidden.shape[0], dtype=torch.int64, device=hidden.device)
        for start, stop in _user_chunks(hidden.shape[0], n_items):
            rows = torch.arange(stop - start, device=hidden.device)
            tgt = targets[start:stop]
            scores = hidden[start:stop].to(dtype) @ items_c.t()  # (u, V)
            target_score = scores[rows, tgt].unsqueeze(1)  # (u, 1)
            counted = ~_excluded_mask(start, stop, n_items, exclude_indptr, exclude_indices,
                                      hidden.device)
            counted[rows, tgt] = False
            # "not below the target" counts: ties, and NaN on either side, go against the target.
            counted &= ~(scores < target_score)
            ranks[start:stop] = counted.sum(dim=1)
        return ranks


def item_topk(
    hidden: torch.Tensor, items: torch.Tensor, k: int,
    exclude_indptr: Optional[torch.Tensor] = None, exclude_indices: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` non-excluded items per user; (scores (U, k), indices (U, k) int64), best first,
    no gradient.

    hidden (U, d), items (V, d), 1 <= k <= V, optional CSR exclusions as in ``item_rank``.
    Excluded items are never returned. When fewer than k items remain for a user, the missing
    (last) slots hold score -inf and index -1. NaN scores rank above every number (as in
    torch.topk). Among items whose score is -inf (only possible with infinite inputs) which are
    returned is unspecified, and such items may be reported as missing slots. Order among equal
    scores is unspecified. Chunked over users like ``item_rank``.
    """
    with torch.no_grad(), _no_autocast(hidden):
        dtype = compute_dtype(hidden)
        n_users, n_items = hidden.shape[0], items.shape[0]
        items_c = items.to(dtype)
        top_scores = torch.empty(n_users, k, dtype=dtype, device=hidden.device)
        top_indices = torch.empty(n_users, k, dtype=torch.int64, device=hidden.device)
        for start, stop in _user_chunks(n_users, n_items):
            scores = hidden[start:stop].to(dtype) @ items_c.t()  # (u, V)
            allowed = ~_excluded_mask(start, stop, n_items, exclude_indptr, exclude_indices,
                                      hidden.device)
            scores = torch.where(allowed, scores, torch.full_like(scores, -math.inf))
            values, index = torch.topk(scores, k, dim=1)  # (u, k)
            found = allowed.gather(1, index)
            # move the slots that hold an excluded item behind the found ones, keeping order
            order = torch.sort((~found).to(torch.int8), dim=1, stable=True).indices
            values, index = values.gather(1, order), index.gather(1, order)
            found = found.gather(1, order)
            top_scores[start:stop] = values.masked_fill(~found, -math.inf)
            top_indices[start:stop] = index.masked_fill(~found, -1)
        return top_scores, top_indices
