"""The steps of benchmarks/gpu_check.sh, one per call, each appending its measurements to
``OUT/gpu_check.jsonl`` the moment it makes them (one JSON object per line, flushed and fsynced),
so a step killed by its time limit loses nothing it had measured.

    python -m benchmarks.gpu_check STEP --out OUT [--rehearse] [--provider NAME]

Steps: env, smoke, accuracy, kernels, peers (one --provider at a time), dist, summary. With
``--rehearse`` every step runs at tiny shapes on the CPU, the kernels in Triton's interpreter
(TRITON_INTERPRET=1): how the script is kept working without a GPU. The module is also a pytest
plugin (``-p benchmarks.gpu_check``) that appends one row per test outcome when
GPU_CHECK_JSONL names the file.

Every row has ``step``, ``name`` and ``ok`` (True, False, or None for a measurement without a
verdict); errors are rows with ``ok: false`` and the message, never a stop.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Device floors by the name the device reports: HBM bytes/s; dense bf16 tensor-core FLOP/s;
# exp2 per second (132 SMs x 16 MUFU ex2 per clock x 1.83 GHz). H100 figures are the SXM part's.
HBM = {"H200": 4.8e12, "H100": 3.35e12}
BF16_FLOPS = {"H200": 989e12, "H100": 989e12}
EXP_RATE = {"H200": 3.9e12, "H100": 3.9e12}
# Peer providers: the most items each is run at (Liger re-reads the item table per chunk of rows;
# eager and torch.compile write the (N, V) logits in fp32, several copies)
PROVIDER_MAX_ITEMS = {"liger": 262_144, "eager": None, "compiled": None, "cce": None,
                      "ours": None}
MAX_EAGER_LOGITS = 2**31  # eager / compiled: N x V at most this (8 GB of fp32 logits a copy)


# ----------------------------------------------------------------------------------------------
# The JSONL writer
# ----------------------------------------------------------------------------------------------


class Log:
    """Appends rows to a JSONL file, one write + flush + fsync per row, and echoes them."""

    def __init__(self, path: Path, step: str):
        self.path, self.step = Path(path), step
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def row(self, name: str, ok: Optional[bool] = None, **fields) -> Dict:
        row = {"t": round(time.time(), 3), "step": self.step, "name": name, "ok": ok, **fields}
        line = json.dumps(row, default=str) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one write of the whole line: never half a row
            os.fsync(fd)
        finally:
            os.close(fd)
        print(("   " if ok is None else "ok " if ok else "BAD") + " " + line.strip(), flush=True)
        return row

    @contextlib.contextmanager
    def attempt(self, name: str, **fields) -> Iterator[Dict]:
        """Run a block; an exception becomes a row with ok=False and the error, not a stop."""
        extra: Dict = {}
        t0 = time.perf_counter()
        try:
            yield extra
        except Exception as err:  # every failure is a result of the check
            self.row(name, False, error=f"{type(err).__name__}: {err}"[:2000],
                     trace=traceback.format_exc(limit=4)[-1500:], **fields)
        else:
            if extra.pop("_skip_row", False):
                return
            ok = extra.pop("ok", True)
            self.row(name, ok, seconds=round(time.perf_counter() - t0, 3), **fields, **extra)


# ----------------------------------------------------------------------------------------------
# Shared set-up
# ----------------------------------------------------------------------------------------------


def _device(rehearse: bool):
    import torch

    if rehearse:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --rehearse on a CPU)")
    return torch.device("cuda")


def _device_key(device) -> Optional[str]:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((k for k in HBM if k in name), None)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable, device, rehearse: bool) -> Dict[str, float]:
    """Median and 20th/80th percentile in ms (CUDA: do_bench; rehearsal: one call)."""
    if rehearse:
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return {"median_ms": ms, "p20_ms": ms, "p80_ms": ms}
    from triton.testing import do_bench

    q50, q20, q80 = do_bench(fn, warmup=5, rep=40, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": q50, "p20_ms": q20, "p80_ms": q80}


def _ops():
    return importlib.import_module("s4rec_kernels")


def _modules():
    return [importlib.import_module(f"s4rec_kernels.{m}") for m in (
        "sinkhorn", "info_nce", "item_softmax", "_item_softmax_bwd", "item_ranking")]


def _compiled_kernels() -> Dict[Tuple[str, str], object]:
    """Every compiled kernel the jit functions of the op modules hold: (kernel, key) -> kernel."""
    found = {}
    for module in _modules():
        for name, fn in vars(module).items():
            caches = getattr(fn, "device_caches", None)
            if not name.endswith("_kernel") or caches is None:
                continue
            for cache in caches.values():
                for key, kernel in cache[0].items():
                    found[(name, str(key))] = kernel
    return found


# ----------------------------------------------------------------------------------------------
# Step: env
# ----------------------------------------------------------------------------------------------

IMPORTS = ("torch", "triton", "numpy", "tqdm", "pytest", "hypothesis", "s4rec", "s4rec_kernels",
           "liger_kernel", "cut_cross_entropy", "ot")
REQUIRED = {"torch", "triton", "numpy", "tqdm", "pytest", "hypothesis", "s4rec",
            "s4rec_kernels"}


def step_env(log: Log, rehearse: bool) -> None:
    smi = shutil.which("nvidia-smi")
    if smi:
        with log.attempt("nvidia-smi") as out:
            res = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20)
            out.update(output=res.stdout.strip(), ok=res.returncode == 0)
    else:
        log.row("nvidia-smi", None if rehearse else False, output="not found")
    log.row("python", None, version=platform.python_version(), executable=sys.executable)
    for name in IMPORTS:
        try:
            module = importlib.import_module(name)
            log.row(f"import {name}", True, version=getattr(module, "__version__", None),
                    path=getattr(module, "__file__", None))
        except Exception as err:  # absent optional peers are results too
            log.row(f"import {name}", False if name in REQUIRED else None,
                    error=f"{type(err).__name__}: {err}", required=name in REQUIRED)
    import torch

    log.row("cuda", None if rehearse else torch.cuda.is_available(),
            available=torch.cuda.is_available(), torch_cuda=torch.version.cuda,
            device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            capability=(torch.cuda.get_device_capability() if torch.cuda.is_available()
                        else None))
    cache = os.environ.get("TRITON_CACHE_DIR")
    log.row("TRITON_CACHE_DIR", bool(cache), path=cache,
            interpret=os.environ.get("TRITON_INTERPRET"))


# ----------------------------------------------------------------------------------------------
# Step: smoke (compile and launch every kernel once, tiny shapes)
# ----------------------------------------------------------------------------------------------


def _smoke_cases(device):
    """(name, call) for every kernel path at a tiny shape."""
    import torch

    ops = _ops()
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def ce(n, v, d, dtype, ignored=False):
        def call():
            h = rnd(n, d, dtype=dtype).requires_grad_(True)
            e = rnd(v, d, dtype=dtype).requires_grad_(True)
            t = torch.randint(0, v, (n,), generator=g).to(device)
            if ignored:
                t[::3] = -100
            loss = ops.item_softmax_ce(h, e, t, backend="triton")
            loss.backward()
            return float(loss)
        return call

    def nce(b, k, d, dtype):
        def call():
            z1, z2, p = (rnd(n, d, dtype=dtype).requires_grad_(True) for n in (b, b, k))
            a = torch.randint(0, k, (b,), generator=g).to(device)
            loss = ops.info_nce_proto(z1, z2, p, a, 0.5, backend="triton")
            loss.backward()
            return float(loss)
        return call

    def sink(b, k, iters):
        return lambda: float(ops.sinkhorn(rnd(b, k), 0.05, iters, backend="triton").sum())

    def rank(u, v, d, exclude):
        def call():
            indptr = torch.arange(0, 2 * u + 1, 2) if exclude else torch.zeros(u + 1)
            indices = torch.randint(0, v, (2 * u if exclude else 0,), generator=g)
            return int(ops.item_rank(rnd(u, d), rnd(v, d), torch.randint(0, v, (u,), generator=g)
                                     .to(device), indptr.long().to(device),
                                     indices.to(device), backend="triton").sum())
        return call

    def topk(u, v, d, k, dtype):
        return lambda: float(ops.item_topk(rnd(u, d, dtype=dtype), rnd(v, d, dtype=dtype), k,
                                           backend="triton")[0].sum())

    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        short = str(dtype).split(".")[1]
        cases += [(f"item_softmax_ce {short} 37x301x64", ce(37, 301, 64, dtype)),
                  (f"item_softmax_ce {short} ignored rows", ce(37, 301, 64, dtype, True)),
                  (f"info_nce_proto {short} B=19 K=7 d=64", nce(19, 7, 64, dtype)),
                  (f"item_topk {short} k=10", topk(23, 301, 64, 10, dtype))]
    cases += [("item_softmax_ce float32 d=256", ce(37, 301, 256, torch.float32)),
              ("info_nce_proto float64", nce(19, 7, 32, torch.float64)),
              ("sinkhorn one program", sink(50, 13, 3)),
              ("sinkhorn one program n_iters=0", sink(50, 13, 0)),
              ("sinkhorn multi-program", sink(300, 301, 3)),
              ("sinkhorn multi-program wide rows", sink(9, 5000, 2)),
              ("item_rank", rank(23, 301, 64, False)),
              ("item_rank exclusions", rank(23, 301, 64, True)),
              ("item_topk k=128", topk(23, 301, 64, 128, torch.float32))]
    return cases


def step_smoke(log: Log, rehearse: bool) -> None:
    device = _device(rehearse)
    for name, call in _smoke_cases(device):
        before = set(_compiled_kernels())
        with log.attempt(name) as out:
            value = call()
            _sync(device)
            out["value"] = value
            out["ok"] = math.isfinite(value)
        if rehearse:
            continue
        for (kernel, key), compiled in _compiled_kernels().items():
            if (kernel, key) in before:
                continue
            with log.attempt(f"{name}: {kernel}") as out:
                out.update(kernel=kernel, regs=getattr(compiled, "n_regs", None),
                           spills=getattr(compiled, "n_spills", None),
                           smem=compiled.metadata.shared,
                           num_warps=compiled.metadata.num_warps,
                           num_stages=compiled.metadata.num_stages)


# ----------------------------------------------------------------------------------------------
# Step: accuracy against a chunked float64 reference
# ----------------------------------------------------------------------------------------------


def ce_reference64(hidden, items, targets, ignore_index=-100, chunk_scores=2**26):
    """item_softmax_ce's mean loss and its gradients in float64, a block of rows at a time
    (never the whole (N, V) logits): (loss, grad_hidden, grad_items, row losses)."""
    import torch

    h, e = hidden.detach().double(), items.detach().double()
    n_rows = h.shape[0]
    active = targets != ignore_index
    count = int(active.sum())
    grad_h, grad_e = torch.zeros_like(h), torch.zeros_like(e)
    rows_loss = torch.zeros(n_rows, dtype=torch.float64, device=h.device)
    step = max(1, chunk_scores // e.shape[0])
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        t = targets[start:stop]
        keep = active[start:stop]
        logits = h[start:stop] @ e.t()
        lse = torch.logsumexp(logits, dim=1)
        safe_t = torch.where(keep, t, 0)
        rows_loss[start:stop] = torch.where(
            keep, lse - logits.gather(1, safe_t[:, None])[:, 0], 0.0)
        p = torch.exp(logits - lse[:, None])
        p[torch.arange(stop - start, device=h.device), safe_t] -= 1.0
        p *= keep[:, None].double() / max(count, 1)
        grad_h[start:stop] = p @ e
        grad_e += p.t() @ h[start:stop]
        del logits, p
    return rows_loss.sum() / max(count, 1), grad_h, grad_e, rows_loss


def _rel(got, want) -> float:
    """Largest error relative to the reference's largest entry."""
    scale = float(want.abs().max()) or 1.0
    return float((got.double() - want.double()).abs().max()) / scale


