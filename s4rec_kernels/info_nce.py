"""InfoNCE over two views with prototype negatives (SPEC eq. 10).

Layout, top to bottom: Triton forward/backward kernels, host launchers, the ``torch.library`` ops
that wrap them, the autograd.Function (registered with ``_dispatch.register_triton``), then the
public function.

The kernels work on one key matrix ``keys = [z1; z2; protos]`` (2B + K, d). Its first 2B rows are
also the anchors (queries). Each program owns a block of rows and streams blocks of the other side
through an online log-sum-exp, so nothing of size (2B, 2B + K) is ever stored: memory is
O((B + K) d). The self logit and the assigned prototype's logit are masked by comparing indices
inside the tile. The forward saves, per anchor, only its log2-sum-exp2 and its loss (logsumexp
minus positive logit, computed without subtracting the two). The backward recomputes the logits
tile by tile in two kernels, without atomics (FlashAttention-2's split): one program per anchor
block for the anchor side of dz, then one per key block for the key side of dz and dprotos.

Why one concatenated matrix rather than three base pointers: the copy is O((2B + K) d), small next
to the O(B (B + K) d) work, it makes strided inputs contiguous, and a tile that straddles the
z1/z2/protos boundaries needs no branching. The gradient comes back as one (2B + K, d) buffer whose
three slices are the three gradients (views, no copy).

Precision: products and sums in float32 (float64 for float64 inputs). On the GPU, float32 inputs
use 3xTF32 tensor-core products (float32-level accuracy), float16/bfloat16 inputs one TF32 pass for
the logits (exact: their values fit in TF32) and 3xTF32 for the softmax-weighted sums.

The two kernel launches are ``torch.library`` custom ops with fake implementations, called from
the autograd.Function, so ``torch.compile(fullgraph=True)`` traces a call, forward and backward,
into one graph that treats the kernels as opaque ops.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

from s4rec_kernels import _dispatch, distributed, reference
from s4rec_kernels._launch import Launch, on_device

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: without it every call takes the reference path
    triton = None

OP = "info_nce_proto"

# Largest anchor block (rows of [z1; z2]) and key block (rows of [z1; z2; protos]) per tile.
# Module level so tests can shrink them (tl.dot needs at least 16).
MAX_BLOCK_M = 64
MAX_BLOCK_N = 32
NUM_STAGES = 2  # software-pipelining depth of the key (or anchor) tile loads

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
#
# Notation. n_rows = 2B anchors q_i = keys[i]; n_keys = 2B + K keys k_j = keys[j]; s_ij = q_i.k_j
# / tau. Anchor i keeps every key except itself (j = i) and its own prototype (j = 2B +
# assign[i mod B]); its positive is p_i = (i + B) mod 2B, always kept; the other kept keys are
# its negatives. In log2 units t_ij = s_ij * log2(e), so exp(s) = exp2(t): the kernels use exp2
# with log2(e) / tau folded into one scale.
#
# Forward, per anchor: the positive t_{i p_i} from the positive's row itself, then an online
# log2-sum-exp2 over the negatives only, started at the positive (running max m = t_{i p_i}),
#   x_i = log2 sum_{negatives j} exp2(t_ij - t_{i p_i})
#   loss2_i = log2(1 + exp2(x_i)) = max(x_i, 0) + log2(1 + exp2(-|x_i|))   (the row loss / ln 2)
#   lse2_i = t_{i p_i} + loss2_i                                            (for the backward)
# so a small row loss is not the difference of two large logsumexps. loss = ln 2 mean_i loss2_i.
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
#   dq_i = c (sum_{j != p_i} P_ij k_j - n_i k_{p_i})        dQ kernel: one program per anchor
#   dk_j = c (sum_{i: p_i != j} P_ij q_i - [j < 2B] n_{p_j} q_{p_j})     block; dK kernel: one
#                                                                         program per key block
# Both terms are then small together and nothing cancels. The dQ kernel writes dq and n; the
# dK kernel, launched after it, reads them and writes dz and dprotos. No atomics.
#
# Every load is cast to the compute dtype (float32, or float64 for float64 inputs) before use;
# products and sums are accumulated in it.

if triton is not None:

    @triton.jit
    def _row_ptrs(base_ptr, rows, offs_d, stride_n, stride_d):
        """Pointers to the (len(rows), BLOCK_D) tile of rows ``rows`` (int64 row offsets)."""
        return base_ptr + rows.to(tl.int64)[:, None] * stride_n + offs_d[None, :] * stride_d

    @triton.jit
    def _info_nce_fwd_kernel(
        # pointers
        keys_ptr,  # (n_keys, d) [z1; z2; protos]
        assign_ptr,  # (B,) int64, prototype of each user
        consts_ptr,  # (1,) compute dtype: log2(e) / tau
        lse2_ptr,  # (n_rows,) out, compute dtype: log2-sum-exp2 of each anchor's kept t
        loss2_ptr,  # (n_rows,) out, compute dtype: each anchor's loss / ln 2
        # shapes
        n_views,  # B
        n_keys,  # 2B + K
        dim,  # d
        # strides
        stride_kn, stride_kd,
        # meta
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        QK_PRECISION: tl.constexpr,
    ):
        compute = lse2_ptr.dtype.element_ty
        n_rows = 2 * n_views
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < n_rows
        d_ok = offs_d < dim
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(_row_ptrs(keys_ptr, offs_m, offs_d, stride_kn, stride_kd),
                    mask=q_mask, other=0.0).to(compute)  # (BLOCK_M, BLOCK_D)
        pos_row = tl.where(offs_m < n_views, offs_m + n_views, offs_m - n_views)
        own_key = n_rows + tl.load(assign_ptr + offs_m % n_views, mask=row_ok, other=0)
        scale = tl.load(consts_ptr)
        q_pos = tl.load(_row_ptrs(keys_ptr, pos_row, offs_d, stride_kn, stride_kd),
                        mask=q_mask, other=0.0).to(compute)
        t_pos = tl.sum(q * q_pos, axis=1) * scale  # (BLOCK_M,)

        m_i = t_pos  # running max of t, started at the positive's
        l_i = tl.zeros([BLOCK_M], compute)  # running sum of exp2(t - m_i) over the negatives
        for start_n in range(0, n_keys, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < n_keys
            k = tl.load(_row_ptrs(keys_ptr, offs_n, offs_d, stride_kn, stride_kd),
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(compute)
            # k: (BLOCK_N, BLOCK_D)
            s = tl.dot(q, tl.trans(k), input_precision=QK_PRECISION)  # (BLOCK_M, BLOCK_N) q.k
            negative = (col_ok[None, :] & (offs_n[None, :] != offs_m[:, None])
                        & (offs_n[None, :] != own_key[:, None])
                        & (offs_n[None, :] != pos_row[:, None]))
            t = tl.where(negative, s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(t, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(t - m_new[:, None]), axis=1)
            m_i = m_new

        # x = -inf when no negative is left (B = 1 and K = 1, or all of them underflow)
        has_negative = l_i > 0.0
        x = tl.where(has_negative, (m_i - t_pos) + tl.log2(tl.where(has_negative, l_i, 1.0)),
                     float("-inf"))
        y = tl.exp2(-tl.abs(x))  # in [0, 1]
        u = 1.0 + y
        # log2(1 + y) without losing y when it is tiny: log2(u) * y / (u - 1) is exact up to the
        # rounding of log2 (Goldberg); u == 1 leaves log2(1 + y) = y / ln 2
        rounded_up = u != 1.0
        log2_1p = tl.where(rounded_up, tl.log2(u) * (y / tl.where(rounded_up, u - 1.0, 1.0)),
                           y * 1.4426950408889634)
        loss2 = tl.maximum(x, 0.0) + log2_1p
        # an assign out of [0, K) poisons the anchor's loss (the range is not checked on the host)
        assign_ok = (own_key >= n_rows) & (own_key < n_keys)
        loss2 = tl.where(assign_ok, loss2, float("nan"))
        tl.store(lse2_ptr + offs_m, t_pos + loss2, mask=row_ok)
        tl.store(loss2_ptr + offs_m, loss2, mask=row_ok)

    @triton.jit
    def _info_nce_bwd_dq_kernel(
        # pointers
        keys_ptr,  # (n_keys, d) [z1; z2; protos]
        assign_ptr,  # (B,) int64
        consts_ptr,  # (2,) compute dtype: log2(e) / tau, c = g / (2B tau)
        lse2_ptr,  # (n_rows,) compute dtype, from the forward
        dq_ptr,  # (n_rows, d) out, compute dtype: gradient through the anchor side
        neg_mass_ptr,  # (n_rows,) out, compute dtype: n_i, the negatives' share of P
        # shapes
        n_views, n_keys, dim,
        # strides
        stride_kn, stride_kd, stride_dqn, stride_dqd,
        # meta
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        QK_PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    ):
        compute = lse2_ptr.dtype.element_ty
        n_rows = 2 * n_views
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < n_rows
        d_ok = offs_d < dim
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(_row_ptrs(keys_ptr, offs_m, offs_d, stride_kn, stride_kd),
                    mask=q_mask, other=0.0).to(compute)  # (BLOCK_M, BLOCK_D)
        pos_row = tl.where(offs_m < n_views, offs_m + n_views, offs_m - n_views)
        own_key = n_rows + tl.load(assign_ptr + offs_m % n_views, mask=row_ok, other=0)
        lse2 = tl.load(lse2_ptr + offs_m, mask=row_ok, other=0.0)
        scale = tl.load(consts_ptr)
        coef = tl.load(consts_ptr + 1)

        acc = tl.zeros([BLOCK_M, BLOCK_D], compute)  # sum_{j != p_i} P_ij k_j
        neg_mass = tl.zeros([BLOCK_M], compute)  # n_i = sum_{j != p_i} P_ij
        for start_n in range(0, n_keys, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < n_keys
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

        k_pos = tl.load(_row_ptrs(keys_ptr, pos_row, offs_d, stride_kn, stride_kd),
                        mask=q_mask, other=0.0).to(compute)
        dq = coef * (acc - neg_mass[:, None] * k_pos)
        tl.store(_row_ptrs(dq_ptr, offs_m, offs_d, stride_dqn, stride_dqd),
                 dq, mask=q_mask)
        tl.store(neg_mass_ptr + offs_m, neg_mass, mask=row_ok)

    @triton.jit
    def _info_nce_bwd_dk_kernel(
        # pointers
        keys_ptr,  # (n_keys, d) [z1; z2; protos]
        assign_ptr,  # (B,) int64
        consts_ptr,  # (2,) compute dtype: log2(e) / tau, c = g / (2B tau)
        lse2_ptr,  # (n_rows,) compute dtype, from the forward
        dq_ptr,  # (n_rows, d) compute dtype, from the dQ kernel
        neg_mass_ptr,  # (n_rows,) compute dtype, from the dQ kernel
        dkeys_ptr,  # (n_keys, d) out, dtype of the inputs: [dz1; dz2; dprotos]
        # shapes
        n_views, n_keys, dim,
        # strides
        stride_kn, stride_kd, stride_dqn, stride_dqd, stride_dkn, stride_dkd,
        # meta
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        QK_PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
    ):
        compute = lse2_ptr.dtype.element_ty
        n_rows = 2 * n_views
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < n_keys
        d_ok = offs_d < dim
        k_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(_row_ptrs(keys_ptr, offs_n, offs_d, stride_kn, stride_kd),
                    mask=k_mask, other=0.0).to(compute)  # (BLOCK_N, BLOCK_D)
        scale = tl.load(consts_ptr)
        coef = tl.load(consts_ptr + 1)

        acc = tl.zeros([BLOCK_N, BLOCK_D], compute)  # sum_{i: p_i != j} P_ij q_i
        for start_m in range(0, n_rows, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < n_rows
            q = tl.load(_row_ptrs(keys_ptr, offs_m, offs_d, stride_kn, stride_kd),
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(compute)
            # q: (BLOCK_M, BLOCK_D)
            pos_row = tl.where(offs_m < n_views, offs_m + n_views, offs_m - n_views)
            own_key = n_rows + tl.load(assign_ptr + offs_m % n_views, mask=row_ok, other=0)
            lse2 = tl.load(lse2_ptr + offs_m, mask=row_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=QK_PRECISION)  # (BLOCK_N, BLOCK_M) k.q
            negative = (col_ok[:, None] & row_ok[None, :] & (offs_n[:, None] != offs_m[None, :])
                        & (offs_n[:, None] != own_key[None, :])
                        & (offs_n[:, None] != pos_row[None, :]))
            p_t = tl.exp2(tl.where(negative, s_t * scale, float("-inf")) - lse2[None, :])
            acc += tl.dot(p_t, q, input_precision=GRAD_PRECISION)

        # keys that are views: the anchor p_j whose positive they are, and the anchor-side dq
        is_view = col_ok & (offs_n < n_rows)
        view_mask = is_view[:, None] & d_ok[None, :]
        pos_row = tl.where(offs_n < n_views, offs_n + n_views, offs_n - n_views)
        q_pos = tl.load(_row_ptrs(keys_ptr, pos_row, offs_d, stride_kn, stride_kd),
                        mask=view_mask, other=0.0).to(compute)
        pos_mass = tl.load(neg_mass_ptr + pos_row, mask=is_view, other=0.0)
        dq = tl.load(_row_ptrs(dq_ptr, offs_n, offs_d, stride_dqn, stride_dqd),
                     mask=view_mask, other=0.0)
        dk = coef * (acc - pos_mass[:, None] * q_pos) + dq
        tl.store(_row_ptrs(dkeys_ptr, offs_n, offs_d, stride_dkn, stride_dkd),
                 dk.to(dkeys_ptr.dtype.element_ty), mask=k_mask)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------


def _launch_config(dim: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of width ``dim`` in ``dtype``, shared by the three
    kernels. Compiled for sm_90 and sm_80 (benchmarks/compile_report.py), these do not spill at
    d <= 64 in float32, bfloat16 or float16 (64-row anchor blocks spill there in the backward);
    float32 (3xTF32) spills at d >= 128. Wider rows or float64 take smaller tiles. Not yet
    tuned on a GPU."""
    block_d = max(16, triton.next_power_of_2(dim))
    block_m, block_n = MAX_BLOCK_M, MAX_BLOCK_N
    if dtype == torch.float64 or block_d > 128 or block_d <= 64:
        block_m, block_n = min(block_m, 32), min(block_n, 32)
    if block_d > 256 or (dtype == torch.float64 and block_d > 128):  # A100's shared memory
        block_m, block_n = 16, 16
    num_warps = 4 if block_d <= 64 else 8
    return block_m, block_n, num_warps


