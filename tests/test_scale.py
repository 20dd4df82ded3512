"""Large catalogues end to end at a small scale: the trainer, its evaluation, a resume and
s4rec.recommend on the synthetic data set with --synthetic-items, with a logits budget so small
that every item op streams the item table in chunks."""
import csv
import json

import pytest

import s4rec.recommend as recommend
import s4rec.train as train
from s4rec_kernels import _dispatch, chunked

FAST = ["--hidden", "16", "--layers", "1", "--n-clusters", "8", "--batch-size", "64",
        "--progress", "false", "--threads", "1"]
LARGE = ["--synthetic-items", "3000", "--synthetic-users", "150", "--logits-budget-mb", "0.05",
         "--seed", "4", *FAST]


def spy(monkeypatch, names):
    calls = {name: 0 for name in names}
    for name in names:
        original = getattr(chunked, name)

        def wrapped(*args, _name=name, _original=original, **kw):
            calls[_name] += 1
            return _original(*args, **kw)

        monkeypatch.setattr(chunked, name, wrapped)
    return calls


def metrics(run_dir):
    found = json.loads((run_dir / "metrics.json").read_text())
    return found["items"], found["valid"], found["test"]


def test_trainer_streams_the_items_and_resumes(tmp_path, monkeypatch, capsys):
    calls = spy(monkeypatch, ["item_softmax_ce", "item_rank", "item_topk"])
    assert train.main(["--epochs", "2", "--run-dir", str(tmp_path / "full"), *LARGE]) == 0
    out = capsys.readouterr().out
    assert "3000 items" in out and "ndcg@20" in out and "overall" in out
    assert calls["item_softmax_ce"] > 0 and calls["item_rank"] > 0
    assert _dispatch.LOGITS_BUDGET_MB == 256.0  # restored after the run
    # one epoch, then a resume to two, ends where the uninterrupted run ended
    cut = tmp_path / "cut"
    assert train.main(["--epochs", "1", "--run-dir", str(cut), *LARGE]) == 0
    assert train.main(["--resume", str(cut), "--epochs", "2"]) == 0
    assert metrics(cut) == metrics(tmp_path / "full")
    assert metrics(cut)[0] == 3000

    # recommending from the run streams too, and gives the reference's items
    def recs(name):
        path = tmp_path / f"{name}.csv"
        assert recommend.main(["--run", str(cut), "--all", "--k", "7", "--out", str(path)]) == 0
        return [(r["user"], r["rank"], r["item"]) for r in csv.DictReader(path.open())]

    streamed = recs("streamed")
    assert calls["item_topk"] > 0
    config = json.loads((cut / "config.json").read_text())
    (cut / "config.json").write_text(json.dumps({**config, "logits_budget_mb": 1e6}))
    before = calls["item_topk"]
    assert recs("eager") == streamed and len(streamed) == 150 * 7
    assert calls["item_topk"] == before  # under the budget: the reference ran


@pytest.mark.parametrize("flag,value,message", [
    ("--synthetic-items", "20", "--synthetic-items must be at least 32"),
    ("--synthetic-users", "0", "--synthetic-users must be positive"),
    ("--logits-budget-mb", "0", "--logits-budget-mb must be positive"),
])
def test_bad_scale_flags_are_one_line(flag, value, message, tmp_path, capsys):
    assert train.main([flag, value, "--run-dir", str(tmp_path / "run"), *FAST]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
