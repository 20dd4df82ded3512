"""Full-ranking evaluation ops: item_rank (the target's rank) and item_topk (the k best items).

Layout, top to bottom: Triton kernels, host launchers, the ``torch.library`` custom ops that wrap
them (with fake implementations; the outputs carry no gradient), their registration with
``_dispatch.register_triton``, then the public functions. What they share with the loss (tile
tables, range splits, dot precision, row loaders, input checks) is in _item_common.py; the top-k
kernel's tl.dot takes the precision of the loss's forward (see item_softmax.py).

Ranking. ``item_rank`` streams item tiles past blocks of users (and splits the items into ranges
when there are few user blocks), counting per user the items that are not below the target's
score, minus the target itself and the user's excluded items; only (ranges, U) int32 counts are
written. Its scores are chains of fp32 fused multiply-adds over d (no tensor cores): an fma is
correctly rounded, so a score depends only on the two vectors, and an item whose embedding
equals the target's scores exactly the target's score and counts as a tie, as in the reference.
(A tensor-core or BLAS product does not promise that; evaluation is far from the cost of
training, so exact ties are worth the FMA rate.) Exclusion lists are sorted per user on the host;
each program walks them with one cursor per user as its tiles advance, so a tile's exclusion
mask costs one compare per listed item. ``item_topk`` keeps a running top-k list per user in
registers (score and item index packed into one int64 key), merged by max extraction when a
tile holds a better item than the current k-th, one list per item range; the ranges' lists are
merged on the host by torch.topk over (ranges x k) keys, so only (U, k) leaves. k above
``MAX_KERNEL_K`` runs the reference's chunked scoring instead.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from s4rec_kernels import _dispatch, chunked, distributed, reference
from s4rec_kernels._item_common import (INTERPRET_TILES, MAX_BLOCK_D, RANK_TILES, TOPK_TILES,
                                        _block_d, _check_hidden_items, _splits,
                                        _target_programs, _tile_setting, fp32_dot_precision)
from s4rec_kernels._launch import Launch, device_arch, on_device

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: without it every call takes the reference path
    triton = None

# Largest k the top-k kernel keeps in registers; larger k runs the reference's chunked scoring.
MAX_KERNEL_K = 128

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:
    from s4rec_kernels._item_common import _load_rows

    # the top-k key of "no item": below every packed (score, index) key
    _MISSING = tl.constexpr(-(2**63))

    @triton.jit
    def _exclusion_tile(ex_ptr, cursor, stop, v0, offs_v,
                        BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr):
        """Which items of the tile [v0, v0 + BLOCK_V) each user excludes, (BLOCK_U, BLOCK_V).

        ``ex_ptr[cursor[u]:stop[u]]`` is the rest of user u's exclusion list, sorted ascending.
        Consumes every listed item below v0 + BLOCK_V (those below v0 only advance the cursor),
        one list entry per user per pass; returns the mask and the advanced cursors.
        """
        hits = tl.zeros((BLOCK_U, BLOCK_V), tl.int32)
        v1 = v0 + BLOCK_V
        more = tl.max((cursor < stop).to(tl.int32), axis=0) > 0
        while more:
            valid = cursor < stop
            item = tl.load(ex_ptr + cursor, mask=valid, other=0)
            take = valid & (item < v1)
            hit = take[:, None] & (item[:, None] == offs_v[None, :])
            hits = hits | hit.to(tl.int32)
            cursor = tl.where(take, cursor + 1, cursor)
            more = tl.max(take.to(tl.int32), axis=0) > 0
        return hits != 0, cursor

    @triton.jit
    def _score_tile(h_ptr, e_ptr, rows_u, mask_u, items, mask_v, dim,
                    stride_hu, stride_hd, stride_ev, stride_ed,
                    BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr):
        """(BLOCK_U, BLOCK_V) fp32 scores h[rows_u] . e[items] by one fused multiply-add per
        d, in order of d. An fma is correctly rounded, so every score is a function of the two
        vectors alone: equal embeddings give bitwise equal scores wherever they sit in a tile,
        and wherever else the same chain is computed (a tensor-core or BLAS product promises
        neither)."""
        s = tl.zeros((BLOCK_U, BLOCK_V), tl.float32)
        for k in range(0, dim):
            h_k = tl.load(h_ptr + rows_u * stride_hu + k * stride_hd, mask=mask_u, other=0.0)
            e_k = tl.load(e_ptr + items * stride_ev + k * stride_ed, mask=mask_v, other=0.0)
            s = tl.fma(h_k.to(tl.float32)[:, None], e_k.to(tl.float32)[None, :], s)
        return s

    @triton.jit
    def _rank_kernel(
        # pointers
        h_ptr, e_ptr, t_ptr, ex_ptr, indptr_ptr, count_ptr,
        # shapes
        n_users, n_items, dim, tiles_per_split,
        # strides
        stride_hu, stride_hd, stride_ev, stride_ed,
        # meta
        HAS_EXCLUDE: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """Counts per user of a block the items of one item range that are not the target, not
        excluded, and not below the target's score (NaN on either side counts), into
        count[range, user] (int32). Grid (user blocks, ranges), user block fastest.

        The target's score is computed by the same chain of fused multiply-adds as the tiles'
        scores, so an item whose embedding equals the target's scores exactly the same and
        counts as a tie, as in the reference.
        """
        pid = tl.program_id(0)
        n_user_blocks = tl.cdiv(n_users, BLOCK_U)
        user_block = pid % n_user_blocks
        split = pid // n_user_blocks
        offs_u = user_block * BLOCK_U + tl.arange(0, BLOCK_U)
        mask_u = offs_u < n_users
        rows_u = offs_u.to(tl.int64)
        target = tl.load(t_ptr + offs_u, mask=mask_u, other=0)
        t_ok = mask_u & (target >= 0) & (target < n_items)
        # each user against its own target, by the same chain of fused multiply-adds as a tile
        target_score = tl.zeros((BLOCK_U,), tl.float32)
        for k in range(0, dim):
            h_k = tl.load(h_ptr + rows_u * stride_hu + k * stride_hd, mask=mask_u, other=0.0)
            e_k = tl.load(e_ptr + target.to(tl.int64) * stride_ev + k * stride_ed, mask=t_ok,
                          other=0.0)
            target_score = tl.fma(h_k.to(tl.float32), e_k.to(tl.float32), target_score)
        if HAS_EXCLUDE:
            cursor = tl.load(indptr_ptr + offs_u, mask=mask_u, other=0)
            stop = tl.load(indptr_ptr + offs_u + 1, mask=mask_u, other=0)

        v_begin = split * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, n_items)
        count = tl.zeros((BLOCK_U,), tl.int32)
        for v0 in range(v_begin, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < n_items
            s = _score_tile(h_ptr, e_ptr, rows_u, mask_u, offs_v.to(tl.int64), mask_v, dim,
                            stride_hu, stride_hd, stride_ev, stride_ed, BLOCK_U, BLOCK_V)
            # "not below the target": NaN on either side makes s < ts false, so it counts
            not_below = ((s >= target_score[:, None]) | (s != s)
                         | (target_score != target_score)[:, None])
            keep = mask_v[None, :] & (offs_v[None, :] != target[:, None]) & not_below
            if HAS_EXCLUDE:
                excluded, cursor = _exclusion_tile(ex_ptr, cursor, stop, v0, offs_v,
                                                   BLOCK_U, BLOCK_V)
                keep = keep & (excluded == 0)
            count += tl.sum(keep.to(tl.int32), axis=1)
        tl.store(count_ptr + split.to(tl.int64) * n_users + offs_u, count, mask=mask_u)

    @triton.jit
    def _topk_kernel(
        # pointers
        h_ptr, e_ptr, ex_ptr, indptr_ptr, keys_ptr,
        # shapes
        n_users, n_items, dim, tiles_per_split, k,
        # strides
        stride_hu, stride_hd, stride_ev, stride_ed,
        # meta
        HAS_EXCLUDE: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Running top-k list of every user of a block over one item range, written to
        keys[range, user, :BLOCK_K] best first (BLOCK_K >= k; slots past k stay _MISSING).

        A key packs an item's score and index into one int64: (order-preserving int32 image of
        the fp32 score) << 32 | (2**32 - 1 - item), so keys order like (score, -item), NaN maps
        above +inf, and excluded items and empty slots are _MISSING (below every key). A tile
        is merged only when one of its keys beats a user's current k-th key; the merge takes the
        k largest of (list, tile) by repeated max extraction (keys are distinct). Grid (user
        blocks, ranges)."""
        pid_u = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
        mask_u = offs_u < n_users
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        slots = tl.arange(0, BLOCK_K)
        h = _load_rows(h_ptr, offs_u.to(tl.int64), mask_u, offs_d, mask_d,
                       stride_hu, stride_hd).to(DOT_DTYPE)
        if HAS_EXCLUDE:
            cursor = tl.load(indptr_ptr + offs_u, mask=mask_u, other=0)
            stop = tl.load(indptr_ptr + offs_u + 1, mask=mask_u, other=0)

        best = tl.full((BLOCK_U, BLOCK_K), _MISSING, tl.int64)  # best first
        kth = tl.full((BLOCK_U,), _MISSING, tl.int64)  # the k-th key of best
        v_begin = pid_s * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, n_items)
        for v0 in range(v_begin, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < n_items
            e = _load_rows(e_ptr, offs_v.to(tl.int64), mask_v, offs_d, mask_d,
                           stride_ev, stride_ed).to(DOT_DTYPE)
            s = tl.dot(h, tl.trans(e), input_precision=PRECISION)
            bits = s.to(tl.int32, bitcast=True)
            key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order of the floats
            key = tl.where(s != s, 0x7FFFFFFF, key)
            packed = (key.to(tl.int64) << 32) | (4294967295 - offs_v.to(tl.int64))[None, :]
            keep = mask_v[None, :] & mask_u[:, None]
            if HAS_EXCLUDE:
                excluded, cursor = _exclusion_tile(ex_ptr, cursor, stop, v0, offs_v,
                                                   BLOCK_U, BLOCK_V)
                keep = keep & (excluded == 0)
            packed = tl.where(keep, packed, _MISSING)
            better = tl.max(packed, axis=1) > kth
            if tl.max(better.to(tl.int32), axis=0) > 0:
                merged = tl.full((BLOCK_U, BLOCK_K), _MISSING, tl.int64)
                for j in range(0, k):
                    top = tl.maximum(tl.max(best, axis=1), tl.max(packed, axis=1))
                    merged = tl.where(slots[None, :] == j, top[:, None], merged)
                    best = tl.where(best == top[:, None], _MISSING, best)
                    packed = tl.where(packed == top[:, None], _MISSING, packed)
                    kth = top
                best = merged
        out = ((pid_s.to(tl.int64) * n_users + offs_u.to(tl.int64))[:, None] * BLOCK_K
               + slots[None, :])
        tl.store(keys_ptr + out, best, mask=mask_u[:, None])


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------


def _sorted_exclusions(indptr: torch.Tensor, indices: torch.Tensor, n_items: int) -> torch.Tensor:
    """Each user's exclusion list sorted ascending (same CSR row pointer)."""
    n_users = indptr.shape[0] - 1
    if indices.numel() == 0:
        return indices
    counts = indptr[1:] - indptr[:-1]
    owner = torch.repeat_interleave(torch.arange(n_users, device=indices.device), counts,
                                    output_size=indices.shape[0])
    keys = torch.sort(owner * n_items + indices).values
    return keys - owner * n_items  # owner is sorted already, so it still matches


def rank_launch(n_users: int, n_items: int, has_exclude: bool, arch: Optional[int],
                programs: int) -> Tuple[Launch, int, int]:
    """(rank launch, item ranges, item tiles per range) on CUDA architecture ``arch`` (None: the
    interpreter); ``programs`` is what the range split aims for."""
    if arch is not None:
        block_u, block_v, warps = RANK_TILES
    else:
        (block_u, block_v), warps = INTERPRET_TILES, 4
    n_user_blocks = triton.cdiv(n_users, block_u)
    n_splits, tiles_per_split = _splits(n_user_blocks, triton.cdiv(n_items, block_v), programs)
    launch = Launch(_rank_kernel, (n_user_blocks * n_splits,),
                    dict(HAS_EXCLUDE=has_exclude, BLOCK_U=block_u, BLOCK_V=block_v), warps)
    return launch, n_splits, tiles_per_split


def rank_forward(hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                 indptr: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(U,) int64 ranks (see ``item_rank``)."""
    n_users, dim = hidden.shape
    n_items = items.shape[0]
    device = hidden.device
    if n_users == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    has_exclude = indices.numel() > 0
    launch, n_splits, tiles_per_split = rank_launch(n_users, n_items, has_exclude,
                                                    device_arch(device), _target_programs(device))
    sorted_indices = _sorted_exclusions(indptr, indices, n_items) if has_exclude else indices
    counts = torch.empty(n_splits, n_users, dtype=torch.int32, device=device)
    with on_device(device):
        launch(hidden, items, targets, sorted_indices, indptr, counts,
               n_users, n_items, dim, tiles_per_split,
               hidden.stride(0), hidden.stride(1), items.stride(0), items.stride(1))
    return counts.sum(0, dtype=torch.int64)


def _decode_keys(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed top-k keys -> (fp32 scores, int64 item indices); missing slots -> (-inf, -1)."""
    high = (keys >> 32).to(torch.int32)
    bits = high ^ ((high >> 31) & 0x7FFFFFFF)
    scores = bits.view(torch.float32)
    index = 4294967295 - (keys & 4294967295)
    missing = keys == -(2**63)
    return scores.masked_fill(missing, -math.inf), index.masked_fill(missing, -1)


def topk_launch(n_users: int, n_items: int, dim: int, k: int, dtype: torch.dtype,
                has_exclude: bool, arch: Optional[int], programs: int, fp32: str
                ) -> Tuple[Launch, int, int]:
    """(top-k launch, item ranges, item tiles per range); the grid is (user blocks, ranges).
    Arguments as rank_launch's, ``fp32`` the dot precision of fp32 inputs."""
    block_d, (block_u, block_v, warps, stages), dots = _tile_setting(TOPK_TILES, dim, dtype,
                                                                     arch, fp32)
    n_user_blocks = triton.cdiv(n_users, block_u)
    n_splits, tiles_per_split = _splits(n_user_blocks, triton.cdiv(n_items, block_v), programs)
    launch = Launch(_topk_kernel, (n_user_blocks, n_splits),
                    dict(HAS_EXCLUDE=has_exclude, BLOCK_U=block_u, BLOCK_V=block_v,
                         BLOCK_K=max(16, triton.next_power_of_2(k)),  # the list width
                         BLOCK_D=block_d, DOT_DTYPE=dots["DOT_DTYPE"],
                         PRECISION=dots["PRECISION"]),
                    warps, stages)
    return launch, n_splits, tiles_per_split


def topk_forward(hidden: torch.Tensor, items: torch.Tensor, k: int,
                 indptr: Optional[torch.Tensor], indices: Optional[torch.Tensor]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scores (U, k) fp32, indices (U, k) int64), best first (see ``item_topk``)."""
    n_users, dim = hidden.shape
    n_items = items.shape[0]
    device = hidden.device
    if n_users == 0:
        return (torch.zeros(0, k, dtype=torch.float32, device=device),
                torch.zeros(0, k, dtype=torch.int64, device=device))
    has_exclude = indices is not None and indices.numel() > 0
    launch, n_splits, tiles_per_split = topk_launch(
        n_users, n_items, dim, k, hidden.dtype, has_exclude, device_arch(device),
        _target_programs(device), fp32_dot_precision())
    if has_exclude:
        sorted_indices = _sorted_exclusions(indptr, indices, n_items)
    else:
        sorted_indices = indptr = torch.zeros(1, dtype=torch.int64, device=device)
    keys = torch.empty(n_splits, n_users, launch.meta["BLOCK_K"], dtype=torch.int64,
                       device=device)
    with on_device(device):
        launch(hidden, items, sorted_indices, indptr, keys,
               n_users, n_items, dim, tiles_per_split, k,
               hidden.stride(0), hidden.stride(1), items.stride(0), items.stride(1))
    if n_splits == 1:
        best = keys[0, :, :k]
    else:  # merge the ranges' lists: keys order like (score, -index)
        best = torch.topk(keys.permute(1, 0, 2).reshape(n_users, -1), k, dim=1).values
    return _decode_keys(best)


# ----------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile, with fake implementations), registration
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @torch.library.custom_op("s4rec_kernels::item_rank", mutates_args=())
    def _rank_op(hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                 exclude_indptr: torch.Tensor, exclude_indices: torch.Tensor) -> torch.Tensor:
        return rank_forward(hidden, items, targets, exclude_indptr, exclude_indices)

    @_rank_op.register_fake
    def _(hidden, items, targets, exclude_indptr, exclude_indices):
        return hidden.new_empty(hidden.shape[0], dtype=torch.int64)

    @torch.library.custom_op("s4rec_kernels::item_topk", mutates_args=())
    def _topk_op(hidden: torch.Tensor, items: torch.Tensor, k: int,
                 exclude_indptr: Optional[torch.Tensor], exclude_indices: Optional[torch.Tensor]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        return topk_forward(hidden, items, k, exclude_indptr, exclude_indices)

    @_topk_op.register_fake
    def _(hidden, items, k, exclude_indptr, exclude_indices):
        n_users = hidden.shape[0]
        return (hidden.new_empty(n_users, k, dtype=torch.float32),
                hidden.new_empty(n_users, k, dtype=torch.int64))

    def _item_rank_triton(hidden, items, targets, exclude_indptr, exclude_indices):
        if hidden.dtype == torch.float64:
            return reference.item_rank(hidden, items, targets, exclude_indptr, exclude_indices)
        # no autograd: detached, so the ranks never carry a grad_fn
        return _rank_op(hidden.detach(), items.detach(), targets, exclude_indptr, exclude_indices)

    def _item_topk_triton(hidden, items, k, exclude_indptr, exclude_indices):
        if (hidden.dtype == torch.float64 or k > MAX_KERNEL_K
                or _block_d(hidden.shape[1]) > MAX_BLOCK_D):
            return reference.item_topk(hidden, items, k, exclude_indptr, exclude_indices)
        return _topk_op(hidden.detach(), items.detach(), k, exclude_indptr, exclude_indices)

    _dispatch.register_triton("item_rank", _item_rank_triton)
    _dispatch.register_triton("item_topk", _item_topk_triton)

# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def item_rank(
    hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
    exclude_indptr: torch.Tensor, exclude_indices: torch.Tensor, *, backend: str = "auto",
    shard=None,
) -> torch.Tensor:
    """0-based rank of each user's target among all non-excluded items (full ranking).

    Args:
        hidden: (U, d) user states, U >= 0, d >= 1.
        items: (V, d) item embeddings, V >= 1; same float dtype and device as ``hidden``.
        targets: (U,) int64 or int32 in [0, V).
        exclude_indptr: (U + 1,) int64/int32 CSR row pointer: non-decreasing, starts at 0, ends
            at len(exclude_indices).
        exclude_indices: (E,) int64/int32 item rows in [0, V); user u excludes
            exclude_indices[exclude_indptr[u]:exclude_indptr[u + 1]]. Duplicates are allowed; the
            target is never excluded, even when listed.
        backend: "auto", "reference", "triton" or "chunked" (see ``_dispatch``).

    Returns:
        (U,) int64, no gradient: the number of items i != targets[u], not excluded for u, with
        hidden[u] . items[i] >= the target's score. Ties count against the target (pessimistic).
        NaN counts against the target as well: items with a NaN score are counted, and a user
        whose target score is NaN gets the worst rank, the count of all non-target non-excluded
        items. hit@k = rank < k. Scores are computed in float32 (float64 for float64 inputs).
        The reference scores users in chunks of at most 2**24 (user, item) scores (one user at a
        time when V is larger), so the (U, V) score matrix never exists at once; the Triton
        backend writes nothing per (user, item) at all, and its fp32 scores are exact fma chains,
        so an item whose embedding equals the target's always ties with it. The chunked backend
        holds at most about ``_dispatch.LOGITS_BUDGET_MB`` of scores at once.

    Under torch.compile the targets and the CSR are not checked (reading values would break the
    graph): pass valid ones.
    """
    op = "item_rank"
    if shard is not None:  # vocabulary parallel (see ``distributed``): global target ids
        return distributed.item_rank(hidden, items, targets, exclude_indptr, exclude_indices,
                                     shard, backend)
    _check_hidden_items(op, hidden, items, "U")
    n_users, n_items = hidden.shape[0], items.shape[0]
    targets = _dispatch.check_index(op, "targets", targets, n_users)
    exclude_indptr = _dispatch.check_index(op, "exclude_indptr", exclude_indptr, n_users + 1)
    exclude_indices = _dispatch.check_index(op, "exclude_indices", exclude_indices)
    _dispatch.check_same_device(
        op, ("hidden", hidden), ("items", items), ("targets", targets),
        ("exclude_indptr", exclude_indptr), ("exclude_indices", exclude_indices),
    )
    if not torch.compiler.is_compiling():  # value checks, skipped when compiling
        _dispatch.check_index_range(op, "targets", targets, n_items)
        exclude_indptr, exclude_indices = _dispatch.check_csr(
            op, exclude_indptr, exclude_indices, n_users, n_items
        )
    path = _dispatch.resolve_backend(op, backend, hidden, items, targets, exclude_indptr,
                                     exclude_indices, n_scores=n_users * n_items)
    if path == "triton":
        return _dispatch.triton_impl(op)(hidden, items, targets, exclude_indptr, exclude_indices)
    if path == "chunked":
        return chunked.item_rank(hidden, items, targets, exclude_indptr, exclude_indices)
    return reference.item_rank(hidden, items, targets, exclude_indptr, exclude_indices)


def item_topk(
    hidden: torch.Tensor, items: torch.Tensor, k: int,
    exclude_indptr: Optional[torch.Tensor] = None, exclude_indices: Optional[torch.Tensor] = None,
    *, backend: str = "auto", shard=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k best non-excluded items of each user.

    Args:
        hidden: (U, d) user states, U >= 0, d >= 1.
        items: (V, d) item embeddings, V >= 1; same float dtype and device as ``hidden``.
        k: int, 1 <= k <= V.
        exclude_indptr, exclude_indices: optional CSR exclusion lists as in ``item_rank``; give
            both or neither.
        backend: "auto", "reference", "triton" or "chunked" (see ``_dispatch``).

    Returns:
        (scores (U, k), indices (U, k) int64), best first, no gradient. Scores are float32
        (float64 for float64 inputs). Excluded items are never returned. When fewer than k items
        remain for a user, the missing last slots hold score -inf and index -1. NaN scores rank
        above every number (as in torch.topk); order among equal scores is unspecified; items
        whose score is -inf (only possible with infinite inputs) may be reported as missing
        slots. Chunked over users like ``item_rank``.
    """
    op = "item_topk"
    if shard is not None:  # vocabulary parallel (see ``distributed``): global item ids
        return distributed.item_topk(hidden, items, k, exclude_indptr, exclude_indices, shard,
                                     backend)
    _check_hidden_items(op, hidden, items, "U")
    n_users, n_items = hidden.shape[0], items.shape[0]
    k = _dispatch.check_int(op, "k", k, 1, n_items)
    if (exclude_indptr is None) != (exclude_indices is None):
        given, missing = (
            ("exclude_indptr", "exclude_indices") if exclude_indices is None
            else ("exclude_indices", "exclude_indptr")
        )
        raise ValueError(f"{op}: {given} was given but {missing} is None; expected both or neither")
    if exclude_indptr is not None:
        exclude_indptr = _dispatch.check_index(op, "exclude_indptr", exclude_indptr, n_users + 1)
        exclude_indices = _dispatch.check_index(op, "exclude_indices", exclude_indices)
    _dispatch.check_same_device(
        op, ("hidden", hidden), ("items", items),
        ("exclude_indptr", exclude_indptr), ("exclude_indices", exclude_indices),
    )
    if exclude_indptr is not None and not torch.compiler.is_compiling():  # see item_rank
        exclude_indptr, exclude_indices = _dispatch.check_csr(
            op, exclude_indptr, exclude_indices, n_users, n_items
        )
    path = _dispatch.resolve_backend(op, backend, hidden, items, exclude_indptr, exclude_indices,
                                     n_scores=n_users * n_items)
    if path == "triton":
        return _dispatch.triton_impl(op)(hidden, items, k, exclude_indptr, exclude_indices)
    if path == "chunked":
        return chunked.item_topk(hidden, items, k, exclude_indptr, exclude_indices)
    return reference.item_topk(hidden, items, k, exclude_indptr, exclude_indices)
