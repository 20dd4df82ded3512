"""Every kernel specialisation the ops can launch compiles for sm_80 and sm_90, on any machine.

The specialisations come from the launchers' settings functions (see benchmarks/compile_report.py):
every tile-table entry, dtype, head dim and constexpr flag a launch can pick. Compiling needs no
GPU (triton lowers to PTX and runs the ptxas its wheel ships); results are cached by the kernels'
source hash, so only changed kernels recompile (cache: ~/.cache/s4rec-compile, or
$S4REC_COMPILE_CACHE).
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import compile_report as cr  # noqa: E402
from s4rec_kernels import _item_common  # noqa: E402

# which mma operand kinds each input dtype's GEMMs must use
MMA_KIND = {"bf16": "bf16", "fp16": "f16", "fp32/tf32": "tf32", "fp32/tf32x3": "tf32",
            "fp32": "tf32"}


@pytest.fixture(scope="module", params=cr.ARCHS, ids=lambda a: f"sm{a}")
def compiled(request):
    arch = request.param
    jobs = int(os.environ.get("S4REC_COMPILE_JOBS", min(2, os.cpu_count() or 1)))
    return arch, cr.compile_all(arch, cr.default_cache(), jobs)


def _where(arch, spec):
    return f"sm_{arch} {spec.kernel} {spec.dtype} d={spec.dim} [{spec.label()}]"


def test_every_specialisation_compiles(compiled):
    arch, results = compiled
    specs = cr.specialisations(arch)
    assert len(results) == len(specs) and {s.op for s, _ in results} == {
        "item_softmax_ce", "item_rank", "item_topk", "info_nce_proto", "sinkhorn"}
    failed = [f"{_where(arch, s)}: {r['error']}" for s, r in results if r["error"]]
    assert not failed, "\n".join(failed)


def test_shared_memory_within_the_device_limit(compiled):
    arch, results = compiled
    over = [f"{_where(arch, s)}: {r['smem_bytes']} B" for s, r in results
            if not r["error"] and r["smem_bytes"] > cr.SMEM_LIMIT[arch]]
    assert not over, "\n".join(over)


def test_gemms_use_tensor_cores_where_the_dtype_allows(compiled):
    arch, results = compiled
    missing, checked = [], 0
    for spec, row in results:
        if row["error"] or not cr.expects_tensor_cores(spec):
            continue
        checked += 1
        # InfoNCE loads every input as fp32 and takes its dots at QK_PRECISION (tf32 or 3xTF32)
        want = "tf32" if spec.op == "info_nce_proto" else MMA_KIND[spec.dtype]
        if want not in row["mma"]:
            missing.append(f"{_where(arch, spec)}: mma kinds {row['mma']}, expected {want}")
    assert checked == sum(cr.expects_tensor_cores(s) for s, _ in results) > 0
    assert {"bf16", "fp16", "fp32/tf32"} <= {s.dtype for s, _ in results if cr.expects_tensor_cores(s)}
    assert not missing, "\n".join(missing)


def test_true_fp32_dots_stay_off_tensor_cores(compiled):
    """fp32 at torch's default precision ("highest") must be exact fp32, as eager's matmul."""
    arch, results = compiled
    wrong = [_where(arch, s) for s, r in results
             if not r["error"] and s.kernel in cr.GEMM and s.dtype == "fp32/ieee" and r["mma"]]
    assert not wrong, "\n".join(wrong)


def test_no_spills_in_training_kernels_outside_the_listed_exceptions(compiled):
    arch, results = compiled
    spills = [p for p in cr.problems(arch, results) if " spills " in p]
    assert not spills, "\n".join(spills)


def test_the_list_covers_every_tile_table_entry_and_flag():
    """A specialisation list that misses a tile or a flag value would pass the tests above
    without compiling what launches run."""
    specs = cr.specialisations(90)
    seen = {(s.kernel, tuple((k, v) for k, v in s.meta
                             if k in ("BLOCK_N", "BLOCK_V", "BLOCK_U", "BLOCK_D")),
             s.num_warps, s.num_stages) for s in specs + cr.specialisations(80)}
    tables = {"_ce_fwd_kernel": (_item_common.CE_FWD_TILES, "BLOCK_N"),
              "_ce_bwd_dh_kernel": (_item_common.CE_DH_TILES, "BLOCK_N"),
              "_ce_bwd_de_kernel": (_item_common.CE_DE_TILES, "BLOCK_N"),
              "_topk_kernel": (_item_common.TOPK_TILES, "BLOCK_U")}
    for kernel, (table, rows) in tables.items():
        for kind, entries in table.items():
            for block_d in cr.HEAD_DIMS:
                if block_d not in entries:  # the sm_80 replacements name a few
                    continue
                block_r, block_v, warps, stages = entries[block_d]
                assert (kernel, ((rows, block_r), ("BLOCK_V", block_v), ("BLOCK_D", block_d)),
                        warps, stages) in seen, (kernel, kind, block_d)
    flags = {}
    for spec in specs:
        for key, value in spec.meta:
            if isinstance(value, bool):
                flags.setdefault((spec.kernel, key), set()).add(value)
    one_sided = {k: v for k, v in flags.items() if v != {False, True}}
    # the single-program Sinkhorn kernel has no flag but NO_ITERS; TRANS_LOGITS is True only for
    # true-fp32 dots, which the list has
    assert not one_sided, one_sided
    kinds = {s.dtype for s in specs if s.kernel == "_ce_fwd_kernel"}
    assert kinds == {"bf16", "fp16", "fp32/ieee", "fp32/tf32x3", "fp32/tf32"}
