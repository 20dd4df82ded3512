import json

import pytest

import benchmarks.accuracy as accuracy
import s4rec.train as train

FAST = ["--epochs", "1", "--hidden", "16", "--layers", "1", "--n-clusters", "8", "--batch-size", "64",
        "--progress", "false", "--threads", "1"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    dirs = []
    for seed in (1, 2):
        run_dir = base / f"seed-{seed}"
        assert train.main([*FAST, "--seed", str(seed), "--run-dir", str(run_dir)]) == 0
        dirs.append(run_dir)
    return dirs


def test_add_stores_the_run_and_replaces_the_same_model_and_seed(two_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    metrics = json.loads((two_runs[0] / "metrics.json").read_text())
    path = accuracy.add(two_runs[0], "S4Rec", "cmd one")
    accuracy.add(two_runs[0], "S4Rec", "cmd two")
    accuracy.add(two_runs[1], "S4Rec", "cmd two")
    accuracy.add(two_runs[0], "SR-only", "cmd three")
    rows = json.loads(path.read_text())
    assert path.name == f"accuracy-{metrics['dataset']}.json"
    assert [(r["model"], r["seed"], r["command"]) for r in rows] == [
        ("S4Rec", 1, "cmd two"), ("S4Rec", 2, "cmd two"), ("SR-only", 1, "cmd three")]
    first = rows[0]
    assert first["test"]["ndcg@20"] == round(metrics["test"]["overall"]["ndcg@20"], 4)
    assert first["valid"]["hit@5"] == round(metrics["valid"]["overall"]["hit@5"], 4)
    assert first["epochs"] == metrics["epochs_run"] and first["best_epoch"] == metrics["best_epoch"]
    assert first["device"].startswith("CPU")
    accuracy.add(two_runs[0], "S4Rec", "cmd four")  # re-adding keeps the row's place
    assert [(r["model"], r["seed"], r["command"]) for r in json.loads(path.read_text())] == [
        ("S4Rec", 1, "cmd four"), ("S4Rec", 2, "cmd two"), ("SR-only", 1, "cmd three")]


def test_table_reports_mean_and_std_over_seeds(two_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    for run_dir in two_runs:
        accuracy.add(run_dir, "S4Rec", "cmd")
    tests = [json.loads((d / "metrics.json").read_text())["test"]["overall"]["hit@20"]
             for d in two_runs]
    dataset = json.loads((two_runs[0] / "metrics.json").read_text())["dataset"]
    text = accuracy.table(dataset)
    row = [line for line in text.splitlines() if line.startswith("| S4Rec")]
    assert len(row) == 1 and "| 1,2 |" in row[0]
    mean = (round(tests[0], 4) + round(tests[1], 4)) / 2
    assert f"{mean:.4f} ± " in row[0]


def test_unfinished_run_is_one_line_error(tmp_path, capsys):
    assert accuracy.main(["add", str(tmp_path), "--model", "x", "--command", "y"]) == 2
    assert "metrics.json" in capsys.readouterr().err
