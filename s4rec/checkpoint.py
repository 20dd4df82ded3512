"""Run state on disk: atomic writes, every random generator's state, and stop signals.

A checkpoint holds what is needed to replay the rest of a run exactly: model and optimiser states,
the counters of the training loop, the history so far, and the state of every random number
generator (Python, numpy's global and our own Generator, torch CPU and CUDA). It is written at the
start of every epoch, so a run stopped anywhere in epoch k resumes at the start of epoch k with the
data order and augmentations it had.
"""
from __future__ import annotations

import json
import os
import random
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator

import numpy as np
import torch


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run stops at the next step boundary."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save(obj, path: Path) -> None:
    atomic_write_bytes(Path(path), lambda tmp: torch.save(obj, tmp))


def save_json(obj, path: Path) -> None:
    atomic_write_bytes(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def load(path: Path, device) -> Dict:
    """Load a checkpoint this package wrote (it holds numpy RNG states, hence weights_only=False)."""
    return torch.load(path, map_location=device, weights_only=False)


def new_state() -> Dict:
    """The loop counters and history of a run that has not trained yet."""
    return {"epoch": 0, "step": 0, "best_score": -1.0, "best_epoch": -1, "bad_evals": 0,
            "stopped": False, "history": []}


def restore(path: Path, model, optimizer, device, patience: int) -> Dict:
    """Load a last.pt into ``model`` and ``optimizer``; returns the checkpoint. An early-stopped
    run goes on when resumed with a larger patience."""
    ckpt = load(path, device)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    ckpt["state"]["stopped"] = ckpt["state"]["bad_evals"] >= patience
    return ckpt


def rng_state(generator: np.random.Generator) -> Dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "generator": generator.bit_generator.state,
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict, generator: np.random.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    generator.bit_generator.state = state["generator"]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopFlag:
    """Set by SIGINT / SIGTERM while a `catch_signals` block runs; checked between steps."""

    def __init__(self):
        self.signum = 0

    def check(self) -> None:
        if self.signum:
            raise Interrupted(self.signum)


@contextmanager
def catch_signals() -> Iterator[StopFlag]:
    """Turn SIGINT / SIGTERM into a flag for the duration of the block (main thread only)."""
    flag = StopFlag()

    def handler(signum, frame):
        if flag.signum:  # a second signal: stop now
            raise Interrupted(signum)
        flag.signum = signum

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals stay as they are
        yield flag
        return
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
