"""What every op benchmark shares: device naming, timing, peak memory, agreement checks, tables.

On CUDA the timings are device time (Triton's `do_bench`, which synchronises and flushes the L2
cache); on CPU they are wall time of a synchronous call. Every figure names its device.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

RESULTS = Path(__file__).resolve().parent / "results"  # the committed tables: written on request
SCRATCH = Path("runs") / "benchmarks"  # the default folder for tables (runs/ is ignored by git)


def device_label(device: torch.device) -> str:
    """A short human name: the GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """The label as a file-name part: "nvidia-h100-80gb-hbm3", "cpu"."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_label(device).lower()).strip("-")


def versions() -> Dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    return out


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3,
            rep: int = 10, min_seconds: float = 0.0) -> Dict[str, float]:
    """Median, 20th and 80th percentile of one call, in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        q50, q20, q80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": q50, "p20_ms": q20, "p80_ms": q80}
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    start = time.perf_counter()
    while len(samples) < rep or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()

    def pick(q: float) -> float:
        return samples[min(len(samples) - 1, int(q * len(samples)))]

    return {"median_ms": pick(0.5), "p20_ms": pick(0.2), "p80_ms": pick(0.8)}


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory a call allocates beyond what was live before it (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def mode_call(loss: Callable[[], torch.Tensor], wrt: Sequence[torch.Tensor],
              mode: str) -> Callable[[], object]:
    """The call to time for ``mode`` ("forward", "backward", "forward+backward") of a scalar
    ``loss()`` differentiated in ``wrt``; backward replays a graph built once, here."""
    if mode == "forward":
        return loss
    if mode == "forward+backward":
        return lambda: torch.autograd.grad(loss(), wrt)
    graph = loss()
    return lambda: torch.autograd.grad(graph, wrt, retain_graph=True)


def losses_and_grads(fns: Dict[str, Callable], loss_of: Callable[[Callable], torch.Tensor],
                     wrt: Sequence[torch.Tensor]):
    """Run every provider once: ({name: (loss, *grads in wrt) as fp32}, {name: "OOM"} for the
    providers that ran out of memory). Other errors propagate."""
    results, status = {}, {}
    for name, fn in fns.items():
        try:
            loss = loss_of(fn)
            grads = torch.autograd.grad(loss, wrt)
            results[name] = (loss.detach().float(), *(g.float() for g in grads))
            del loss, grads
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            status[name] = "OOM"
        free(wrt[0].device)
    return results, status


def parse_shapes(text: str) -> List[Tuple[int, ...]]:
    """'4096x12101x64,512x128' -> [(4096, 12101, 64), (512, 128)] (a --shapes flag)."""
    try:
        return [tuple(int(x) for x in shape.split("x")) for shape in text.split(",") if shape]
    except ValueError:
        raise SystemExit(f"error: --shapes expects shapes like 4096x1024, got {text!r}") from None


def parse_choices(name: str, text: str, known: Sequence[str]) -> List[str]:
    """"a,b" -> ["a", "b"], each one of ``known``; a ValueError names the first that is not."""
    given = [x for x in text.split(",") if x]
    unknown = [g for g in given if g not in known]
    if unknown:
        raise ValueError(f"unknown {name} {unknown[0]!r}; expected some of {', '.join(known)}")
    return given


def is_oom(err: BaseException) -> bool:
    """True for a device out-of-memory error (a provider too big for the device is a result)."""
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def free(device: torch.device) -> None:
    """Return cached memory between providers, so one's peak does not count against the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compiled(fn: Callable) -> Optional[Callable]:
    """`torch.compile(fn)`, or None where compiling is not possible here."""
    try:
        return torch.compile(fn)
    except Exception as err:  # compile support differs by platform; report rather than fail
        print(f"torch.compile unavailable: {err}")
        return None


def check_agree(results: Dict[str, object], reference: str, rtol: float, atol: float) -> None:
    """Every provider's output must match the reference provider's before anything is timed."""
    expected = results[reference]
    for name, got in results.items():
        exp_list = expected if isinstance(expected, (tuple, list)) else [expected]
        got_list = got if isinstance(got, (tuple, list)) else [got]
        for e, g in zip(exp_list, got_list):
            if isinstance(e, torch.Tensor):
                torch.testing.assert_close(
                    g.float(), e.float(), rtol=rtol, atol=atol,
                    msg=lambda m, who=name: f"{who} disagrees with {reference}: {m}")


def write_table(op: str, rows: Sequence[Dict], columns: Sequence[str], device: torch.device,
                out_dir: Optional[Path] = None, note: str = "") -> Path:
    """Print a markdown table and write it as <device>-<op>.md and .json under out_dir
    (default runs/benchmarks/ of the working folder; the committed tables only when asked)."""
    out_dir = Path(out_dir) if out_dir else SCRATCH
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"op": op, "device": device_label(device), "date": time.strftime("%Y-%m-%d"),
            **versions(), "note": note}

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = [f"### {op} on {meta['device']} ({meta['date']}, torch {meta['torch']}, "
             f"triton {meta['triton']})", ""]
    if note:
        lines += [note, ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    stem = out_dir / f"{device_slug(device)}-{op}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": list(rows)}, indent=2) + "\n")
    print(f"wrote {stem}.md and .json\n")
    return stem.with_suffix(".md")



def run_in_process(cmd: Sequence[str], timeout_s: float, mem_limit_gb: Optional[float] = None,
              env: Optional[Dict[str, str]] = None):
    """Run one benchmark point in its own process (the repository on its path, its address space
    capped at `mem_limit_gb` on a CPU, every process it starts included). Returns (result,
    process): result is the point's `RESULT {json}` line, or a timeout status (process None), or
    None when no such line came (the caller reads the process's output)."""
    limit = int(mem_limit_gb * 2**30) if mem_limit_gb and not torch.cuda.is_available() else None

    def limit_memory():
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    root = Path(__file__).resolve().parents[1]
    full_env = {**os.environ, **(env or {}),
                "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s,
                              cwd=root, env=full_env, preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout ({timeout_s:.0f} s)"}, None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), proc
    return None, proc

def add_out_flags(parser: argparse.ArgumentParser) -> None:
    """--out DIR, or --save for the committed tables in benchmarks/results/ (args.out: a Path or
    None, the default folder)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help=f"folder for the .md and .json tables (default {SCRATCH}/)")
    where.add_argument("--save", dest="out", action="store_const", const=RESULTS,
                       help="write the tables to benchmarks/results/, the ones in the repository")


def op_parser(description: str, shapes_help: str, quick_help: str = "small shapes only (< 1 min)",
              dtype: Optional[Tuple[str, str]] = None) -> argparse.ArgumentParser:
    """The flags every op benchmark shares: --quick, --out or --save, --shapes and, given (default,
    what it sets), --dtype."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if dtype is not None:
        default, what = dtype
        parser.add_argument("--dtype", default=default, help=f"dtype of {what}",
                            choices=[default] + [d for d in ("float32", "bfloat16", "float16")
                                                 if d != default])
    add_out_flags(parser)
    parser.add_argument("--shapes", default=None, help=shapes_help)
    return parser
