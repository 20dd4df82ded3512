"""Every kernel specialisation the ops can launch, compiled for a CUDA target on any machine.

    python -m benchmarks.compile_report [--arch 90|80] [--out DIR] [--tag TEXT] [--jobs N]

Triton compiles for a CUDA target without a GPU: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` lowers to PTX and assembles a cubin with the ptxas that the
triton wheel ships. The specialisations come from the launchers' own settings functions
(``ce_forward_launches``, ``ce_dh_launch``, ``ce_de_launch``, ``rank_launch``, ``topk_launch``,
``info_nce_launches``, ``single_launch``, ``multi_plan``) called at the shapes below, for every
dtype, head dim and flag they can take, so the list is what a launch on that architecture picks.
Per specialisation it records registers, spilled bytes (``ptxas -v``), shared memory (the
kernel's metadata) and the tensor-core instructions in the PTX (``mma.sync`` / ``wgmma``).

Argument specialisation as a launch sees it: pointers 16-byte aligned, the inner stride of every
contiguous matrix equal to 1 (a constant), row strides multiples of 16, sizes unspecialised.

Results are cached in ``<cache>/results.json`` by the kernel's source hash, arguments, options,
target and triton version, with triton's own cache beside it, so a second run only reads.
Without ``--out`` the report is printed and written under a temporary folder.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script or imported by the tests
    sys.path.insert(0, str(ROOT))

import triton  # noqa: E402

import importlib  # noqa: E402

# the modules (the package's __init__ exports functions of the same names)
_item_common, _item_softmax_bwd, info_nce, item_ranking, item_softmax, sinkhorn = (
    importlib.import_module(f"s4rec_kernels.{name}") for name in (
        "_item_common", "_item_softmax_bwd", "info_nce", "item_ranking", "item_softmax",
        "sinkhorn"))

ARCHS = (90, 80)
# Streaming multiprocessors of the devices each architecture stands for (H100/H200 SXM, A100)
SM_COUNT = {90: 132, 80: 108}
# Shared memory one block may use, bytes (opt-in maximum per block)
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
DEVICE_NAMES = {90: "H100 / H200", 80: "A100"}
HEAD_DIMS = (32, 64, 128, 256)
# (input dtype, dot precision of fp32 inputs): the item ops' operand kinds
ITEM_KINDS = ((torch.bfloat16, "ieee"), (torch.float16, "ieee"), (torch.float32, "ieee"),
              (torch.float32, "tf32x3"), (torch.float32, "tf32"))
# (rows, items) of the item softmax: few rows (split over items, compact dh partials), many
# rows (no split), and a small catalogue (grad_items split over rows, fp32 partials)
CE_SHAPES = ((8192, 1_000_000), (2**20, 1_000_000), (8192, 12_101))
TOPK_K = (10, 128)  # list widths 16 and 128, the narrowest and the widest
# (input dtype, precision asked for fp32 products): InfoNCE takes 3xTF32 unless TF32 is asked
# for (``info_nce._precisions``)
NCE_KINDS = ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "ieee"),
             (torch.bfloat16, "tf32"), (torch.float16, "ieee"), (torch.float16, "tf32"),
             (torch.float64, "ieee"))
# the training batch: both sides split into ranges on either architecture
NCE_VIEWS, NCE_PROTOS = 512, 128
# Sinkhorn: one program (the training shape, and the widest rows it takes), multi-program with
# rows in one tile, and rows wider than a tile
SINKHORN_SHAPES = ((512, 128), (16, 4096), (4096, 1024), (64, 8192))
SINKHORN_ITERS = (0, 3)
SINKHORN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# kernels of the training step (the others are evaluation: rank, top-k)
TRAINING = {"_ce_fwd_kernel", "_ce_combine_kernel", "_ce_bwd_dh_kernel", "_ce_bwd_de_kernel",
            "_info_nce_fwd_kernel", "_info_nce_combine_kernel", "_info_nce_bwd_dq_kernel",
            "_info_nce_bwd_dk_kernel", "_info_nce_bwd_finish_kernel", "_sinkhorn_single_kernel", "_col_stats_kernel", "_col_update_kernel",
            "_row_pass_kernel"}
# kernels with tl.dot products
GEMM = {"_ce_fwd_kernel", "_ce_bwd_dh_kernel", "_ce_bwd_de_kernel", "_topk_kernel",
        "_info_nce_fwd_kernel", "_info_nce_bwd_dq_kernel", "_info_nce_bwd_dk_kernel"}

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
        torch.float64: "*fp64"}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.float64: "fp64"}
INNER_STRIDES = {"stride_hd", "stride_ed", "stride_dd", "stride_g", "stride_kd", "stride_dqd",
                 "stride_dkd", "stride_sk"}
ROW_STRIDES = {"stride_hn", "stride_ev", "stride_dn", "stride_dv", "stride_hu", "stride_kn",
               "stride_dqn", "stride_dkn", "stride_sb"}
FLOAT_SCALARS = {"scale", "log2_b"}


@dataclass(frozen=True)
class Spec:
    """One specialisation: a kernel, its pointer types, constexprs and options."""
    op: str
    kernel: str  # the jit function's name
    module: str  # where it is defined
    dtype: str  # input dtype, with the fp32 dot precision ("fp32/tf32x3")
    dim: Optional[int]
    pointers: Tuple[Tuple[str, str], ...]  # (argument, "*bf16"), for every pointer argument
    meta: Tuple[Tuple[str, object], ...]
    num_warps: int
    num_stages: int
    row_stride_16: bool  # row strides are multiples of 16

    def label(self) -> str:
        flags = ", ".join(f"{k}={_show(v)}" for k, v in self.meta
                          if k not in ("DOT_DTYPE", "GRAD_DTYPE", "BLOCK_D"))
        return f"{flags}; w{self.num_warps} s{self.num_stages}"


def _show(value) -> str:
    if isinstance(value, bool):
        return "T" if value else "F"
    return str(value)


def _jit(spec: Spec):
    return getattr(sys.modules[spec.module], spec.kernel)


def _nce_label(dtype: torch.dtype, fp32: str) -> str:
    """InfoNCE's dtype label: the input dtype, with "/tf32x3" or "/tf32" for fp32 inputs (their
    products' precision) and "/tf32" for half inputs where TF32 was asked for."""
    qk, grad = info_nce._precisions(dtype, fp32)
    if dtype == torch.float32:
        return f"fp32/{qk}"
    return _SHORT[dtype] + ("/tf32" if grad == "tf32" else "")


