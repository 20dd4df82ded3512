"""benchmarks.compare_runs: per-user gains agree with the trainer's metrics, the paired bootstrap
covers a known shift, groups partition the users, and bad input is one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import compare_runs as cr
from s4rec.metrics import rank_metrics

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--hidden", "16", "--layers", "1", "--n-clusters", "8", "--batch-size", "64",
        "--progress", "false", "--threads", "1", "--epochs", "2"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = []
    for seed in (1, 2):
        run = root / f"s{seed}"
        proc = subprocess.run([sys.executable, "-m", "s4rec.train", "--run-dir", str(run), *FAST,
                               "--seed", str(seed)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        runs.append(run)
    return runs


def test_user_gains_average_to_the_trainers_metrics():
    ranks = np.array([0, 3, 19, 20, 250, 7, 0])
    gains = cr.user_gains(ranks, cr.K)
    want = rank_metrics(ranks)
    assert gains["ndcg"].mean() == pytest.approx(want["ndcg@20"], abs=1e-15)
    assert gains["hit"].mean() == pytest.approx(want["hit@20"], abs=1e-15)


def test_the_paired_interval_covers_a_known_shift_and_is_zero_without_one():
    rng = np.random.default_rng(0)
    base = rng.random(4000)
    lo, hi = cr.paired_interval(base, base + 0.01 + rng.normal(0, 0.05, 4000), 500)
    assert lo < 0.01 < hi and hi - lo < 0.01
    assert cr.paired_interval(base, base, 50) == (0.0, 0.0)


def test_length_groups_partition_the_users_and_skip_empty_ones():
    lengths = np.array([4, 4, 5, 6, 9, 16, 40])
    head = lengths >= 16
    groups = cr.length_groups(lengths, head, [3, 5, 8, 15])
    assert list(groups) == ["all", "head", "tail", "length 4-5", "length 6-8", "length 9-15",
                            "length 16+"]
    by_length = np.stack([m for name, m in groups.items() if name.startswith("length")])
    assert (by_length.sum(0) == 1).all()
    assert (groups["head"] ^ groups["tail"]).all()
    assert list(cr.length_groups(lengths, head, [4, 5, 8]))[3:] == ["length 4", "length 5",
                                                                   "length 6-8", "length 9+"]


@pytest.mark.parametrize("text", ["", "5,3", "0,4", "a,b", "3,3"])
def test_bad_bounds_are_refused(text):
    with pytest.raises(cr.RecommendError, match="--bounds"):
        cr.parse_bounds(text)


def test_a_run_against_itself_changes_nothing_and_all_users_match_its_metrics(two_runs, tmp_path,
                                                                              capsys):
    out = tmp_path / "rows.json"
    assert cr.main(["--base", str(two_runs[0]), "--other", str(two_runs[0]), "--resamples", "20",
                    "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    trained = json.loads((two_runs[0] / "metrics.json").read_text())["test"]
    assert rows[0]["users"] == "all"
    assert rows[0]["base ndcg@20"] == pytest.approx(trained["overall"]["ndcg@20"], abs=1e-12)
    assert rows[1]["base hit@20"] == pytest.approx(trained["head"]["hit@20"], abs=1e-12)
    for row in rows:
        assert row["ndcg diff 95%"] == [0.0, 0.0] and row["base ndcg@20"] == row["other ndcg@20"]
    assert "| all |" in capsys.readouterr().out


def test_two_seeds_are_averaged_per_user(two_runs, tmp_path):
    out = tmp_path / "rows.json"
    assert cr.main(["--base", *map(str, two_runs), "--other", str(two_runs[1]),
                    "--resamples", "20", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    metrics = [json.loads((r / "metrics.json").read_text())["test"]["overall"] for r in two_runs]
    assert row["base ndcg@20"] == pytest.approx((metrics[0]["ndcg@20"] + metrics[1]["ndcg@20"]) / 2,
                                                abs=1e-12)
    assert row["other ndcg@20"] == pytest.approx(metrics[1]["ndcg@20"], abs=1e-12)


def test_a_missing_run_is_one_line(tmp_path, capsys):
    assert cr.main(["--base", str(tmp_path / "nope"), "--other", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