def _ce_inputs(n, v, d, dtype, device, seed=0, ignored=0.0):
    import torch

    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * d ** -0.25).to(device=device, dtype=dtype)
    e = (torch.randn(v, d, generator=g) * d ** -0.25).to(device=device, dtype=dtype)
    t = torch.randint(0, v, (n,), generator=g)
    if ignored:
        t[torch.rand(n, generator=g) < ignored] = -100
    return h.requires_grad_(True), e.requires_grad_(True), t.to(device)


def _ce_errors(fn, h, e, t) -> Dict[str, float]:
    import torch

    loss = fn(h, e, t)
    gh, ge = torch.autograd.grad(loss, (h, e))
    ref, rh, re, _ = ce_reference64(h, e, t)
    return {"loss": float(loss), "loss_err": abs(float(loss) - float(ref)),
            "grad_hidden_err": _rel(gh, rh), "grad_items_err": _rel(ge, re)}


@contextlib.contextmanager
def _matmul_precision(value: str):
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# Our error against float64 may exceed eager's own error in the same dtype by at most this
# margin, relative to the largest entry: one unit in the last place of the dtype's mantissa
# (bf16 8 bits, fp16 and tf32 11), 1e-5 for fp32 and 3xTF32
MARGIN = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "tf32": 2.0**-11, "tf32x3": 1e-5,
          "float32": 1e-5}