def _spec(op: str, launch, dtype: torch.dtype, dim: Optional[int], pointers: Dict[str, str],
          label_dtype: Optional[str] = None) -> Spec:
    fn = launch.kernel.fn  # the Python function (under the interpreter as well)
    return Spec(op, fn.__name__, fn.__module__,
                label_dtype or _SHORT[dtype], dim, tuple(sorted(pointers.items())),
                tuple(launch.meta.items()), launch.num_warps, launch.num_stages,
                dim is None or dim % 16 == 0)


# ----------------------------------------------------------------------------------------------
# The specialisations, from the launchers' settings functions
# ----------------------------------------------------------------------------------------------


def specialisations(arch: int) -> List[Spec]:
    """Every specialisation the ops launch on ``arch``, without duplicates, in a fixed order."""
    specs: List[Spec] = []
    item_programs = _item_common.PROGRAMS_PER_SM * SM_COUNT[arch]
    for dtype, fp32 in ITEM_KINDS:
        if dtype != torch.float32 and fp32 != "ieee":
            continue
        kind = _SHORT[dtype] + (f"/{fp32}" if dtype == torch.float32 else "")
        p = _PTR[dtype]
        for dim in HEAD_DIMS:
            for n_rows, n_items in CE_SHAPES:
                fwd, combine, _, _ = item_softmax.ce_forward_launches(
                    n_rows, n_items, dim, dtype, arch, item_programs, fp32)
                base = dict(h_ptr=p, e_ptr=p, rows_ptr="*i64", count_ptr="*i32")
                specs.append(_spec("item_softmax_ce", fwd, dtype, dim, dict(
                    base, part_m_ptr="*fp32", part_l_ptr="*fp32"), kind))
                specs.append(_spec("item_softmax_ce", combine, dtype, dim, dict(
                    base, t_ptr="*i64", part_m_ptr="*fp32", part_l_ptr="*fp32",
                    loss_ptr="*fp32", stats_ptr="*fp32")))  # no dot: any precision
                grads = dict(base, t_ptr="*i64", stats_ptr="*fp32", g_ptr="*fp32")
                dh, _, _ = _item_softmax_bwd.ce_dh_launch(
                    n_rows, n_items, dim, dtype, arch, item_programs, fp32)
                specs.append(_spec("item_softmax_ce", dh, dtype, dim, dict(
                    grads, dh_ptr="*fp32" if dh.meta["OUT_COMPACT"] else p), kind))
                de, de_splits, _ = _item_softmax_bwd.ce_de_launch(
                    n_rows, n_items, dim, dtype, arch, item_programs, fp32)
                specs.append(_spec("item_softmax_ce", de, dtype, dim, dict(
                    grads, de_ptr="*fp32" if de_splits > 1 else p), kind))
            for k in TOPK_K:
                for has_exclude in (False, True):
                    topk, _, _ = item_ranking.topk_launch(
                        8192, 1_000_000, dim, k, dtype, has_exclude, arch, item_programs, fp32)
                    specs.append(_spec("item_topk", topk, dtype, dim, dict(
                        h_ptr=p, e_ptr=p, ex_ptr="*i64", indptr_ptr="*i64", keys_ptr="*i64"),
                        kind))
        if fp32 == "ieee":  # rank scores by fma chains whatever the precision setting
            for has_exclude in (False, True):
                rank, _, _ = item_ranking.rank_launch(8192, 1_000_000, has_exclude, arch,
                                                      item_programs)
                specs.append(_spec("item_rank", rank, dtype, None, dict(
                    h_ptr=p, e_ptr=p, t_ptr="*i64", ex_ptr="*i64", indptr_ptr="*i64",
                    count_ptr="*i32"), _SHORT[dtype]))
    nce_programs = info_nce.PROGRAMS_PER_SM * SM_COUNT[arch]
    for dtype, fp32 in NCE_KINDS:
        p = _PTR[dtype]
        compute = "*fp64" if dtype == torch.float64 else "*fp32"
        kind = _nce_label(dtype, fp32)
        for dim in HEAD_DIMS:
            config = info_nce._launch_config(dim, dtype)
            plan = info_nce.info_nce_launches(NCE_VIEWS, 2 * NCE_VIEWS + NCE_PROTOS, dim, dtype,
                                              *config, nce_programs, fp32)
            base = dict(keys_ptr=p, assign_ptr="*i64", consts_ptr=compute)
            specs.append(_spec("info_nce_proto", plan.fwd, dtype, dim, dict(
                base, t_pos_ptr=compute, part_m_ptr=compute, part_l_ptr=compute), kind))
            specs.append(_spec("info_nce_proto", plan.combine, dtype, None, dict(
                assign_ptr="*i64", t_pos_ptr=compute, part_m_ptr=compute, part_l_ptr=compute,
                lse2_ptr=compute, loss2_ptr=compute), compute[1:]))  # no dot: by compute dtype
            specs.append(_spec("info_nce_proto", plan.dq, dtype, dim, dict(
                base, lse2_ptr=compute, part_dq_ptr=compute, part_mass_ptr=compute), kind))
            specs.append(_spec("info_nce_proto", plan.dk, dtype, dim, dict(
                base, lse2_ptr=compute, part_dk_ptr=compute), kind))
            specs.append(_spec("info_nce_proto", plan.finish, dtype, dim, dict(
                keys_ptr=p, consts_ptr=compute, part_dq_ptr=compute, part_mass_ptr=compute,
                part_dk_ptr=compute, dkeys_ptr=p)))  # no dot: by input dtype
    sink_programs = sinkhorn.PROGRAMS_PER_SM * SM_COUNT[arch]
    for dtype in SINKHORN_DTYPES:
        p = _PTR[dtype]
        for n_rows, n_cols in SINKHORN_SHAPES:
            for n_iters in SINKHORN_ITERS:
                if sinkhorn._fits_one_program(n_rows, n_cols):
                    launch = sinkhorn.single_launch(n_rows, n_cols, n_iters)
                    specs.append(_spec("sinkhorn", launch, dtype, None,
                                       dict(s_ptr=p, q_ptr="*fp32")))
                    continue
                plan = sinkhorn.multi_plan(n_rows, n_cols, n_iters, sink_programs)
                specs.append(_spec("sinkhorn", plan.col_stats, dtype, None, dict(
                    s_ptr=p, max_ptr="*fp32", sum_ptr="*fp32")))
                for update in (plan.first_update, plan.update):
                    specs.append(_spec("sinkhorn", update, torch.float32, None, dict(
                        max_ptr="*fp32", sum_ptr="*fp32", a_ptr="*fp32", g_in_ptr="*fp32",
                        g_out_ptr="*fp32")))
                passes = (plan.row_q,) if n_iters == 0 else (plan.row_sums, plan.row_q)
                for row_pass in passes:
                    specs.append(_spec("sinkhorn", row_pass, dtype, None, dict(
                        s_ptr=p, a_ptr="*fp32", g_ptr="*fp32", out_ptr="*fp32")))
    seen, unique = set(), []
    for spec in specs:
        if spec not in seen:
            seen.add(spec)
            unique.append(spec)
    return unique