def _precisions(dtype: torch.dtype) -> Tuple[str, str]:
    """tl.dot input precisions for the logits (q.k) and the gradient (P @ k) products.

    float16/bfloat16 values are exact in TF32, so their logits take one TF32 pass; float32 needs
    3xTF32 for float32 accuracy, and so does P, a float32 quantity, for every dtype; float64 is
    computed in float64.
    """
    if dtype == torch.float64:
        return "ieee", "ieee"
    if dtype == torch.float32:
        return "tf32x3", "tf32x3"
    return "tf32", "tf32x3"


def info_nce_launches(n_views: int, n_keys: int, dim: int, dtype: torch.dtype,
                      block_m: int, block_n: int, num_warps: int) -> Tuple[Launch, Launch, Launch]:
    """(forward, dQ, dK) launches for 2B = 2 ``n_views`` anchors and ``n_keys`` keys of width
    ``dim`` in ``dtype``, with the tiles of ``_launch_config``."""
    block_d = max(16, triton.next_power_of_2(dim))
    qk_precision, grad_precision = _precisions(dtype)
    tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, QK_PRECISION=qk_precision)
    grads = dict(tiles, GRAD_PRECISION=grad_precision)
    n_anchor_blocks = triton.cdiv(2 * n_views, block_m)
    return (Launch(_info_nce_fwd_kernel, (n_anchor_blocks,), tiles, num_warps, NUM_STAGES),
            Launch(_info_nce_bwd_dq_kernel, (n_anchor_blocks,), grads, num_warps, NUM_STAGES),
            Launch(_info_nce_bwd_dk_kernel, (triton.cdiv(n_keys, block_n),), grads, num_warps,
                   NUM_STAGES))


