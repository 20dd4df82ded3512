"""What the item ops share: tile tables, launch settings, dot precision, row loaders, checks.

Used by item_softmax.py (the loss), _item_softmax_bwd.py (its backward) and item_ranking.py
(item_rank, item_topk). The tile tables are here together, to be tuned on a device in one place.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from s4rec_kernels import _dispatch
from s4rec_kernels._launch import programs_per_device

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: without it every call takes the reference path
    triton = None

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)

# Programs per streaming multiprocessor that the range splits aim for (enough for two or more
# waves, so that no SM idles on the last one for long).
PROGRAMS_PER_SM = 4
# Program count aimed for under the interpreter (small: every program runs in turn on the CPU,
# but more than one, so the tests cover the split paths).
INTERPRET_TARGET_PROGRAMS = 4

# Tiles on CUDA: {operand kind: {padded d (BLOCK_D): (BLOCK rows, BLOCK items, num_warps,
# num_stages)}}, with "<kind>_sm80" entries replacing some on sm_80. "half" is bf16/fp16 operands; "fp32" is fp32 on tensor cores (3xTF32 or TF32, see
# _dot_types: twice the shared memory, 3xTF32 three products per tile); "ieee" is true fp32, an
# fma chain per entry without tensor cores, whose operands live in registers, hence the small
# tiles. First choices for sm_90, not yet timed on a device. Compiled for sm_90 and sm_80
# (benchmarks/compile_report.py, reports in benchmarks/results/compile-sm*.md): no spill in any
# "half" or "ieee" entry; the "fp32" entries spill at d >= 128 in the backward (3xTF32 holds a
# big and a small TF32 part of every operand; no smaller tile tried removed it) and at d = 256
# in the forward, listed as exceptions there.
CE_FWD_TILES = {
    "half": {16: (128, 128, 8, 3), 32: (128, 128, 8, 3), 64: (128, 128, 8, 3),
             128: (128, 128, 8, 2), 256: (128, 64, 8, 2)},
    "fp32": {16: (128, 128, 8, 3), 32: (128, 128, 8, 3), 64: (128, 128, 8, 3),
             128: (64, 64, 8, 2), 256: (64, 32, 8, 1)},
    "ieee": {16: (64, 32, 4, 3), 32: (64, 32, 4, 3), 64: (64, 32, 4, 3),
             128: (32, 32, 4, 2), 256: (32, 32, 4, 2)},
    # sm_80 (mma.sync keeps the 3xTF32 accumulators and operands in registers): smaller tiles
    "fp32_sm80": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2)},
}
CE_DH_TILES = {
    "half": {16: (128, 64, 8, 3), 32: (128, 64, 8, 3), 64: (128, 64, 8, 3),
             128: (64, 64, 8, 2), 256: (64, 16, 8, 2)},
    "fp32": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2),
             128: (64, 32, 4, 2), 256: (64, 16, 4, 2)},
    "ieee": {16: (32, 32, 4, 3), 32: (32, 32, 4, 3), 64: (32, 32, 4, 3),
             128: (32, 32, 8, 2), 256: (32, 16, 8, 2)},
    "fp32_sm80": {64: (32, 32, 4, 2)},
}
CE_DE_TILES = {  # 64 rows on tensor cores: the logits take the same (wgmma) path as the forward's
    "half": {16: (64, 128, 8, 2), 32: (64, 128, 8, 2), 64: (64, 128, 8, 2),
             128: (64, 64, 8, 2), 256: (64, 32, 8, 2)},
    "fp32": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 32, 4, 2),
             128: (64, 32, 4, 2), 256: (64, 16, 4, 2)},
    "ieee": {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2),
             128: (32, 32, 8, 2), 256: (32, 16, 8, 2)},
}
TOPK_TILES = {
    "half": {16: (32, 128, 8, 3), 32: (32, 128, 8, 3), 64: (32, 128, 8, 3),
             128: (32, 128, 8, 2), 256: (32, 64, 8, 2)},
    "fp32": {16: (32, 128, 8, 2), 32: (32, 128, 8, 2), 64: (32, 128, 8, 2),
             128: (32, 64, 8, 2), 256: (32, 64, 8, 2)},
}
# item_rank scores with fp32 fused multiply-adds (item_ranking._score_tile): (BLOCK_U, BLOCK_V,
# num_warps)
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

    @triton.jit
    def _load_rows(ptr, rows, mask_n, offs_d, mask_d, stride_n, stride_d):
        """(BLOCK, BLOCK_D) tile of rows ``rows`` (int64) of a row-major-ish matrix; 0 outside."""
        return tl.load(ptr + rows[:, None] * stride_n + offs_d[None, :] * stride_d,
                       mask=mask_n[:, None] & mask_d[None, :], other=0.0)

    @triton.jit
    def _row_index(rows_ptr, offs_n, mask_n):
        """Row of hidden at position ``offs_n`` of the row order (see ``_row_order``)."""
        return tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)


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


def _tiles(table: dict, block_d: int, dtype: torch.dtype, arch: Optional[int],
           fp32: str) -> Tuple[int, ...]:
    """(BLOCK_rows, BLOCK_items, num_warps, num_stages) for a kernel on CUDA architecture
    ``arch`` (None: the interpreter); ``fp32`` is the dot precision of fp32 inputs."""
    if arch is None:
        return INTERPRET_TILES + (4, 1)
    kind = "half"
    if dtype == torch.float32:
        kind = "ieee" if fp32 == "ieee" and "ieee" in table else "fp32"
    if arch < 90 and block_d in table.get(f"{kind}_sm80", {}):
        return table[f"{kind}_sm80"][block_d]
    return table[kind][block_d]


# tl.dot precision of fp32 operands for each torch.get_float32_matmul_precision(), as torch's own
# fp32 matmuls read it: "highest" (torch's default) computes in true fp32 (no tensor cores)
_FP32_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


def fp32_dot_precision() -> str:
    """tl.dot input precision of fp32 operands: what ``_dispatch.float32_dots`` asked for, else
    what torch's current matmul precision says."""
    asked = _dispatch.float32_dots_asked()
    if asked is not None:
        return asked
    return _FP32_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")


