"""s4rec.evaluate: a run's best checkpoint re-evaluated, under the trainer's or another protocol."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from s4rec import evaluate as ev
from s4rec.data import synthetic
from s4rec.metrics import compute_ranks
from s4rec.recommend import load_run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--hidden", "16", "--layers", "1", "--n-clusters", "8", "--batch-size", "64",
        "--progress", "false", "--threads", "1", "--epochs", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("evaluate") / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "s4rec.train", "--run-dir", str(run), *FAST],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return run


def _args(run, *extra):
    return ev.build_parser().parse_args(["--run", str(run), *extra])


def test_evaluating_twice_gives_the_trainers_table(run_dir, capsys):
    first = ev.run(_args(run_dir))
    out1 = capsys.readouterr().out
    second = ev.run(_args(run_dir))
    assert capsys.readouterr().out == out1 and first == second
    trained = json.loads((run_dir / "metrics.json").read_text())
    for group in ("overall", "head", "tail"):
        assert first[group] == pytest.approx(trained["test"][group], abs=1e-12)
    valid = ev.run(_args(run_dir, "--split", "valid"))
    assert valid["overall"] == pytest.approx(trained["valid"]["overall"], abs=1e-12)


def test_ranking_the_history_never_ranks_a_target_better(run_dir):
    model, cfg = load_run(run_dir)
    data = synthetic()
    for split in ("valid", "test"):
        with_history = compute_ranks(model, data, split, 512, "none", cfg.max_pad)
        without = compute_ranks(model, data, split, 512, "all", cfg.max_pad)
        assert (with_history >= without).all()
        assert (with_history > without).any()  # the history does outrank some targets


def test_out_file_records_the_protocol(run_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    ev.run(_args(run_dir, "--exclude-history", "none", "--out", str(out)))
    saved = json.loads(out.read_text())
    assert "ranked like any other item" in saved["protocol"]["history"]
    assert saved["protocol"]["loss"] == "full softmax over all items"
    assert set(saved["test"]) == {"overall", "head", "tail"}


def test_bad_run_and_wrong_data_are_one_line(run_dir, tmp_path, capsys):
    assert ev.main(["--run", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    other = tmp_path / "other.txt"
    other.write_text("1 1 2 3\n2 2 3 4\n")
    assert ev.main(["--run", str(run_dir), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "items" in err and err.count("\n") == 1