def info_nce_fwd(
    keys: torch.Tensor, assign: torch.Tensor, n_views: int, tau: float,
    block_m: int, block_n: int, num_warps: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on contiguous keys (2B + K, d) and assign (B,). Returns (lse2,
    loss2), each (2B,) in the compute dtype: per anchor, the log2-sum-exp2 of its kept logits
    (times log2(e)) and its loss divided by ln 2."""
    n_keys, dim = keys.shape
    n_rows = 2 * n_views
    compute = reference.compute_dtype(keys)
    lse2 = torch.empty(n_rows, dtype=compute, device=keys.device)
    loss2 = torch.empty(n_rows, dtype=compute, device=keys.device)
    consts = torch.full((1,), math.log2(math.e) / tau, dtype=compute, device=keys.device)
    fwd, _, _ = info_nce_launches(n_views, n_keys, dim, keys.dtype, block_m, block_n, num_warps)
    with on_device(keys.device):
        fwd(keys, assign, consts, lse2, loss2, n_views, n_keys, dim,
            keys.stride(0), keys.stride(1))
    return lse2, loss2


def info_nce_bwd(
    grad: torch.Tensor, keys: torch.Tensor, assign: torch.Tensor, lse2: torch.Tensor,
    n_views: int, tau: float, block_m: int, block_n: int, num_warps: int,
) -> torch.Tensor:
    """Launch the two backward kernels; returns d loss / d keys (2B + K, d) in keys' dtype,
    times the upstream gradient ``grad`` (a 0-dim tensor, read on the device: no sync)."""
    n_keys, dim = keys.shape
    n_rows = 2 * n_views
    compute = lse2.dtype
    consts = torch.cat([
        torch.full((1,), math.log2(math.e) / tau, dtype=compute, device=keys.device),
        (grad.to(compute) / (n_rows * tau)).reshape(1),
    ])
    dq = torch.empty(n_rows, dim, dtype=compute, device=keys.device)
    neg_mass = torch.empty(n_rows, dtype=compute, device=keys.device)
    dkeys = torch.empty_like(keys)
    _, dq_launch, dk_launch = info_nce_launches(n_views, n_keys, dim, keys.dtype,
                                                block_m, block_n, num_warps)
    with on_device(keys.device):
        dq_launch(keys, assign, consts, lse2, dq, neg_mass, n_views, n_keys, dim,
                  keys.stride(0), keys.stride(1), dq.stride(0), dq.stride(1))
        # reads dq and neg_mass: runs after the dQ kernel, on the same stream
        dk_launch(keys, assign, consts, lse2, dq, neg_mass, dkeys, n_views, n_keys, dim,
                  keys.stride(0), keys.stride(1), dq.stride(0), dq.stride(1),
                  dkeys.stride(0), dkeys.stride(1))
    return dkeys


# ----------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile, with fake implementations) and autograd.Function
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @torch.library.custom_op("s4rec_kernels::info_nce_proto_fwd", mutates_args=())
    def _fwd_op(
        keys: torch.Tensor, assign: torch.Tensor, n_views: int, tau: float,
        block_m: int, block_n: int, num_warps: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return info_nce_fwd(keys, assign, n_views, tau, block_m, block_n, num_warps)

    @_fwd_op.register_fake
    def _(keys, assign, n_views, tau, block_m, block_n, num_warps):
        compute = reference.compute_dtype(keys)
        return (keys.new_empty(2 * n_views, dtype=compute),
                keys.new_empty(2 * n_views, dtype=compute))

    @torch.library.custom_op("s4rec_kernels::info_nce_proto_bwd", mutates_args=())
    def _bwd_op(
        grad: torch.Tensor, keys: torch.Tensor, assign: torch.Tensor, lse2: torch.Tensor,
        n_views: int, tau: float, block_m: int, block_n: int, num_warps: int,
    ) -> torch.Tensor:
        return info_nce_bwd(grad, keys, assign, lse2, n_views, tau, block_m, block_n, num_warps)

    @_bwd_op.register_fake
    def _(grad, keys, assign, lse2, n_views, tau, block_m, block_n, num_warps):
        return torch.empty_like(keys)

    class InfoNCEProtoFunction(torch.autograd.Function):
        """Forward and backward through the kernels; launch settings travel on ctx."""

        @staticmethod
        def forward(ctx, z1, z2, protos, assign, tau):
            n_views = z1.shape[0]
            keys = torch.cat([z1, z2, protos], dim=0)  # (2B + K, d), contiguous
            assign = assign.contiguous()
            config = _launch_config(z1.shape[1], z1.dtype)
            lse2, loss2 = _fwd_op(keys, assign, n_views, tau, *config)  # (2B,), (2B,)
            ctx.save_for_backward(keys, assign, lse2)
            ctx.n_views, ctx.tau, ctx.config = n_views, tau, config
            return loss2.mean() * math.log(2.0)

        @staticmethod
        def backward(ctx, grad):
            keys, assign, lse2 = ctx.saved_tensors
            n = ctx.n_views
            dkeys = _bwd_op(grad, keys, assign, lse2, n, ctx.tau, *ctx.config)  # (2B + K, d)
            return dkeys[:n], dkeys[n:2 * n], dkeys[2 * n:], None, None

    def _info_nce_proto_triton(z1, z2, protos, assign, tau):
        return InfoNCEProtoFunction.apply(z1, z2, protos, assign, tau)

    _dispatch.register_triton(OP, _info_nce_proto_triton)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def info_nce_proto(
    z1: torch.Tensor, z2: torch.Tensor, protos: torch.Tensor, assign: torch.Tensor,
    tau: float, *, backend: str = "auto", group=None,
) -> torch.Tensor:
    """Symmetric InfoNCE loss of two views whose negatives include the other prototypes.

    Args:
        z1, z2: (B, d) the two views of each sequence, B >= 1, d >= 1.
        protos: (K, d) prototypes, K >= 1.
        assign: (B,) int64 or int32 in [0, K), the prototype each user is assigned to.
        tau: temperature, > 0.
        backend: "auto", "reference" or "triton" (see ``_dispatch``).
        group: a torch.distributed process group (see ``distributed``): z1, z2 and assign are
            this rank's rows; the result is this rank's anchors' share of the loss over every
            rank's rows (their sum over the ranks is that loss).
        z1, z2 and protos share one float dtype (float16/bfloat16/float32/float64) and device.

    Returns:
        Scalar loss. With Z = cat(z1, z2) (2B, d), anchor Z[i] has positive Z[(i + B) mod 2B];
        its negatives are the other 2B - 2 rows of Z (itself excluded) and every prototype except
        protos[assign[i mod B]]; logits are dot products / tau, vectors used as given (no
        normalisation). loss = mean over the 2B anchors of logsumexp(all its logits) - positive
        logit. K = 1 means no prototype negatives. Differentiable in z1, z2 and protos.
        float64 inputs give float64; every other dtype is computed in and returned as float32.
        The Triton backend keeps memory O((B + K) d): it never forms the (2B, 2B + K) logits.
        It does not check assign's values on the host (that would wait for the device): an
        anchor whose assign is out of range gets a NaN loss, and ``_dispatch.deferred_errors()``
        names it; the reference backend raises ValueError.
    """
    _dispatch.check_matrix(OP, "z1", z1, "(B, d)")
    _dispatch.check_matrix(OP, "z2", z2, "(B, d)")
    _dispatch.check_matrix(OP, "protos", protos, "(K, d)")
    if tuple(z2.shape) != tuple(z1.shape):
        raise ValueError(
            f"{OP}: z2 has shape {tuple(z2.shape)} but z1 has shape {tuple(z1.shape)}; "
            f"expected the same shape"
        )
    if z1.shape[0] == 0:
        raise ValueError(f"{OP}: z1 has shape {tuple(z1.shape)}; expected B >= 1 rows")
    _dispatch.check_dim_size(OP, "protos", protos, 1, z1.shape[1], "d of z1")
    if protos.shape[0] == 0:
        raise ValueError(f"{OP}: protos has shape {tuple(protos.shape)}; expected K >= 1 rows")
    _dispatch.check_same_dtype(OP, ("z1", z1), ("z2", z2), ("protos", protos))
    assign = _dispatch.check_index(OP, "assign", assign, z1.shape[0])
    _dispatch.check_same_device(OP, ("z1", z1), ("z2", z2), ("protos", protos), ("assign", assign))
    tau = _dispatch.check_positive(OP, "tau", tau)
    path = _dispatch.resolve_backend(OP, backend, z1, z2, protos, assign)
    if group is not None:
        if not torch.compiler.is_compiling():
            _dispatch.check_index_range(OP, "assign", assign, protos.shape[0])
        return distributed.info_nce_proto(z1, z2, protos, assign, tau, group)
    if path == "triton":
        # no value check here: it would wait for the device (and break a torch.compile graph).
        # The kernels never load through assign; an anchor whose assign is out of range gets a
        # NaN loss, and the check is recorded for _dispatch.deferred_errors()
        if not torch.compiler.is_compiling():
            _dispatch.defer_index_range(OP, "assign", assign, protos.shape[0])
        return _dispatch.triton_impl(OP)(z1, z2, protos, assign, tau)
    if not torch.compiler.is_compiling():
        _dispatch.check_index_range(OP, "assign", assign, protos.shape[0])
    return reference.info_nce_proto(z1, z2, protos, assign, tau)
