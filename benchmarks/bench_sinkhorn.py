"""sinkhorn: the Triton kernels against eager PyTorch, torch.compile of it, and POT.

    python -m benchmarks.bench_sinkhorn [--quick] [--out DIR | --save]

Providers: "ours" (the Triton kernels; CUDA only, the interpreter is no speed reference),
"eager" (``reference.sinkhorn``), "compile" (``torch.compile`` of it) and "pot"
(``ot.bregman.sinkhorn_log`` with uniform marginals 1/B and 1/K and cost -scores, scaled by B;
only where POT is installed). Every provider's Q is checked against eager's before anything is
timed. Forward only (the op has no gradient).

Bandwidth floor: reading the scores once and writing Q once, B*K*(itemsize + 4) bytes, at the
device's peak memory bandwidth; "floor fraction" is floor time / measured time (1 = at the floor).
Peak bandwidths used: H100 3.35e12 B/s (the SXM part's figure, used for every H100), H200
4.8e12 B/s; left blank for other devices and on CPU.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

import s4rec_kernels
from benchmarks._harness import (check_agree, compiled, device_label, op_parser, parse_shapes,
                                 peak_extra_mb, time_ms, write_table)
from s4rec_kernels import _dispatch, reference

OP = "sinkhorn"
EPS = 0.05
N_ITERS = (3, 10)
SHAPES = [(512, 128), (4096, 1024), (65536, 4096)]
QUICK_SHAPES = [(512, 128), (4096, 1024)]
CPU_SHAPES = [(512, 128)]
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes per second
COLUMNS = ["shape", "n_iters", "provider", "median_us", "p20_us", "p80_us", "floor_fraction",
           "speedup_vs_eager", "peak_extra_mib"]
NOTE = ("Forward, eps = 0.05, float32 scores. floor_fraction = (B*K*(4 + 4) bytes / peak "
        "bandwidth) / median; peak bandwidth H100 3.35e12 B/s (SXM), H200 4.8e12 B/s, blank "
        "elsewhere. speedup_vs_eager = eager median / median.")


def peak_bandwidth(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = device_label(device)
    for key, value in PEAK_BANDWIDTH.items():
        if key in name:
            return value
    return None


def pot_provider() -> Optional[Callable]:
    """POT's log-domain Sinkhorn as a provider with our signature, or None without POT."""
    try:
        import ot
    except ImportError:
        return None

    def pot_sinkhorn(scores: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
        n_rows, n_cols = scores.shape
        rows = torch.full((n_rows,), 1.0 / n_rows, dtype=scores.dtype, device=scores.device)
        cols = torch.full((n_cols,), 1.0 / n_cols, dtype=scores.dtype, device=scores.device)
        # same order as SwAV: columns to 1/K, then rows to 1/B, n_iters times
        plan = ot.bregman.sinkhorn_log(rows, cols, -scores, eps, numItermax=n_iters,
                                       stopThr=0.0, warn=False)
        return plan * n_rows

    return pot_sinkhorn


def providers(device: torch.device) -> Dict[str, Callable]:
    found: Dict[str, Callable] = {}
    if device.type == "cuda" and _dispatch.triton_impl(OP) is not None:
        found["ours"] = lambda s, eps, n: s4rec_kernels.sinkhorn(s, eps, n, backend="triton")
    found["eager"] = reference.sinkhorn
    compiled_fn = compiled(reference.sinkhorn)
    if compiled_fn is not None:
        found["compile"] = compiled_fn
    pot = pot_provider()
    if pot is not None:
        found["pot"] = pot
    return found


def bench_shape(shape, n_iters: int, device: torch.device, fns: Dict[str, Callable]) -> List[Dict]:
    n_rows, n_cols = shape
    scores = make_scores(shape, device)  # (B, K)

    outputs, usable = {}, {}
    for name, fn in fns.items():
        try:
            outputs[name] = fn(scores, EPS, n_iters)
            usable[name] = fn
        except Exception as err:  # a provider that cannot run here is reported, not fatal
            print(f"{name} skipped at {shape}, n_iters={n_iters}: {type(err).__name__}: {err}")
    check_agree(outputs, "eager", rtol=1e-4, atol=1e-6)
    del outputs

    bandwidth = peak_bandwidth(device)
    floor_s = (n_rows * n_cols * (scores.element_size() + 4) / bandwidth) if bandwidth else None
    timed = {}
    for name, fn in usable.items():
        call = lambda fn=fn: fn(scores, EPS, n_iters)  # noqa: E731
        timed[name] = time_ms(call, device, rep=10, min_seconds=0.5)
        timed[name]["peak"] = peak_extra_mb(call, device)
    rows = []
    for name, t in timed.items():
        median_s = t["median_ms"] * 1e-3
        rows.append({
            "shape": f"{n_rows}x{n_cols}", "n_iters": n_iters, "provider": name,
            "median_us": t["median_ms"] * 1e3, "p20_us": t["p20_ms"] * 1e3,
            "p80_us": t["p80_ms"] * 1e3,
            "floor_fraction": floor_s / median_s if floor_s else None,
            "speedup_vs_eager": timed["eager"]["median_ms"] / t["median_ms"],
            "peak_extra_mib": t["peak"],
        })
    return rows


def make_scores(shape, device: torch.device) -> torch.Tensor:
    """Cosine scores (B, K) of random unit users and prototypes, as in the clustering loss."""
    n_rows, n_cols = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(n_rows, 64, generator=g), dim=1)
    mu = torch.nn.functional.normalize(torch.randn(n_cols, 64, generator=g), dim=1)
    return (z @ mu.t()).to(device)


def cases(quick: bool) -> List[Tuple[str, Callable[[], Callable[[], object]]]]:
    """(id, make) pairs for pytest-benchmark: make() builds the inputs and returns the call."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = CPU_SHAPES if device.type == "cpu" else (QUICK_SHAPES if quick else SHAPES)
    fns = providers(device)
    out = []
    for shape in shapes:
        for n_iters in N_ITERS:
            for name, fn in fns.items():
                def make(shape=shape, n_iters=n_iters, fn=fn):
                    scores = make_scores(shape, device)
                    return lambda: fn(scores, EPS, n_iters)
                out.append((f"{shape[0]}x{shape[1]}-it{n_iters}-{name}", make))
    return out


def run(quick: bool, out_dir=None, shapes: Optional[List[Tuple[int, int]]] = None) -> List[Dict]:
    """Benchmark every shape and n_iters on this machine's device; print and write the table."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if shapes is None:
        shapes = CPU_SHAPES if device.type == "cpu" else (QUICK_SHAPES if quick else SHAPES)
    fns = providers(device)
    rows: List[Dict] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for shape in shapes:
            for n_iters in N_ITERS:
                rows += bench_shape(shape, n_iters, device, fns)
    write_table(OP, rows, COLUMNS, device, Path(out_dir) if out_dir else None, note=NOTE)
    return rows


def main() -> None:
    parser = op_parser(
        __doc__.splitlines()[0], "comma-separated BxK shapes instead of the default list",
        quick_help="skip the largest shape (on CPU only the small one runs anyway)")
    args = parser.parse_args()
    run(args.quick, args.out, parse_shapes(args.shapes) if args.shapes else None)


if __name__ == "__main__":
    main()
