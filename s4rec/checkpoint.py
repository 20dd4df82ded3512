"""Run state on disk: atomic writes, every random generator's state, and stop signals.

A checkpoint holds what is needed to replay the rest of a run exactly: model and optimiser states,
the counters of the training loop, the history so far, and the state of every random number
generator (Python, numpy's global and our own Generator, torch CPU and CUDA). It is written at the
start of every epoch, so a run stopped anywhere in epoch k resumes at the start of epoch k with the
data order and augmentations it had.

Everything in it is a tensor or a plain value (dict, list, tuple, str, int, float, bool, None),
so it is read with ``torch.load(..., weights_only=True)``: a checkpoint from elsewhere cannot run
code when a run is resumed from it.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import random
import signal
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import torch

from .config import ConfigError

FORMAT = 2  # the layout of the RNG states in last.pt; 1 (no "format" key) held numpy arrays


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


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from; the one-line message says why."""


def load(path: Path, device) -> Dict:
    """A checkpoint written by :func:`save` in this format, read with ``weights_only=True``.

    Anything else raises CheckpointError without running any of the file's code: a file that
    names functions or classes to call when unpickled is refused, one of the older format (numpy
    arrays inside) is named as such.
    """
    try:
        with warnings.catch_warnings():  # torch warns about a bare pickle's protocol, then refuses
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(_refusal(path)) from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({first_line(err)})") from None
    keys = ("model", "optimizer", "state", "rng")
    # rng is None from the torchrun trainer, whose random streams come from the seed and epoch
    if (not isinstance(ckpt, dict) or not set(keys) <= set(ckpt)
            or not isinstance(ckpt["rng"], (dict, type(None)))):
        raise CheckpointError(f"{path}: not a last.pt of s4rec.train (a dict of "
                              f"{', '.join(keys)})")
    found = FORMAT if ckpt["rng"] is None else ckpt["rng"].get("format", 1)
    if found != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {found!r}, this version reads format "
                              f"{FORMAT}; start the run again")
    return ckpt


def _refusal(path: Path) -> str:
    """Why weights_only refused the file, from the names it would import (read, never imported)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError:  # not torch.save's zip format: maybe a bare pickle
        names = _pickle_globals(Path(path).read_bytes())
    if not names:
        return f"{path}: cannot read the checkpoint (not a file written by torch.save)"
    if all(n.startswith("numpy.") for n in names):
        return (f"{path}: a checkpoint of an older s4rec format (numpy arrays in its RNG state), "
                "which cannot be loaded safely; start the run again, or resume it with the version "
                "that wrote it")
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (f"{path}: refused, it would import {shown}, and loading it could run code; "
            "only checkpoints of tensors and plain values are resumed")


def _pickle_globals(raw: bytes) -> List[str]:
    """``module.name`` of every global the pickles at the start of ``raw`` would import, read
    statically by pickletools (nothing is imported or called)."""
    names: List[str] = []
    strings: List[str] = []  # the last strings pushed: STACK_GLOBAL's module and name
    stream = io.BytesIO(raw)
    try:
        while stream.tell() < len(raw):
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
    except ValueError:  # not (or no longer) a pickle: tensor bytes, or not a pickle at all
        pass
    return sorted(set(names))


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
    """Every generator's state as tensors and plain values (see :func:`set_rng_state`)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "format": FORMAT,
        "python": random.getstate(),  # (version, tuple of 625 ints, float or None)
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "generator": generator.bit_generator.state,  # nested dict of str and int
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict, generator: np.random.Generator) -> None:
    """Restore what :func:`rng_state` saved (its tensors may have been loaded onto any device)."""
    random.setstate(state["python"])
    legacy = state["numpy"]
    np.random.set_state((legacy["kind"], legacy["keys"].cpu().numpy().astype(np.uint32),
                         legacy["pos"], legacy["has_gauss"], legacy["cached_gaussian"]))
    generator.bit_generator.state = state["generator"]
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


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
