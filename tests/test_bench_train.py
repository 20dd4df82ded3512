"""The end-to-end training benchmark on tiny synthetic data: our timing, and RecBole's row.

RecBole is an optional benchmark dependency: without it its row must be left out quietly; with it,
one quick timing on a tiny `.inter` file, leaving nothing behind in the process or on disk.
"""
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import _recbole, bench_train  # noqa: E402
from s4rec.config import Config  # noqa: E402
from s4rec.data import synthetic  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return synthetic(n_users=300, n_items=100)


@pytest.fixture
def cfg():
    return Config(hidden=16, heads=2, layers=1, max_len=20, batch_size=64, n_clusters=8)


@pytest.fixture
def sr_only(monkeypatch):
    """Time the SR-only objective alone, which is all the RecBole row is about."""
    monkeypatch.setattr(bench_train, "OBJECTIVES", {"SR only": bench_train.OBJECTIVES["SR only"]})


@pytest.mark.parametrize("objective", list(bench_train.OBJECTIVES))
def test_time_steps_returns_documented_keys(data, cfg, objective):
    cfg = Config(**{**cfg.__dict__, **bench_train.OBJECTIVES[objective]})
    res = bench_train.time_steps(data, cfg, "eager", steps=2, warmup=1, device=CPU)
    assert set(res) == set(bench_train.RESULT_KEYS)
    trainable = int((data.lengths >= 4).sum())
    assert res["steps_per_epoch"] == math.ceil(trainable / cfg.batch_size)
    assert res["s_per_step"] > 0 and res["p20_s"] <= res["s_per_step"] <= res["p80_s"]
    assert res["s_per_epoch"] == pytest.approx(res["s_per_step"] * res["steps_per_epoch"])
    assert res["users_per_s"] == pytest.approx(cfg.batch_size / res["s_per_step"])
    assert res["targets_per_s"] > res["users_per_s"]  # every user has several targets
    assert 0 <= res["padding_share"] < 1
    assert res["peak_mb"] is None  # CPU


def test_write_inter_keeps_order_as_timestamps(data, tmp_path):
    path = _recbole.write_inter(data, tmp_path, "tiny")
    assert path == tmp_path / "tiny" / "tiny.inter"
    lines = path.read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    rows = np.array([[int(v) for v in line.split("\t")] for line in lines[1:]])
    assert len(rows) == len(data.items)
    for u in (0, 1, len(data) - 1):
        mine = rows[rows[:, 0] == u]
        np.testing.assert_array_equal(mine[:, 1], data.sequence(u))
        np.testing.assert_array_equal(mine[:, 2], np.arange(len(mine)))


def test_recbole_row_skipped_without_recbole(data, cfg, sr_only, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "recbole", None)  # `import recbole` now fails
    assert "not importable" in _recbole.unavailable()
    rows = bench_train.measure(data, cfg, ["eager"], steps=1, warmup=0, device=CPU)
    assert [row["provider"] for row in rows] == ["eager"]
    assert f"{_recbole.PROVIDER}: skipped" in capsys.readouterr().out


def test_recbole_row_on_tiny_inter(data, cfg, sr_only, monkeypatch, tmp_path):
    reason = _recbole.unavailable()
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)
    argv, anomaly = list(sys.argv), torch.is_anomaly_enabled()
    cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    rows = bench_train.measure(data, cfg, ["eager"], steps=2, warmup=1, device=CPU)
    assert [row["provider"] for row in rows] == ["eager", _recbole.PROVIDER]
    theirs = rows[1]
    assert set(bench_train.RESULT_KEYS) <= set(theirs)
    # one training sample per prefix: every interaction but each user's first and held-out two
    assert theirs["train_samples"] == int((data.lengths - 3).sum())
    assert theirs["steps_per_epoch"] == math.ceil(theirs["train_samples"] / cfg.batch_size)
    assert theirs["s_per_epoch"] == pytest.approx(theirs["s_per_step"] * theirs["steps_per_epoch"])
    speedup = rows[0]["s_per_epoch"] / theirs["s_per_epoch"]
    assert theirs["speedup_vs_eager"] == pytest.approx(speedup)
    assert 0 <= theirs["padding_share"] < 1
    # what RecBole changes process-wide is put back, and nothing is left on disk
    assert sys.argv == argv and os.getcwd() == str(tmp_path) and not list(tmp_path.iterdir())
    assert torch.is_anomaly_enabled() == anomaly
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == cuda_visible
    assert "float" not in vars(np) and "float_" not in vars(np)
