"""item_softmax_ce, the full-item softmax cross-entropy of SPEC eq. 1 (the training loss).

Layout, top to bottom: the forward's Triton kernels and host launcher, the ``torch.library`` custom
ops that wrap the forward and the backward (with fake implementations; the backward is registered
on the forward's op with ``register_autograd``, which plays the autograd.Function's part and lets
torch.compile trace through it without a graph break), their registration with
``_dispatch.register_triton``, then the public function. The backward's kernels and launcher, and
the gradient formula, are in _item_softmax_bwd.py; what the loss shares with item_ranking.py
(tile tables, range splits, dot precision, row loaders, input checks) is in _item_common.py.

The loss. With logits s_ni = h_n . e_i over all V items, row n's loss is lse_n - s_{n,t_n}. No
(N, V) buffer is ever written:

  forward   one program per (row block, item range): an online log-sum-exp over the item tiles of
            its range (fp32 running max m and sum l of exp2((s - m) log2(e)), one exp2 per logit),
            written as a partial (m, l) per row and range; a small combine kernel merges the
            ranges in a fixed order, adds the target logit by an indexed dot (fp32, straight from
            the two rows), and writes the row loss (m - s_t) + ln(sum). What the backward keeps
            per row is m and log2(sum) (2 N floats), not their sum lse: at large logits one ulp
            of lse is far more than 1 - p of a confident row, so p = exp2((s - m) log2(e) -
            log2(sum)) is formed from the exact difference s - m instead, as eager log_softmax
            does.
  backward  recomputes each tile's logits and probabilities and splits the two products
            (FlashAttention-2's split): one kernel over row blocks for grad_hidden, one over item
            blocks for grad_items. Every kernel computes its logits in tiles aligned to the same
            grid, (rows x items) on tensor cores, so they equal the forward's bitwise (as long as
            an MMA entry does not depend on its place in the tile; the x30 test on CUDA checks
            it), or (items x rows) where it pays, only for true-fp32 dots, whose fma chains give
            the same entries either way. Each program owns its output rows and sums over the
            other side in registers, so there are no atomics and the result is bitwise
            repeatable. That costs the exps twice (2 N V instead of N V) against one fused tile
            kernel with atomic adds, but a fused kernel must add a (rows x d) and an (items x d)
            partial per tile into global memory (about 4 bytes per logit at d = 64 with
            128 x 128 tiles, far over what L2 serves at the exp rate), and float atomics make
            runs non-repeatable. When one side alone has too few blocks to fill the GPU (few
            rows, or few items), its programs also split the other side into ranges and write
            fp32 partials that are summed in a fixed order; the partials are bounded by
            (programs x block x d), independent of N and V.
  ignored   rows whose target is ``ignore_index`` cost nothing, and nothing waits for the
            device: a stable argsort on the device puts the rows that take part first, the
            kernels read rows through that order and read the count of rows that take part
            from device memory; grids are sized for all N rows, and a row block past the count
            does no work. (The ranges are planned for N rows, so with many ignored rows the
            split is coarser than for the rows alone.) All index arithmetic on rows of
            hidden/items is int64.
  checks    a target out of [0, V) (other than ``ignore_index``) makes its row loss NaN, so the
            mean is NaN; nothing is read through it. Checking the values on the host would wait
            for the device: the public function records the check instead, and
            ``_dispatch.deferred_errors()`` runs it when asked (the trainer asks when a loss is
            not finite).

The row loss takes its target logit from the indexed dot, not from the tile, so it carries an
absolute error of about one ulp of the largest logit (the logits' own rounding); the gradients
do not depend on it.

Precision. Logit tiles use tl.dot with fp32 accumulation: bf16/fp16 operands as they are (their
products are exact in fp32); fp32 operands as torch.get_float32_matmul_precision() says for
torch's own matmuls: true fp32 by default ("highest", no tensor cores: fp32 inputs match eager
fp32, at the FMA rate), 3xTF32 for "high", TF32 for "medium". The gradient products take
(p - onehot) * g rounded to bf16 for bf16 inputs (as Cut Cross-Entropy does; the gradient is
returned in bf16 anyway), TF32 for fp16 inputs (fp16's range would flush p ~ 1/V times 1/N to
zero), and the fp32 setting for fp32. float64 inputs run the reference (the dtype rule promises
fp64 accuracy). In Triton's interpreter every operand is fp32 (its bf16 arithmetic is not
faithful).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from s4rec_kernels import _dispatch, chunked, distributed, reference
from s4rec_kernels._item_common import (CE_FWD_TILES, INTERPRET_TILES, MAX_BLOCK_D, _block_d,
                                        _check_hidden_items, _row_order, _splits,
                                        _target_programs, _tile_setting, fp32_dot_precision)
from s4rec_kernels._item_softmax_bwd import ce_backward
from s4rec_kernels._launch import Launch, device_arch, on_device

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: without it every call takes the reference path
    triton = None

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:
    from s4rec_kernels._item_common import _LN2, _LOG2E, _load_rows, _row_index

    @triton.jit
    def _ce_fwd_kernel(
        # pointers
        h_ptr, e_ptr, rows_ptr, count_ptr, part_m_ptr, part_l_ptr,
        # shapes
        n_rows, n_items, dim, tiles_per_split,
        # strides
        stride_hn, stride_hd, stride_ev, stride_ed,
        # meta
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Partial log-sum-exp of one row block over one item range.

        Grid (row blocks x ranges,), row block fastest, so the programs running together read
        the same item tiles (served from L2). Writes part_m[range, n] = max_i s_ni and
        part_l[range, n] = sum_i exp2((s_ni - part_m) log2(e)) over the range's items, at the
        positions n of the row order below the count of rows that take part (a block past it
        does nothing).
        """
        pid = tl.program_id(0)
        n_row_blocks = tl.cdiv(n_rows, BLOCK_N)
        row_block = pid % n_row_blocks
        split = pid // n_row_blocks
        n_active = tl.load(count_ptr)
        offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_active
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        rows = _row_index(rows_ptr, offs_n, mask_n)
        h = _load_rows(h_ptr, rows, mask_n, offs_d, mask_d, stride_hn, stride_hd).to(DOT_DTYPE)

        v_begin = split * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, n_items)
        v_end = tl.where(row_block * BLOCK_N < n_active, v_end, v_begin)  # no row: no work
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max logit
        l = tl.zeros((BLOCK_N,), tl.float32)  # running sum of exp(s - m)
        for v0 in range(v_begin, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < n_items
            e = _load_rows(e_ptr, offs_v.to(tl.int64), mask_v, offs_d, mask_d,
                           stride_ev, stride_ed).to(DOT_DTYPE)
            s = tl.dot(h, tl.trans(e), input_precision=PRECISION)  # (BLOCK_N, BLOCK_V) fp32
            s = tl.where(mask_v[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp2((s - m_new[:, None]) * _LOG2E)
            l = l * tl.exp2((m - m_new) * _LOG2E) + tl.sum(p, axis=1)
            m = m_new
        out = split.to(tl.int64) * n_rows + offs_n
        tl.store(part_m_ptr + out, m, mask=mask_n)
        tl.store(part_l_ptr + out, l, mask=mask_n)

    @triton.jit
    def _ce_combine_kernel(
        # pointers
        h_ptr, e_ptr, t_ptr, rows_ptr, count_ptr, part_m_ptr, part_l_ptr, loss_ptr, stats_ptr,
        # shapes
        n_rows, n_items, dim, n_splits,
        # strides
        stride_hn, stride_hd, stride_ev, stride_ed,
        # meta
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Merge the ranges' partials in order, add the target logit, write loss and stats.

        stats[0, row] = m (the row's largest logit), stats[1, row] = log2 sum_i exp(s_i - m);
        loss[row] = (m - h_row . e_target) + ln(2) stats[1, row], the target logit by an fp32
        indexed dot; NaN when the target is out of [0, V) (nothing is read through it).
        """
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < tl.load(count_ptr)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        rows = _row_index(rows_ptr, offs_n, mask_n)

        m = tl.load(part_m_ptr + offs_n, mask=mask_n, other=0.0)
        l = tl.load(part_l_ptr + offs_n, mask=mask_n, other=1.0)
        for split in range(1, n_splits):
            at = split * n_rows + offs_n.to(tl.int64)
            m_s = tl.load(part_m_ptr + at, mask=mask_n, other=0.0)
            l_s = tl.load(part_l_ptr + at, mask=mask_n, other=1.0)
            m_new = tl.maximum(m, m_s)
            l = l * tl.exp2((m - m_new) * _LOG2E) + l_s * tl.exp2((m_s - m_new) * _LOG2E)
            m = m_new
        log2_sum = tl.log2(l)

        target = tl.load(t_ptr + rows, mask=mask_n, other=0)
        t_ok = mask_n & (target >= 0) & (target < n_items)
        h = _load_rows(h_ptr, rows, mask_n, offs_d, mask_d, stride_hn, stride_hd).to(tl.float32)
        e_t = _load_rows(e_ptr, target.to(tl.int64), t_ok, offs_d, mask_d,
                         stride_ev, stride_ed).to(tl.float32)
        target_logit = tl.sum(h * e_t, axis=1)
        loss = tl.where(t_ok, (m - target_logit) + log2_sum * _LN2, float("nan"))
        tl.store(loss_ptr + rows, loss, mask=mask_n)
        tl.store(stats_ptr + rows, m, mask=mask_n)
        tl.store(stats_ptr + n_rows + rows, log2_sum, mask=mask_n)


# ----------------------------------------------------------------------------------------------
# Host launcher
# ----------------------------------------------------------------------------------------------


def ce_forward_launches(n_rows: int, n_items: int, dim: int, dtype: torch.dtype,
                        arch: Optional[int], programs: int, fp32: str
                        ) -> Tuple[Launch, Launch, int, int]:
    """(forward launch, combine launch, ranges, item tiles per range) for up to ``n_rows`` rows
    over ``n_items`` items on CUDA architecture ``arch`` (None: the interpreter); ``programs``
    is what the range split aims for, ``fp32`` the dot precision of fp32 inputs."""
    block_d, (block_n, block_v, warps, stages), dots = _tile_setting(CE_FWD_TILES, dim, dtype,
                                                                     arch, fp32)
    n_row_blocks = triton.cdiv(n_rows, block_n)
    n_splits, tiles_per_split = _splits(n_row_blocks, triton.cdiv(n_items, block_v), programs)
    fwd = Launch(_ce_fwd_kernel, (n_row_blocks * n_splits,),
                 dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
                      DOT_DTYPE=dots["DOT_DTYPE"], PRECISION=dots["PRECISION"]), warps, stages)
    combine_rows = max(16, 8192 // block_d) if arch is not None else INTERPRET_TILES[0]
    combine = Launch(_ce_combine_kernel, (triton.cdiv(n_rows, combine_rows),),
                     dict(BLOCK_N=combine_rows, BLOCK_D=block_d), 4)
    return fwd, combine, n_splits, tiles_per_split


def ce_forward(hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
               ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row losses (N,) fp32 (0 at ignored rows, NaN at rows whose target is out of range) and
    the rows' softmax statistics (2, N) fp32: [0] the largest logit m, [1] log2 sum_i exp(s_i -
    m); logsumexp = m + ln(2) [1]. Never waits for the device."""
    n_rows, dim = hidden.shape
    n_items = items.shape[0]
    device = hidden.device
    loss = torch.zeros(n_rows, dtype=torch.float32, device=device)
    stats = torch.zeros(2, n_rows, dtype=torch.float32, device=device)
    if n_rows == 0:
        return loss, stats
    rows, count = _row_order(targets, ignore_index)
    fwd, combine, n_splits, tiles_per_split = ce_forward_launches(
        n_rows, n_items, dim, hidden.dtype, device_arch(device), _target_programs(device),
        fp32_dot_precision())
    part_m = torch.empty(n_splits, n_rows, dtype=torch.float32, device=device)
    part_l = torch.empty(n_splits, n_rows, dtype=torch.float32, device=device)
    strides = (hidden.stride(0), hidden.stride(1), items.stride(0), items.stride(1))
    with on_device(device):
        fwd(hidden, items, rows, count, part_m, part_l, n_rows, n_items, dim, tiles_per_split,
            *strides)
        combine(hidden, items, targets, rows, count, part_m, part_l, loss, stats,
                n_rows, n_items, dim, n_splits, *strides)
    return loss, stats


# ----------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile, with fake implementations), autograd, registration
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @torch.library.custom_op("s4rec_kernels::item_softmax_ce_fwd", mutates_args=())
    def _ce_fwd_op(hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                   ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return ce_forward(hidden, items, targets, ignore_index)

    @_ce_fwd_op.register_fake
    def _(hidden, items, targets, ignore_index):
        n_rows = hidden.shape[0]
        return (hidden.new_empty(n_rows, dtype=torch.float32),
                hidden.new_empty(2, n_rows, dtype=torch.float32))

    @torch.library.custom_op("s4rec_kernels::item_softmax_ce_bwd", mutates_args=())
    def _ce_bwd_op(grad_rows: torch.Tensor, hidden: torch.Tensor, items: torch.Tensor,
                   targets: torch.Tensor, stats: torch.Tensor, ignore_index: int,
                   need_hidden: bool, need_items: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        return ce_backward(grad_rows, hidden, items, targets, stats, ignore_index,
                           need_hidden, need_items)

    @_ce_bwd_op.register_fake
    def _(grad_rows, hidden, items, targets, stats, ignore_index, need_hidden, need_items):
        dim = hidden.shape[1]
        # contiguous, like the real outputs (whatever the inputs' strides)
        return (hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0, dim),
                items.new_empty(items.shape) if need_items else items.new_empty(0, dim))

    def _ce_setup_context(ctx, inputs, output):
        hidden, items, targets, ignore_index = inputs
        ctx.save_for_backward(hidden, items, targets, output[1])
        ctx.ignore_index = ignore_index

    def _ce_backward(ctx, grad_rows, grad_stats):
        hidden, items, targets, stats = ctx.saved_tensors
        need_hidden, need_items = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_rows is None:
            grad_rows = stats.new_zeros(hidden.shape[0])
        dh, de = _ce_bwd_op(grad_rows, hidden, items, targets, stats, ctx.ignore_index,
                            need_hidden, need_items)
        return (dh if need_hidden else None), (de if need_items else None), None, None

    _ce_fwd_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)

    def _item_softmax_ce_triton(hidden, items, targets, ignore_index, reduction):
        """The registered Triton implementation (arguments already checked)."""
        if hidden.dtype == torch.float64 or _block_d(hidden.shape[1]) > MAX_BLOCK_D:
            return reference.item_softmax_ce(hidden, items, targets, ignore_index, reduction)
        rows, _ = _ce_fwd_op(hidden, items, targets, ignore_index)  # (N,), 0 at ignored rows
        if reduction == "none":
            return rows
        total = rows.sum()
        if reduction == "sum":
            return total
        return total / (targets != ignore_index).sum()  # 0 / 0 = NaN when every row is ignored

    _dispatch.register_triton("item_softmax_ce", _item_softmax_ce_triton)

# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

REDUCTIONS = ("mean", "sum", "none")


def item_softmax_ce(
    hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, *,
    ignore_index: int = -100, reduction: str = "mean", backend: str = "auto", shard=None,
) -> torch.Tensor:
    """Cross-entropy of the softmax over all V items, without a bias.

    Args:
        hidden: (N, d) hidden states, N >= 0, d >= 1.
        items: (V, d) item embeddings, V >= 1; same float dtype and device as ``hidden``.
        targets: (N,) int64 or int32, each in [0, V) or equal to ``ignore_index``.
        ignore_index: target value of rows that take no part in the loss.
        reduction: "mean" (over non-ignored rows), "sum" or "none".
        backend: "auto", "reference", "triton" or "chunked" (see ``_dispatch``).
        shard: a ``VocabShard(start, stop, group)`` for vocabulary parallelism (see
            ``distributed``): items are rows [start, stop) of the table (possibly none), targets
            are global item ids, hidden and targets are this rank's rows.

    Returns:
        Row loss logsumexp_i(hidden[n] . items[i]) - hidden[n] . items[targets[n]], reduced
        exactly like F.cross_entropy: "mean" gives NaN when every row is ignored (or N = 0),
        "sum" gives 0, "none" gives (N,) with 0 at ignored rows. Differentiable in hidden and
        items. float64 inputs give float64; every other dtype is computed in and returned as
        float32. The Triton backend never forms the (N, V) logits: beyond the inputs and the
        gradients it keeps O(N) floats (and O(programs x block x d) of partial sums); the
        chunked backend holds at most about ``_dispatch.LOGITS_BUDGET_MB`` of logits at once.

    Target values are checked without waiting for the device: the reference backend raises
    ValueError for one out of range; the Triton backend makes that row's loss NaN (so the mean
    is NaN) and records the check, whose message ``_dispatch.deferred_errors()`` returns (the
    trainer's non-finite check reports it). Nothing is ever read through such a target.
    """
    op = "item_softmax_ce"
    if shard is not None:
        return distributed.item_softmax_ce(hidden, items, targets, ignore_index, reduction,
                                           shard, backend)
    _check_hidden_items(op, hidden, items, "N")
    targets = _dispatch.check_index(op, "targets", targets, hidden.shape[0])
    _dispatch.check_same_device(op, ("hidden", hidden), ("items", items), ("targets", targets))
    ignore_index = _dispatch.check_int(op, "ignore_index", ignore_index, -(2**63))
    reduction = _dispatch.check_choice(op, "reduction", reduction, REDUCTIONS)
    path = _dispatch.resolve_backend(op, backend, hidden, items, targets,
                                     n_scores=hidden.shape[0] * items.shape[0])
    if path == "triton":
        # no value check here: it would wait for the device (and break a torch.compile graph).
        # A target out of range makes the loss NaN; the check is recorded for deferred_errors
        if not torch.compiler.is_compiling():
            _dispatch.defer_index_range(op, "targets", targets, items.shape[0], ignore_index)
        return _dispatch.triton_impl(op)(hidden, items, targets, ignore_index, reduction)
    if not torch.compiler.is_compiling():
        _dispatch.check_index_range(op, "targets", targets, items.shape[0],
                                    allowed_extra=ignore_index)
    if path == "chunked":
        return chunked.item_softmax_ce(hidden, items, targets, ignore_index, reduction)
    return reference.item_softmax_ce(hidden, items, targets, ignore_index, reduction)