def step_accuracy(log: Log, rehearse: bool) -> None:
    import torch

    ops = _ops()
    device = _device(rehearse)
    ours = lambda h, e, t: ops.item_softmax_ce(h, e, t, backend="triton")  # noqa: E731
    eager = lambda h, e, t: importlib.import_module(  # noqa: E731
        "s4rec_kernels.reference").item_softmax_ce(h, e, t)
    n, v, d = (67, 301, 32) if rehearse else (4099, 50_007, 64)
    cases = [("float32", torch.float32, "highest", 0.0,
              "fp32 (true fp32 dots; grad_items by the transposed-logits branch on CUDA)"),
             ("float32 ignored rows", torch.float32, "highest", 0.3, "30% of rows ignored"),
             ("tf32x3", torch.float32, "high", 0.0, "fp32 inputs, 3xTF32 dots"),
             ("tf32", torch.float32, "medium", 0.0, "fp32 inputs, TF32 dots"),
             ("bfloat16", torch.bfloat16, "highest", 0.0, "bf16 inputs"),
             ("float16", torch.float16, "highest", 0.0, "fp16 inputs")]
    for name, dtype, precision, ignored, what in cases:
        with log.attempt(f"item_softmax_ce {name}", N=n, V=v, d=d, what=what) as out:
            h, e, t = _ce_inputs(n, v, d, dtype, device, ignored=ignored)
            with _matmul_precision(precision):
                got = _ce_errors(ours, h, e, t)
                base = _ce_errors(eager, h, e, t)
            out.update(got, eager_loss_err=base["loss_err"],
                       eager_grad_hidden_err=base["grad_hidden_err"],
                       eager_grad_items_err=base["grad_items_err"])
            margin = MARGIN[name.split()[0]]
            out["ok"] = all(got[k] <= base[k] + margin
                            for k in ("loss_err", "grad_hidden_err", "grad_items_err"))

    big = (16, 4099, 32) if rehearse else (2200, 1_000_003, 64)
    with log.attempt("item_softmax_ce bf16 past 2**31 logits" + (" (small in rehearsal)"
                                                                  if rehearse else ""),
                     N=big[0], V=big[1], d=big[2], logits=big[0] * big[1]) as out:
        h, e, t = _ce_inputs(*big, torch.bfloat16, device, seed=3)
        got = _ce_errors(ours, h, e, t)
        out.update(got)
        out["ok"] = max(got["loss_err"], got["grad_hidden_err"], got["grad_items_err"]) < 2e-2
        del h, e, t

    with log.attempt("item_softmax_ce bitwise determinism (bf16, two runs)") as out:
        h, e, t = _ce_inputs(n, v, d, torch.bfloat16, device, seed=5)
        runs = []
        for _ in range(2):
            loss = ours(h, e, t)
            runs.append((loss.detach(), *torch.autograd.grad(loss, (h, e))))
        same = [bool(torch.equal(a, b)) for a, b in zip(*runs)]
        out.update(loss_same=same[0], grad_hidden_same=same[1], grad_items_same=same[2],
                   ok=all(same))

    with log.attempt("item_softmax_ce confident rows: d loss / d target logit = p - 1") as out:
        # items = scaled basis vectors, so grad_hidden[n] = scale (p_n - onehot): its target
        # component is scale (p_t - 1), against float64's p_t - 1 (row losses 1e-1 to 1e-7)
        dim, scale = 64, 20.0
        items = (torch.eye(dim) * scale).to(device)
        targets = torch.arange(dim, device=device)
        hidden = (torch.eye(dim) * torch.linspace(0.3, 1.0, dim)[:, None]).to(device)
        hidden.requires_grad_(True)
        rows = ops.item_softmax_ce(hidden, items, targets, reduction="none", backend="triton")
        (grad,) = torch.autograd.grad(rows.sum(), hidden)
        got = grad[targets, targets].double() / scale
        p64 = torch.softmax(hidden.detach().double() @ items.double().t(), dim=1)
        want = p64[targets, targets] - 1.0
        err = float((got - want).abs().max())
        out.update(min_row_loss=float(rows.min()), max_row_loss=float(rows.max()),
                   max_abs_err=err, ok=err < 4 * 2.0**-23 and bool((got <= 0).all()))

    nb, nk, nd = (23, 9, 32) if rehearse else (4096, 128, 64)
    reference = importlib.import_module("s4rec_kernels.reference")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        with log.attempt(f"info_nce_proto {str(dtype)[6:]}", B=nb, K=nk, d=nd) as out:
            g = torch.Generator().manual_seed(1)
            base = [torch.nn.functional.normalize(torch.randn(m, nd, generator=g), dim=1)
                    for m in (nb, nb, nk)]
            assign = torch.randint(0, nk, (nb,), generator=g).to(device)
            ins = [x.to(device=device, dtype=dtype).requires_grad_(True) for x in base]
            ref_in = [x.detach().double().requires_grad_(True) for x in ins]
            loss = ops.info_nce_proto(*ins, assign, 0.3, backend="triton")
            grads = torch.autograd.grad(loss, ins)
            ref = reference.info_nce_proto(*ref_in, assign, 0.3)
            ref_grads = torch.autograd.grad(ref, ref_in)
            eager = reference.info_nce_proto(*ins, assign, 0.3)  # eager in the same dtype
            eager_grads = torch.autograd.grad(eager, ins)
            errs = [_rel(a, b) for a, b in zip(grads, ref_grads)]
            eager_errs = [_rel(a, b) for a, b in zip(eager_grads, ref_grads)]
            loss_err = abs(float(loss) - float(ref))
            margin = MARGIN[str(dtype)[6:]]
            out.update(loss_err=loss_err, grad_errs=errs, eager_loss_err=abs(float(eager) -
                       float(ref)), eager_grad_errs=eager_errs,
                       ok=loss_err <= abs(float(eager) - float(ref)) + margin and all(
                           a <= b + margin for a, b in zip(errs, eager_errs)))

    sb, sk = (50, 13) if rehearse else (4096, 1024)
    with log.attempt("sinkhorn float32", B=sb, K=sk) as out:
        scores = torch.randn(sb, sk, generator=torch.Generator().manual_seed(2)).to(device)
        q = ops.sinkhorn(scores, 0.05, 3, backend="triton")
        ref = reference.sinkhorn(scores.double(), 0.05, 3)
        err = _rel(q, ref)
        out.update(max_rel_err=err, ok=err < 1e-4)

    ru, rv, rd = (23, 301, 32) if rehearse else (1024, 100_003, 64)
    with log.attempt("item_rank and item_topk against the reference", U=ru, V=rv, d=rd) as out:
        g = torch.Generator().manual_seed(4)
        hu, it = torch.randn(ru, rd, generator=g).to(device), torch.randn(rv, rd, generator=g).to(device)
        tg = torch.randint(0, rv, (ru,), generator=g).to(device)
        indptr = torch.arange(0, 3 * ru + 1, 3).to(device)
        indices = torch.randint(0, rv, (3 * ru,), generator=g).to(device)
        got = ops.item_rank(hu, it, tg, indptr, indices, backend="triton")
        want = reference.item_rank(hu, it, tg, indptr, indices)
        _, top_got = ops.item_topk(hu, it, 10, indptr, indices, backend="triton")
        _, top_want = reference.item_topk(hu, it, 10, indptr, indices)
        rank_diff = int((got != want).sum())
        top_diff = int((top_got != top_want).any(dim=1).sum())
        out.update(rank_mismatches=rank_diff, topk_row_mismatches=top_diff,
                   ok=rank_diff == 0 and top_diff == 0)


