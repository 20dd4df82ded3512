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


def _row(model, seed, all_, head, tail):
    """A stored row whose test hit@20 and ndcg@20 are both `all_` (head, tail alike)."""
    metrics = lambda v: {"hit@20": v, "ndcg@20": v}  # noqa: E731
    return {"dataset": "toy", "model": model, "seed": seed, "test": metrics(all_),
            "test_head": metrics(head), "test_tail": metrics(tail)}


def _write(tmp_path, monkeypatch, rows):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    (tmp_path / "accuracy-toy.json").write_text(json.dumps(rows))


BASE = [_row("SR-only", s, v, v + 0.03, v - 0.01) for s, v in ((1, 0.100), (2, 0.102), (3, 0.098))]


def test_bar_is_cleared_by_a_steady_gain_that_reaches_the_tail(tmp_path, monkeypatch):
    ours = [_row("S4Rec", s, 1.05 * b["test"]["hit@20"], 1.04 * b["test_head"]["hit@20"],
                 1.06 * b["test_tail"]["hit@20"]) for s, b in zip((1, 2, 3), BASE)]
    _write(tmp_path, monkeypatch, BASE + ours)
    text, ok = accuracy.bar("toy", "S4Rec")
    assert ok and text.endswith("S4Rec clears the bar")
    assert "| hit@20 | 0.1000 | 0.1050 | +5.0% |" in text


@pytest.mark.parametrize("change,why", [
    ((1.02, 1.02, 1.02), "hit@20 gain +2.0% < +3%"),
    ((1.05, 1.08, 1.04), "tail gain +4.0% < head gain +8.0% (ndcg@20)"),
])
def test_bar_fails_on_a_small_gain_or_a_tail_left_behind(tmp_path, monkeypatch, change, why):
    ours = [_row("S4Rec", s, change[0] * b["test"]["hit@20"], change[1] * b["test_head"]["hit@20"],
                 change[2] * b["test_tail"]["hit@20"]) for s, b in zip((1, 2, 3), BASE)]
    _write(tmp_path, monkeypatch, BASE + ours)
    text, ok = accuracy.bar("toy", "S4Rec")
    assert not ok and why in text


def test_bar_fails_when_the_gap_is_within_the_seed_noise(tmp_path, monkeypatch):
    values = (0.120, 0.095, 0.104)  # mean +5.3%, but paired gaps +0.020, -0.007, +0.006
    ours = [_row("S4Rec", s, v, v + 0.03, v - 0.008) for s, v in zip((1, 2, 3), values)]
    _write(tmp_path, monkeypatch, BASE + ours)
    text, ok = accuracy.bar("toy", "S4Rec")
    assert not ok and "hit@20 gap +0.0063 <= 2 std 0.0270" in text


def test_bar_needs_two_paired_seeds_and_known_models(tmp_path, monkeypatch, capsys):
    _write(tmp_path, monkeypatch, BASE + [_row("S4Rec", 7, 0.2, 0.25, 0.2)])
    text, ok = accuracy.bar("toy", "S4Rec")
    assert not ok and "hit@20: 0 paired seeds" in text and "needs 2 paired seeds, has 0" in text
    assert accuracy.main(["bar", "--dataset", "toy", "--model", "nope"]) == 2
    assert "no rows for model 'nope'" in capsys.readouterr().err
