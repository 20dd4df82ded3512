"""The ops across the ranks of a torch.distributed process group.

Contract, for every op given ``group=`` (or ``shard=VocabShard(start, stop, group)``): every rank
of the group calls the op, forward and backward, with its own rows (its own users); the sum over
the ranks of the returned values equals the single-process value on the rows of all ranks
concatenated in rank order, and each rank's gradients are the gradients of that sum with respect
to its own tensors. With ``reduction="mean"`` a rank returns its rows' sum divided by the count
over all ranks, so the contract holds for "mean" and "sum" alike; "none" returns the rank's rows.

How each op is split:
  sinkhorn         SwAV's distributed Sinkhorn-Knopp: each rank keeps its rows of Q; the column
                   statistics (max and sum of exp) are all-reduced every round, the rows are local,
                   B counts every rank's rows. Torch ops in log space, whatever the backend (the
                   per-rank work is B/W x K; the kernels' loops live within one device).
  info_nce_proto   the views of every rank are gathered (autograd-aware: a key's gradient is summed
                   over the ranks and returned to its owner); this rank's 2 b anchors are scored
                   against all 2 B views and the prototypes. Torch ops, like sinkhorn.
  item_softmax_ce  vocabulary parallel (Megatron-LM's cross-entropy): the hidden rows of all ranks
                   are gathered; each rank runs the backend's fused op on its slice of the table
                   for every row, which yields the slice's logsumexp without an (N, V) buffer; the
                   max, the sum of exp and the target logit (from the rank that owns the target)
                   are three N-sized all-reduces. The backward is the op's own (recomputing), and
                   the hidden rows' gradient is summed over ranks and returned to their owner.
  item_rank        each rank counts, with the backend's fused op, the items of its slice scoring
                   at least the target's score; the target's vector comes from its owner, counts
                   are summed over the slices.
  item_topk        per slice top-k with the backend's op, merged on the rank that owns the user.

Communication uses torch.distributed collectives that gloo and NCCL both provide (all_gather with
equal shapes, all_reduce); rows of uneven length are padded to the longest rank's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from s4rec_kernels import _dispatch
from s4rec_kernels.reference import _no_autocast, compute_dtype

# item_rank with a shard scores the users in chunks of this many: each chunk's target vectors are
# appended to the slice, and each user excludes the other users' appended rows.
RANK_USERS_PER_CHUNK = 64


@dataclass(frozen=True)
class VocabShard:
    """Rows [start, stop) of the full item table live on this rank; the ranks of ``group`` (None:
    the default group) together cover [0, V) without overlap. Uneven and empty slices are
    allowed."""

    start: int
    stop: int
    group: Optional[dist.ProcessGroup] = None


# ----------------------------------------------------------------------------------------------
# Collectives
# ----------------------------------------------------------------------------------------------


def _world(group) -> Tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _all_gather_ints(values: List[int], group, device) -> torch.Tensor:
    """(W, len(values)) int64: every rank's ``values``, in rank order."""
    world, _ = _world(group)
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out)


def _gather_rows_raw(t: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """Concatenate every rank's ``t`` (sizes[r] rows each) in rank order; no autograd."""
    longest = max(sizes)
    if longest == 0:
        return t.new_zeros((0,) + tuple(t.shape[1:]))
    padded = t.new_zeros((longest,) + tuple(t.shape[1:]))
    padded[:t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(out, sizes)])


