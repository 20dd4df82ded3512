"""Memory-bounded versions of the item ops for devices without the Triton kernels (the CPU).

Same signatures, results and dtype rule as ``reference.py`` (plus a keyword ``chunk_size``), but
the item table is streamed in chunks of C items, so beyond the inputs, the outputs and the
gradients a call holds O(N x C) scores instead of the (N, V) logits. Without ``chunk_size``, C is
picked so that one chunk's scores fit in ``_dispatch.LOGITS_BUDGET_MB`` (at least
``MIN_CHUNK`` items). ``_dispatch.resolve_backend`` picks this path for backend "auto" when the
Triton kernels do not serve a call and the reference's (N, V) scores would exceed that budget.

  item_softmax_ce  an autograd.Function. Forward: per chunk, logits = h @ e_c^T (n, C), a running
                   max m and sum s of exp(logit - m) per row (online log-sum-exp), and the target
                   logit from the chunk that holds the target. Saved: m and log(s) per row (2 N
                   floats; kept apart rather than as lse = m + log(s) so that p = exp((x - m) -
                   log(s)) is formed from the exact difference x - m, as log_softmax does: one ulp
                   of a large lse is more than 1 - p of a confident row). Backward recomputes each
                   chunk's logits, with g_n the upstream gradient of row n's loss:
                       dL/dx_ni       = g_n (p_ni - [i == t_n])
                       grad_hidden[n] = sum_i dL/dx_ni e_i        (accumulated over the chunks)
                       grad_items[i]  = sum_n dL/dx_ni h_n        (written chunk by chunk)
                   Ignored rows are dropped before the first chunk and get zero gradient.
  item_rank        per block of users and chunk of items, counts the items not scoring below the
                   target. The target's score is computed in the same matrix product as the
                   chunk's (the block's target rows are appended to the chunk), so an item whose
                   embedding equals the target's scores exactly like it and counts as a tie, as in
                   the reference; the target itself and the (deduplicated) excluded items are then
                   taken back out of the count.
  item_topk        a running top-k per user, merged with each chunk's own top min(k, C); k may
                   exceed C. Excluded items are set to -inf before the chunk's top-k, and any slot
                   left at -inf is reported missing (-1), as the reference allows.

Why not ``torch.nn.functional.linear_cross_entropy`` (torch 2.13): its chunked path splits the rows
(N), not the items, so every chunk still holds a (rows, V) logits block and the peak grows with V;
it precomputes the gradients in the forward (no double backward, no ``torch.func``); and it
computes in the inputs' dtype, so bf16 inputs would need an fp32 copy of the whole item table to
follow this package's dtype rule. benchmarks/bench_scale.py (``--loss-only``) measures it beside
this file's version; the README gives the figures.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from s4rec_kernels import _dispatch
from s4rec_kernels.reference import _no_autocast, compute_dtype

# Fewest items per chunk whatever the budget (so that a huge N does not stream one item at a time).
MIN_CHUNK = 128
# Most users scored together by item_rank: the block's target rows are appended to every chunk.
RANK_USER_BLOCK = 1024
# Bytes each op holds per (row, item) of a chunk: the fp32 scores plus the op's temporaries.
_BYTES_PER_SCORE = {"item_softmax_ce": 8, "item_rank": 6, "item_topk": 8}


def chunk_items(op: str, n_rows: int, n_items: int, element_size: int = 4,
                chunk_size: Optional[int] = None) -> int:
    """Items per chunk: ``chunk_size`` if given, else as many as keep one chunk of ``n_rows``
    rows within ``_dispatch.LOGITS_BUDGET_MB`` (at least MIN_CHUNK), never more than V."""
    if chunk_size is not None:
        return max(1, min(int(chunk_size), n_items))
    per_item = max(1, n_rows) * _BYTES_PER_SCORE[op] * element_size // 4
    fits = int(_dispatch.LOGITS_BUDGET_MB * 2**20) // per_item
    return max(1, min(n_items, max(MIN_CHUNK, fits)))


def _chunks(n_items: int, size: int):
    for start in range(0, n_items, size):
        yield start, min(start + size, n_items)


# ----------------------------------------------------------------------------------------------
# item_softmax_ce
# ----------------------------------------------------------------------------------------------


def _row_weights(grad: torch.Tensor, reduction: str, active: Optional[torch.Tensor],
                 n_active: int) -> torch.Tensor:
    """The upstream gradient g_n of each active row's loss."""
    if reduction == "none":
        return grad if active is None else grad[active]
    if reduction == "mean":
        grad = grad / n_active
    return grad.expand(n_active)