# ----------------------------------------------------------------------------------------------
# Step: kernels (ours alone at the stated shapes, against the device's floors)
# ----------------------------------------------------------------------------------------------


def _floors(device, bytes_moved: float, flops: float, exps: float) -> Dict[str, Optional[float]]:
    key = _device_key(device)
    if key is None:
        return {"floor_ms": None, "floor": None}
    parts = {"hbm": bytes_moved / HBM[key], "flops": flops / BF16_FLOPS[key],
             "exp": exps / EXP_RATE[key]}
    which = max(parts, key=parts.get)
    return {"floor_ms": parts[which] * 1e3, "floor": which}


def _measure(log: Log, name: str, fn: Callable, device, rehearse: bool,
             bytes_moved: float, flops: float, exps: float, **fields) -> None:
    with log.attempt(name, **fields) as out:
        fn()  # compile and warm up
        _sync(device)
        out.update(_time_ms(fn, device, rehearse))
        out.update(_floors(device, bytes_moved, flops, exps))
        if out["floor_ms"]:
            out["of_floor"] = out["floor_ms"] / out["median_ms"]
        out["ok"] = None


def step_kernels(log: Log, rehearse: bool) -> None:
    import torch

    ops = _ops()
    device = _device(rehearse)
    ce_shapes = [(64, 500, 32)] if rehearse else [(8192, 1_000_000, 64), (8192, 10_000_000, 64)]
    for n, v, d in ce_shapes:
        for label, dtype, precision in (("bf16", torch.bfloat16, "highest"),
                                        ("tf32", torch.float32, "medium")):
            with _matmul_precision(precision):
                try:
                    h, e, t = _ce_inputs(n, v, d, dtype, device, seed=7)
                except Exception as err:  # e.g. out of memory: a result
                    log.row(f"item_softmax_ce {label} {n}x{v}x{d}", False, error=str(err))
                    continue
                size = v * d * h.element_size()
                fwd = lambda: ops.item_softmax_ce(h, e, t, backend="triton")  # noqa: E731
                graph = fwd()
                modes = {"forward": (fwd, 1, 1, size),
                         "backward": (lambda: torch.autograd.grad(graph, (h, e),
                                                                  retain_graph=True), 4, 2, 3 * size),
                         "forward+backward": (lambda: torch.autograd.grad(fwd(), (h, e)), 5, 3,
                                              4 * size)}
                for mode, (call, gemms, exp_passes, moved) in modes.items():
                    _measure(log, f"item_softmax_ce {label} {mode}", call, device, rehearse,
                             moved, gemms * 2.0 * n * v * d, exp_passes * n * v,
                             N=n, V=v, d=d, dtype=label, mode=mode)
                h = e = t = graph = modes = None  # free them (the lambdas close over them)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    for b, k in ([(50, 13), (300, 301)] if rehearse else [(512, 128), (4096, 1024)]):
        scores = torch.randn(b, k, device=device)
        _measure(log, f"sinkhorn {b}x{k}", lambda: ops.sinkhorn(scores, 0.05, 3, backend="triton"),
                 device, rehearse, b * k * 8, 0.0, 4.0 * b * k, B=b, K=k, n_iters=3)
    for b in ([19, 40] if rehearse else [512, 4096, 65536]):
        k, d = (7, 32) if rehearse else (128, 64)
        for label, dtype in (("bf16", torch.bfloat16), ("fp32 (3xTF32)", torch.float32)):
            z1, z2, p = (torch.randn(m, d, device=device, dtype=dtype).requires_grad_(True)
                         for m in (b, b, k))
            a = torch.randint(0, k, (b,), device=device)
            logits = 2.0 * b * (2 * b + k)
            fwd = lambda: ops.info_nce_proto(z1, z2, p, a, 0.5, backend="triton")  # noqa: E731
            both = lambda: torch.autograd.grad(fwd(), (z1, z2, p))  # noqa: E731
            for mode, call, gemms, passes in (("forward", fwd, 1, 1),
                                              ("forward+backward", both, 5, 3)):
                _measure(log, f"info_nce_proto {label} B={b} {mode}", call, device, rehearse,
                         (2 * b + k) * d * z1.element_size() * passes, gemms * 2 * logits * d,
                         passes * logits, B=b, K=k, d=d, dtype=label, mode=mode)