class _GatherRows(torch.autograd.Function):
    """All ranks' rows concatenated; the gradient of each row is summed over the ranks and
    returned to the rank that owns it."""

    @staticmethod
    def forward(ctx, t, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _gather_rows_raw(t, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        offset = sum(ctx.sizes[:rank])
        return grad[offset:offset + ctx.sizes[rank]], None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; every rank's output is the same sum, so the gradient of an input is
    the sum over the ranks of the outputs' gradients."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def gather_rows(t: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """Every rank's rows of ``t`` in rank order, differentiable (see ``_GatherRows``)."""
    if t.requires_grad:
        return _GatherRows.apply(t, sizes, group)
    return _gather_rows_raw(t, sizes, group)


def _row_sizes(op: str, n: int, group, device, known: Optional[Sequence[int]] = None) -> List[int]:
    """Every rank's row count, in rank order: ``known`` (checked against this rank's ``n``) when
    the caller gives it, else gathered from the ranks (which waits for the device)."""
    world, rank = _world(group)
    if known is None:
        return _all_gather_ints([n], group, device)[:, 0].tolist()
    known = [int(x) for x in known]
    if len(known) != world or known[rank] != n or min(known) < 1:
        raise ValueError(f"{op}: group_rows={known} does not fit a group of {world} ranks where "
                         f"rank {rank} holds {n} rows; expected {world} counts >= 1, entry {rank} "
                         f"equal to {n}")
    return known


def _check_group(op: str, group) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{op}: group= was given but torch.distributed is not initialised; "
                         f"call torch.distributed.init_process_group first")
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError(f"{op}: this process (global rank {dist.get_rank()}) is not a member of "
                         f"the group it was given")


# ----------------------------------------------------------------------------------------------
# sinkhorn
# ----------------------------------------------------------------------------------------------


def _logsumexp_all(x: torch.Tensor, dim: Optional[int], group) -> torch.Tensor:
    """logsumexp over ``dim`` (None: all entries) and over the ranks; the max and the sum of exp
    are each one all-reduce."""
    top = x.amax() if dim is None else x.amax(dim=dim)
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    shifted = x - shift if dim is None else x - shift.unsqueeze(dim)
    total = torch.exp(shifted).sum() if dim is None else torch.exp(shifted).sum(dim=dim)
    dist.all_reduce(total, group=group)
    return torch.log(total) + shift


def sinkhorn(scores: torch.Tensor, eps: float, n_iters: int, group,
             group_rows: Optional[Sequence[int]] = None) -> torch.Tensor:
    """This rank's rows of the reference's Q over the rows of all ranks (checked arguments)."""
    _check_group("sinkhorn", group)
    with torch.no_grad(), _no_autocast(scores):
        n_cols = scores.shape[1]
        sizes = _row_sizes("sinkhorn", scores.shape[0], group, scores.device, group_rows)
        n_rows = sum(sizes)
        log_q = scores.to(compute_dtype(scores)) / eps
        log_q = log_q - _logsumexp_all(log_q, None, group)
        for _ in range(n_iters):
            log_q = log_q - _logsumexp_all(log_q, 0, group).unsqueeze(0) - math.log(n_cols)
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n_rows)
        return torch.exp(log_q + math.log(n_rows))


# ----------------------------------------------------------------------------------------------
# info_nce_proto
# ----------------------------------------------------------------------------------------------


def info_nce_proto(z1: torch.Tensor, z2: torch.Tensor, protos: torch.Tensor,
                   assign: torch.Tensor, tau: float, group,
                   group_rows: Optional[Sequence[int]] = None) -> torch.Tensor:
    """This rank's anchors' share of the reference's loss over all ranks' rows: the sum of its
    2 b anchor losses divided by 2 B (checked arguments; an ``assign`` out of [0, K) is not
    read, and its anchors' losses are NaN)."""
    _check_group("info_nce_proto", group)
    _, rank = _world(group)
    with _no_autocast(z1):
        dtype = compute_dtype(z1)
        sizes = _row_sizes("info_nce_proto", z1.shape[0], group, z1.device, group_rows)
        n_all, offset, n = sum(sizes), sum(sizes[:rank]), z1.shape[0]
        both = gather_rows(torch.cat([z1, z2], dim=1).to(dtype), sizes, group)  # (B, 2d)
        keys = torch.cat(both.chunk(2, dim=1))  # (2B, d): the single process's cat(z1, z2)
        mine = torch.arange(offset, offset + n, device=z1.device)
        anchors = torch.cat([mine, mine + n_all])  # (2b,) rows of keys
        view_logits = keys[anchors] @ keys.t() / tau  # (2b, 2B)
        proto_logits = keys[anchors] @ protos.to(dtype).t() / tau  # (2b, K)
        rows = torch.arange(2 * n, device=z1.device)
        positive = view_logits[rows, (anchors + n_all) % (2 * n_all)]  # (2b,)
        drop_self = torch.zeros_like(view_logits, dtype=torch.bool)
        drop_self[rows, anchors] = True
        n_protos = protos.shape[0]
        valid = ((assign >= 0) & (assign < n_protos)).repeat(2)  # (2b,)
        drop_own_proto = torch.zeros_like(proto_logits, dtype=torch.bool)
        drop_own_proto[rows, assign.clamp(0, n_protos - 1).repeat(2)] = True
        logits = torch.cat([view_logits.masked_fill(drop_self, -math.inf),
                            proto_logits.masked_fill(drop_own_proto, -math.inf)], dim=1)
        losses = torch.logsumexp(logits, dim=1) - positive  # (2b,)
        return losses.masked_fill(~valid, math.nan).sum() / (2 * n_all)


# ----------------------------------------------------------------------------------------------
# Vocabulary-parallel item ops
# ----------------------------------------------------------------------------------------------


def _check_item_inputs(op: str, hidden: object, items: object, rows: str) -> None:
    """The public ops' checks of hidden and items, with an empty slice allowed."""
    _dispatch.check_matrix(op, "hidden", hidden, f"({rows}, d)")
    _dispatch.check_ndim(op, "items", items, 2, "(slice rows, d)")
    _dispatch.check_float(op, "items", items)
    _dispatch.check_dim_size(op, "items", items, 1, hidden.shape[1], "d of hidden")
    _dispatch.check_same_dtype(op, ("hidden", hidden), ("items", items))


def check_shard(op: str, shard: object, n_local_items: int, n_rows: int,
                device) -> Tuple[int, List[int], List[Tuple[int, int]]]:
    """Validate ``shard`` against every rank's; returns (V, rows per rank, slices per rank).
    One all-gather of three ints per rank."""
    if not isinstance(shard, VocabShard):
        raise ValueError(f"{op}: shard must be a VocabShard(start, stop, group); "
                         f"got {type(shard).__name__}")
    _check_group(op, shard.group)
    start, stop = shard.start, shard.stop
    if isinstance(start, bool) or isinstance(stop, bool) or not (
            isinstance(start, int) and isinstance(stop, int)) or not 0 <= start <= stop:
        raise ValueError(f"{op}: shard must have ints 0 <= start <= stop; "
                         f"got start={start!r}, stop={stop!r}")
    if n_local_items != stop - start:
        raise ValueError(f"{op}: items has {n_local_items} rows but shard [{start}, {stop}) "
                         f"holds {stop - start}; expected items to be that slice of the table")
    table = _all_gather_ints([n_rows, start, stop], shard.group, device).tolist()
    sizes = [row[0] for row in table]
    slices = [(row[1], row[2]) for row in table]
    edge = 0
    for lo, hi, r in sorted((lo, hi, r) for r, (lo, hi) in enumerate(slices)):
        if lo < edge:
            raise ValueError(f"{op}: shard slices overlap: rank {r} holds [{lo}, {hi}) but items "
                             f"below {edge} are already held; expected disjoint slices")
        if lo > edge:
            raise ValueError(f"{op}: shard slices leave items [{edge}, {lo}) on no rank; "
                             f"expected the slices to cover [0, V)")
        edge = max(edge, hi)
    if edge == 0:
        raise ValueError(f"{op}: every rank's shard is empty; expected V >= 1 items in all")
    return edge, sizes, slices


def _slice_logsumexp(hidden: torch.Tensor, items: torch.Tensor, local_targets: torch.Tensor,
                     backend: str) -> torch.Tensor:
    """(N,) logsumexp over ``items`` of each row's logits, through the backend's fused loss:
    loss = lse - logit[t] for any valid t, so lse = loss + logit[t]. Differentiable."""
    from s4rec_kernels.item_softmax import item_softmax_ce as single

    rows = single(hidden, items, local_targets, reduction="none", backend=backend)
    picked = (hidden * items[local_targets]).sum(dim=1)
    return rows + picked


def item_softmax_ce(hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                    ignore_index: int, reduction: str, shard: VocabShard,
                    backend: str) -> torch.Tensor:
    """Vocabulary-parallel cross-entropy (checked local arguments; see the module docstring)."""
    op = "item_softmax_ce"
    _check_item_inputs(op, hidden, items, "N")
    targets = _dispatch.check_index(op, "targets", targets, hidden.shape[0])
    _dispatch.check_same_device(op, ("hidden", hidden), ("items", items), ("targets", targets))
    ignore_index = _dispatch.check_int(op, "ignore_index", ignore_index, -(2**63))
    _dispatch.check_choice(op, "reduction", reduction, ("mean", "sum", "none"))
    _dispatch.resolve_backend(op, backend, hidden, items, targets)
    n_items, sizes, _ = check_shard(op, shard, items.shape[0], hidden.shape[0], hidden.device)
    group = shard.group
    _, rank = _world(group)
    start, stop = shard.start, shard.stop
    _dispatch.check_index_range(op, "targets", targets, n_items, allowed_extra=ignore_index)
    with _no_autocast(hidden):
        dtype = compute_dtype(hidden)
        # gathered and scored in the compute dtype, so a gradient is rounded to the input dtype
        # once, after the sum over the ranks
        all_hidden = gather_rows(hidden.to(dtype), sizes, group)  # (N, d)
        items = items.to(dtype)
        all_targets = _gather_rows_raw(targets, sizes, group)  # (N,)
        valid = all_targets != ignore_index
        owned = valid & (all_targets >= start) & (all_targets < stop)
        if stop > start:
            local = torch.where(owned, all_targets - start, torch.zeros_like(all_targets))
            lse = _slice_logsumexp(all_hidden, items, local, backend)  # (N,)
            target_logit = torch.where(owned, (all_hidden * items[local]).sum(dim=1), 0.0)
        else:  # an empty slice adds nothing, but takes part in every collective
            lse = all_hidden.new_full((all_hidden.shape[0],), -math.inf, dtype=dtype)
            target_logit = all_hidden.new_zeros(all_hidden.shape[0], dtype=dtype)
        top = lse.detach().clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)  # (N,) the largest slice lse
        parts = torch.stack([torch.exp(lse - top), target_logit])  # (2, N)
        if all_hidden.requires_grad and not parts.requires_grad:
            # keep this rank's backward collectives in step with the other ranks'
            parts = parts + 0.0 * all_hidden.sum(dim=1)
        # one all-reduce for both sums, so the backward's collectives cannot be reordered
        sum_exp, target_logit = _AllReduceSum.apply(parts, group)  # (N,) each
        row_loss = torch.where(valid, top + torch.log(sum_exp) - target_logit, 0.0)  # (N,)
        offset = sum(sizes[:rank])
        mine = row_loss[offset:offset + hidden.shape[0]]
        if reduction == "none":
            return mine
        if reduction == "sum":
            return mine.sum()
        return mine.sum() / valid.sum()  # 0 / 0 = NaN when every row of every rank is ignored


def _gather_csr(indptr: torch.Tensor, indices: torch.Tensor, sizes: List[int],
                group) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every rank's CSR lists concatenated in rank order."""
    counts = indptr[1:] - indptr[:-1]  # (U_r,)
    all_counts = _gather_rows_raw(counts, sizes, group)
    n_indices = [int(x) for x in _all_gather_ints([indices.shape[0]], group, indptr.device)[:, 0]]
    all_indices = _gather_rows_raw(indices, n_indices, group)
    all_indptr = torch.zeros(all_counts.shape[0] + 1, dtype=torch.int64, device=indptr.device)
    all_indptr[1:] = torch.cumsum(all_counts, 0)
    return all_indptr, all_indices


def _slice_pairs(indptr: torch.Tensor, indices: torch.Tensor, lo: int, hi: int, start: int,
                 stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(user - lo, item - start) pairs of users [lo, hi) of a CSR whose item is in [start, stop)."""
    part = indices[indptr[lo]:indptr[hi]]
    user = torch.repeat_interleave(torch.arange(hi - lo, device=indptr.device),
                                   indptr[lo + 1:hi + 1] - indptr[lo:hi])
    keep = (part >= start) & (part < stop)
    return user[keep], part[keep] - start


def _pairs_to_csr(user: torch.Tensor, item: torch.Tensor,
                  n_users: int) -> Tuple[torch.Tensor, torch.Tensor]:
    order = torch.sort(user, stable=True).indices
    indptr = torch.zeros(n_users + 1, dtype=torch.int64, device=user.device)
    indptr[1:] = torch.cumsum(torch.bincount(user, minlength=n_users), 0)
    return indptr, item[order]


def item_rank(hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
              exclude_indptr: torch.Tensor, exclude_indices: torch.Tensor, shard: VocabShard,
              backend: str) -> torch.Tensor:
    """This rank's users' full-ranking positions over the sharded table (checked local
    arguments). Each rank counts its slice for every user with the backend's op: the users'
    target vectors (from the owning ranks) are appended to the slice as the targets, and a user's
    own target item, when in the slice, is excluded, so the count is that of the single-process
    op restricted to the slice."""
    from s4rec_kernels.item_ranking import item_rank as single

    op = "item_rank"
    _check_item_inputs(op, hidden, items, "U")
    targets = _dispatch.check_index(op, "targets", targets, hidden.shape[0])
    exclude_indptr = _dispatch.check_index(op, "exclude_indptr", exclude_indptr,
                                           hidden.shape[0] + 1)
    exclude_indices = _dispatch.check_index(op, "exclude_indices", exclude_indices)
    _dispatch.check_same_device(op, ("hidden", hidden), ("items", items), ("targets", targets),
                                ("exclude_indptr", exclude_indptr),
                                ("exclude_indices", exclude_indices))
    _dispatch.resolve_backend(op, backend, hidden, items, targets)
    n_items, sizes, _ = check_shard(op, shard, items.shape[0], hidden.shape[0], hidden.device)
    group = shard.group
    _, rank = _world(group)
    start, stop = shard.start, shard.stop
    _dispatch.check_index_range(op, "targets", targets, n_items)
    exclude_indptr, exclude_indices = _dispatch.check_csr(
        op, exclude_indptr, exclude_indices, hidden.shape[0], n_items)
    with torch.no_grad():
        all_hidden = _gather_rows_raw(hidden, sizes, group)  # (U, d)
        all_targets = _gather_rows_raw(targets, sizes, group)  # (U,)
        indptr, indices = _gather_csr(exclude_indptr, exclude_indices, sizes, group)
        owned = (all_targets >= start) & (all_targets < stop)
        target_rows = items.new_zeros(all_hidden.shape[0], items.shape[1])
        target_rows[owned] = items[all_targets[owned] - start]
        dist.all_reduce(target_rows, group=group)  # one owner each: x + 0 is exact
        counts = torch.zeros(all_hidden.shape[0], dtype=torch.int64, device=hidden.device)
        if stop > start:
            for lo in range(0, all_hidden.shape[0], RANK_USERS_PER_CHUNK):
                hi = min(lo + RANK_USERS_PER_CHUNK, all_hidden.shape[0])
                counts[lo:hi] = _rank_chunk(all_hidden[lo:hi], items, target_rows[lo:hi],
                                            all_targets[lo:hi] - start, indptr, indices, lo, hi,
                                            start, stop, single, backend)
        dist.all_reduce(counts, group=group)
        offset = sum(sizes[:rank])
        return counts[offset:offset + hidden.shape[0]]


def _rank_chunk(hidden, items, target_rows, local_targets, indptr, indices, lo, hi, start, stop,
                single, backend) -> torch.Tensor:
    """Counts over one slice for users [lo, hi): the slice plus the c users' target rows, user j's
    target being row v + j; every other appended row, the user's own target item (when in the
    slice) and its exclusions are excluded."""
    c, v = hi - lo, items.shape[0]
    device = hidden.device
    table = torch.cat([items, target_rows])  # (v + c, d)
    user, item = _slice_pairs(indptr, indices, lo, hi, start, stop)
    grid_u, grid_i = torch.meshgrid(torch.arange(c, device=device),
                                    torch.arange(c, device=device), indexing="ij")
    other = grid_u != grid_i
    in_slice = (local_targets >= 0) & (local_targets < v)
    own = torch.arange(c, device=device)[in_slice]
    user = torch.cat([user, grid_u[other], own])
    item = torch.cat([item, grid_i[other] + v, local_targets[in_slice]])
    chunk_indptr, chunk_indices = _pairs_to_csr(user, item, c)
    chunk_targets = torch.arange(v, v + c, device=device)
    return single(hidden, table, chunk_targets, chunk_indptr, chunk_indices, backend=backend)


def item_topk(hidden: torch.Tensor, items: torch.Tensor, k: int,
              exclude_indptr: Optional[torch.Tensor], exclude_indices: Optional[torch.Tensor],
              shard: VocabShard, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's users' k best items over the sharded table (checked local arguments): each
    slice's best min(k, slice) for every user, merged on the user's rank."""
    from s4rec_kernels.item_ranking import item_topk as single

    op = "item_topk"
    _check_item_inputs(op, hidden, items, "U")
    if (exclude_indptr is None) != (exclude_indices is None):
        raise ValueError(f"{op}: give both exclude_indptr and exclude_indices or neither")
    if exclude_indptr is not None:
        exclude_indptr = _dispatch.check_index(op, "exclude_indptr", exclude_indptr,
                                               hidden.shape[0] + 1)
        exclude_indices = _dispatch.check_index(op, "exclude_indices", exclude_indices)
    _dispatch.check_same_device(op, ("hidden", hidden), ("items", items),
                                ("exclude_indptr", exclude_indptr),
                                ("exclude_indices", exclude_indices))
    _dispatch.resolve_backend(op, backend, hidden, items)
    n_items, sizes, slices = check_shard(op, shard, items.shape[0], hidden.shape[0],
                                         hidden.device)
    group = shard.group
    world, rank = _world(group)
    k = _dispatch.check_int(op, "k", k, 1, n_items)
    if exclude_indptr is not None:
        exclude_indptr, exclude_indices = _dispatch.check_csr(
            op, exclude_indptr, exclude_indices, hidden.shape[0], n_items)
    start, stop = shard.start, shard.stop
    dtype = compute_dtype(hidden)
    with torch.no_grad():
        all_hidden = _gather_rows_raw(hidden, sizes, group)  # (U, d)
        n_users = all_hidden.shape[0]
        scores = torch.full((n_users, k), -math.inf, dtype=dtype, device=hidden.device)
        index = torch.full((n_users, k), -1, dtype=torch.int64, device=hidden.device)
        if exclude_indptr is not None:
            indptr, indices = _gather_csr(exclude_indptr, exclude_indices, sizes, group)
        if stop > start:
            kk = min(k, stop - start)
            csr = (None, None)
            if exclude_indptr is not None:
                csr = _pairs_to_csr(*_slice_pairs(indptr, indices, 0, n_users, start, stop),
                                    n_users)
            s, i = single(all_hidden, items, kk, *csr, backend=backend)
            scores[:, :kk] = s
            index[:, :kk] = torch.where(i >= 0, i + start, i)
        parts_s = [torch.empty_like(scores) for _ in range(world)]
        parts_i = [torch.empty_like(index) for _ in range(world)]
        dist.all_gather(parts_s, scores, group=group)
        dist.all_gather(parts_i, index, group=group)
        offset = sum(sizes[:rank])
        mine = slice(offset, offset + hidden.shape[0])
        cand_s = torch.cat([p[mine] for p in parts_s], dim=1)  # (u, W k)
        cand_i = torch.cat([p[mine] for p in parts_i], dim=1)
        # found slots first (NaN above every number, as torch.topk), missing slots last
        key = torch.where(cand_i >= 0, cand_s, torch.full_like(cand_s, -math.inf))
        order = torch.sort(key, dim=1, descending=True, stable=True).indices
        cand_s, cand_i = cand_s.gather(1, order), cand_i.gather(1, order)
        missing = torch.sort((cand_i < 0).to(torch.int8), dim=1, stable=True).indices
        cand_s, cand_i = cand_s.gather(1, missing), cand_i.gather(1, missing)
        return cand_s[:, :k], cand_i[:, :k]
