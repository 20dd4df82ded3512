"""item_softmax_ce and item_rank: the fused Triton kernels against eager PyTorch, torch.compile of
it, Liger-Kernel's fused linear cross entropy and Apple's Cut Cross-Entropy.

    python -m benchmarks.bench_item_softmax [--quick] [--dtype bfloat16|float16|float32]
                                            [--out DIR | --save]
        [--shapes NxVxd,...] [--providers ours,eager,...] [--no-rank]

Loss providers: "ours" (the Triton kernels, CUDA only), "eager" (``reference.item_softmax_ce``,
which writes the (N, V) logits in fp32), "compiled" (``torch.compile`` of it), and where
importable "liger" (``LigerFusedLinearCrossEntropyLoss``; it computes the gradients during the
forward, so its "backward" only scales them), "cce" (``cut_cross_entropy.linear_cross_entropy``
with its default gradient filtering, filter_eps="high", which skips blocks of small softmax
entries: an approximation) and "cce_exact" (the same with filter_eps=None). Modes: forward,
backward (replaying one retained graph) and forward+backward, with inputs that require grad, as
in training. Per (N, V, d, mode, provider): median ms with 20th/80th percentiles, peak memory
beyond the inputs (CUDA), the speed-up over eager, and the fraction of the exp floor reached:
the floor is N V exps per pass (forward N V, backward N V, both 2 N V) at 3.9e12 exp/s, the
H100 SXM's MUFU rate (132 SMs x 16 ex2 per clock x 1.83 GHz); on other devices the column is
left empty. A provider that runs out of memory is recorded as "OOM". Before timing, every
provider's loss and gradients must agree with eager's (or, where eager does not fit, with ours).
A provider whose first call takes over ``SLOW_SECONDS`` is timed by that one call ("1 run").

Ranking: ``item_rank`` over U users in batches (with each user's history excluded, as in
evaluation), "ours" against the eager reference; the ranks must agree before timing.

On CUDA the shapes are (N, V, d) = (4096, 12101, 64) (a Beauty batch after dropping padding),
(25600, 12101, 64), (8192, 1M, 64), (8192, 10M, 64), (8192, 1M, 256), and ranking at U = 22363
(Beauty's users) in batches of 1024, V = 12101, d = 64. On CPU (or with --quick) only small
shapes and the reference providers: the kernels run on CPU only in Triton's interpreter, which
is a correctness tool, not a timing one.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks import _harness
from s4rec_kernels import _dispatch, reference

OP = "item_softmax_ce"
MODES = ("forward", "backward", "forward+backward")
EXPS_PER_PASS = {"forward": 1, "backward": 1, "forward+backward": 2}
H100_EXP_PER_S = 3.9e12
SLOW_SECONDS = 2.0
COLUMNS = ["N", "V", "d", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "of_exp_floor",
           "peak_extra_MB", "x_eager", "checked"]
RANK_COLUMNS = ["U", "batch", "V", "d", "provider", "median_ms", "p20_ms", "p80_ms",
                "users_per_s", "peak_extra_MB", "x_eager", "checked"]

FULL_SHAPES = [(4096, 12101, 64), (25600, 12101, 64), (8192, 1_000_000, 64),
               (8192, 10_000_000, 64), (8192, 1_000_000, 256)]
QUICK_SHAPES = [(256, 2000, 64), (512, 12101, 64)]
FULL_RANK = (22363, 1024, 12101, 64)
QUICK_RANK = (1000, 500, 12101, 64)


def make_inputs(n: int, n_items: int, d: int, dtype: torch.dtype, device: torch.device):
    """Hidden states and item embeddings at the scale of a trained model (logits of a few units),
    targets uniform over the items; hidden and items require grad."""
    g = torch.Generator(device=device).manual_seed(n + n_items + d)
    hidden = torch.randn(n, d, device=device, generator=g).mul_(d ** -0.25).to(dtype)
    items = torch.randn(n_items, d, device=device, generator=g).mul_(d ** -0.25).to(dtype)
    targets = torch.randint(0, n_items, (n,), device=device, generator=g)
    return hidden.requires_grad_(True), items.requires_grad_(True), targets


def providers(device: torch.device, only: Optional[Sequence[str]] = None) -> Dict[str, Callable]:
    """name -> mean loss of (hidden, items, targets); only the names in ``only`` if given."""
    found: Dict[str, Callable] = {}
    if device.type == "cuda" and _dispatch.triton_impl(OP) is not None:
        # the registered implementation, without the public function's input checks (whose
        # range check on the targets syncs the device), like the eager provider
        impl = _dispatch.triton_impl(OP)
        found["ours"] = lambda h, it, t: impl(h, it, t, -100, "mean")
    found["eager"] = lambda h, it, t: reference.item_softmax_ce(h, it, t, -100, "mean")
    torch._dynamo.reset()  # a fresh cache per shape: static-shape graphs, no recompile limit
    # the backward mode replays one graph (retain_graph=True), which donated buffers forbid
    torch._functorch.config.donated_buffer = False
    fn = _harness.compiled(reference.item_softmax_ce)
    if fn is not None:
        found["compiled"] = lambda h, it, t: fn(h, it, t, -100, "mean")
    if device.type == "cuda":
        found.update(peer_providers())
    if only is not None:
        found = {name: fn for name, fn in found.items() if name in only}
    return found


def peer_providers() -> Dict[str, Callable]:
    found: Dict[str, Callable] = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        pass
    else:
        liger = LigerFusedLinearCrossEntropyLoss(reduction="mean")
        found["liger"] = lambda h, it, t: liger(it, h, t)
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        pass
    else:
        found["cce"] = lambda h, it, t: linear_cross_entropy(h, it, t)
        found["cce_exact"] = lambda h, it, t: linear_cross_entropy(h, it, t, filter_eps=None)
    return found


def check_agreement(fns: Dict[str, Callable], inputs) -> Dict[str, str]:
    """Loss and gradients of every provider against eager's (ours where eager runs out of memory);
    gradients as fractions of the reference's largest entry. Returns provider -> "OOM", "yes",
    "filtered" (CCE's approximate gradients: loss checked, gradients loosely), "reference" or
    "no reference"; raises if a provider disagrees."""
    hidden, items, targets = inputs
    results, status = _harness.losses_and_grads(fns, lambda fn: fn(hidden, items, targets),
                                                (hidden, items))
    base = next((b for b in ("eager", "compiled", "ours") if b in results), None)
    half = hidden.dtype != torch.float32
    for name, got in results.items():
        if base is None or name == base:
            status[name] = "reference" if name == base else "no reference"
            continue
        want = results[base]
        tol = 2e-2 if half else 1e-4
        torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol,
                                   msg=lambda m: f"{name} loss disagrees with {base}: {m}")
        grad_tol = 0.5 if name == "cce" else tol  # filtered gradients drop small entries
        for g, w in zip(got[1:], want[1:]):
            scale = float(w.abs().max()) or 1.0
            torch.testing.assert_close(g / scale, w / scale, rtol=grad_tol, atol=grad_tol,
                                       msg=lambda m: f"{name} gradient disagrees with {base}: {m}")
        status[name] = "filtered" if name == "cce" else "yes"
    results.clear()
    return status


def timed_call(fn: Callable, inputs, mode: str) -> Callable[[], object]:
    """The call to time for ``mode``; gradients for hidden and items."""
    hidden, items, targets = inputs
    return _harness.mode_call(lambda: fn(hidden, items, targets), (hidden, items), mode)


def time_call(call: Callable[[], object], device: torch.device) -> Dict[str, object]:
    """Median (p20, p80) ms; one timed call only when that call alone is slow."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    once = (time.perf_counter() - start) * 1e3
    if once > SLOW_SECONDS * 1e3:
        return {"median_ms": once, "p20_ms": once, "p80_ms": once, "note": "1 run"}
    return _harness.time_ms(call, device, rep=10, min_seconds=0.5)


def exp_floor_ms(n: int, n_items: int, mode: str, device: torch.device) -> Optional[float]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    if "H100" not in name and "H200" not in name:  # same SM count and MUFU rate
        return None
    return EXPS_PER_PASS[mode] * n * n_items / H100_EXP_PER_S * 1e3


def bench_shape(n: int, n_items: int, d: int, dtype: torch.dtype, device: torch.device,
                only: Optional[Sequence[str]] = None) -> List[Dict]:
    inputs = make_inputs(n, n_items, d, dtype, device)
    fns = providers(device, only)
    status = check_agreement(fns, inputs)
    rows = []
    for mode in MODES:
        floor = exp_floor_ms(n, n_items, mode, device)
        mode_rows = []
        for name, fn in fns.items():
            row = {"N": n, "V": n_items, "d": d, "mode": mode, "provider": name,
                   "checked": status[name], "median_ms": "OOM"}
            mode_rows.append(row)
            if status[name] == "OOM":
                continue
            try:
                call = timed_call(fn, inputs, mode)
                row.update(time_call(call, device))
                if row.pop("note", None):
                    row["checked"] += ", 1 run"
                row["peak_extra_MB"] = _harness.peak_extra_mb(call, device)
                if floor is not None:
                    row["of_exp_floor"] = floor / row["median_ms"]
                del call
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not _harness.is_oom(err):
                    raise
                row.update(median_ms="OOM", p20_ms=None, p80_ms=None)
            _harness.free(device)
        eager_ms = next((r["median_ms"] for r in mode_rows if r["provider"] == "eager"), "OOM")
        for row in mode_rows:
            if isinstance(eager_ms, float) and isinstance(row["median_ms"], float):
                row["x_eager"] = eager_ms / row["median_ms"]
        rows += mode_rows
    del inputs
    _harness.free(device)
    return rows


# ----------------------------------------------------------------------------------------------
# item_rank
# ----------------------------------------------------------------------------------------------


def make_rank_inputs(n_users: int, n_items: int, d: int, device: torch.device, seed: int = 0):
    """User states, items, targets and a CSR of histories (lengths 1..30, mean about 9, like
    Beauty's), as evaluation passes them."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_users, d, generator=g).to(device)
    items = torch.randn(n_items, d, generator=g).to(device)
    targets = torch.randint(0, n_items, (n_users,), generator=g).to(device)
    lengths = torch.randint(1, 18, (n_users,), generator=g)
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    indices = torch.randint(0, n_items, (int(indptr[-1]),), generator=g)
    return hidden, items, targets, indptr.to(device), indices.to(device)


def rank_all(fn: Callable, inputs, batch: int) -> torch.Tensor:
    """Ranks of every user, ``batch`` users per call (each with its slice of the CSR)."""
    hidden, items, targets, indptr, indices = inputs
    out = []
    for start in range(0, hidden.shape[0], batch):
        stop = min(start + batch, hidden.shape[0])
        lo, hi = int(indptr[start]), int(indptr[stop])
        out.append(fn(hidden[start:stop], items, targets[start:stop],
                      indptr[start:stop + 1] - lo, indices[lo:hi]))
    return torch.cat(out)


def bench_rank(n_users: int, batch: int, n_items: int, d: int, device: torch.device) -> List[Dict]:
    inputs = make_rank_inputs(n_users, n_items, d, device)
    fns: Dict[str, Callable] = {}
    if device.type == "cuda" and _dispatch.triton_impl("item_rank") is not None:
        fns["ours"] = _dispatch.triton_impl("item_rank")
    fns["eager"] = reference.item_rank
    ranks = {name: rank_all(fn, inputs, batch) for name, fn in fns.items()}
    rows = []
    for name, fn in fns.items():
        # fp32 scores in another summation order: near-ties may break the other way
        differ = float((ranks[name] != ranks["eager"]).float().mean())
        if differ > 1e-3:
            raise AssertionError(f"item_rank: {name} differs from eager for {differ:.2%} of users")
        row = {"U": n_users, "batch": batch, "V": n_items, "d": d, "provider": name,
               "checked": "reference" if name == "eager" else f"yes ({differ:.3%} differ)"}
        call = lambda fn=fn: rank_all(fn, inputs, batch)  # noqa: E731
        row.update(time_call(call, device))
        row.pop("note", None)
        row["peak_extra_MB"] = _harness.peak_extra_mb(call, device)
        row["users_per_s"] = n_users / (row["median_ms"] / 1e3)
        rows.append(row)
    eager_ms = rows[-1]["median_ms"]
    for row in rows:
        row["x_eager"] = eager_ms / row["median_ms"]
    return rows


def cases(quick: bool) -> List[Tuple[str, Callable[[], Callable[[], object]]]]:
    """(id, make) pairs for pytest-benchmark: make() builds the inputs and returns the call."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = FULL_SHAPES if device.type == "cuda" and not quick else QUICK_SHAPES
    out = []
    for n, n_items, d in shapes:
        for mode in MODES:
            for name in providers(device):
                def make(n=n, n_items=n_items, d=d, mode=mode, name=name):
                    inputs = make_inputs(n, n_items, d, torch.bfloat16, device)
                    return timed_call(providers(device, [name])[name], inputs, mode)
                out.append((f"N{n}-V{n_items}-d{d}-{mode}-{name}", make))
    return out


def run(quick: bool = False, out_dir: Optional[Path] = None,
        dtype: torch.dtype = torch.bfloat16,
        shapes: Optional[Sequence[Tuple[int, int, int]]] = None,
        only: Optional[Sequence[str]] = None, rank: bool = True) -> List[Dict]:
    """Benchmark every shape on the default device; print and write the tables; return the loss
    table's rows followed by the ranking table's. ``shapes`` replaces the default (N, V, d) list,
    ``only`` keeps the named loss providers, ``rank=False`` skips the ranking table."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full = device.type == "cuda" and not quick
    if shapes is None:
        shapes = FULL_SHAPES if full else QUICK_SHAPES
    rows: List[Dict] = []
    for n, n_items, d in shapes:
        rows += bench_shape(n, n_items, d, dtype, device, only)
    dtype_name = str(dtype).replace("torch.", "")
    note = (f"hidden and items {dtype_name}; mean over N rows, no ignored rows. Loss and "
            f"gradients of every provider checked against eager's (ours where eager ran out of "
            f"memory) before timing. of_exp_floor = (N V exps per pass at 3.9e12 exp/s, the "
            f"H100's MUFU rate) / median; forward+backward counts two passes. x_eager = eager "
            f"median / provider median.")
    if device.type != "cuda":
        note += (" CPU: reference providers only (the kernels need a GPU; on CPU they run in "
                 "Triton's interpreter, for correctness).")
    _harness.write_table(f"{OP}-{dtype_name}", rows, COLUMNS, device, out_dir, note=note)

    if not rank:
        return rows
    rank_rows = bench_rank(*(FULL_RANK if full else QUICK_RANK), device)
    _harness.write_table("item_rank", rank_rows, RANK_COLUMNS, device, out_dir,
                         note="float32 user states and items; every user's history (1-17 items) "
                              "excluded; all users ranked, `batch` per call.")
    return rows + rank_rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = _harness.op_parser(__doc__.split("\n\n")[0],
                                "comma-separated NxVxd shapes instead of the default list",
                                dtype=("bfloat16", "hidden and items"))
    parser.add_argument("--providers", default=None,
                        help="comma-separated loss providers to keep (ours, eager, compiled, "
                             "liger, cce, cce_exact)")
    parser.add_argument("--no-rank", action="store_true", help="skip the item_rank table")
    args = parser.parse_args(argv)
    shapes = _harness.parse_shapes(args.shapes) if args.shapes else None
    only = args.providers.split(",") if args.providers else None
    run(args.quick, args.out, getattr(torch, args.dtype), shapes, only, rank=not args.no_rank)


if __name__ == "__main__":
    main()