# ----------------------------------------------------------------------------------------------
# Compiling one specialisation
# ----------------------------------------------------------------------------------------------


def _source(spec: Spec):
    """The ASTSource of ``spec``: signature, constexprs and divisibility attributes."""
    from triton.compiler import ASTSource

    fn = _jit(spec)
    pointers, meta = dict(spec.pointers), dict(spec.meta)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in meta:
            signature[name], constexprs[name] = "constexpr", meta[name]
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in INNER_STRIDES:  # 1: a launch specialises it into a constant
            signature[name], constexprs[name] = "constexpr", 1
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in ROW_STRIDES and spec.row_stride_16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = [n for n in fn.arg_names if n.endswith("_ptr") and n not in pointers]
    if missing:
        raise ValueError(f"{spec.kernel}: no type given for pointer arguments {missing}")
    return ASTSource(fn, signature, constexprs, attrs)


_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)[\w.]*?\.(bf16|f16|tf32|f64|e4m3|e5m2)\b")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                          r"loads")


def _ptxas_usage(ptx: str, arch: int) -> Tuple[int, int, int]:
    """(registers, spill store bytes, stack frame bytes) from ``ptxas -v`` on ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", str(src),
                              "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True)
    usage = _parse_ptxas(out.stdout + out.stderr)
    if usage is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{out.stdout + out.stderr}")
    return usage


def _parse_ptxas(log: str) -> Optional[Tuple[int, int, int]]:
    regs = _PTXAS_REGS.search(log)
    spill = _PTXAS_SPILL.search(log)
    if regs is None or spill is None:
        return None
    return int(regs.group(1)), int(spill.group(2)), int(spill.group(1))


def compile_one(spec: Spec, arch: int) -> Dict:
    """Compile ``spec`` for ``arch``: registers, spills, shared memory and mma kinds, or the
    error."""
    from triton.backends.compiler import GPUTarget

    row = {"error": None}
    t0 = time.perf_counter()
    try:
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # triton prints ptxas's -v log when asked to
            kernel = triton.compile(_source(spec), target=GPUTarget("cuda", arch, 32),
                                    options=dict(num_warps=spec.num_warps,
                                                 num_stages=spec.num_stages))
        ptx = kernel.asm["ptx"]
        usage = _parse_ptxas(log.getvalue())  # None when triton's cache answered
        regs, spill, stack = usage or _ptxas_usage(ptx, arch)
        row.update(regs=regs, spill_bytes=spill, stack_bytes=stack,
                   smem_bytes=int(kernel.metadata.shared),
                   mma=sorted({m.group(2) for m in _MMA.finditer(ptx)}),
                   wgmma="wgmma.mma_async" in ptx)
    except Exception as err:  # a failed compile is a result to report, with its message
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _cache_key(item) -> str:
    spec, arch = item
    return f"{triton.__version__}|sm{arch}|{_source(spec).hash()}|w{spec.num_warps}s{spec.num_stages}"


def _keyed_work(keyed) -> Tuple[str, Dict]:
    key, item = keyed
    return key, _work(item)


def _work(item) -> Dict:
    try:
        triton.knobs.nvidia.dump_ptxas_log = True
    except AttributeError:  # older triton: compile_one runs ptxas -v itself
        pass
    return compile_one(*item)


def compile_all(arch: int, cache_dir: Path, jobs: int = 2) -> List[Tuple[Spec, Dict]]:
    """Compile every specialisation for ``arch`` (results cached under ``cache_dir``).

    Compiles run in fresh worker processes with the Triton interpreter off (under it, as in the
    tests, the kernels are interpreted functions, which do not compile)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    store = cache_dir / "results.json"
    cached = json.loads(store.read_text()) if store.exists() else {}
    specs = specialisations(arch)
    items = [(s, arch) for s in specs]
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    os.environ.update(TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(cache_dir / "triton"))
    fresh: Dict[str, Dict] = {}
    try:
        with multiprocessing.get_context("spawn").Pool(max(1, jobs)) as pool:
            keys = pool.map(_cache_key, items, chunksize=16)
            # one compile per key: specialisations that differ only in what the kernel does not
            # see (8 of 325 per architecture) share one
            todo = list({key: (key, item) for item, key in zip(items, keys)
                         if key not in cached}.values())
            for n, (key, row) in enumerate(pool.imap_unordered(_keyed_work, todo), 1):
                fresh[key] = row
                if row["error"] is None:  # failures are retried next time
                    cached[key] = row
                if n % 10 == 0 or n == len(todo):  # an interrupted run keeps what it did
                    store.write_text(json.dumps(cached, indent=0, sort_keys=True))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [(s, fresh.get(k) or cached[k]) for s, k in zip(specs, keys)]


