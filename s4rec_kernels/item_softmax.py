"""Full-item softmax cross-entropy (SPEC eq. 1) and the full-ranking evaluation ops.

Layout, top to bottom: Triton kernels, host launchers, the ``torch.library`` custom ops that wrap
them (with fake implementations; the loss's backward is registered on its op with
``register_autograd``, which plays the autograd.Function's part and lets torch.compile trace
through it without a graph break), their registration with ``_dispatch.register_triton``, then
the shared checks and the public functions.

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
  ignored   rows whose target is ``ignore_index`` are dropped on the host (their indices are
            compacted by one nonzero(), which waits for the device; the kernels read rows
            through that index), so they cost nothing. All index arithmetic on rows of
            hidden/items is int64.

Gradient, with g_n the upstream gradient of row n's loss and p_ni = exp(s_ni - lse_n):
    dL/ds_ni = g_n (p_ni - [i == t_n])
    grad_hidden[n] = g_n * sum_i (p_ni - [i == t_n]) e_i        (row-block kernel, g_n applied last)
    grad_items[i]  = sum_n g_n (p_ni - [i == t_n]) h_n           (item-block kernel)
The one-hot term is subtracted inside the tile, before the product, so no scatter is needed.
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

from s4rec_kernels import _dispatch, reference
from s4rec_kernels._launch import on_device, programs_per_device

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: without it every call takes the reference path
    triton = None

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)

# Largest k the top-k kernel keeps in registers; larger k runs the reference's chunked scoring.
MAX_KERNEL_K = 128
# Programs per streaming multiprocessor that the range splits aim for (enough for two or more
# waves, so that no SM idles on the last one for long).
PROGRAMS_PER_SM = 4
# Program count aimed for under the interpreter (small: every program runs in turn on the CPU,
# but more than one, so the tests cover the split paths).
INTERPRET_TARGET_PROGRAMS = 4

# Tiles on CUDA: {operand kind: {padded d (BLOCK_D): (BLOCK rows, BLOCK items, num_warps,
# num_stages)}}. "half" is bf16/fp16 operands; "fp32" is fp32 on tensor cores (3xTF32 or TF32, see
# _dot_types: twice the shared memory, 3xTF32 three products per tile); "ieee" is true fp32, an
# fma chain per entry without tensor cores, whose operands live in registers, hence the small
# tiles. First choices for sm_90, compiled ahead of time for it (triton 3.9, ptxas) to check
# registers and shared memory: no spill, or a few dozen bytes, up to d = 128 ("fp32" excepted,
# which spills a few hundred bytes in the backward at d >= 128); a few hundred bytes in the
# "half" backward at d = 256. Not yet timed on a device: to be tuned there.
CE_FWD_TILES = {
    "half": {16: (128, 128, 8, 3), 32: (128, 128, 8, 3), 64: (128, 128, 8, 3),
             128: (128, 128, 8, 2), 256: (128, 64, 8, 2)},
    "fp32": {16: (128, 128, 8, 3), 32: (128, 128, 8, 3), 64: (128, 128, 8, 3),
             128: (64, 64, 8, 2), 256: (64, 32, 8, 1)},
    "ieee": {16: (64, 32, 4, 3), 32: (64, 32, 4, 3), 64: (64, 32, 4, 3),
             128: (32, 32, 4, 2), 256: (32, 32, 4, 2)},
}
CE_DH_TILES = {
    "half": {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3),
             128: (64, 64, 8, 2), 256: (64, 32, 8, 2)},
    "fp32": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2),
             128: (64, 32, 4, 2), 256: (64, 16, 4, 2)},
    "ieee": {16: (32, 32, 4, 3), 32: (32, 32, 4, 3), 64: (32, 32, 4, 3),
             128: (32, 32, 4, 2), 256: (32, 16, 8, 2)},
}
CE_DE_TILES = {  # 64 rows on tensor cores: the logits take the same (wgmma) path as the forward's
    "half": {16: (64, 128, 8, 2), 32: (64, 128, 8, 2), 64: (64, 128, 8, 2),
             128: (64, 64, 8, 2), 256: (64, 32, 8, 2)},
    "fp32": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2),
             128: (64, 32, 4, 2), 256: (64, 16, 4, 2)},
    "ieee": {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2),
             128: (32, 32, 4, 2), 256: (32, 16, 8, 2)},
}
TOPK_TILES = {
    "half": {16: (32, 128, 8, 3), 32: (32, 128, 8, 3), 64: (32, 128, 8, 3),
             128: (32, 128, 8, 2), 256: (32, 64, 8, 2)},
    "fp32": {16: (32, 128, 8, 2), 32: (32, 128, 8, 2), 64: (32, 128, 8, 2),
             128: (32, 64, 8, 2), 256: (32, 64, 8, 2)},
}
# item_rank scores with fp32 fused multiply-adds (see _score_tile): (BLOCK_U, BLOCK_V, num_warps)
RANK_TILES = (64, 128, 8)
# Under the interpreter: (BLOCK_N or BLOCK_U, BLOCK_V) small enough that test shapes span several
# tiles. Module level so tests can change them (tl.dot needs 16 or more).
INTERPRET_TILES = (32, 64)
# Widest padded d the tl.dot kernels take; wider rows run the reference.
MAX_BLOCK_D = 256

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:
    _LOG2E = tl.constexpr(LOG2E)
    _LN2 = tl.constexpr(LN2)
    # the top-k key of "no item": below every packed (score, index) key
    _MISSING = tl.constexpr(-(2**63))

    @triton.jit
    def _load_rows(ptr, rows, mask_n, offs_d, mask_d, stride_n, stride_d):
        """(BLOCK, BLOCK_D) tile of rows ``rows`` (int64) of a row-major-ish matrix; 0 outside."""
        return tl.load(ptr + rows[:, None] * stride_n + offs_d[None, :] * stride_d,
                       mask=mask_n[:, None] & mask_d[None, :], other=0.0)

    @triton.jit
    def _row_index(rows_ptr, offs_n, mask_n, HAS_ROWS: tl.constexpr):
        """Row of hidden for compact position ``offs_n`` (the identity without compaction)."""
        if HAS_ROWS:
            rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0)
        else:
            rows = offs_n
        return rows.to(tl.int64)

    @triton.jit
    def _ce_fwd_kernel(
        # pointers
        h_ptr, e_ptr, rows_ptr, part_m_ptr, part_l_ptr,
        # shapes
        n_rows, n_items, dim, tiles_per_split,
        # strides
        stride_hn, stride_hd, stride_ev, stride_ed,
        # meta
        HAS_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Partial log-sum-exp of one row block over one item range.

        Grid (row blocks x ranges,), row block fastest, so the programs running together read
        the same item tiles (served from L2). Writes part_m[range, n] = max_i s_ni and
        part_l[range, n] = sum_i exp2((s_ni - part_m) log2(e)) over the range's items.
        """
        pid = tl.program_id(0)
        n_row_blocks = tl.cdiv(n_rows, BLOCK_N)
        row_block = pid % n_row_blocks
        split = pid // n_row_blocks
        offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_rows
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        rows = _row_index(rows_ptr, offs_n, mask_n, HAS_ROWS)
        h = _load_rows(h_ptr, rows, mask_n, offs_d, mask_d, stride_hn, stride_hd).to(DOT_DTYPE)

        v_begin = split * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, n_items)
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
        h_ptr, e_ptr, t_ptr, rows_ptr, part_m_ptr, part_l_ptr, loss_ptr, stats_ptr,
        # shapes
        n_rows, n_all_rows, n_items, dim, n_splits,
        # strides
        stride_hn, stride_hd, stride_ev, stride_ed,
        # meta
        HAS_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Merge the ranges' partials in order, add the target logit, write loss and stats.

        stats[0, row] = m (the row's largest logit), stats[1, row] = log2 sum_i exp(s_i - m);
        loss[row] = (m - h_row . e_target) + ln(2) stats[1, row], the target logit by an fp32
        indexed dot.
        """
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_rows
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        rows = _row_index(rows_ptr, offs_n, mask_n, HAS_ROWS)

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
        tl.store(loss_ptr + rows, (m - target_logit) + log2_sum * _LN2, mask=mask_n)
        tl.store(stats_ptr + rows, m, mask=mask_n)
        tl.store(stats_ptr + n_all_rows + rows, log2_sum, mask=mask_n)

    @triton.jit
    def _load_stats(stats_ptr, rows, mask_n, n_all_rows):
        """(m, log2 sum) of rows ``rows``; padding rows get (0, 0)."""
        m = tl.load(stats_ptr + rows, mask=mask_n, other=0.0)
        log2_sum = tl.load(stats_ptr + n_all_rows + rows, mask=mask_n, other=0.0)
        return m, log2_sum

    @triton.jit
    def _ce_bwd_dh_kernel(
        # pointers
        h_ptr, e_ptr, t_ptr, rows_ptr, stats_ptr, g_ptr, dh_ptr,
        # shapes
        n_rows, n_all_rows, n_items, dim, tiles_per_split,
        # strides
        stride_hn, stride_hd, stride_ev, stride_ed, stride_g,
        stride_dsplit, stride_dn, stride_dd,
        # meta
        HAS_ROWS: tl.constexpr, OUT_COMPACT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
        PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    ):
        """grad_hidden of one row block over one item range:
        g_n * sum_i (p_ni - [i == t_n]) e_i, accumulated in registers (fp32).

        Grid (row blocks x ranges,), row block fastest. Writes dh[range, position] when
        OUT_COMPACT (fp32 partials, position = compact row), else dh[row] directly.
        """
        pid = tl.program_id(0)
        n_row_blocks = tl.cdiv(n_rows, BLOCK_N)
        row_block = pid % n_row_blocks
        split = pid // n_row_blocks
        offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_rows
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        rows = _row_index(rows_ptr, offs_n, mask_n, HAS_ROWS)
        h = _load_rows(h_ptr, rows, mask_n, offs_d, mask_d, stride_hn, stride_hd).to(DOT_DTYPE)
        target = tl.load(t_ptr + rows, mask=mask_n, other=-1)
        m, log2_sum = _load_stats(stats_ptr, rows, mask_n, n_all_rows)
        g = tl.load(g_ptr + rows * stride_g, mask=mask_n, other=0.0).to(tl.float32)

        v_begin = split * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, n_items)
        acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for v0 in range(v_begin, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < n_items
            e = _load_rows(e_ptr, offs_v.to(tl.int64), mask_v, offs_d, mask_d,
                           stride_ev, stride_ed).to(DOT_DTYPE)
            s = tl.dot(h, tl.trans(e), input_precision=PRECISION)  # the forward's logits
            p = tl.exp2((s - m[:, None]) * _LOG2E - log2_sum[:, None])
            p = tl.where(mask_v[None, :], p, 0.0)
            p -= tl.where(offs_v[None, :] == target[:, None], 1.0, 0.0)
            acc = tl.dot(p.to(GRAD_DTYPE), e.to(GRAD_DTYPE), acc, input_precision=GRAD_PRECISION)
        acc = acc * g[:, None]
        if OUT_COMPACT:
            out = split.to(tl.int64) * stride_dsplit + offs_n.to(tl.int64)[:, None] * stride_dn
        else:
            out = rows[:, None] * stride_dn
        tl.store(dh_ptr + out + offs_d[None, :] * stride_dd, acc.to(dh_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_d[None, :])

    @triton.jit
    def _ce_bwd_de_kernel(
        # pointers
        h_ptr, e_ptr, t_ptr, rows_ptr, stats_ptr, g_ptr, de_ptr,
        # shapes
        n_rows, n_all_rows, n_items, dim, blocks_per_split,
        # strides
        stride_hn, stride_hd, stride_ev, stride_ed, stride_g,
        stride_dsplit, stride_dv, stride_dd,
        # meta
        HAS_ROWS: tl.constexpr, TRANS_LOGITS: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
        GRAD_DTYPE: tl.constexpr, PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    ):
        """grad_items of one item block over one range of row blocks:
        sum_n g_n (p_ni - [i == t_n]) h_n, accumulated in registers (fp32).

        The logits must be the forward's bitwise, so that p of a row's top item is exact next
        to 1 (at large logits one ulp of a logit is far more than 1 - p). Tensor-core tiles are
        computed as (rows x items) like the forward's; a true-fp32 tl.dot (an fma chain over d
        per entry) gives the same entries transposed, so with TRANS_LOGITS it computes
        (items x rows) and spares the transpose of p. Grid (item blocks x ranges,), item block
        fastest. Writes de[range, item] (fp32 partials when there are several ranges,
        grad_items itself when there is one).
        """
        pid = tl.program_id(0)
        n_item_blocks = tl.cdiv(n_items, BLOCK_V)
        item_block = pid % n_item_blocks
        split = pid // n_item_blocks
        offs_v = item_block * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < n_items
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        e = _load_rows(e_ptr, offs_v.to(tl.int64), mask_v, offs_d, mask_d,
                       stride_ev, stride_ed).to(DOT_DTYPE)

        n_begin = split * blocks_per_split * BLOCK_N
        n_end = tl.minimum(n_begin + blocks_per_split * BLOCK_N, n_rows)
        acc = tl.zeros((BLOCK_V, BLOCK_D), tl.float32)
        for n0 in range(n_begin, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_end
            rows = _row_index(rows_ptr, offs_n, mask_n, HAS_ROWS)
            h = _load_rows(h_ptr, rows, mask_n, offs_d, mask_d, stride_hn, stride_hd)
            target = tl.load(t_ptr + rows, mask=mask_n, other=-1)
            m, log2_sum = _load_stats(stats_ptr, rows, mask_n, n_all_rows)
            g = tl.load(g_ptr + rows * stride_g, mask=mask_n, other=0.0).to(tl.float32)
            if TRANS_LOGITS:  # (V, N): an fma-chain dot gives the forward's entries either way
                s_t = tl.dot(e, tl.trans(h.to(DOT_DTYPE)), input_precision=PRECISION)
                p_t = tl.exp2((s_t - m[None, :]) * _LOG2E - log2_sum[None, :])
                p_t -= tl.where(offs_v[:, None] == target[None, :], 1.0, 0.0)
                p_t = p_t * g[None, :]
            else:  # (N, V), as the forward's tiles
                s = tl.dot(h.to(DOT_DTYPE), tl.trans(e), input_precision=PRECISION)
                p = tl.exp2((s - m[:, None]) * _LOG2E - log2_sum[:, None])
                p -= tl.where(offs_v[None, :] == target[:, None], 1.0, 0.0)
                p_t = tl.trans(p * g[:, None])
            acc = tl.dot(p_t.to(GRAD_DTYPE), h.to(GRAD_DTYPE), acc,
                         input_precision=GRAD_PRECISION)
        out = (split.to(tl.int64) * stride_dsplit + offs_v.to(tl.int64)[:, None] * stride_dv
               + offs_d[None, :] * stride_dd)
        tl.store(de_ptr + out, acc.to(de_ptr.dtype.element_ty),
                 mask=mask_v[:, None] & mask_d[None, :])

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


def _target_programs(device: torch.device) -> int:
    """How many programs the range splits aim for."""
    if device.type == "cuda":
        return programs_per_device(device, PROGRAMS_PER_SM)
    return INTERPRET_TARGET_PROGRAMS


def _splits(n_outer: int, n_inner: int, target: int) -> Tuple[int, int]:
    """Split ``n_inner`` units (tiles or blocks) into ranges so that n_outer x ranges reaches
    ``target`` programs. Returns (number of ranges, units per range); every range is non-empty."""
    want = max(1, min(n_inner, -(-target // max(1, n_outer))))
    per = -(-n_inner // want)
    return -(-n_inner // per), per


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _tiles(table: dict, block_d: int, dtype: torch.dtype, device: torch.device) -> Tuple[int, ...]:
    """(BLOCK_rows, BLOCK_items, num_warps, num_stages) for a kernel on ``device``."""
    if device.type != "cuda":
        return INTERPRET_TILES + (4, 1)
    kind = "half"
    if dtype == torch.float32:
        kind = "ieee" if _dot_types(dtype, device)[1] == "ieee" and "ieee" in table else "fp32"
    return table[kind][block_d]


# tl.dot precision of fp32 operands for each torch.get_float32_matmul_precision(), as torch's own
# fp32 matmuls read it: "highest" (torch's default) computes in true fp32 (no tensor cores)
_FP32_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


def _dot_types(dtype: torch.dtype, device: torch.device):
    """(DOT_DTYPE, PRECISION, GRAD_DTYPE, GRAD_PRECISION) for inputs of ``dtype``."""
    if device.type != "cuda":  # the interpreter: every operand in fp32
        return tl.float32, "ieee", tl.float32, "ieee"
    if dtype == torch.bfloat16:
        return tl.bfloat16, "tf32", tl.bfloat16, "tf32"
    if dtype == torch.float16:
        return tl.float16, "tf32", tl.float32, "tf32"
    precision = _FP32_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")
    return tl.float32, precision, tl.float32, precision


def _active_rows(targets: torch.Tensor, ignore_index: int) -> Tuple[Optional[torch.Tensor], int]:
    """Indices of the rows that take part (None when all do) and their count."""
    active = targets != ignore_index
    n_active = int(active.sum())
    if n_active == targets.shape[0]:
        return None, n_active
    return active.nonzero().squeeze(1), n_active


def _store_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Gradients are stored by the kernels in their own dtype on CUDA; the interpreter rounds
    to bfloat16 by truncation, so there it stores fp32 and torch rounds."""
    if device.type != "cuda" and dtype == torch.bfloat16:
        return torch.float32
    return dtype


