"""`torchrun -m s4rec.train` on CPU with gloo: a 2-rank run against a 1-rank run of the same seed
(losses of every epoch and the metrics), --resume from 2 ranks to 1 and from 1 to 2, and a rank
that is stopped mid-run ending the whole run with its one-line message."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--hidden", "16", "--layers", "1", "--n-clusters", "8", "--batch-size", "64",
        "--progress", "false", "--threads", "1", "--dropout", "0", "--seed", "3"]
LOSSES = ("loss_total", "loss_sr", "loss_clust", "loss_scl", "loss_ckd", "loss_adv")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _torchrun(world, args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
           "--standalone", "-m", "s4rec.train", *args]
    return cmd


def _run(world, args, cwd):
    proc = subprocess.run(_torchrun(world, args, cwd), cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """240 users over 60 items, 5 to 20 interactions each."""
    rng = np.random.default_rng(0)
    lines = [" ".join(map(str, [u + 1, *rng.integers(1, 61, rng.integers(5, 21))]))
             for u in range(240)]
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _log(run_dir):
    return [json.loads(ln) for ln in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def _metrics(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def _same_losses(a, b):
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        for key in LOSSES:
            assert ea[key] == pytest.approx(eb[key], rel=1e-5, abs=1e-6), (ea["epoch"], key)


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, data_file):
    tmp = tmp_path_factory.mktemp("runs")
    runs = {}
    for world in (1, 2):
        run_dir = tmp / f"w{world}"
        proc = _run(world, ["--data", data_file, "--epochs", "2", "--run-dir", str(run_dir),
                            *FAST], tmp)
        runs[world] = (run_dir, proc)
    return runs


def test_two_ranks_match_one_rank(one_and_two):
    (dir1, proc1), (dir2, proc2) = one_and_two[1], one_and_two[2]
    _same_losses(_log(dir1), _log(dir2))
    m1, m2 = _metrics(dir1), _metrics(dir2)
    for split in ("valid", "test"):
        for group in ("overall", "head", "tail"):
            assert m2[split][group] == pytest.approx(m1[split][group], abs=1e-12)
    # rank 0 alone prints: each epoch line and the tables once
    assert proc2.stdout.count("epoch   1 ") == 1
    assert proc2.stdout.count("test\n") == 1
    assert "data parallel over 2 rank(s) (gloo)" in proc2.stdout


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_resume_with_another_world_size(one_and_two, data_file, tmp_path, first, then):
    run_dir = tmp_path / "run"
    _run(first, ["--data", data_file, "--epochs", "1", "--run-dir", str(run_dir), *FAST], tmp_path)
    proc = _run(then, ["--resume", str(run_dir), "--epochs", "2"], tmp_path)
    assert f"resumed {run_dir} at epoch 1 on {then} ranks" in proc.stdout
    straight = one_and_two[then][0]
    _same_losses(_log(run_dir), _log(straight))


def _children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def test_a_stopped_rank_ends_every_rank(data_file, tmp_path):
    proc = subprocess.Popen(_torchrun(2, ["--data", data_file, "--epochs", "50", "--run-dir",
                                          str(tmp_path / "run"), *FAST], tmp_path),
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "log.jsonl").exists():  # an epoch has finished
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    workers = sorted(_children(proc.pid))
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGTERM)
    started = time.time()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - started < 60
    assert "error on rank 1: Interrupted: SIGTERM" in err, err[-3000:]
