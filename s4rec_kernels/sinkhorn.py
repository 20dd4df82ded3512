"""Sinkhorn-Knopp equipartition target (SwAV), SPEC section 3.

Layout, top to bottom: Triton kernels, their host launchers (registered with
``_dispatch.register_triton("sinkhorn", fn)``), then the public function.

How the kernels compute it. Write x_ij = (s_ij - a_j) * log2(e) / eps, in log2 units, where a_j
is the largest score of column j (subtracting a constant per column changes nothing, since the
first column step removes it, and it keeps the entries near their column's top exact in float32).
After any number of rounds the reference's Q is exp2(x_ij + f_i + g_j) for a row potential f and
a column potential g, the logarithms of SwAV's scaling vectors. The scores are never modified and
no copy of exp(x) is kept; the kernels iterate on g (K float32 values) and recompute f per pass:

  first column step   g_j = -log2 sum_i exp2(x_ij)          (one online sweep: column max, sum)
  row step            P_ij = exp2(x_ij + g_j - m_i) / l_i,   m_i = max_j (x_ij + g_j),
                      l_i = sum_j exp2(x_ij + g_j - m_i)     (every row of P sums to 1)
  next column step    g_j -= log2 c_j,                       c_j = sum_i P_ij
  result              Q = P of the last row step, written once.

The reference's constants (-log2 K in g, -log2 B in f) are left out: the row step is unchanged by
adding a constant to g, and Q after a row step is B times a matrix with rows summing to 1/B, i.e.
P. Each round is one pass over the scores with one exp2 per entry. The row max m_i (with g folded
in) keeps exp2 in range, and the column sums c_j need no max of their own because they add up
row-normalised P: the column step before made every column sum to 1/K (in the reference's units)
and the row step scales row i by 1 / (B r_i) with r_i <= 1, so 1/K <= c_j <= B.

Underflow at small eps, precisely: exp2 is only ever taken of x_ij + g_j - m_i <= 0 (and, in the
first column step, of x_ij - max_i x_ij <= 0), so nothing overflows for any eps. An entry
underflows exactly when it is below 2**-126 of its row's largest entry in that round (of its
column's largest in the first step); it then becomes 0 on the GPU (exp2 flushes subnormals) or a
subnormal in the interpreter. Such an entry is below 2**-126 in P too, where the float32 reference
rounds it the same way. Every sum that is divided by or taken the log of is at least 1 (l_i and
the first step's column sums) or 1/K (c_j), of which at most B*K * 2**-126 is lost, so no eps
makes a row or a column vanish: finite scores give finite Q for every eps > 0. (A kernel that
keeps exp(x - row max) as a fixed matrix and rescales it loses whole columns here: at eps = 0.01
a prototype that every user scores more than 1.04 below their best has a column of exact zeros,
exp(-104) being below float32's smallest subnormal, and its column step divides by zero.)
The precision limit at small eps is float32's resolution of x: entry (i, j) is computed from
(s_ij - a_j) / eps with a relative rounding error of 2**-24, so its relative error is about
|s_ij - a_j| / eps * 1e-7: exact at each column's top, and at most range(s) / eps * 1e-7 where eager
float32 has |s| / eps * 1e-7 (1e-4 at |s| = 50, eps = 0.05). Beyond float32's range (range(s) *
1.44 / eps above 3.4e38) entries may become NaN; NaN or +inf scores give NaN, as in the reference.

Paths. A problem with at most ``SINGLE_PROGRAM_MAX_SCORES`` entries whose rows fit one tile runs in
one program for all rounds (one launch): g stays in registers and the scores are re-read each
round from the cache (a 512 x 128 float32 matrix is 256 KB). Larger problems use row-block
programs that write per-program column sums, plus a small kernel that reduces them into g:
launches = 2 * n_iters + 1 (first column step: partial column max/sum, then reduce; each round
but the last: row pass, then reduce; last round: row pass that writes Q; n_iters = 0 adds a few
torch ops on the (K,) vector for the global total). No program waits
for another and nothing synchronises with the host. A multi-GPU variant would all-reduce the
column sums (and the first step's column max/sum) between the row pass and the reduce.

float64 scores run the eager reference (the dtype rule promises float64 accuracy for them);
every other dtype is loaded and computed in float32, whatever autocast says.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch

from s4rec_kernels import _dispatch, distributed, reference
from s4rec_kernels._launch import Launch, on_device, programs_per_device

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the package then runs the reference
    triton = None

OP = "sinkhorn"

# Problems with at most this many scores whose rows fit one tile run in a single program.
SINGLE_PROGRAM_MAX_SCORES = 2**16
# Widest row a tile holds whole (a power of two); wider score matrices are swept in column tiles.
MAX_ROW_TILE = 4096
# Scores one program holds at a time (rows x columns of a tile): the single program, the others.
SINGLE_PROGRAM_TILE_SCORES = 16384
TILE_SCORES = 8192
# Row-block programs launched per streaming multiprocessor by the multi-program path.
PROGRAMS_PER_SM = 2
# Warps of the single-program kernel and of the multi-program kernels.
SINGLE_PROGRAM_WARPS = 16
MULTI_PROGRAM_WARPS = 8

LOG2E = 1.0 / math.log(2.0)

# ----------------------------------------------------------------------------------------------
# Triton kernels and launchers
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _load_x(s_ptr, offs_m, offs_k, B, K, stride_sb, stride_sk, col_ref, scale):
        """(BLOCK_M, BLOCK_K) tile of x = (scores - col_ref) * log2(e) / eps in float32, -inf
        outside the matrix. ``col_ref`` (BLOCK_K,) is subtracted before scaling, so entries near
        it keep their float32 precision however large scores / eps is."""
        mask = (offs_m < B)[:, None] & (offs_k < K)[None, :]
        ptrs = (s_ptr + offs_m.to(tl.int64)[:, None] * stride_sb
                + offs_k.to(tl.int64)[None, :] * stride_sk)
        s = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
        return (s - col_ref[None, :]) * scale

    @triton.jit
    def _row_step(x, mask_m):
        """exp2(x) with every valid row scaled to sum 1 (row max subtracted first); rows outside
        the matrix give 0. ``x`` holds whole rows."""
        row_max = tl.where(mask_m, tl.max(x, axis=1), 0.0)
        e = tl.exp2(x - row_max[:, None])
        inv = 1.0 / tl.where(mask_m, tl.sum(e, axis=1), 1.0)
        return e * tl.where(mask_m, inv, 0.0)[:, None]

    @triton.jit
    def _column_stats(s_ptr, row_start, row_stop, offs_k, B, K, stride_sb, stride_sk, scale,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """Max of the scores down each column over rows [row_start, row_stop) and the sum of
        exp2((s - max) * log2(e) / eps), in one online sweep of (BLOCK_M, BLOCK_K) tiles."""
        col_max = tl.full([BLOCK_K], float("-inf"), tl.float32)
        col_sum = tl.zeros([BLOCK_K], tl.float32)
        zero = tl.zeros([BLOCK_K], tl.float32)
        for start in range(row_start, row_stop, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            s = _load_x(s_ptr, offs_m, offs_k, B, K, stride_sb, stride_sk, zero, 1.0)
            new_max = tl.maximum(col_max, tl.max(s, axis=0))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            col_sum = (col_sum * tl.exp2((col_max - shift) * scale)
                       + tl.sum(tl.exp2((s - shift[None, :]) * scale), axis=0))
            col_max = new_max
        return col_max, col_sum

    @triton.jit
    def _sinkhorn_single_kernel(
        # pointers
        s_ptr, q_ptr,  # scores (B, K) in their own dtype; Q (B, K) float32, contiguous
        # shapes and rounds
        B, K, n_iters,
        # strides
        stride_sb, stride_sk,
        # scalars: log2(e) / eps, log2 B
        scale, log2_b,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NO_ITERS: tl.constexpr,
    ):
        """The whole problem in one program: the column max a and potential g stay in registers
        for all rounds; the scores are streamed from the cache in tiles of whole rows."""
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        # first column step
        col_max, col_sum = _column_stats(s_ptr, 0, B, offs_k, B, K, stride_sb, stride_sk, scale,
                                         BLOCK_M, BLOCK_K)
        a = tl.where(mask_k, col_max, 0.0)
        log_sum = tl.log2(tl.where(mask_k, col_sum, 1.0))
        if NO_ITERS:
            # Q = B * softmax over all entries: g_j = a_j * scale - log2sumexp2(all x) + log2 B
            col_lse = tl.where(mask_k, a * scale + log_sum, float("-inf"))
            top = tl.max(col_lse, axis=0)
            total = top + tl.log2(tl.sum(tl.exp2(col_lse - top), axis=0))
            g = tl.where(mask_k, (a * scale - total) + log2_b, 0.0)
        else:
            g = -log_sum
            for _ in range(n_iters - 1):
                # row step, then the next round's column step (column sums reduced once)
                col_p = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
                for start in range(0, B, BLOCK_M):
                    offs_m = start + tl.arange(0, BLOCK_M)
                    x = _load_x(s_ptr, offs_m, offs_k, B, K, stride_sb, stride_sk, a, scale)
                    col_p += _row_step(x + g[None, :], offs_m < B)
                g -= tl.log2(tl.where(mask_k, tl.sum(col_p, axis=0), 1.0))
        # last row step, written as Q
        for start in range(0, B, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            mask_m = offs_m < B
            x = _load_x(s_ptr, offs_m, offs_k, B, K, stride_sb, stride_sk, a, scale) + g[None, :]
            if NO_ITERS:
                p = tl.exp2(x)
            else:
                p = _row_step(x, mask_m)
            q_ptrs = q_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
            tl.store(q_ptrs, p, mask=mask_m[:, None] & mask_k[None, :])

    @triton.jit
    def _col_stats_kernel(
        # pointers
        s_ptr, max_ptr, sum_ptr,  # scores (B, K); per-group column max and sum (G, K) float32
        # shapes
        B, K, rows_per_group,
        # strides
        stride_sb, stride_sk,
        # scalars
        scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """First column step, partial: program (group, column tile) sweeps its group of rows."""
        pid_g = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row0 = pid_g * rows_per_group
        col_max, col_sum = _column_stats(s_ptr, row0, row0 + rows_per_group, offs_n, B, K,
                                         stride_sb, stride_sk, scale, BLOCK_M, BLOCK_N)
        out = pid_g.to(tl.int64) * K + offs_n
        tl.store(max_ptr + out, col_max, mask=offs_n < K)
        tl.store(sum_ptr + out, col_sum, mask=offs_n < K)

    @triton.jit
    def _col_update_kernel(
        # pointers
        max_ptr, sum_ptr,  # per-program partials (P, K) float32 (max_ptr: FIRST only)
        a_ptr, g_in_ptr, g_out_ptr,  # column max of the scores; column potentials (K,)
        # shapes
        P, K,
        # scalars
        scale,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, FIRST: tl.constexpr,
    ):
        """Column step: reduce the partials of P programs.

        FIRST: a = column max of the scores, g_out = -log2 sum_i exp2((s_ij - a_j) * scale).
        Otherwise: g_out = g_in - log2(column sum of the row-normalised P)."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < K
        run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, P, BLOCK_P):
            offs_p = start + tl.arange(0, BLOCK_P)
            mask = (offs_p < P)[:, None] & mask_n[None, :]
            offs = offs_p.to(tl.int64)[:, None] * K + offs_n[None, :]
            part_sum = tl.load(sum_ptr + offs, mask=mask, other=0.0)
            if FIRST:
                part_max = tl.load(max_ptr + offs, mask=mask, other=float("-inf"))
                new_max = tl.maximum(run_max, tl.max(part_max, axis=0))
                shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                rescaled = part_sum * tl.exp2((part_max - shift[None, :]) * scale)
                run_sum = run_sum * tl.exp2((run_max - shift) * scale) + tl.sum(rescaled, axis=0)
                run_max = new_max
            else:
                run_sum += tl.sum(part_sum, axis=0)
        log_sum = tl.log2(tl.where(mask_n, run_sum, 1.0))
        if FIRST:
            tl.store(a_ptr + offs_n, run_max, mask=mask_n)
            tl.store(g_out_ptr + offs_n, -log_sum, mask=mask_n)
        else:
            g = tl.load(g_in_ptr + offs_n, mask=mask_n, other=0.0) - log_sum
            tl.store(g_out_ptr + offs_n, g, mask=mask_n)

    @triton.jit
    def _row_pass_kernel(
        # pointers
        s_ptr, a_ptr, g_ptr, out_ptr,  # scores (B, K); column max and potential (K,);
                                       # Q (B, K) or per-program column sums (P, K), float32
        # shapes
        B, K, rows_per_prog,
        # strides
        stride_sb, stride_sk,
        # scalars
        scale,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr,
        WRITE_Q: tl.constexpr, ROW_NORM: tl.constexpr,
    ):
        """Row step over ``rows_per_prog`` rows: P = exp2(x + g) with each row scaled to sum 1
        (ROW_NORM; else exp2(x + g) as is). WRITE_Q stores P as Q; otherwise the program stores
        the column sums of its rows of P in row ``pid`` of ``out``.

        ONE_TILE: rows fit a tile (K <= BLOCK_K); the program walks its rows in chunks of BLOCK_M
        and adds up the column sums in registers. Otherwise rows_per_prog == BLOCK_M and each
        row is swept twice in BLOCK_K-wide tiles, first for its max and sum, then for P."""
        pid = tl.program_id(0)
        row0 = pid * rows_per_prog
        if ONE_TILE:
            offs_k = tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(a_ptr + offs_k, mask=mask_k, other=0.0)
            g = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0)
            col_p = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)  # column sums, reduced at the end
            for start in range(row0, row0 + rows_per_prog, BLOCK_M):
                offs_m = start + tl.arange(0, BLOCK_M)
                mask_m = offs_m < B
                x = (_load_x(s_ptr, offs_m, offs_k, B, K, stride_sb, stride_sk, a, scale)
                     + g[None, :])
                if ROW_NORM:
                    p = _row_step(x, mask_m)
                else:
                    p = tl.exp2(x)
                if WRITE_Q:
                    q_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
                    tl.store(q_ptrs, p, mask=mask_m[:, None] & mask_k[None, :])
                else:
                    col_p += p
            if not WRITE_Q:
                tl.store(out_ptr + pid.to(tl.int64) * K + offs_k, tl.sum(col_p, axis=0),
                         mask=mask_k)
        else:
            offs_m = row0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < B
            row_lse = tl.zeros([BLOCK_M], tl.float32)
            if ROW_NORM:
                row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
                row_sum = tl.zeros([BLOCK_M], tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    a = tl.load(a_ptr + offs_k, mask=offs_k < K, other=0.0)
                    g = tl.load(g_ptr + offs_k, mask=offs_k < K, other=0.0)
                    x = (_load_x(s_ptr, offs_m, offs_k, B, K, stride_sb, stride_sk, a, scale)
                         + g[None, :])
                    new_max = tl.maximum(row_max, tl.max(x, axis=1))
                    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                    row_sum = (row_sum * tl.exp2(row_max - shift)
                               + tl.sum(tl.exp2(x - shift[:, None]), axis=1))
                    row_max = new_max
                row_lse = tl.where(mask_m, row_max + tl.log2(tl.where(mask_m, row_sum, 1.0)), 0.0)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                a = tl.load(a_ptr + offs_k, mask=mask_k, other=0.0)
                g = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0)
                x = (_load_x(s_ptr, offs_m, offs_k, B, K, stride_sb, stride_sk, a, scale)
                     + g[None, :])
                p = tl.exp2(x - row_lse[:, None])
                if WRITE_Q:
                    q_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
                    tl.store(q_ptrs, p, mask=mask_m[:, None] & mask_k[None, :])
                else:
                    tl.store(out_ptr + pid.to(tl.int64) * K + offs_k, tl.sum(p, axis=0),
                             mask=mask_k)