def _dot_types(dtype: torch.dtype, arch: Optional[int], fp32: str):
    """(DOT_DTYPE, PRECISION, GRAD_DTYPE, GRAD_PRECISION) for inputs of ``dtype`` on CUDA
    architecture ``arch`` (None: the interpreter), fp32 dots at precision ``fp32``."""
    if arch is None:  # the interpreter: every operand in fp32
        return tl.float32, "ieee", tl.float32, "ieee"
    if dtype == torch.bfloat16:
        return tl.bfloat16, "tf32", tl.bfloat16, "tf32"
    if dtype == torch.float16:
        return tl.float16, "tf32", tl.float32, "tf32"
    return tl.float32, fp32, tl.float32, fp32


def _tile_setting(table: dict, dim: int, dtype: torch.dtype, arch: Optional[int], fp32: str):
    """(BLOCK_D, (BLOCK rows, BLOCK items, num_warps, num_stages), the tl.constexpr dot
    settings {DOT_DTYPE, PRECISION, GRAD_DTYPE, GRAD_PRECISION}) of a kernel over rows of width
    ``dim`` (see ``_tiles`` and ``_dot_types``)."""
    block_d = _block_d(dim)
    dots = dict(zip(("DOT_DTYPE", "PRECISION", "GRAD_DTYPE", "GRAD_PRECISION"),
                    _dot_types(dtype, arch, fp32)))
    return block_d, _tiles(table, block_d, dtype, arch, fp32), dots


def _row_order(targets: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rows that take part first (in order), then the ignored ones, and how many take part:
    (order (N,) int64, count (1,) int32), both on the device and computed without waiting for
    it. Kernels read the count and skip the ignored rows; grids are sized for all N rows."""
    ignored = targets == ignore_index
    order = torch.argsort(ignored.to(torch.uint8), stable=True)
    return order, (targets.shape[0] - ignored.sum(dtype=torch.int32)).reshape(1)


# ----------------------------------------------------------------------------------------------
# Checks of the public functions
# ----------------------------------------------------------------------------------------------


def _check_hidden_items(op: str, hidden: torch.Tensor, items: torch.Tensor, rows: str) -> None:
    _dispatch.check_matrix(op, "hidden", hidden, f"({rows}, d)")
    _dispatch.check_matrix(op, "items", items, "(V, d)")
    _dispatch.check_dim_size(op, "items", items, 1, hidden.shape[1], "d of hidden")
    if items.shape[0] == 0:
        raise ValueError(f"{op}: items has shape {tuple(items.shape)}; expected V >= 1 rows")
    _dispatch.check_same_dtype(op, ("hidden", hidden), ("items", items))
