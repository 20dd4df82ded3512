"""last.pt holds tensors and plain values only: read with weights_only=True, RNG streams restored
exactly, and a file that would run code when unpickled is refused before anything runs."""

import json
import os
import pickle
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from s4rec import checkpoint
from s4rec.config import Config

ROOT = Path(__file__).resolve().parents[1]


class WritesAFile:
    """Unpickling this calls open(path, "w"): code a checkpoint must never get to run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _draws(generator: np.random.Generator):
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.normal(size=2).tolist(), generator.integers(0, 2**62, 3).tolist(),
            torch.rand(3).tolist())


def test_rng_states_round_trip_through_weights_only(tmp_path):
    rng = np.random.default_rng(3)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(4)
    random.gauss(0, 1)  # leaves a cached second normal in both legacy generators
    np.random.normal()
    checkpoint.save({"rng": checkpoint.rng_state(rng)}, tmp_path / "last.pt")
    expected = _draws(rng)

    state = torch.load(tmp_path / "last.pt", weights_only=True)["rng"]
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    rng = np.random.default_rng(99)
    checkpoint.set_rng_state(state, rng)
    assert _draws(rng) == expected


def _run_dir(tmp_path, payload) -> Path:
    """A run directory whose last.pt is `payload` (bytes, or an object for torch.save)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = Config(hidden=16, layers=1, n_clusters=8, batch_size=64, progress=False, threads=1,
                 epochs=1, run_dir=str(run_dir))
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg)))
    if isinstance(payload, bytes):
        (run_dir / "last.pt").write_bytes(payload)
    else:
        torch.save(payload, run_dir / "last.pt")
    return run_dir


def _resume(run_dir, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "s4rec.train", "--resume", str(run_dir)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("how", ["torch.save", "bare pickle"])
def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, how):
    marker = tmp_path / "ran"
    planted = {"model": {}, "optimizer": {}, "state": {}, "rng": WritesAFile(marker)}
    run_dir = _run_dir(tmp_path, planted if how == "torch.save" else pickle.dumps(planted))
    with open(marker, "w"):  # the planted call works here: only loading must not make it
        pass
    marker.unlink()

    proc = _resume(run_dir, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "last.pt" in lines[0] and "could run code" in lines[0]
    assert "would import io.open" in lines[0]  # what builtins.open pickles as
    assert not marker.exists()
    assert not (run_dir / "metrics.json").exists()


def test_resume_names_the_older_format(tmp_path):
    old = {"model": {}, "optimizer": {}, "state": {}, "config": {},
           "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                   "generator": np.random.default_rng(0).bit_generator.state,
                   "torch": torch.get_rng_state()}}
    run_dir = _run_dir(tmp_path, old)
    with pytest.raises(checkpoint.CheckpointError, match="older s4rec format"):
        checkpoint.load(run_dir / "last.pt", "cpu")
    proc = _resume(run_dir, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "older s4rec format" in lines[0], proc.stderr


@pytest.mark.parametrize("payload, message", [
    (b"not a checkpoint", "cannot read the checkpoint"),
    ({"model": {}}, "not a last.pt of s4rec.train"),
    ({"model": {}, "optimizer": {}, "state": {}, "rng": {"format": 7}}, "checkpoint format 7"),
    ({"model": {}, "optimizer": {}, "state": {}, "rng": [1, 2]}, "not a last.pt"),
])
def test_unreadable_checkpoints_are_one_line(tmp_path, payload, message):
    run_dir = _run_dir(tmp_path, payload)
    with pytest.raises(checkpoint.CheckpointError, match=message) as err:
        checkpoint.load(run_dir / "last.pt", "cpu")
    assert "\n" not in str(err.value)


def test_a_checkpoint_without_rng_state_loads(tmp_path):
    # the torchrun trainer draws every random number from the seed and epoch: it saves rng=None
    saved = {"model": {"w": torch.ones(2)}, "optimizer": {}, "state": {"epoch": 3}, "rng": None}
    run_dir = _run_dir(tmp_path, saved)
    ckpt = checkpoint.load(run_dir / "last.pt", "cpu")
    assert ckpt["rng"] is None and ckpt["state"] == {"epoch": 3}
    assert torch.equal(ckpt["model"]["w"], torch.ones(2))


def test_no_checkpoint_is_loaded_with_weights_only_false():
    sources = [p for p in (ROOT / "s4rec").rglob("*.py")]
    assert sources
    for path in sources:
        assert "weights_only=False" not in path.read_text(), path


def test_a_real_last_pt_loads_safely_with_every_logged_statistic(tmp_path):
    # what an epoch logs (loss terms, gradient shares, K-means inertia, validation metrics) is
    # saved in last.pt's history: all of it must be plain values that weights_only reads
    from s4rec import train

    run_dir = tmp_path / "run"
    assert train.main(["--epochs", "1", "--hidden", "16", "--layers", "1", "--n-clusters", "8",
                       "--batch-size", "64", "--progress", "false", "--threads", "1",
                       "--prototypes", "kmeans", "--alpha", "0", "--run-dir", str(run_dir)]) == 0
    ckpt = checkpoint.load(run_dir / "last.pt", "cpu")
    logged = ckpt["state"]["history"][0]
    assert {"kmeans_inertia", "grad_share_sr", "valid"} <= set(logged), sorted(logged)
