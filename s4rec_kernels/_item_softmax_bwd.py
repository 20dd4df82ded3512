"""The backward of item_softmax_ce: the grad_hidden and grad_items kernels and their launcher.

Gradient, with g_n the upstream gradient of row n's loss and p_ni = exp(s_ni - lse_n):
    dL/ds_ni = g_n (p_ni - [i == t_n])
    grad_hidden[n] = g_n * sum_i (p_ni - [i == t_n]) e_i        (row-block kernel, g_n applied last)
    grad_items[i]  = sum_n g_n (p_ni - [i == t_n]) h_n           (item-block kernel)
The one-hot term is subtracted inside the tile, before the product, so no scatter is needed.

Why two kernels that recompute the logits, without atomics: see item_softmax.py's docstring.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from s4rec_kernels._item_common import (CE_DE_TILES, CE_DH_TILES, _row_order, _splits,
                                        _target_programs, _tile_setting, fp32_dot_precision)
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
    from s4rec_kernels._item_common import _LOG2E, _load_rows, _row_index

    @triton.jit
    def _load_stats(stats_ptr, rows, mask_n, n_rows):
        """(m, log2 sum) of rows ``rows``; padding rows get (0, 0)."""
        m = tl.load(stats_ptr + rows, mask=mask_n, other=0.0)
        log2_sum = tl.load(stats_ptr + n_rows + rows, mask=mask_n, other=0.0)
        return m, log2_sum

    @triton.jit
    def _ce_bwd_dh_kernel(
        # pointers
        h_ptr, e_ptr, t_ptr, rows_ptr, count_ptr, stats_ptr, g_ptr, dh_ptr,
        # shapes
        n_rows, n_items, dim, tiles_per_split,
        # strides
        stride_hn, stride_hd, stride_ev, stride_ed, stride_g,
        stride_dsplit, stride_dn, stride_dd,
        # meta
        OUT_COMPACT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
        PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    ):
        """grad_hidden of one row block over one item range:
        g_n * sum_i (p_ni - [i == t_n]) e_i, accumulated in registers (fp32).

        Grid (row blocks x ranges,), row block fastest; blocks past the count of rows that take
        part do nothing. Writes dh[range, position] when OUT_COMPACT (fp32 partials, position
        in the row order), else dh[row] directly.
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
        target = tl.load(t_ptr + rows, mask=mask_n, other=-1)
        m, log2_sum = _load_stats(stats_ptr, rows, mask_n, n_rows)
        g = tl.load(g_ptr + rows * stride_g, mask=mask_n, other=0.0).to(tl.float32)

        v_begin = split * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, n_items)
        v_end = tl.where(row_block * BLOCK_N < n_active, v_end, v_begin)  # no row: no work
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
        h_ptr, e_ptr, t_ptr, rows_ptr, count_ptr, stats_ptr, g_ptr, de_ptr,
        # shapes
        n_rows, n_items, dim, blocks_per_split,
        # strides
        stride_hn, stride_hd, stride_ev, stride_ed, stride_g,
        stride_dsplit, stride_dv, stride_dd,
        # meta
        TRANS_LOGITS: tl.constexpr, BLOCK_N: tl.constexpr,
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
        n_end = tl.minimum(n_begin + blocks_per_split * BLOCK_N, tl.load(count_ptr))
        acc = tl.zeros((BLOCK_V, BLOCK_D), tl.float32)
        for n0 in range(n_begin, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_end
            rows = _row_index(rows_ptr, offs_n, mask_n)
            h = _load_rows(h_ptr, rows, mask_n, offs_d, mask_d, stride_hn, stride_hd)
            target = tl.load(t_ptr + rows, mask=mask_n, other=-1)
            m, log2_sum = _load_stats(stats_ptr, rows, mask_n, n_rows)
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


# ----------------------------------------------------------------------------------------------
# Host launcher
# ----------------------------------------------------------------------------------------------


def _store_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Gradients are stored by the kernels in their own dtype on CUDA; the interpreter rounds
    to bfloat16 by truncation, so there it stores fp32 and torch rounds."""
    if device.type != "cuda" and dtype == torch.bfloat16:
        return torch.float32
    return dtype


def ce_dh_launch(n_rows: int, n_items: int, dim: int, dtype: torch.dtype, arch: Optional[int],
                 programs: int, fp32: str) -> Tuple[Launch, int, int]:
    """(grad_hidden launch, ranges, item tiles per range); arguments as ce_forward_launches'.
    Several ranges write fp32 partials (OUT_COMPACT), one range grad_hidden itself."""
    block_d, (block_n, block_v, warps, stages), dots = _tile_setting(CE_DH_TILES, dim, dtype,
                                                                     arch, fp32)
    n_row_blocks = triton.cdiv(n_rows, block_n)
    n_splits, tiles_per_split = _splits(n_row_blocks, triton.cdiv(n_items, block_v), programs)
    launch = Launch(_ce_bwd_dh_kernel, (n_row_blocks * n_splits,),
                    dict(OUT_COMPACT=n_splits > 1, BLOCK_N=block_n, BLOCK_V=block_v,
                         BLOCK_D=block_d, **dots), warps, stages)
    return launch, n_splits, tiles_per_split


def ce_de_launch(n_rows: int, n_items: int, dim: int, dtype: torch.dtype, arch: Optional[int],
                 programs: int, fp32: str) -> Tuple[Launch, int, int]:
    """(grad_items launch, ranges, row blocks per range); arguments as ce_forward_launches'.
    Several ranges write fp32 partials, one range grad_items itself."""
    block_d, (block_n, block_v, warps, stages), dots = _tile_setting(CE_DE_TILES, dim, dtype,
                                                                     arch, fp32)
    n_item_blocks = triton.cdiv(n_items, block_v)
    n_splits, blocks_per_split = _splits(n_item_blocks, triton.cdiv(n_rows, block_n), programs)
    launch = Launch(_ce_bwd_de_kernel, (n_item_blocks * n_splits,),
                    dict(TRANS_LOGITS=arch is not None and dots["PRECISION"] == "ieee",
                         BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, **dots),
                    warps, stages)
    return launch, n_splits, blocks_per_split


def ce_backward(grad_rows: torch.Tensor, hidden: torch.Tensor, items: torch.Tensor,
                targets: torch.Tensor, stats: torch.Tensor, ignore_index: int,
                need_hidden: bool, need_items: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_items) in the inputs' dtypes; an empty (0, d) tensor for a gradient
    that is not needed. Never waits for the device."""
    n_rows, dim = hidden.shape
    n_items = items.shape[0]
    device = hidden.device
    setting = (n_rows, n_items, dim, hidden.dtype, device_arch(device), _target_programs(device),
               fp32_dot_precision())
    grad_rows = grad_rows.to(torch.float32)
    strides = (hidden.stride(0), hidden.stride(1), items.stride(0), items.stride(1),
               grad_rows.stride(0))
    dh = hidden.new_empty(0, dim)
    de = items.new_empty(0, dim)
    if n_rows == 0:
        return (hidden.new_zeros(0, dim) if need_hidden else dh,
                torch.zeros_like(items, memory_format=torch.contiguous_format)
                if need_items else de)
    rows, count = _row_order(targets, ignore_index)

    if need_hidden:
        launch, n_splits, tiles_per_split = ce_dh_launch(*setting)
        if n_splits > 1:  # fp32 partials per position of the row order, summed in order
            out = torch.zeros(n_splits, n_rows, dim, dtype=torch.float32, device=device)
        else:  # ignored rows are never written: zeros
            out = torch.zeros(n_rows, dim, dtype=_store_dtype(hidden.dtype, device),
                              device=device)
        with on_device(device):
            launch(hidden, items, targets, rows, count, stats, grad_rows, out,
                   n_rows, n_items, dim, tiles_per_split, *strides,
                   out.stride(0) if n_splits > 1 else 0, out.stride(-2), out.stride(-1))
        if n_splits > 1:
            # ranges in a fixed order; rows is a permutation, so every row is written once
            dh = torch.empty(n_rows, dim, dtype=torch.float32, device=device)
            dh[rows] = out.sum(0)
        else:
            dh = out
        dh = dh.to(hidden.dtype)

    if need_items:
        store = _store_dtype(items.dtype, device)
        launch, n_splits, blocks_per_split = ce_de_launch(*setting)
        out = (torch.empty(n_splits, n_items, dim, dtype=torch.float32, device=device)
               if n_splits > 1 else torch.empty(n_items, dim, dtype=store, device=device))
        with on_device(device):
            launch(hidden, items, targets, rows, count, stats, grad_rows, out,
                   n_rows, n_items, dim, blocks_per_split, *strides,
                   out.stride(0) if n_splits > 1 else 0, out.stride(-2), out.stride(-1))
        de = (out.sum(0) if n_splits > 1 else out).to(items.dtype)
    return dh, de