# ----------------------------------------------------------------------------------------------
# Step: peers (one provider per call, each with its own time limit in gpu_check.sh)
# ----------------------------------------------------------------------------------------------


def _peer(name: str, rehearse: bool = False):
    """The loss function of provider ``name`` (hidden, items, targets) -> mean loss. In a
    rehearsal torch.compile traces with the "aot_eager" backend (no C++ compile on the CPU)."""
    import torch

    reference = importlib.import_module("s4rec_kernels.reference")
    if name == "ours":
        impl = _ops().item_softmax_ce
        return lambda h, e, t: impl(h, e, t, backend="triton")
    if name == "eager":
        return lambda h, e, t: reference.item_softmax_ce(h, e, t)
    if name == "compiled":
        fn = torch.compile(reference.item_softmax_ce,
                           backend="aot_eager" if rehearse else "inductor")
        return lambda h, e, t: fn(h, e, t)
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="mean")
        return lambda h, e, t: liger(e, h, t)
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, e, t: linear_cross_entropy(h, e, t)
    raise ValueError(f"unknown provider {name!r}")


def step_peers(log: Log, rehearse: bool, provider: str) -> None:
    module = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}.get(provider)
    if module and importlib.util.find_spec(module) is None:  # quick: torch is not imported
        log.row(f"item_softmax_ce {provider}", None if rehearse else False, provider=provider,
                error=f"{module} is not installed")
        return
    import torch

    device = _device(rehearse)
    shapes = ([(64, 500, 32)] if rehearse else
              [(4096, 12_101, 64), (8192, 262_144, 64), (8192, 1_000_000, 64),
               (8192, 10_000_000, 64)])
    try:
        fn = _peer(provider, rehearse)
    except Exception as err:  # not installed, or not on this device
        log.row(f"item_softmax_ce {provider}", None if rehearse else False,
                error=f"{type(err).__name__}: {err}", provider=provider)
        return
    limit = PROVIDER_MAX_ITEMS.get(provider)
    for n, v, d in shapes:
        if limit is not None and v > limit:
            log.row(f"item_softmax_ce {provider} {n}x{v}x{d}", None, provider=provider,
                    skipped=f"over this provider's limit of {limit} items")
            continue
        if provider in ("eager", "compiled") and n * v > MAX_EAGER_LOGITS:
            log.row(f"item_softmax_ce {provider} {n}x{v}x{d}", None, provider=provider,
                    skipped=f"N x V over {MAX_EAGER_LOGITS} logits")
            continue
        h, e, t = _ce_inputs(n, v, d, torch.bfloat16 if not rehearse else torch.float32,
                             device, seed=9)
        both = lambda: torch.autograd.grad(fn(h, e, t), (h, e))  # noqa: E731
        _measure(log, f"item_softmax_ce {provider} {n}x{v}x{d} forward+backward", both,
                 device, rehearse, 4 * v * d * h.element_size(), 5 * 2.0 * n * v * d,
                 3.0 * n * v, provider=provider, N=n, V=v, d=d, mode="forward+backward")
        h = e = t = both = None  # free them (the lambda closes over them)
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Step: dist (the torchrun trainer on this one GPU)
# ----------------------------------------------------------------------------------------------


