"""`python -m s4rec.report`: the three pictures of a run, several runs side by side, and errors."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from s4rec.data import synthetic
from s4rec.report import main, run_names

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("hit@5", "hit@10", "hit@20", "ndcg@5", "ndcg@10", "ndcg@20")
PNG = b"\x89PNG\r\n\x1a\n"


def scores(base):
    return {m: base * (1 + i / 3) for i, m in enumerate(METRICS)}


def make_run(run_dir: Path, epochs=6, k=16, adversary=True, empty=(3, 11)) -> Path:
    """A run directory with log.jsonl and metrics.json in the trainer's format."""
    run_dir.mkdir(parents=True)
    log = []
    for e in range(epochs):
        entry = {"epoch": e, "loss_total": 9.0 - e * 0.4, "loss_sr": 8.5 - e * 0.4,
                 "loss_clust": 4.8 - e * 0.1, "loss_scl": 5.0 - e * 0.2, "loss_ckd": 0.5 / (e + 1),
                 "cluster_entropy": 2.5, "empty_clusters": 0, "padding_share": 0.2,
                 "train_seconds": 1.0, "lr": 1e-3}
        if adversary:
            entry["loss_adv"] = 0.69
        if e % 2 == 1:
            entry["valid"] = scores(0.01 + 0.004 * e - 0.0006 * e * e)
        log.append(entry)
    (run_dir / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))
    size = [0 if c in empty else 20 + (7 * c) % 31 for c in range(k)]
    spread = 0.05 if adversary else 0.25
    rate = [None if s == 0 else min(1.0, max(0.0, 0.2 + spread * math.sin(c * 1.7)))
            for c, s in enumerate(size)]
    metrics = {
        "dataset": "toy",
        "valid": {g: scores(b) for g, b in (("overall", 0.03), ("head", 0.025), ("tail", 0.032))},
        "test": {g: scores(b) for g, b in (("overall", 0.028), ("head", 0.02), ("tail", 0.03))},
        "clusters": {"k": k, "size": size, "head_rate": rate},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


@pytest.fixture
def mpl():
    """Drawing needs matplotlib (optional): skipped without it, except under CI where it fails."""
    if importlib.util.find_spec("matplotlib") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("matplotlib is missing: CI installs it to test the plots")
        pytest.skip("matplotlib is not installed")


def assert_png(path: Path):
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000, path


def report(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_one_run_writes_three_pictures(mpl, tmp_path, capsys):
    run = make_run(tmp_path / "run")
    code, out, err = report([run], capsys)
    assert code == 0, err
    names = ["training.png", "head_rate.png", "head_tail.png"]
    assert out.splitlines() == [str(run / n) for n in names]
    for n in names:
        assert_png(run / n)
    code, out, err = report([run, "--out", tmp_path / "pics", "--split", "valid"], capsys)
    assert code == 0 and out.splitlines() == [str(tmp_path / "pics" / n) for n in names]


def test_runs_side_by_side(mpl, tmp_path, capsys):
    a = make_run(tmp_path / "runs" / "with-adversary")
    b = make_run(tmp_path / "runs" / "no-adversary", adversary=False, k=32, empty=())
    code, out, err = report([a, b], capsys)
    assert code == 0, err
    parent = tmp_path / "runs"
    assert out.splitlines() == [str(parent / n) for n in (
        "training-with-adversary.png", "training-no-adversary.png", "head_rate.png",
        "head_tail.png")]
    for line in out.splitlines():
        assert_png(Path(line))


def test_odd_logs_still_draw(mpl, tmp_path, capsys):
    run = make_run(tmp_path / "run", epochs=1)  # one epoch, never evaluated
    log = json.loads((run / "log.jsonl").read_text())
    log["loss_ckd"] = 0.0  # a zero term: no log scale
    (run / "log.jsonl").write_text(json.dumps(log) + "\n\n")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["clusters"]["head_rate"] = [None] * len(metrics["clusters"]["size"])
    (run / "metrics.json").write_text(json.dumps(metrics))
    code, out, err = report([run], capsys)
    assert code == 0, err
    assert len(out.splitlines()) == 3


def test_run_names():
    assert run_names([Path("runs/a"), Path("runs/b")]) == ["a", "b"]
    assert run_names([Path("x/seed-1"), Path("y/seed-1")]) == ["x/seed-1", "y/seed-1"]


@pytest.mark.parametrize("case, expect", [
    ("no dir", "no such run directory"),
    ("no log", "no log.jsonl"),
    ("no metrics", "no metrics.json"),
    ("empty log", "log.jsonl: no epochs logged"),
    ("bad log line", "log.jsonl line 2: not valid JSON"),
    ("log without epoch", "log.jsonl line 1: expected an object with an integer \"epoch\""),
    ("bad metrics", "metrics.json line 1: not valid JSON"),
    ("no clusters", "metrics.json: no \"clusters\" with a \"head_rate\" list"),
    ("sizes differ", "\"clusters\" needs a \"size\" list as long as \"head_rate\""),
    ("no tail", "metrics.json: no test hit@5 and ndcg@5 for tail users"),
])
def test_missing_or_bad_files_are_one_line(tmp_path, capsys, case, expect):
    good = make_run(tmp_path / "good")
    run = make_run(tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    if case == "no dir":
        run = tmp_path / "nope"
    elif case == "no log":
        (run / "log.jsonl").unlink()
    elif case == "no metrics":
        (run / "metrics.json").unlink()
    elif case == "empty log":
        (run / "log.jsonl").write_text("\n")
    elif case == "bad log line":
        (run / "log.jsonl").write_text('{"epoch": 0}\n{"epoch": 1\n')
    elif case == "log without epoch":
        (run / "log.jsonl").write_text('{"loss_total": 1.0}\n')
    elif case == "bad metrics":
        (run / "metrics.json").write_text("{")
    elif case == "no clusters":
        del metrics["clusters"]
    elif case == "sizes differ":
        metrics["clusters"]["size"].pop()
    elif case == "no tail":
        del metrics["test"]["tail"]
    if case in ("no clusters", "sizes differ", "no tail"):
        (run / "metrics.json").write_text(json.dumps(metrics))
    code, out, err = report([good, run], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err, err
    assert not list(tmp_path.rglob("*.png"))  # everything is checked before drawing


def test_without_matplotlib(tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, out, err = report([run], capsys)
    assert code == 2 and err == ("error: matplotlib is not installed; `pip install matplotlib` "
                                 "to draw the plots\n")


def test_report_on_a_real_training_run(mpl, tmp_path):
    d = synthetic(n_users=200, n_items=100, n_intents=4, seed=3)
    data = tmp_path / "small.txt"
    data.write_text("".join(f"{u + 1} {' '.join(map(str, d.sequence(u).tolist()))}\n"
                            for u in range(len(d))))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "s4rec.train", "--data", str(data), "--epochs", "2", "--hidden",
         "16", "--layers", "1", "--n-clusters", "8", "--batch-size", "64", "--progress", "false",
         "--threads", "1", "--run-dir", str(run)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr
    proc = subprocess.run([sys.executable, "-m", "s4rec.report", str(run)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(run / n) for n in
                                        ("training.png", "head_rate.png", "head_tail.png")]
    for n in ("training.png", "head_rate.png", "head_tail.png"):
        assert_png(run / n)