# ----------------------------------------------------------------------------------------------
# Checks and the report
# ----------------------------------------------------------------------------------------------

# Training-path specialisations allowed to spill, with why: (kernels, dtype labels, head dims,
# reason). Everything else on the training path must not spill.
_TF32X3 = ("3xTF32 holds a big and a small TF32 part of every fp32 operand, so the tile's "
           "registers nearly triple; no smaller tile tried removed the spill (the model trains at "
           "d = 64, in bf16 or true fp32, where nothing spills)")
SPILL_EXCEPTIONS = [
    (("_ce_fwd_kernel", "_ce_bwd_dh_kernel", "_ce_bwd_de_kernel"), ("fp32/tf32x3", "fp32/tf32"),
     (128, 256), _TF32X3),
    (("_info_nce_fwd_kernel", "_info_nce_bwd_dq_kernel", "_info_nce_bwd_dk_kernel"),
     ("fp32/tf32x3",), (128, 256), _TF32X3 + "; InfoNCE's fp32 inputs take 3xTF32 unless TF32 "
     "is asked for"),
    (("_info_nce_fwd_kernel", "_info_nce_bwd_dq_kernel", "_info_nce_bwd_dk_kernel"), ("fp64",),
     (32, 64, 128, 256), "float64 inputs (a test and reference dtype, not a training one) at up "
     "to a few hundred bytes"),
    (("_info_nce_bwd_dk_kernel",), ("fp16/tf32",), (64,),
     "sm_90 under triton 3.9 only, 16 bytes (bf16 with TF32 and 3.6 do not spill): fp16 inputs "
     "with TF32 asked for, not a training setting (--precision hands the ops bf16 or fp32)"),
    (("_ce_bwd_dh_kernel",), ("fp32/ieee",), (256,),
     "triton 3.6 only, 8 to 28 bytes (3.9 does not spill): true-fp32 fma chains at d = 256"),
]