class _ChunkedSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, items, targets, ignore_index, reduction, chunk):
        dtype = compute_dtype(hidden)
        n_rows = hidden.shape[0]
        keep = targets != ignore_index
        n_active = int(keep.sum())
        active = None if n_active == n_rows else keep.nonzero().squeeze(1)
        h = hidden.to(dtype) if active is None else hidden[active].to(dtype)  # (n, d)
        t = targets if active is None else targets[active]  # (n,)
        m = h.new_full((n_active,), -math.inf)
        s = h.new_zeros(n_active)
        x_t = h.new_zeros(n_active)
        for start, stop in _chunks(items.shape[0], chunk):
            logits = h @ items[start:stop].to(dtype).t()  # (n, C)
            here = ((t >= start) & (t < stop)).nonzero().squeeze(1)
            x_t[here] = logits[here, t[here] - start]
            m_new = torch.maximum(m, logits.max(dim=1).values)
            s = s * torch.exp(m - m_new) + logits.sub_(m_new[:, None]).exp_().sum(dim=1)
            m = m_new
        log_s = torch.log(s)
        rows = (m - x_t) + log_s  # (n,)
        ctx.save_for_backward(hidden, items, targets, m, log_s)
        ctx.meta = (ignore_index, reduction, chunk, n_active)
        if reduction == "none":
            if active is None:
                return rows
            return rows.new_zeros(n_rows).index_copy_(0, active, rows)
        total = rows.sum()
        return total if reduction == "sum" else total / n_active  # 0 / 0 = NaN, as F.cross_entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        hidden, items, targets, m, log_s = ctx.saved_tensors
        ignore_index, reduction, chunk, n_active = ctx.meta
        need_h, need_e = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = compute_dtype(hidden)
        keep = targets != ignore_index
        active = None if n_active == hidden.shape[0] else keep.nonzero().squeeze(1)
        h = hidden.to(dtype) if active is None else hidden[active].to(dtype)  # (n, d)
        t = targets if active is None else targets[active]
        g = _row_weights(grad.to(dtype), reduction, active, n_active)  # (n,)
        grad_h = torch.zeros_like(h) if need_h else None
        grad_e = torch.zeros_like(items) if need_e else None
        for start, stop in _chunks(items.shape[0], chunk):
            e_c = items[start:stop].to(dtype)  # (C, d)
            # p = exp((x - m) - log s), then g (p - onehot)
            dlogits = (h @ e_c.t()).sub_(m[:, None]).sub_(log_s[:, None]).exp_().mul_(g[:, None])
            here = ((t >= start) & (t < stop)).nonzero().squeeze(1)
            dlogits[here, t[here] - start] -= g[here]  # (n, C): g (p - onehot)
            if need_h:
                grad_h.addmm_(dlogits, e_c)
            if need_e:
                grad_e[start:stop] = (dlogits.t() @ h).to(items.dtype)
        grad_hidden = None
        if need_h:
            if active is None:
                grad_hidden = grad_h.to(hidden.dtype)
            else:
                grad_hidden = hidden.new_zeros(hidden.shape).index_copy_(
                    0, active, grad_h.to(hidden.dtype))
        return grad_hidden, grad_e, None, None, None, None