def _target_programs(device: torch.device) -> int:
    """How many row-block programs the multi-program path aims for (a few in the interpreter)."""
    if device.type == "cuda":
        return programs_per_device(device, PROGRAMS_PER_SM)
    return 2 * PROGRAMS_PER_SM


def _row_tile(n_rows: int, block_k: int, tile_scores: int) -> int:
    """Rows per (rows, block_k) tile of about ``tile_scores`` scores."""
    return max(1, min(tile_scores // block_k, triton.next_power_of_2(n_rows)))


def _fits_one_program(n_rows: int, n_cols: int) -> bool:
    return (n_rows * n_cols <= SINGLE_PROGRAM_MAX_SCORES
            and triton.next_power_of_2(n_cols) <= MAX_ROW_TILE)


def single_launch(n_rows: int, n_cols: int, n_iters: int) -> Launch:
    """The one-program launch (problems that ``_fits_one_program``)."""
    block_k = triton.next_power_of_2(n_cols)
    return Launch(_sinkhorn_single_kernel, (1,),
                  dict(BLOCK_M=_row_tile(n_rows, block_k, SINGLE_PROGRAM_TILE_SCORES),
                       BLOCK_K=block_k, NO_ITERS=n_iters == 0),
                  SINGLE_PROGRAM_WARPS)


class MultiPlan(NamedTuple):
    """The multi-program path's launches and sizes (see ``multi_plan``)."""
    col_stats: Launch  # first column step, partial: (row group, column tile) programs
    rows_per_group: int
    n_groups: int
    first_update: Launch  # its reduce
    update: Launch  # the reduce of a round's column sums
    row_sums: Launch  # a round's row pass that writes column sums
    row_q: Launch  # the last row pass, writing Q (row-normalised unless n_iters = 0)
    rows_per_prog: int
    n_progs: int


def multi_plan(n_rows: int, n_cols: int, n_iters: int, programs: int) -> MultiPlan:
    """Launches of the multi-program path for (n_rows, n_cols) scores; ``programs`` is the
    number of row-block programs it aims for."""
    # first column step: (row group, column tile) programs, then the reduce
    stats_n = min(triton.next_power_of_2(n_cols), 128)
    stats_tiles = triton.cdiv(n_cols, stats_n)
    stats_m = _row_tile(n_rows, stats_n, TILE_SCORES)
    groups = max(1, programs // stats_tiles)
    rows_per_group = stats_m * triton.cdiv(triton.cdiv(n_rows, stats_m), groups)
    n_groups = triton.cdiv(n_rows, rows_per_group)

    # rounds: row-block programs over whole rows
    block_k = triton.next_power_of_2(n_cols)
    one_tile = block_k <= MAX_ROW_TILE
    if not one_tile:
        block_k = MAX_ROW_TILE
    block_m = _row_tile(n_rows, block_k, TILE_SCORES)
    chunks = triton.cdiv(triton.cdiv(n_rows, block_m), programs) if one_tile else 1
    rows_per_prog = block_m * chunks
    n_progs = triton.cdiv(n_rows, rows_per_prog)

    update_n = min(triton.next_power_of_2(n_cols), 64)

    def update(n_parts, first):
        return Launch(_col_update_kernel, (triton.cdiv(n_cols, update_n),),
                      dict(BLOCK_P=min(triton.next_power_of_2(n_parts), 64), BLOCK_N=update_n,
                           FIRST=first), 4)

    def row_pass(write_q, row_norm):
        return Launch(_row_pass_kernel, (n_progs,),
                      dict(BLOCK_M=block_m, BLOCK_K=block_k, ONE_TILE=one_tile,
                           WRITE_Q=write_q, ROW_NORM=row_norm), MULTI_PROGRAM_WARPS)

    col_stats = Launch(_col_stats_kernel, (n_groups, stats_tiles),
                       dict(BLOCK_M=stats_m, BLOCK_N=stats_n), MULTI_PROGRAM_WARPS)
    return MultiPlan(col_stats, rows_per_group, n_groups, update(n_groups, True),
                     update(n_progs, False), row_pass(False, True),
                     row_pass(True, n_iters > 0), rows_per_prog, n_progs)


def _launch_single(scores: torch.Tensor, q: torch.Tensor, scale: float, n_iters: int) -> None:
    n_rows, n_cols = scores.shape
    single_launch(n_rows, n_cols, n_iters)(
        scores, q, n_rows, n_cols, n_iters, scores.stride(0), scores.stride(1),
        scale, math.log2(n_rows))


def _launch_multi(scores: torch.Tensor, q: torch.Tensor, scale: float, n_iters: int) -> None:
    n_rows, n_cols = scores.shape
    device = scores.device
    plan = multi_plan(n_rows, n_cols, n_iters, _target_programs(device))
    strides = (scores.stride(0), scores.stride(1))
    n_groups, n_progs = plan.n_groups, plan.n_progs

    # one scratch allocation: partial column max and sum per group, column sums per program,
    # the column max a and two column potentials g
    work = torch.empty((2 * n_groups + n_progs + 3) * n_cols, dtype=torch.float32, device=device)
    part_max, part_sum, col_p, a, g = work.split(
        [n_groups * n_cols, n_groups * n_cols, n_progs * n_cols, n_cols, 2 * n_cols])
    g = g.view(2, n_cols)

    plan.col_stats(scores, part_max, part_sum, n_rows, n_cols, plan.rows_per_group, *strides,
                   scale)
    plan.first_update(part_max, part_sum, a, g[0], g[0], n_groups, n_cols, scale)
    if n_iters == 0:
        # Q = B * softmax over all entries: g_j = a_j * scale - log2sumexp2(all x) + log2 B
        with reference._no_autocast(g):
            a_scaled = a * scale
            col_lse = a_scaled - g[0]  # g[0] = -log2 sum_i exp2((s_ij - a_j) * scale)
            top = col_lse.max()
            total = top + torch.log2(torch.exp2(col_lse - top).sum())
            torch.add(a_scaled - total, math.log2(n_rows), out=g[1])
        plan.row_q(scores, a, g[1], q, n_rows, n_cols, plan.rows_per_prog, *strides, scale)
        return
    cur = 0
    for _ in range(n_iters - 1):
        plan.row_sums(scores, a, g[cur], col_p, n_rows, n_cols, plan.rows_per_prog, *strides,
                      scale)
        plan.update(col_p, col_p, a, g[cur], g[1 - cur], n_progs, n_cols, scale)
        cur = 1 - cur
    plan.row_q(scores, a, g[cur], q, n_rows, n_cols, plan.rows_per_prog, *strides, scale)


def _sinkhorn_triton(scores: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """The registered Triton implementation (arguments already checked)."""
    if scores.dtype == torch.float64:
        return reference.sinkhorn(scores, eps, n_iters)
    n_rows, n_cols = scores.shape
    q = torch.empty((n_rows, n_cols), dtype=torch.float32, device=scores.device)
    scale = LOG2E / eps
    with on_device(scores.device):
        if _fits_one_program(n_rows, n_cols):
            _launch_single(scores, q, scale, n_iters)
        else:
            _launch_multi(scores, q, scale, n_iters)
    return q


if triton is not None:
    _dispatch.register_triton(OP, _sinkhorn_triton)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def sinkhorn(
    scores: torch.Tensor, eps: float = 0.05, n_iters: int = 3, *, backend: str = "auto",
    group=None, group_rows: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp soft assignment of B users to K prototypes.

    Args:
        scores: (B, K) float16/bfloat16/float32/float64, B >= 1 and K >= 1.
        eps: entropic temperature, > 0. Q starts proportional to exp(scores / eps).
        n_iters: number of {columns to 1/K, rows to 1/B} rounds, >= 0.
        backend: "auto", "reference" or "triton" (see ``_dispatch``).
        group: a torch.distributed process group (see ``distributed``): scores are this rank's
            rows and the result is this rank's rows of the Q over every rank's rows.
        group_rows: with ``group``, every rank's row count in rank order, when the caller knows
            it; without it the counts are gathered, which waits for the device.

    Returns:
        Q (B, K), not requiring grad: normalised to total 1, then ``n_iters`` times each column
        scaled to sum 1/K and each row to sum 1/B, finally multiplied by B. After at least one
        iteration every row sums to 1 and every column to about B/K; with ``n_iters=0`` Q is B
        times a softmax over all entries. Stable for any eps and score magnitude (log space).
        float64 scores give float64; every other dtype gives float32. Autocast has no effect.
        The Triton backend computes in float32 (one launch at small shapes, 2 * n_iters + 1 at
        large ones; see the module docstring for the underflow behaviour at small eps) and runs
        the reference for float64 scores.
    """
    _dispatch.check_matrix(OP, "scores", scores, "(B, K)")
    if scores.shape[0] == 0:
        raise ValueError(f"{OP}: scores has shape {tuple(scores.shape)}; expected B >= 1 rows")
    eps = _dispatch.check_positive(OP, "eps", eps)
    n_iters = _dispatch.check_int(OP, "n_iters", n_iters, 0)
    use_triton = _dispatch.resolve_backend(OP, backend, scores) == "triton"
    if group is not None:
        return distributed.sinkhorn(scores, eps, n_iters, group, group_rows)
    if use_triton:
        return _dispatch.triton_impl(OP)(scores, eps, n_iters)
    return reference.sinkhorn(scores, eps, n_iters)
