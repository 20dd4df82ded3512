"""info_nce_proto's backward: the kernels, their launcher, and the row helpers both passes share.

Used by info_nce.py (the forward, the launch settings, the ops). The gradient formula and the
notation are written once, above the kernels below.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from s4rec_kernels._launch import on_device

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: without it every call takes the reference path
    triton = None

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
#
# Notation. n_rows = 2B anchors q_i = keys[i]; n_keys = 2B + K keys k_j = keys[j]; s_ij = q_i.k_j
# / tau, t_ij = s_ij log2(e). Anchor i keeps every key except itself (j = i) and its own
# prototype (j = 2B + assign[i mod B]); its positive is p_i = (i + B) mod 2B, always kept; the
# other kept keys are its negatives. lse2_i is the forward's log2-sum-exp2 of anchor i's kept t.
#
# Gradient, with g the upstream gradient, P_ij = exp2(t_ij - lse2_i) on kept keys (0 elsewhere)
# and c = g / (2B tau):
#   dloss/ds_ij = g/(2B) (P_ij - [j == p_i])
#   dq_i = c (sum_j P_ij k_j - k_{p_i})
#   dk_j = c (sum_i P_ij q_i - [j < 2B] q_{p_j})   (for j < 2B the anchor whose positive is j is
#                                                   p_j, since p_{p_j} = j)
#   dz = dq + dk[:2B], dprotos = dk[2B:].
# When the positive dominates (P_{i p_i} near 1, the trained regime, more so at small tau) the
# two terms of dq_i nearly cancel. Since sum_j P_ij = 1, with the negatives' mass
# n_i = sum_{j kept, j != p_i} P_ij = 1 - P_{i p_i}, summed directly rather than as 1 - P:
#   dq_i = c (sum_{j != p_i} P_ij k_j - n_i k_{p_i})
#   dk_j = c (sum_{i: p_i != j} P_ij q_i - [j < 2B] n_{p_j} q_{p_j})
# Both terms are then small together and nothing cancels. For a view j < 2B, k_{p_j} = q_{p_j} =
# keys[p_j].
#
# Three kernels, no atomics, every sum in a fixed order (bitwise repeatable):
#   dQ      grid (anchor blocks, key ranges): per anchor, sum_{j != p_i} P_ij k_j and n_i over
#           the keys of one range, written as partials (key ranges, 2B, d) and (key ranges, 2B)
#   dK      grid (key blocks, anchor ranges): per key, sum_{i: p_i != j} P_ij q_i over the
#           anchors of one range, written as partials (anchor ranges, 2B + K, d)
#   finish  grid (key blocks,): sums the partials over the ranges in order and writes
#           dkeys = [dz1; dz2; dprotos] in the inputs' dtype.
# The ranges (FlashAttention-2's split of the two products, each side also split over the other
# when its blocks alone are too few to fill the device) come from info_nce.info_nce_launches.
#
# Every load is cast to the compute dtype (float32, or float64 for float64 inputs) before use;
# products and sums are accumulated in it.

if triton is not None:

    @triton.jit
    def _row_ptrs(base_ptr, rows, offs_d, stride_n, stride_d):
        """Pointers to the (len(rows), BLOCK_D) tile of rows ``rows`` (int64 row offsets)."""
        return base_ptr + rows.to(tl.int64)[:, None] * stride_n + offs_d[None, :] * stride_d

    @triton.jit
    def _anchor_rows(offs_m, row_ok, assign_ptr, n_views):
        """(positive row p_i, own prototype's key row) of anchors ``offs_m``."""
        pos_row = tl.where(offs_m < n_views, offs_m + n_views, offs_m - n_views)
        own_key = 2 * n_views + tl.load(assign_ptr + offs_m % n_views, mask=row_ok, other=0)
        return pos_row, own_key

    @triton.jit
    def _partial_ptrs(base_ptr, split, n, rows, offs_d, dim):
        """Pointers into a contiguous (splits, n, dim) partial: range ``split``, rows ``rows``
        (split x n stays small: the partials are bounded by programs x block x d)."""
        row = rows.to(tl.int64) + split * n
        return base_ptr + row[:, None] * dim + offs_d[None, :]

    @triton.jit
    def _info_nce_bwd_dq_kernel(
        # pointers
        keys_ptr,  # (n_keys, d) [z1; z2; protos]
        assign_ptr,  # (B,) int64
        consts_ptr,  # (2,) compute dtype: log2(e) / tau, c = g / (2B tau)
        lse2_ptr,  # (n_rows,) compute dtype, from the forward
        part_dq_ptr,  # (key ranges, n_rows, d) out, compute dtype: sum_{j != p_i} P_ij k_j
        part_mass_ptr,  # (key ranges, n_rows) out, compute dtype: n_i over the range
        # shapes
        n_views, n_keys, dim, keys_per_split,
        # strides
        stride_kn, stride_kd,
        # meta
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        QK_PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    ):
        compute = lse2_ptr.dtype.element_ty
        n_rows = 2 * n_views
        split = tl.program_id(1)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < n_rows
        d_ok = offs_d < dim
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(_row_ptrs(keys_ptr, offs_m, offs_d, stride_kn, stride_kd),
                    mask=q_mask, other=0.0).to(compute)  # (BLOCK_M, BLOCK_D)
        pos_row, own_key = _anchor_rows(offs_m, row_ok, assign_ptr, n_views)
        lse2 = tl.load(lse2_ptr + offs_m, mask=row_ok, other=0.0)
        scale = tl.load(consts_ptr)

        acc = tl.zeros([BLOCK_M, BLOCK_D], compute)  # sum_{j != p_i} P_ij k_j over the range
        neg_mass = tl.zeros([BLOCK_M], compute)  # n_i over the range
        key_begin = split * keys_per_split
        key_end = tl.minimum(key_begin + keys_per_split, n_keys)
        for start_n in range(key_begin, key_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < key_end
            k = tl.load(_row_ptrs(keys_ptr, offs_n, offs_d, stride_kn, stride_kd),
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(compute)
            # k: (BLOCK_N, BLOCK_D)
            s = tl.dot(q, tl.trans(k), input_precision=QK_PRECISION)  # (BLOCK_M, BLOCK_N)
            negative = (row_ok[:, None] & col_ok[None, :] & (offs_n[None, :] != offs_m[:, None])
                        & (offs_n[None, :] != own_key[:, None])
                        & (offs_n[None, :] != pos_row[:, None]))
            p = tl.exp2(tl.where(negative, s * scale, float("-inf")) - lse2[:, None])
            neg_mass += tl.sum(p, axis=1)
            acc += tl.dot(p, k, input_precision=GRAD_PRECISION)

        tl.store(_partial_ptrs(part_dq_ptr, split, n_rows, offs_m, offs_d, dim), acc,
                 mask=q_mask)
        tl.store(part_mass_ptr + split * n_rows + offs_m, neg_mass, mask=row_ok)

    @triton.jit
    def _info_nce_bwd_dk_kernel(
        # pointers
        keys_ptr,  # (n_keys, d) [z1; z2; protos]
        assign_ptr,  # (B,) int64
        consts_ptr,  # (2,) compute dtype: log2(e) / tau, c = g / (2B tau)
        lse2_ptr,  # (n_rows,) compute dtype, from the forward
        part_dk_ptr,  # (anchor ranges, n_keys, d) out, compute dtype: sum_{i: p_i != j} P_ij q_i
        # shapes
        n_views, n_keys, dim, rows_per_split,
        # strides
        stride_kn, stride_kd,
        # meta
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        QK_PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    ):
        compute = lse2_ptr.dtype.element_ty
        n_rows = 2 * n_views
        split = tl.program_id(1)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < n_keys
        d_ok = offs_d < dim
        k_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(_row_ptrs(keys_ptr, offs_n, offs_d, stride_kn, stride_kd),
                    mask=k_mask, other=0.0).to(compute)  # (BLOCK_N, BLOCK_D)
        scale = tl.load(consts_ptr)

        acc = tl.zeros([BLOCK_N, BLOCK_D], compute)  # sum_{i: p_i != j} P_ij q_i over the range
        row_begin = split * rows_per_split
        row_end = tl.minimum(row_begin + rows_per_split, n_rows)
        for start_m in range(row_begin, row_end, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < row_end
            q = tl.load(_row_ptrs(keys_ptr, offs_m, offs_d, stride_kn, stride_kd),
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(compute)
            # q: (BLOCK_M, BLOCK_D)
            pos_row, own_key = _anchor_rows(offs_m, row_ok, assign_ptr, n_views)
            lse2 = tl.load(lse2_ptr + offs_m, mask=row_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=QK_PRECISION)  # (BLOCK_N, BLOCK_M) k.q
            negative = (col_ok[:, None] & row_ok[None, :] & (offs_n[:, None] != offs_m[None, :])
                        & (offs_n[:, None] != own_key[None, :])
                        & (offs_n[:, None] != pos_row[None, :]))
            p_t = tl.exp2(tl.where(negative, s_t * scale, float("-inf")) - lse2[None, :])
            acc += tl.dot(p_t, q, input_precision=GRAD_PRECISION)

        tl.store(_partial_ptrs(part_dk_ptr, split, n_keys, offs_n, offs_d, dim), acc,
                 mask=k_mask)

    @triton.jit
    def _info_nce_bwd_finish_kernel(
        # pointers
        keys_ptr,  # (n_keys, d) [z1; z2; protos]
        consts_ptr,  # (2,) compute dtype: log2(e) / tau, c = g / (2B tau)
        part_dq_ptr,  # (key ranges, n_rows, d) compute dtype, from the dQ kernel
        part_mass_ptr,  # (key ranges, n_rows) compute dtype, from the dQ kernel
        part_dk_ptr,  # (anchor ranges, n_keys, d) compute dtype, from the dK kernel
        dkeys_ptr,  # (n_keys, d) out, dtype of the inputs: [dz1; dz2; dprotos]
        # shapes
        n_views, n_keys, dim, key_splits, row_splits,
        # strides
        stride_kn, stride_kd, stride_dkn, stride_dkd,
        # meta
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        compute = part_dk_ptr.dtype.element_ty
        n_rows = 2 * n_views
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < n_keys
        d_ok = offs_d < dim
        k_mask = col_ok[:, None] & d_ok[None, :]
        coef = tl.load(consts_ptr + 1)

        acc_k = tl.zeros([BLOCK_N, BLOCK_D], compute)  # key side, summed over anchor ranges
        for split in range(0, row_splits):
            acc_k += tl.load(_partial_ptrs(part_dk_ptr, split, n_keys, offs_n, offs_d, dim),
                             mask=k_mask, other=0.0)
        # keys that are views also carry their anchor side; both terms subtract a multiple of
        # keys[p_j] (the positive's row)
        is_view = col_ok & (offs_n < n_rows)
        view_mask = is_view[:, None] & d_ok[None, :]
        pos_row = tl.where(offs_n < n_views, offs_n + n_views, offs_n - n_views)
        acc_q = tl.zeros([BLOCK_N, BLOCK_D], compute)
        own_mass = tl.zeros([BLOCK_N], compute)  # n_j
        pos_mass = tl.zeros([BLOCK_N], compute)  # n_{p_j}
        for split in range(0, key_splits):
            acc_q += tl.load(_partial_ptrs(part_dq_ptr, split, n_rows, offs_n, offs_d, dim),
                             mask=view_mask, other=0.0)
            base = part_mass_ptr + split * n_rows
            own_mass += tl.load(base + offs_n, mask=is_view, other=0.0)
            pos_mass += tl.load(base + pos_row, mask=is_view, other=0.0)
        k_pos = tl.load(_row_ptrs(keys_ptr, pos_row, offs_d, stride_kn, stride_kd),
                        mask=view_mask, other=0.0).to(compute)
        dk = coef * (acc_k - pos_mass[:, None] * k_pos) + coef * (acc_q - own_mass[:, None] * k_pos)
        tl.store(_row_ptrs(dkeys_ptr, offs_n, offs_d, stride_dkn, stride_dkd),
                 dk.to(dkeys_ptr.dtype.element_ty), mask=k_mask)


# ----------------------------------------------------------------------------------------------
# Host launcher
# ----------------------------------------------------------------------------------------------


def info_nce_bwd(grad: torch.Tensor, keys: torch.Tensor, assign: torch.Tensor,
                 lse2: torch.Tensor, n_views: int, tau: float, plan: Sequence) -> torch.Tensor:
    """Launch the three backward kernels of ``plan`` (info_nce.info_nce_launches); returns
    d loss / d keys (2B + K, d) in keys' dtype, times the upstream gradient ``grad`` (a 0-dim
    tensor, read on the device: no sync)."""
    n_keys, dim = keys.shape
    n_rows = 2 * n_views
    compute = lse2.dtype
    device = keys.device
    consts = torch.cat([
        torch.full((1,), math.log2(math.e) / tau, dtype=compute, device=device),
        (grad.to(compute) / (n_rows * tau)).reshape(1),
    ])
    part_dq = torch.empty(plan.key_splits, n_rows, dim, dtype=compute, device=device)
    part_mass = torch.empty(plan.key_splits, n_rows, dtype=compute, device=device)
    part_dk = torch.empty(plan.row_splits, n_keys, dim, dtype=compute, device=device)
    dkeys = torch.empty_like(keys)
    with on_device(device):
        plan.dq(keys, assign, consts, lse2, part_dq, part_mass, n_views, n_keys, dim,
                plan.keys_per_split, keys.stride(0), keys.stride(1))
        plan.dk(keys, assign, consts, lse2, part_dk, n_views, n_keys, dim, plan.rows_per_split,
                keys.stride(0), keys.stride(1))
        # reads both kernels' partials: runs after them, on the same stream
        plan.finish(keys, consts, part_dq, part_mass, part_dk, dkeys, n_views, n_keys, dim,
                    plan.key_splits, plan.row_splits, keys.stride(0), keys.stride(1),
                    dkeys.stride(0), dkeys.stride(1))
    return dkeys
