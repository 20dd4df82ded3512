"""info_nce_proto: the fused Triton kernels against eager PyTorch and torch.compile of it.

    python -m benchmarks.bench_info_nce [--quick] [--dtype float32|bfloat16] [--out DIR | --save]

Providers: "ours" (the Triton kernels, CUDA only), "eager" (``reference.info_nce_proto``) and
"compiled" (``torch.compile`` of it). Modes: forward, backward (of a retained graph) and
forward+backward, all with inputs that require grad, as in training. Per (B, K, d, mode,
provider): median ms with 20th/80th percentiles, model TFLOP/s (the logits' matmuls: forward
2 * 2B * (2B + K) * d, backward twice that), peak memory beyond the inputs (CUDA), and the speed-up
over eager. A provider that runs out of memory is recorded as "OOM". Before timing, every provider's
loss and gradients must agree with eager's (or, where eager does not fit, with the compiled one's).

On CUDA: B in {512, 4096, 65536}, K in {128, 1024}, d in {64, 128}. On CPU (or with --quick) only
small shapes and the reference providers: the kernels run on CPU only in Triton's interpreter,
which is a correctness tool, not a timing one.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from benchmarks import _harness
from s4rec_kernels import _dispatch, reference

OP = "info_nce_proto"
TAU = 0.1  # SPEC section 3: tau2 in {0.1, 1.0}
MODES = ("forward", "backward", "forward+backward")
COLUMNS = ["B", "K", "d", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "TFLOP/s",
           "peak_extra_MB", "x_eager", "checked"]

FULL_SHAPES = list(itertools.product([512, 4096, 65536], [128, 1024], [64, 128]))
QUICK_SHAPES = [(256, 128, 64), (1024, 128, 64)]


def make_inputs(n: int, n_protos: int, d: int, dtype: torch.dtype, device: torch.device):
    """Unit-norm views (the second a noisy copy of the first), prototypes and assignments."""
    g = torch.Generator(device="cpu").manual_seed(n + n_protos + d)
    z1 = F.normalize(torch.randn(n, d, generator=g), dim=1)
    z2 = F.normalize(z1 + 0.5 * torch.randn(n, d, generator=g), dim=1)
    protos = F.normalize(torch.randn(n_protos, d, generator=g), dim=1)
    assign = torch.randint(0, n_protos, (n,), generator=g)
    tensors = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (z1, z2, protos)]
    return tensors, assign.to(device)


def providers(device: torch.device) -> Dict[str, Callable]:
    """name -> loss function of (z1, z2, protos, assign, tau)."""
    found: Dict[str, Callable] = {}
    if device.type == "cuda" and _dispatch.triton_impl(OP) is not None:
        # the kernels' autograd.Function, without the public function's input checks (whose
        # range check on assign syncs the device), like the eager provider
        found["ours"] = _dispatch.triton_impl(OP)
    found["eager"] = reference.info_nce_proto
    torch._dynamo.reset()  # a fresh cache per shape: static-shape graphs, no recompile limit
    # the backward mode replays one graph (retain_graph=True), which donated buffers forbid
    torch._functorch.config.donated_buffer = False
    fn = _harness.compiled(reference.info_nce_proto)
    if fn is not None:
        found["compiled"] = fn
    return found


def check_agreement(fns: Dict[str, Callable], inputs, assign) -> Dict[str, str]:
    """Loss and gradients of every provider against eager's (compiled's where eager runs out of
    memory). Gradients are compared as fractions of the reference's largest entry. Returns
    provider -> "OOM" for those that ran out of memory, "yes" for those that agree and "no
    reference" where nothing else fits ("reference" for the one compared with); raises if a
    provider disagrees."""
    results, status = _harness.losses_and_grads(fns, lambda fn: fn(*inputs, assign, TAU), inputs)
    base = "eager" if "eager" in results else "compiled" if "compiled" in results else None
    if base is not None:
        scales = [float(g.abs().max()) or 1.0 for g in results[base][1:]]
        normed = {name: (r[0], *(g / s for g, s in zip(r[1:], scales)))
                  for name, r in results.items()}
        _harness.check_agree(normed, base, rtol=1e-4, atol=1e-4)
    for name in results:
        status[name] = ("reference" if name == base else "yes" if base is not None
                        else "no reference")
    return status


def timed_call(fn: Callable, inputs, assign, mode: str) -> Callable[[], object]:
    """The call to time for ``mode``; gradients for z1, z2 and protos."""
    return _harness.mode_call(lambda: fn(*inputs, assign, TAU), inputs, mode)


def model_tflop(n: int, n_protos: int, d: int, mode: str) -> float:
    forward = 2.0 * (2 * n) * (2 * n + n_protos) * d
    factor = {"forward": 1, "backward": 2, "forward+backward": 3}[mode]
    return factor * forward / 1e12


def bench_shape(n: int, n_protos: int, d: int, dtype: torch.dtype,
                device: torch.device) -> List[Dict]:
    inputs, assign = make_inputs(n, n_protos, d, dtype, device)
    fns = providers(device)
    status = check_agreement(fns, inputs, assign)
    rows = []
    for mode in MODES:
        mode_rows = []
        for name, fn in fns.items():
            row = {"B": n, "K": n_protos, "d": d, "mode": mode, "provider": name,
                   "checked": status[name], "median_ms": "OOM"}
            mode_rows.append(row)
            if status[name] == "OOM":
                continue
            try:
                call = timed_call(fn, inputs, assign, mode)
                row.update(_harness.time_ms(call, device, rep=10, min_seconds=0.5))
                row["peak_extra_MB"] = _harness.peak_extra_mb(call, device)
                row["TFLOP/s"] = model_tflop(n, n_protos, d, mode) / (row["median_ms"] / 1e3)
                del call
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not _harness.is_oom(err):
                    raise
            _harness.free(device)
        eager_ms = next((r["median_ms"] for r in mode_rows if r["provider"] == "eager"), "OOM")
        for row in mode_rows:
            if isinstance(eager_ms, float) and isinstance(row["median_ms"], float):
                row["x_eager"] = eager_ms / row["median_ms"]
        rows += mode_rows
    return rows


def cases(quick: bool) -> List[Tuple[str, Callable[[], Callable[[], object]]]]:
    """(id, make) pairs for pytest-benchmark: make() builds the inputs and returns the call."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes: Sequence = FULL_SHAPES if device.type == "cuda" and not quick else QUICK_SHAPES
    out = []
    for n, n_protos, d in shapes:
        for mode in MODES:
            for name in providers(device):
                def make(n=n, n_protos=n_protos, d=d, mode=mode, name=name):
                    inputs, assign = make_inputs(n, n_protos, d, torch.float32, device)
                    return timed_call(providers(device)[name], inputs, assign, mode)
                out.append((f"B{n}-K{n_protos}-d{d}-{mode}-{name}", make))
    return out


