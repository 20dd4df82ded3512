"""InfoNCE over two views with prototype negatives (SPEC eq. 10).

Layout, top to bottom: the forward's Triton kernels, the launch settings and the forward's host
launcher, the ``torch.library`` ops that wrap the launchers, the autograd.Function (registered
with ``_dispatch.register_triton``), then the public function. The backward's kernels, its
launcher and the gradient formula are in _info_nce_bwd.py.

The kernels work on one key matrix ``keys = [z1; z2; protos]`` (2B + K, d). Its first 2B rows are
also the anchors (queries). Each program owns a block of rows and streams blocks of the other side
through an online log-sum-exp, so nothing of size (2B, 2B + K) is ever stored: memory is
O((B + K) d). The self logit and the assigned prototype's logit are masked by comparing indices
inside the tile. The forward saves, per anchor, only its log2-sum-exp2 and its loss (logsumexp
minus positive logit, computed without subtracting the two). The backward recomputes the logits
tile by tile, without atomics (FlashAttention-2's split): programs over anchor blocks for the
anchor side of dz, programs over key blocks for the key side of dz and dprotos.

Filling the device. At the training batch (B = 512, K = 128) there are only 2B / BLOCK_M = 32
anchor blocks and (2B + K) / BLOCK_N = 36 key blocks, against 132 SMs on an H100 or H200. So each
side is also split over the other into ranges, chosen by shape (``info_nce_launches``): the
forward runs (anchor blocks x key ranges) programs, each writing a partial (max, sum of exp2) per
anchor, and a combine kernel merges the ranges in a fixed order; the backward's anchor side runs
(anchor blocks x key ranges) programs and its key side (key blocks x anchor ranges), each writing
fp32 partials that a finish kernel sums in a fixed order. The number of ranges is the smallest
that gives about ``PROGRAMS_PER_SM`` programs per SM, so large batches take one range (no extra
work but a small combine); partials are bounded by (programs x block x d). No program waits on
another and every sum has a fixed order, so results are bitwise repeatable.

Why one concatenated matrix rather than three base pointers: the copy is O((2B + K) d), small next
to the O(B (B + K) d) work, it makes strided inputs contiguous, and a tile that straddles the
z1/z2/protos boundaries needs no branching. The gradient comes back as one (2B + K, d) buffer whose
three slices are the three gradients (views, no copy).

Precision: products and sums in float32 (float64 for float64 inputs). On the GPU, float32 inputs
use 3xTF32 tensor-core products (float32-level accuracy), float16/bfloat16 inputs one TF32 pass for
the logits (exact: their values fit in TF32) and 3xTF32 for the softmax-weighted sums. Where TF32
is asked for (``_dispatch.float32_dots("tf32")``, the trainer's ``--precision tf32``, or torch's
matmul precision "medium"), every product takes one TF32 pass.

The kernel launches are ``torch.library`` custom ops with fake implementations, called from the
autograd.Function, so ``torch.compile(fullgraph=True)`` traces a call, forward and backward, into
one graph that treats the kernels as opaque ops.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from s4rec_kernels import _dispatch, distributed, reference
from s4rec_kernels._info_nce_bwd import info_nce_bwd
from s4rec_kernels._item_common import _splits, fp32_dot_precision
from s4rec_kernels._launch import Launch, on_device, programs_per_device

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
# Programs per streaming multiprocessor the range splits aim for on CUDA (two waves at least).
PROGRAMS_PER_SM = 2
# Programs aimed for under the interpreter, where splitting gains nothing: 1 (no split). Tests
# raise it so that the split paths run.
INTERPRET_PROGRAMS = 1

# ----------------------------------------------------------------------------------------------
# Triton kernels: the forward (the backward's are in _info_nce_bwd.py)
# ----------------------------------------------------------------------------------------------
#
# Notation as in _info_nce_bwd.py: anchor i keeps every key but itself and its own prototype;
# its positive is p_i = (i + B) mod 2B; t_ij = q_i.k_j log2(e) / tau, so exp(s) = exp2(t): the
# kernels use exp2 with log2(e) / tau folded into one scale.
#
# Forward, per anchor: the positive t_{i p_i} from the positive's row itself, then an online
# log2-sum-exp2 over the negatives only, started at the positive (running max m = t_{i p_i}),
#   x_i = log2 sum_{negatives j} exp2(t_ij - t_{i p_i})
#   loss2_i = log2(1 + exp2(x_i)) = max(x_i, 0) + log2(1 + exp2(-|x_i|))   (the row loss / ln 2)
#   lse2_i = t_{i p_i} + loss2_i                                            (for the backward)
# so a small row loss is not the difference of two large logsumexps. loss = ln 2 mean_i loss2_i.
# Each key range r gives a partial (m_r, l_r), m_r >= t_{i p_i}; the combine takes
# m = max_r m_r and l = sum_r l_r exp2(m_r - m), in range order, then x_i = (m - t_{i p_i}) +
# log2 l.

if triton is not None:
    from s4rec_kernels._info_nce_bwd import _anchor_rows, _row_ptrs

    @triton.jit
    def _info_nce_fwd_kernel(
        # pointers
        keys_ptr,  # (n_keys, d) [z1; z2; protos]
        assign_ptr,  # (B,) int64, prototype of each user
        consts_ptr,  # (1,) compute dtype: log2(e) / tau
        t_pos_ptr,  # (n_rows,) out, compute dtype: each anchor's positive t (written by range 0)
        part_m_ptr,  # (key ranges, n_rows) out, compute dtype: running max of t over the range
        part_l_ptr,  # (key ranges, n_rows) out, compute dtype: sum of exp2(t - max), negatives
        # shapes
        n_views,  # B
        n_keys,  # 2B + K
        dim,  # d
        keys_per_split,  # keys per range, a multiple of BLOCK_N
        # strides
        stride_kn, stride_kd,
        # meta
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        QK_PRECISION: tl.constexpr,
    ):
        compute = part_m_ptr.dtype.element_ty
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
        scale = tl.load(consts_ptr)
        q_pos = tl.load(_row_ptrs(keys_ptr, pos_row, offs_d, stride_kn, stride_kd),
                        mask=q_mask, other=0.0).to(compute)
        t_pos = tl.sum(q * q_pos, axis=1) * scale  # (BLOCK_M,)

        m_i = t_pos  # running max of t, started at the positive's
        l_i = tl.zeros([BLOCK_M], compute)  # running sum of exp2(t - m_i) over the negatives
        key_begin = split * keys_per_split
        key_end = tl.minimum(key_begin + keys_per_split, n_keys)
        for start_n in range(key_begin, key_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < key_end
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

        out = split * n_rows + offs_m
        tl.store(part_m_ptr + out, m_i, mask=row_ok)
        tl.store(part_l_ptr + out, l_i, mask=row_ok)
        first = (offs_m * 0 + split) == 0  # range 0 writes it (every range computes the same)
        tl.store(t_pos_ptr + offs_m, t_pos, mask=row_ok & first)

    @triton.jit
    def _info_nce_combine_kernel(
        # pointers
        assign_ptr,  # (B,) int64
        t_pos_ptr,  # (n_rows,) compute dtype, from the forward kernel
        part_m_ptr,  # (key ranges, n_rows) compute dtype, from the forward kernel
        part_l_ptr,  # (key ranges, n_rows) compute dtype, from the forward kernel
        lse2_ptr,  # (n_rows,) out, compute dtype: log2-sum-exp2 of each anchor's kept t
        loss2_ptr,  # (n_rows,) out, compute dtype: each anchor's loss / ln 2
        # shapes
        n_views, n_keys, key_splits,
        # meta
        BLOCK_M: tl.constexpr,
    ):
        n_rows = 2 * n_views
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n_rows
        t_pos = tl.load(t_pos_ptr + offs_m, mask=row_ok, other=0.0)
        m_i = t_pos
        for split in range(0, key_splits):
            m_i = tl.maximum(m_i, tl.load(part_m_ptr + split * n_rows + offs_m, mask=row_ok,
                                          other=0.0))
        l_i = tl.zeros_like(m_i)
        for split in range(0, key_splits):
            part_m = tl.load(part_m_ptr + split * n_rows + offs_m, mask=row_ok, other=0.0)
            part_l = tl.load(part_l_ptr + split * n_rows + offs_m, mask=row_ok, other=0.0)
            l_i += part_l * tl.exp2(part_m - m_i)

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
        _, own_key = _anchor_rows(offs_m, row_ok, assign_ptr, n_views)
        assign_ok = (own_key >= n_rows) & (own_key < n_keys)
        loss2 = tl.where(assign_ok, loss2, float("nan"))
        tl.store(lse2_ptr + offs_m, t_pos + loss2, mask=row_ok)
        tl.store(loss2_ptr + offs_m, loss2, mask=row_ok)

    from s4rec_kernels._info_nce_bwd import (_info_nce_bwd_dk_kernel, _info_nce_bwd_dq_kernel,
                                             _info_nce_bwd_finish_kernel)


# ----------------------------------------------------------------------------------------------
# Launch settings and the forward's host launcher
# ----------------------------------------------------------------------------------------------


def _launch_config(dim: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of width ``dim`` in ``dtype``, shared by the
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


def _precisions(dtype: torch.dtype, fp32: str = "ieee") -> Tuple[str, str]:
    """tl.dot input precisions for the logits (q.k) and the gradient (P @ k) products, with
    ``fp32`` the precision asked for fp32 products (``fp32_dot_precision``).

    float16/bfloat16 values are exact in TF32, so their logits take one TF32 pass; float32 needs
    3xTF32 for float32 accuracy, and so does P, a float32 quantity, for every dtype; float64 is
    computed in float64. Where TF32 is asked for, every product but float64's takes one TF32 pass.
    """
    if dtype == torch.float64:
        return "ieee", "ieee"
    if fp32 == "tf32":
        return "tf32", "tf32"
    if dtype == torch.float32:
        return "tf32x3", "tf32x3"
    return "tf32", "tf32x3"


class InfoNCEPlan(NamedTuple):
    """The launches of one call (forward, combine; dQ, dK, finish) and their ranges."""
    fwd: Launch
    combine: Launch
    dq: Launch
    dk: Launch
    finish: Launch
    key_splits: int  # key ranges of the forward and the dQ kernel
    keys_per_split: int  # keys per such range, a multiple of BLOCK_N
    row_splits: int  # anchor ranges of the dK kernel
    rows_per_split: int  # anchors per such range, a multiple of BLOCK_M


def info_nce_launches(n_views: int, n_keys: int, dim: int, dtype: torch.dtype,
                      block_m: int, block_n: int, num_warps: int, target_programs: int = 1,
                      fp32: str = "ieee") -> InfoNCEPlan:
    """The launches for 2B = 2 ``n_views`` anchors and ``n_keys`` keys of width ``dim`` in
    ``dtype``, with the tiles of ``_launch_config``, each side split over the other into as
    few ranges as give about ``target_programs`` programs, and ``fp32`` the precision asked for
    fp32 products (see ``_precisions``)."""
    block_d = max(16, triton.next_power_of_2(dim))
    qk_precision, grad_precision = _precisions(dtype, fp32)
    tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, QK_PRECISION=qk_precision)
    grads = dict(tiles, GRAD_PRECISION=grad_precision)
    anchor_blocks = triton.cdiv(2 * n_views, block_m)
    key_blocks = triton.cdiv(n_keys, block_n)
    key_splits, key_tiles = _splits(anchor_blocks, key_blocks, target_programs)
    row_splits, row_tiles = _splits(key_blocks, anchor_blocks, target_programs)
    return InfoNCEPlan(
        fwd=Launch(_info_nce_fwd_kernel, (anchor_blocks, key_splits), tiles, num_warps,
                   NUM_STAGES),
        combine=Launch(_info_nce_combine_kernel, (triton.cdiv(2 * n_views, 128),),
                       dict(BLOCK_M=128), 4, 1),
        dq=Launch(_info_nce_bwd_dq_kernel, (anchor_blocks, key_splits), grads, num_warps,
                  NUM_STAGES),
        dk=Launch(_info_nce_bwd_dk_kernel, (key_blocks, row_splits), grads, num_warps,
                  NUM_STAGES),
        finish=Launch(_info_nce_bwd_finish_kernel, (key_blocks,),
                      dict(BLOCK_N=block_n, BLOCK_D=block_d), num_warps, 1),
        key_splits=key_splits, keys_per_split=key_tiles * block_n,
        row_splits=row_splits, rows_per_split=row_tiles * block_m)


def _target_programs(device: torch.device) -> int:
    """How many programs the range splits aim for on ``device``."""
    if device.type == "cuda":
        return programs_per_device(device, PROGRAMS_PER_SM)
    return INTERPRET_PROGRAMS


def _plan(keys: torch.Tensor, n_views: int, block_m: int, block_n: int, num_warps: int,
          fp32: Optional[str] = None) -> InfoNCEPlan:
    """The launches of a call on ``keys``; fp32 products at ``fp32``, by default as asked now
    (``fp32_dot_precision``: read by each launcher, like the item ops', so the backward follows
    the setting in force when it runs)."""
    n_keys, dim = keys.shape
    fp32 = fp32 if fp32 is not None else fp32_dot_precision()
    return info_nce_launches(n_views, n_keys, dim, keys.dtype, block_m, block_n, num_warps,
                             _target_programs(keys.device), fp32)


def info_nce_fwd(
    keys: torch.Tensor, assign: torch.Tensor, n_views: int, tau: float,
    block_m: int, block_n: int, num_warps: int, fp32: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernels on contiguous keys (2B + K, d) and assign (B,). Returns (lse2,
    loss2), each (2B,) in the compute dtype: per anchor, the log2-sum-exp2 of its kept logits
    (times log2(e)) and its loss divided by ln 2."""
    n_keys, dim = keys.shape
    n_rows = 2 * n_views
    compute = reference.compute_dtype(keys)
    device = keys.device
    plan = _plan(keys, n_views, block_m, block_n, num_warps, fp32)
    t_pos = torch.empty(n_rows, dtype=compute, device=device)
    part_m = torch.empty(plan.key_splits, n_rows, dtype=compute, device=device)
    part_l = torch.empty(plan.key_splits, n_rows, dtype=compute, device=device)
    lse2 = torch.empty(n_rows, dtype=compute, device=device)
    loss2 = torch.empty(n_rows, dtype=compute, device=device)
    consts = torch.full((1,), math.log2(math.e) / tau, dtype=compute, device=device)
    with on_device(device):
        plan.fwd(keys, assign, consts, t_pos, part_m, part_l, n_views, n_keys, dim,
                 plan.keys_per_split, keys.stride(0), keys.stride(1))
        plan.combine(assign, t_pos, part_m, part_l, lse2, loss2, n_views, n_keys,
                     plan.key_splits)
    return lse2, loss2


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
        plan = _plan(keys, n_views, block_m, block_n, num_warps)
        return info_nce_bwd(grad, keys, assign, lse2, n_views, tau, plan)

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
    group_rows: Optional[Sequence[int]] = None,
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
        group_rows: with ``group``, every rank's row count in rank order, when the caller knows
            it; without it the counts are gathered, which waits for the device.
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
        names it; so does the path with ``group``. The reference backend raises ValueError.
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
        # as on the Triton path, no value check that would wait: an assign out of range gives
        # its anchors a NaN loss, and the check is recorded for _dispatch.deferred_errors()
        if not torch.compiler.is_compiling():
            _dispatch.defer_index_range(OP, "assign", assign, protos.shape[0])
        return distributed.info_nce_proto(z1, z2, protos, assign, tau, group, group_rows)
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