def spill_allowed(spec: "Spec") -> bool:
    return any(spec.kernel in kernels and spec.dtype in dtypes and spec.dim in dims
               for kernels, dtypes, dims, _ in SPILL_EXCEPTIONS)


def expects_tensor_cores(spec: Spec) -> bool:
    """A GEMM kernel whose operands allow tensor cores (bf16, fp16, tf32 or 3xTF32 dots)."""
    if spec.kernel not in GEMM:
        return False
    if spec.op == "info_nce_proto":
        return spec.dtype != "fp64"
    return spec.dtype != "fp32/ieee"


def problems(arch: int, results: List[Tuple[Spec, Dict]]) -> List[str]:
    """Everything that breaks a rule: compile errors, shared memory over the device's limit,
    GEMMs without tensor cores where the dtype allows them, spills in training kernels outside
    SPILL_EXCEPTIONS."""
    out = []
    for spec, row in results:
        where = f"sm_{arch} {spec.kernel} {spec.dtype} d={spec.dim} [{spec.label()}]"
        if row["error"]:
            out.append(f"{where}: does not compile: {row['error']}")
            continue
        if row["smem_bytes"] > SMEM_LIMIT[arch]:
            out.append(f"{where}: {row['smem_bytes']} bytes of shared memory, over "
                       f"{SMEM_LIMIT[arch]}")
        if expects_tensor_cores(spec) and not row["mma"]:
            out.append(f"{where}: no tensor-core instruction")
        if spec.kernel in TRAINING and row["spill_bytes"] > 0 and not spill_allowed(spec):
            out.append(f"{where}: spills {row['spill_bytes']} bytes")
    return out


