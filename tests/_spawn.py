"""Run a function on every rank of a gloo process group spawned from a test, on CPU.

``run_group(world, worker)`` starts ``world`` processes (the spawn start method, so each child
imports torch afresh and inherits the environment, TRITON_INTERPRET and PYTHONPATH included), joins
them with a FileStore in a fresh temporary directory, calls ``worker(rank, world)`` on each, and
returns every rank's return value (a JSON-serialisable dict). A rank that raises, dies or outlives
``timeout`` fails the call with what it printed.
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, List

import torch.multiprocessing as mp

# every collective of the spawned group gives up after this long (a desynchronised case then
# fails instead of hanging the test run)
COLLECTIVE_TIMEOUT_S = 60


def _entry(rank: int, world: int, worker: Callable, tmp: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = Path(tmp) / f"rank{rank}.json"
    try:
        store = dist.FileStore(str(Path(tmp) / "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        result = worker(rank, world)
        dist.destroy_process_group()
        out.write_text(json.dumps({"ok": result}))
    except BaseException:  # reported to the parent, which fails the test with it
        out.write_text(json.dumps({"error": traceback.format_exc()}))
        raise


def run_group(world: int, worker: Callable[[int, int], Dict], timeout: float = 300) -> List[Dict]:
    """``worker(rank, world)``'s return value on each rank, in rank order."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_entry, args=(r, world, worker, tmp)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results, problems = [], []
        for r in range(world):
            path = Path(tmp) / f"rank{r}.json"
            record = json.loads(path.read_text()) if path.exists() else {}
            if "ok" in record:
                results.append(record["ok"])
            else:
                problems.append(f"rank {r}: " + record.get("error", f"exit code {procs[r].exitcode}"))
        if hung:
            problems.append(f"ranks {hung} still running after {timeout} s")
        if problems:
            raise AssertionError("\n".join(problems))
        return results