def item_softmax_ce(
    hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
    ignore_index: int = -100, reduction: str = "mean", *, chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """``reference.item_softmax_ce`` streaming the items in chunks; differentiable in hidden and
    items. Peak extra memory: about ``LOGITS_BUDGET_MB`` (or N x chunk_size x 8 bytes)."""
    with _no_autocast(hidden):
        size = 8 if hidden.dtype == torch.float64 else 4
        chunk = chunk_items("item_softmax_ce", hidden.shape[0], items.shape[0], size, chunk_size)
        return _ChunkedSoftmaxCE.apply(hidden, items, targets, ignore_index, reduction, chunk)


# ----------------------------------------------------------------------------------------------
# item_rank and item_topk
# ----------------------------------------------------------------------------------------------


def _exclusion_pairs(indptr: Optional[torch.Tensor], indices: Optional[torch.Tensor],
                     start: int, stop: int, n_items: int,
                     targets: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(users relative to ``start``, items) of the exclusion lists of users [start, stop),
    deduplicated and sorted by item; pairs naming the user's own target are dropped."""
    device = indptr.device if indptr is not None else torch.device("cpu")
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    if indptr is None:
        return empty, empty
    lo, hi = int(indptr[start]), int(indptr[stop])
    if hi == lo:
        return empty, empty
    counts = indptr[start + 1:stop + 1] - indptr[start:stop]
    users = torch.repeat_interleave(torch.arange(stop - start, device=device), counts)
    items = indices[lo:hi]
    if targets is not None:
        keep = items != targets[start:stop][users]
        users, items = users[keep], items[keep]
    keys = torch.unique(items * (stop - start) + users)  # sorted: by item, then user
    return keys % (stop - start), keys // (stop - start)


def _in_chunk(items: torch.Tensor, start: int, stop: int) -> slice:
    """The slice of ``items`` (sorted) that falls in [start, stop)."""
    lo = int(torch.searchsorted(items, start))
    hi = int(torch.searchsorted(items, stop))
    return slice(lo, hi)


def item_rank(
    hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
    exclude_indptr: torch.Tensor, exclude_indices: torch.Tensor, *,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """``reference.item_rank`` streaming the items in chunks: (U,) int64, no gradient, same tie,
    NaN and exclusion rules. Peak extra memory: about ``LOGITS_BUDGET_MB``."""
    with torch.no_grad(), _no_autocast(hidden):
        dtype = compute_dtype(hidden)
        n_users, n_items = hidden.shape[0], items.shape[0]
        ranks = torch.zeros(n_users, dtype=torch.int64, device=hidden.device)
        for u0 in range(0, n_users, RANK_USER_BLOCK):
            u1 = min(u0 + RANK_USER_BLOCK, n_users)
            h = hidden[u0:u1].to(dtype)  # (b, d)
            tgt = targets[u0:u1]
            rows = torch.arange(u1 - u0, device=hidden.device)
            e_t = items[tgt].to(dtype)  # (b, d): appended to every chunk
            ex_users, ex_items = _exclusion_pairs(exclude_indptr, exclude_indices, u0, u1,
                                                  n_items, targets)
            chunk = chunk_items("item_rank", u1 - u0, n_items, dtype.itemsize, chunk_size)
            count = torch.zeros(u1 - u0, dtype=torch.int64, device=hidden.device)
            for start, stop in _chunks(n_items, chunk):
                e_c = torch.cat([items[start:stop].to(dtype), e_t])  # (C + b, d)
                scores = h @ e_c.t()  # (b, C + b)
                own = scores[rows, stop - start + rows][:, None]  # (b, 1) the target's score
                chunk_scores = scores[:, :stop - start]
                # items "not below" the target count: ties, and NaN on either side, against it
                count += (stop - start) - (chunk_scores < own).sum(dim=1)
                here = ((tgt >= start) & (tgt < stop)).nonzero().squeeze(1)
                count[here] -= (~(chunk_scores[here, tgt[here] - start] < own[here, 0])).long()
                part = _in_chunk(ex_items, start, stop)
                ex_u, ex_i = ex_users[part], ex_items[part]
                counted = ~(chunk_scores[ex_u, ex_i - start] < own[ex_u, 0])
                count -= torch.bincount(ex_u[counted], minlength=u1 - u0)
            ranks[u0:u1] = count
        return ranks


def item_topk(
    hidden: torch.Tensor, items: torch.Tensor, k: int,
    exclude_indptr: Optional[torch.Tensor] = None, exclude_indices: Optional[torch.Tensor] = None,
    *, chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``reference.item_topk`` with a running top-k over chunks of items: (scores (U, k),
    indices (U, k)), best first, no gradient, same exclusion and missing-slot rules. Peak extra
    memory: about ``LOGITS_BUDGET_MB`` plus (U, 2k) for the merge."""
    with torch.no_grad(), _no_autocast(hidden):
        dtype = compute_dtype(hidden)
        n_users, n_items = hidden.shape[0], items.shape[0]
        h = hidden.to(dtype)
        ex_users, ex_items = _exclusion_pairs(exclude_indptr, exclude_indices, 0, n_users,
                                              n_items)
        chunk = chunk_items("item_topk", n_users, n_items, dtype.itemsize, chunk_size)
        best = h.new_empty(n_users, 0)
        best_index = torch.empty(n_users, 0, dtype=torch.int64, device=hidden.device)
        for start, stop in _chunks(n_items, chunk):
            scores = h @ items[start:stop].to(dtype).t()  # (U, C)
            part = _in_chunk(ex_items, start, stop)
            scores[ex_users[part], ex_items[part] - start] = -math.inf
            values, index = torch.topk(scores, min(k, stop - start), dim=1)
            del scores
            values = torch.cat([best, values], dim=1)
            index = torch.cat([best_index, index + start], dim=1)
            best, pick = torch.topk(values, min(k, values.shape[1]), dim=1)
            best_index = index.gather(1, pick)
        missing = best == -math.inf  # excluded, or no item left: reported as missing slots
        return best, best_index.masked_fill(missing, -1)