def render(arch: int, results: List[Tuple[Spec, Dict]]) -> str:
    """The markdown report."""
    ok = [(s, r) for s, r in results if not r["error"]]
    training = [(s, r) for s, r in ok if s.kernel in TRAINING]
    lines = [
        f"# Kernel specialisations compiled for sm_{arch} ({DEVICE_NAMES[arch]})", "",
        f"triton {triton.__version__}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; compiled, not run (no GPU): "
        f"`python -m benchmarks.compile_report --arch {arch}`. Registers and spill stores from "
        f"`ptxas -v`, shared memory from the kernel's metadata (limit "
        f"{SMEM_LIMIT[arch] // 1024} KB per block), tensor-core instructions from the PTX.", "",
        f"{len(results)} specialisations, {len(results) - len(ok)} failed to compile; "
        f"{sum(1 for _, r in ok if r['spill_bytes'])} spill "
        f"({sum(1 for _, r in training if r['spill_bytes'])} of them in training-path kernels).",
        "",
        "## Headline: training-path kernels", "",
        "Worst case per kernel and input dtype over the head dims 32-256 (and at d = 64, the "
        "model's):", "",
        "| kernel | dtype | regs max | spill B max | smem KB max | d=64 regs / spill B / smem KB |"
        " tensor cores |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: Dict[Tuple[str, str], List[Tuple[Spec, Dict]]] = {}
    for spec, row in training:
        groups.setdefault((spec.kernel, spec.dtype), []).append((spec, row))
    for (kernel, dtype), rows in groups.items():
        at64 = [r for s, r in rows if s.dim == 64]
        d64 = (f"{max(r['regs'] for r in at64)} / {max(r['spill_bytes'] for r in at64)} / "
               f"{max(r['smem_bytes'] for r in at64) / 1024:.0f}") if at64 else "-"
        mma = sorted({m for _, r in rows for m in r["mma"]})
        lines.append(
            f"| {kernel} | {dtype} | {max(r['regs'] for _, r in rows)} | "
            f"{max(r['spill_bytes'] for _, r in rows)} | "
            f"{max(r['smem_bytes'] for _, r in rows) / 1024:.0f} | {d64} | "
            f"{', '.join(mma) if mma else '-'} |")
    broken = problems(arch, results)
    lines += ["", "## Checks", ""]
    lines += [f"- {p}" for p in broken] or ["- every specialisation compiles, fits the shared "
                                            "memory, and uses tensor cores where its dtype allows; "
                                            "no unlisted spill in a training-path kernel"]
    lines += ["", "Spills allowed in training-path kernels:", ""]
    lines += [f"- {', '.join(k)} in {', '.join(t)} at d = {', '.join(map(str, d))}: {why}"
              for k, t, d, why in SPILL_EXCEPTIONS]
    lines += ["", "## Every specialisation", "",
              "| op | kernel | dtype | d | constexprs; warps, stages | regs | spill B | smem KB "
              "| mma |", "|---|---|---|---|---|---|---|---|---|"]
    for spec, row in results:
        if row["error"]:
            cells = f"error: {row['error']} | | | |"
        else:
            mma = ", ".join(row["mma"]) + (" (wgmma)" if row["wgmma"] else "") if row["mma"] \
                else "-"
            cells = (f"{row['regs']} | {row['spill_bytes']} | {row['smem_bytes'] / 1024:.1f} | "
                     f"{mma} |")
        lines.append(f"| {spec.op} | {spec.kernel} | {spec.dtype} | {spec.dim or '-'} | "
                     f"{spec.label()} | {cells}")
    return "\n".join(lines) + "\n"


def default_cache() -> Path:
    return Path(os.environ.get("S4REC_COMPILE_CACHE",
                               Path.home() / ".cache" / "s4rec-compile" / triton.__version__))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, choices=ARCHS, action="append",
                        help="compute capability (repeatable; default both)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for compile-sm<arch>[-TAG].md (default: a temporary folder)")
    parser.add_argument("--tag", default="", help="file-name suffix, e.g. triton3.6")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--cache", type=Path, default=None,
                        help="compile cache folder (default ~/.cache/s4rec-compile/<triton>)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="s4rec-compile-"))
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    for arch in args.arch or ARCHS:
        t0 = time.perf_counter()
        results = compile_all(arch, args.cache or default_cache(), args.jobs)
        text = render(arch, results)
        suffix = f"-{args.tag}" if args.tag else ""
        path = out / f"compile-sm{arch}{suffix}.md"
        path.write_text(text)
        head = text.split("## Every specialisation")[0]
        print(head)
        print(f"sm_{arch}: {len(results)} specialisations in {time.perf_counter() - t0:.0f} s; "
              f"report {path}")
        if problems(arch, results):
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