def ce_forward(hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
               ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row losses (N,) fp32 (0 at ignored rows) and the rows' softmax statistics (2, N) fp32:
    [0] the largest logit m, [1] log2 sum_i exp(s_i - m); logsumexp = m + ln(2) [1]."""
    n_rows, dim = hidden.shape
    n_items = items.shape[0]
    device = hidden.device
    rows, n_active = _active_rows(targets, ignore_index)
    make = torch.empty if rows is None else torch.zeros
    loss = make(n_rows, dtype=torch.float32, device=device)
    stats = make(2, n_rows, dtype=torch.float32, device=device)
    if n_active == 0:
        return loss, stats
    block_d = _block_d(dim)
    block_n, block_v, warps, stages = _tiles(CE_FWD_TILES, block_d, hidden.dtype, device)
    dot_dtype, precision, _, _ = _dot_types(hidden.dtype, device)
    n_row_blocks = triton.cdiv(n_active, block_n)
    n_splits, tiles_per_split = _splits(n_row_blocks, triton.cdiv(n_items, block_v),
                                        _target_programs(device))
    part_m = torch.empty(n_splits, n_active, dtype=torch.float32, device=device)
    part_l = torch.empty(n_splits, n_active, dtype=torch.float32, device=device)
    has_rows = rows is not None
    with on_device(device):
        _ce_fwd_kernel[(n_row_blocks * n_splits,)](
            hidden, items, rows, part_m, part_l,
            n_active, n_items, dim, tiles_per_split,
            hidden.stride(0), hidden.stride(1), items.stride(0), items.stride(1),
            HAS_ROWS=has_rows, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
            DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=warps, num_stages=stages,
        )
        combine_rows = max(16, 8192 // block_d) if device.type == "cuda" else INTERPRET_TILES[0]
        _ce_combine_kernel[(triton.cdiv(n_active, combine_rows),)](
            hidden, items, targets, rows, part_m, part_l, loss, stats,
            n_active, n_rows, n_items, dim, n_splits,
            hidden.stride(0), hidden.stride(1), items.stride(0), items.stride(1),
            HAS_ROWS=has_rows, BLOCK_N=combine_rows, BLOCK_D=block_d, num_warps=4,
        )
    return loss, stats


def ce_backward(grad_rows: torch.Tensor, hidden: torch.Tensor, items: torch.Tensor,
                targets: torch.Tensor, stats: torch.Tensor, ignore_index: int,
                need_hidden: bool, need_items: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_items) in the inputs' dtypes; an empty (0, d) tensor for a gradient
    that is not needed."""
    n_rows, dim = hidden.shape
    n_items = items.shape[0]
    device = hidden.device
    rows, n_active = _active_rows(targets, ignore_index)
    has_rows = rows is not None
    block_d = _block_d(dim)
    dot_dtype, precision, grad_dtype, grad_precision = _dot_types(hidden.dtype, device)
    target = _target_programs(device)
    grad_rows = grad_rows.to(torch.float32)
    dh = hidden.new_empty(0, dim)
    de = items.new_empty(0, dim)

    if need_hidden:
        store = _store_dtype(hidden.dtype, device)
        dh = (torch.empty if rows is None else torch.zeros)(n_rows, dim, dtype=store, device=device)
        if n_active > 0:
            block_n, block_v, warps, stages = _tiles(CE_DH_TILES, block_d, hidden.dtype, device)
            n_row_blocks = triton.cdiv(n_active, block_n)
            n_splits, tiles_per_split = _splits(n_row_blocks, triton.cdiv(n_items, block_v), target)
            compact = n_splits > 1
            out = (torch.empty(n_splits, n_active, dim, dtype=torch.float32, device=device)
                   if compact else dh)
            with on_device(device):
                _ce_bwd_dh_kernel[(n_row_blocks * n_splits,)](
                    hidden, items, targets, rows, stats, grad_rows, out,
                    n_active, n_rows, n_items, dim, tiles_per_split,
                    hidden.stride(0), hidden.stride(1), items.stride(0), items.stride(1),
                    grad_rows.stride(0), out.stride(0) if compact else 0,
                    out.stride(-2), out.stride(-1),
                    HAS_ROWS=has_rows, OUT_COMPACT=compact,
                    BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
                    DOT_DTYPE=dot_dtype, GRAD_DTYPE=grad_dtype,
                    PRECISION=precision, GRAD_PRECISION=grad_precision,
                    num_warps=warps, num_stages=stages,
                )
            if compact:
                summed = out.sum(0)  # ranges in a fixed order: deterministic
                if rows is None:
                    dh = summed
                else:
                    dh[rows] = summed.to(dh.dtype)  # rows are distinct: deterministic
        dh = dh.to(hidden.dtype)

    if need_items:
        store = _store_dtype(items.dtype, device)
        block_n, block_v, warps, stages = _tiles(CE_DE_TILES, block_d, items.dtype, device)
        n_item_blocks = triton.cdiv(n_items, block_v)
        n_row_blocks = triton.cdiv(n_active, block_n)
        if n_active == 0:
            de = torch.zeros(n_items, dim, dtype=items.dtype, device=device)
        else:
            n_splits, blocks_per_split = _splits(n_item_blocks, n_row_blocks, target)
            out = (torch.empty(n_splits, n_items, dim, dtype=torch.float32, device=device)
                   if n_splits > 1 else torch.empty(n_items, dim, dtype=store, device=device))
            with on_device(device):
                _ce_bwd_de_kernel[(n_item_blocks * n_splits,)](
                    hidden, items, targets, rows, stats, grad_rows, out,
                    n_active, n_rows, n_items, dim, blocks_per_split,
                    hidden.stride(0), hidden.stride(1), items.stride(0), items.stride(1),
                    grad_rows.stride(0), out.stride(0) if n_splits > 1 else 0,
                    out.stride(-2), out.stride(-1),
                    HAS_ROWS=has_rows, TRANS_LOGITS=device.type == "cuda" and precision == "ieee",
                    BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
                    DOT_DTYPE=dot_dtype, GRAD_DTYPE=grad_dtype,
                    PRECISION=precision, GRAD_PRECISION=grad_precision,
                    num_warps=warps, num_stages=stages,
                )
            de = (out.sum(0) if n_splits > 1 else out).to(items.dtype)
    return dh, de


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


def rank_forward(hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                 indptr: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(U,) int64 ranks (see ``item_rank``)."""
    n_users, dim = hidden.shape
    n_items = items.shape[0]
    device = hidden.device
    if n_users == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    if device.type == "cuda":
        block_u, block_v, warps = RANK_TILES
    else:
        (block_u, block_v), warps = INTERPRET_TILES, 4
    n_user_blocks = triton.cdiv(n_users, block_u)
    n_splits, tiles_per_split = _splits(n_user_blocks, triton.cdiv(n_items, block_v),
                                        _target_programs(device))
    has_exclude = indices.numel() > 0
    sorted_indices = _sorted_exclusions(indptr, indices, n_items) if has_exclude else indices
    counts = torch.empty(n_splits, n_users, dtype=torch.int32, device=device)
    with on_device(device):
        _rank_kernel[(n_user_blocks * n_splits,)](
            hidden, items, targets, sorted_indices, indptr, counts,
            n_users, n_items, dim, tiles_per_split,
            hidden.stride(0), hidden.stride(1), items.stride(0), items.stride(1),
            HAS_EXCLUDE=has_exclude, BLOCK_U=block_u, BLOCK_V=block_v, num_warps=warps,
        )
    return counts.sum(0, dtype=torch.int64)


def _decode_keys(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed top-k keys -> (fp32 scores, int64 item indices); missing slots -> (-inf, -1)."""
    high = (keys >> 32).to(torch.int32)
    bits = high ^ ((high >> 31) & 0x7FFFFFFF)
    scores = bits.view(torch.float32)
    index = 4294967295 - (keys & 4294967295)
    missing = keys == -(2**63)
    return scores.masked_fill(missing, -math.inf), index.masked_fill(missing, -1)


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
    block_d = _block_d(dim)
    block_u, block_v, warps, stages = _tiles(TOPK_TILES, block_d, hidden.dtype, device)
    block_k = max(16, triton.next_power_of_2(k))  # the list width
    dot_dtype, precision, _, _ = _dot_types(hidden.dtype, device)
    n_user_blocks = triton.cdiv(n_users, block_u)
    n_splits, tiles_per_split = _splits(n_user_blocks, triton.cdiv(n_items, block_v),
                                        _target_programs(device))
    has_exclude = indices is not None and indices.numel() > 0
    if has_exclude:
        sorted_indices = _sorted_exclusions(indptr, indices, n_items)
    else:
        sorted_indices = indptr = torch.zeros(1, dtype=torch.int64, device=device)
    keys = torch.empty(n_splits, n_users, block_k, dtype=torch.int64, device=device)
    with on_device(device):
        _topk_kernel[(n_user_blocks, n_splits)](
            hidden, items, sorted_indices, indptr, keys,
            n_users, n_items, dim, tiles_per_split, k,
            hidden.stride(0), hidden.stride(1), items.stride(0), items.stride(1),
            HAS_EXCLUDE=has_exclude, BLOCK_U=block_u, BLOCK_V=block_v, BLOCK_K=block_k,
            BLOCK_D=block_d, DOT_DTYPE=dot_dtype, PRECISION=precision,
            num_warps=warps, num_stages=stages,
        )
    if n_splits == 1:
        best = keys[0, :, :k]
    else:  # merge the ranges' lists: keys order like (score, -index)
        best = torch.topk(keys.permute(1, 0, 2).reshape(n_users, -1), k, dim=1).values
    return _decode_keys(best)


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

    _dispatch.register_triton("item_softmax_ce", _item_softmax_ce_triton)
    _dispatch.register_triton("item_rank", _item_rank_triton)
    _dispatch.register_triton("item_topk", _item_topk_triton)

# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

REDUCTIONS = ("mean", "sum", "none")


def _check_hidden_items(op: str, hidden: torch.Tensor, items: torch.Tensor, rows: str) -> None:
    _dispatch.check_matrix(op, "hidden", hidden, f"({rows}, d)")
    _dispatch.check_matrix(op, "items", items, "(V, d)")
    _dispatch.check_dim_size(op, "items", items, 1, hidden.shape[1], "d of hidden")
    if items.shape[0] == 0:
        raise ValueError(f"{op}: items has shape {tuple(items.shape)}; expected V >= 1 rows")
    _dispatch.check_same_dtype(op, ("hidden", hidden), ("items", items))


def item_softmax_ce(
    hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, *,
    ignore_index: int = -100, reduction: str = "mean", backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of the softmax over all V items, without a bias.

    Args:
        hidden: (N, d) hidden states, N >= 0, d >= 1.
        items: (V, d) item embeddings, V >= 1; same float dtype and device as ``hidden``.
        targets: (N,) int64 or int32, each in [0, V) or equal to ``ignore_index``.
        ignore_index: target value of rows that take no part in the loss.
        reduction: "mean" (over non-ignored rows), "sum" or "none".
        backend: "auto", "reference" or "triton" (see ``_dispatch``).

    Returns:
        Row loss logsumexp_i(hidden[n] . items[i]) - hidden[n] . items[targets[n]], reduced
        exactly like F.cross_entropy: "mean" gives NaN when every row is ignored (or N = 0),
        "sum" gives 0, "none" gives (N,) with 0 at ignored rows. Differentiable in hidden and
        items. float64 inputs give float64; every other dtype is computed in and returned as
        float32. The Triton backend never forms the (N, V) logits: beyond the inputs and the
        gradients it keeps O(N) floats (and O(programs x block x d) of partial sums).

    Under torch.compile the targets' range is not checked (reading values would break the
    graph); out-of-range targets then give a wrong loss, not a memory fault.
    """
    op = "item_softmax_ce"
    _check_hidden_items(op, hidden, items, "N")
    targets = _dispatch.check_index(op, "targets", targets, hidden.shape[0])
    _dispatch.check_same_device(op, ("hidden", hidden), ("items", items), ("targets", targets))
    ignore_index = _dispatch.check_int(op, "ignore_index", ignore_index, -(2**63))
    reduction = _dispatch.check_choice(op, "reduction", reduction, REDUCTIONS)
    if not torch.compiler.is_compiling():
        # reading values syncs the device and breaks a torch.compile graph: compiled code skips
        # it (the kernels mask every load through a target)
        _dispatch.check_index_range(op, "targets", targets, items.shape[0],
                                    allowed_extra=ignore_index)
    if _dispatch.resolve_backend(op, backend, hidden, items, targets) == "triton":
        return _dispatch.triton_impl(op)(hidden, items, targets, ignore_index, reduction)
    return reference.item_softmax_ce(hidden, items, targets, ignore_index, reduction)


def item_rank(
    hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
    exclude_indptr: torch.Tensor, exclude_indices: torch.Tensor, *, backend: str = "auto",
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
        backend: "auto", "reference" or "triton" (see ``_dispatch``).

    Returns:
        (U,) int64, no gradient: the number of items i != targets[u], not excluded for u, with
        hidden[u] . items[i] >= the target's score. Ties count against the target (pessimistic).
        NaN counts against the target as well: items with a NaN score are counted, and a user
        whose target score is NaN gets the worst rank, the count of all non-target non-excluded
        items. hit@k = rank < k. Scores are computed in float32 (float64 for float64 inputs).
        The reference scores users in chunks of at most 2**24 (user, item) scores (one user at a
        time when V is larger), so the (U, V) score matrix never exists at once; the Triton
        backend writes nothing per (user, item) at all, and its fp32 scores are exact fma chains,
        so an item whose embedding equals the target's always ties with it.

    Under torch.compile the targets and the CSR are not checked (reading values would break the
    graph): pass valid ones.
    """
    op = "item_rank"
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
    if _dispatch.resolve_backend(
        op, backend, hidden, items, targets, exclude_indptr, exclude_indices
    ) == "triton":
        return _dispatch.triton_impl(op)(hidden, items, targets, exclude_indptr, exclude_indices)
    return reference.item_rank(hidden, items, targets, exclude_indptr, exclude_indices)


def item_topk(
    hidden: torch.Tensor, items: torch.Tensor, k: int,
    exclude_indptr: Optional[torch.Tensor] = None, exclude_indices: Optional[torch.Tensor] = None,
    *, backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k best non-excluded items of each user.

    Args:
        hidden: (U, d) user states, U >= 0, d >= 1.
        items: (V, d) item embeddings, V >= 1; same float dtype and device as ``hidden``.
        k: int, 1 <= k <= V.
        exclude_indptr, exclude_indices: optional CSR exclusion lists as in ``item_rank``; give
            both or neither.
        backend: "auto", "reference" or "triton" (see ``_dispatch``).

    Returns:
        (scores (U, k), indices (U, k) int64), best first, no gradient. Scores are float32
        (float64 for float64 inputs). Excluded items are never returned. When fewer than k items
        remain for a user, the missing last slots hold score -inf and index -1. NaN scores rank
        above every number (as in torch.topk); order among equal scores is unspecified; items
        whose score is -inf (only possible with infinite inputs) may be reported as missing
        slots. Chunked over users like ``item_rank``.
    """
    op = "item_topk"
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
    if _dispatch.resolve_backend(
        op, backend, hidden, items, exclude_indptr, exclude_indices
    ) == "triton":
        return _dispatch.triton_impl(op)(hidden, items, k, exclude_indptr, exclude_indices)
    return reference.item_topk(hidden, items, k, exclude_indptr, exclude_indices)