def step_dist(log: Log, rehearse: bool) -> None:
    """The trainer's step under torchrun with one rank (W = 1) over NCCL, data parallel and
    --shard-items, each point its own launch (benchmarks/bench_dist.py); a rehearsal runs gloo on
    the CPU at V = 2000."""
    from benchmarks import bench_dist

    backend = "gloo" if rehearse else "nccl"
    for v in ([2000] if rehearse else [1_000_000, 10_000_000]):
        for mode in bench_dist.MODES:
            with log.attempt(f"dist W=1 V={v} {mode}", W=1, V=v, mode=mode) as out:
                res = bench_dist.spawn_point(1, v, mode, steps=1 if rehearse else 5,
                                             batch_size=64 if rehearse else 512, threads=1,
                                             backend=backend, mem_limit_gb=None,
                                             timeout_s=60 if rehearse else 45)
                out.update(res, ok=res["status"] == "ok")


# ----------------------------------------------------------------------------------------------
# Step: summary; the pytest plugin
# ----------------------------------------------------------------------------------------------


def read_rows(path: Path) -> List[Dict]:
    """The JSONL's rows (every line is a whole row: each was written by one write)."""
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def step_summary(log: Log, rehearse: bool) -> int:
    rows = read_rows(log.path)
    bad = [r for r in rows if r.get("ok") is False]
    steps = {}
    for r in rows:
        steps.setdefault(r["step"], [0, 0])
        steps[r["step"]][0] += 1
        steps[r["step"]][1] += r.get("ok") is False
    for step, (count, failed) in steps.items():
        print(f"{step:10s} {count:4d} rows, {failed} failed")
    for r in bad:
        print(f"FAILED {r['step']}: {r['name']}: {r.get('error', '')[:200]}")
    log.row("summary", not bad, rows=len(rows), failed=len(bad))
    return 1 if bad else 0


def pytest_runtest_logreport(report):
    """One row per test outcome (the call phase, or a failing/skipped setup or teardown)."""
    path = os.environ.get("GPU_CHECK_JSONL")
    if not path or (report.when != "call" and report.outcome == "passed"):
        return
    Log(Path(path), "tests").row(report.nodeid, {"passed": True, "failed": False}.get(
        report.outcome), outcome=report.outcome, when=report.when,
        seconds=round(report.duration, 3))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("env", "smoke", "accuracy", "kernels", "peers",
                                         "dist", "summary"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rehearse", action="store_true",
                        help="tiny shapes on the CPU, kernels in Triton's interpreter")
    parser.add_argument("--provider", default="eager", help="peers: the provider to run")
    args = parser.parse_args(argv)
    if args.rehearse:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
    log = Log(args.out / "gpu_check.jsonl", args.step)
    if args.step == "summary":
        return step_summary(log, args.rehearse)
    step = {"env": step_env, "smoke": step_smoke, "accuracy": step_accuracy,
            "kernels": step_kernels, "dist": step_dist}.get(args.step)
    if step is not None:
        step(log, args.rehearse)
    else:
        step_peers(log, args.rehearse, args.provider)
    return 0


if __name__ == "__main__":
    sys.exit(main())