def run(quick: bool = False, out_dir: Optional[Path] = None,
        dtype: torch.dtype = torch.float32, shapes: Optional[Sequence] = None) -> List[Dict]:
    """Benchmark every shape (B, K, d) on the default device; print and write the table; return
    its rows. ``shapes`` replaces the default list."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if shapes is None:
        shapes = FULL_SHAPES if device.type == "cuda" and not quick else QUICK_SHAPES
    rows: List[Dict] = []
    for n, n_protos, d in shapes:
        rows += bench_shape(n, n_protos, d, dtype, device)
    dtype_name = str(dtype).replace("torch.", "")
    note = (f"inputs {dtype_name}, unit-norm, tau = {TAU}; loss and gradients of every provider "
            f"checked against eager's (compiled's where eager ran out of memory) before timing "
            f"(checked: yes; 'no reference' where neither fits). "
            f"x_eager = eager median / provider median.")
    if device.type != "cuda":
        note += (" CPU: reference providers only (the kernels need a GPU; on CPU they run in "
                 "Triton's interpreter, for correctness).")
    name = OP if dtype == torch.float32 else f"{OP}-{dtype_name}"
    _harness.write_table(name, rows, COLUMNS, device, out_dir, note=note)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = _harness.op_parser(__doc__.split("\n\n")[0],
                                "comma-separated BxKxd shapes instead of the default list",
                                dtype=("float32", "z1, z2 and protos"))
    args = parser.parse_args(argv)
    shapes = _harness.parse_shapes(args.shapes) if args.shapes else None
    run(args.quick, args.out, getattr(torch, args.dtype), shapes)


if __name__ == "__main__":
    main()
