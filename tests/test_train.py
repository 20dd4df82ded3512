import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import s4rec.train as train
from s4rec.augment import Augmenter
from s4rec.config import Config, parse_config
from s4rec.data import SequenceData, head_users, synthetic

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--hidden", "16", "--layers", "1", "--n-clusters", "8", "--batch-size", "64",
        "--progress", "false", "--threads", "1"]


def _cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "s4rec.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_cli_end_to_end(tmp_path):
    proc = _cli(["--epochs", "2", "--run-dir", str(tmp_path / "run"), *FAST], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for group in ("overall", "head", "tail"):
        assert group in out
    for name in ("hit@5", "hit@10", "hit@20", "ndcg@5", "ndcg@10", "ndcg@20"):
        assert name in out
    assert "clusters entropy=" in out and "empty=" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["test"]) == {"overall", "head", "tail"}
    assert metrics["protocol"]["ties"].startswith("pessimistic")
    assert metrics["epochs_run"] == 2
    for name in ("best.pt", "last.pt", "config.json", "log.jsonl"):
        assert (tmp_path / "run" / name).exists(), name
    logged = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in logged] == [0, 1] and "valid" in logged[0] and "lr" in logged[0]
    for key in ("loss_sr", "loss_clust", "loss_scl", "loss_ckd", "loss_adv", "padding_share",
                "cluster_entropy", "empty_clusters", "train_seconds"):
        assert key in logged[0], key
    clusters = metrics["clusters"]
    assert clusters["k"] == 8 and sum(clusters["size"]) == metrics["users"]
    assert len(clusters["head_rate"]) == 8


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


BAD_INPUTS = {
    "missing": (None, "missing.txt"),
    "empty": ("", "empty"),
    "non-integer": ("1 1 2 3 4\n2 1 x 3 4\n", "line 2"),
    "malformed id": ("1 1 2 3 4\n2 1 2.5 3 4\n", "line 2"),
    "too short": ("1 1 2\n2 3\n", "fewer than 3"),
    "zero id": ("1 1 2 3 4\n2 1 0 3 4\n", "line 2"),
    "out of range": ("1 1 2 3 4\n2 1 2 3 99\n", "line 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_nonzero(case, tmp_path):
    text, expect = BAD_INPUTS[case]
    path = tmp_path / "missing.txt" if text is None else _write(tmp_path, f"{case}.txt", text)
    extra = ["--n-items", "10"] if case == "out of range" else []
    proc = _cli(["--data", str(path), "--epochs", "1", *extra, *FAST], tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expect in lines[0]
    assert str(path.name) in lines[0]


def test_bad_flag_value_is_one_line(tmp_path):
    proc = _cli(["--tau2", "0", "--epochs", "1"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--tau2" in proc.stderr


def test_non_finite_loss_names_the_term_and_keeps_the_best(tmp_path, monkeypatch, capsys):
    real = train.compute_losses
    calls = {"n": 0}
    data = synthetic()
    per_epoch = math.ceil(int((data.lengths >= 4).sum()) / 64)

    def poisoned(model, batch, cfg):
        terms, assign = real(model, batch, cfg)
        calls["n"] += 1
        if calls["n"] > per_epoch:  # epoch 0 trains and is evaluated; epoch 1 goes wrong
            terms["scl"] = terms["scl"] * float("nan")
        return terms, assign

    monkeypatch.setattr(train, "compute_losses", poisoned)
    code = train.main(["--epochs", "3", "--run-dir", str(tmp_path / "run"), *FAST])
    err = capsys.readouterr().err
    assert code == 3
    assert "scl" in err and "non-finite" in err
    assert (tmp_path / "run" / "best.pt").exists()
    assert torch.load(tmp_path / "run" / "best.pt")["epoch"] == 0


def _planted_data():
    # Users' held-out items (the last two) are ids 90+ and never appear anywhere else.
    rng = np.random.default_rng(0)
    seqs = []
    for u in range(40):
        body = rng.integers(1, 60, size=int(rng.integers(2, 30)))
        seqs.append(np.concatenate([body, [90 + (u % 5), 95 + (u % 5)]]))
    items = np.concatenate(seqs).astype(np.int32)
    offsets = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
    return SequenceData(items, offsets, np.arange(40), n_items=99, name="planted")


@pytest.mark.parametrize("how", ["last", "random"])
def test_training_never_sees_held_out_items(how):
    # Augmentation happens after the split: inputs, targets, views and the insert pool hold no
    # validation or test target.
    data = _planted_data()
    cfg = Config(max_len=8, insert_ratio=1.0, mask_ratio=0.5, train_window=how)
    pool = train.training_pool(data)
    assert pool.max() < 90
    augmenter = Augmenter(mask_id=100, pool=pool, insert_ratio=1.0, mask_ratio=0.5)
    rng = np.random.default_rng(1)
    users = np.arange(len(data))
    for _ in range(20):
        batch = train.make_batch(data, users, head_users(data), cfg, augmenter, rng, "cpu")
        for packed in (batch.original, batch.view1, batch.view2):
            seen = torch.cat([s.flatten() for _, s in packed.groups])
            assert not ((seen >= 90) & (seen < 100)).any()
        targets = torch.cat([t.flatten() for t in batch.original.targets])
        assert targets.max() < 90


def test_random_window_is_a_contiguous_part_and_reaches_every_item():
    rng = np.random.default_rng(0)
    seq = np.arange(1, 31)
    assert np.array_equal(train.window(seq, 9, "last", rng), seq[-9:])
    assert np.array_equal(train.window(seq[:5], 9, "random", rng), seq[:5])  # shorter: all of it
    seen = set()
    for _ in range(400):
        part = train.window(seq, 9, "random", rng)
        assert len(part) == 9 and np.array_equal(np.diff(part), np.ones(8))
        seen.update(part.tolist())
    assert seen == set(seq.tolist())


def test_flags_cover_the_objective():
    cfg = parse_config(["--alpha", "0", "--beta1", "0.5", "--lam", "0", "--n-clusters", "64",
                        "--tau3", "1.0", "--normalize", "false"])
    assert (cfg.alpha, cfg.beta1, cfg.lam, cfg.n_clusters, cfg.tau3, cfg.normalize) == \
        (0.0, 0.5, 0.0, 64, 1.0, False)
    defaults = Config()
    assert (defaults.alpha, defaults.beta1, defaults.beta2, defaults.lam) == (0.01, 0.1, 0.1, 1.0)
    assert (defaults.n_clusters, defaults.eps, defaults.sinkhorn_iters) == (128, 0.05, 3)


def _test_metrics(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics["valid"], metrics["test"], metrics["best_epoch"]


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    args = ["--epochs", "4", "--seed", "5", *FAST]
    full = _cli(args + ["--run-dir", str(tmp_path / "full")], tmp_path)
    assert full.returncode == 0, full.stderr

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cut_dir = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "s4rec.train", *args, "--run-dir", str(cut_dir)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        if line.startswith("epoch   1"):
            proc.send_signal(signal.SIGTERM)  # lands during epoch 2
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "--resume" in err and "Traceback" not in err
    assert not (cut_dir / "metrics.json").exists()
    logged = [json.loads(x) for x in (cut_dir / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in logged] in ([0, 1], [0, 1, 2])

    resumed = _cli(["--resume", str(cut_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    assert _test_metrics(cut_dir) == _test_metrics(tmp_path / "full")
    logged = [json.loads(x) for x in (cut_dir / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in logged] == [0, 1, 2, 3]


def test_early_stopped_run_goes_on_when_resumed_with_more_patience(tmp_path):
    run_dir = tmp_path / "run"
    assert train.main(["--epochs", "4", "--patience", "0", *FAST, "--run-dir", str(run_dir)]) == 0
    assert [json.loads(x)["epoch"] for x in (run_dir / "log.jsonl").read_text().splitlines()] == [0]
    assert train.main(["--resume", str(run_dir), "--patience", "10"]) == 0
    logged = [json.loads(x)["epoch"] for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 3]
    assert json.loads((run_dir / "config.json").read_text())["patience"] == 10


def test_deterministic_runs_are_bitwise_equal(tmp_path):
    args = ["--epochs", "2", "--deterministic", "true", *FAST]
    for name in ("a", "b"):
        assert train.main(args + ["--run-dir", str(tmp_path / name)]) == 0
    assert _test_metrics(tmp_path / "a") == _test_metrics(tmp_path / "b")


def test_several_seeds_report_mean_and_std(tmp_path):
    code = train.main(["--epochs", "1", "--seeds", "1,2", "--run-dir", str(tmp_path), *FAST])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    per_seed = [_test_metrics(tmp_path / f"seed-{s}")[1]["overall"]["ndcg@20"] for s in (1, 2)]
    assert summary["test"]["overall"]["ndcg@20"]["mean"] == pytest.approx(np.mean(per_seed))
    assert summary["test"]["overall"]["ndcg@20"]["std"] == pytest.approx(np.std(per_seed, ddof=1))


def test_resume_needs_a_checkpoint(tmp_path):
    proc = _cli(["--resume", str(tmp_path / "nothing")], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "last.pt" in proc.stderr


def _loss_curve(kernels: str, steps: int, device: str, small: bool):
    from s4rec.model import S4Rec
    from s4rec_kernels._dispatch import default_backend

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = synthetic(n_users=120, n_items=90, n_intents=4) if small else synthetic()
    cfg = Config(hidden=16 if small else 64, layers=1 if small else 2, dropout=0.0,
                 n_clusters=8 if small else 128, batch_size=32 if small else 512)
    model = S4Rec(data.n_items, cfg.hidden, cfg.heads, cfg.layers, cfg.dropout, cfg.max_len,
                  cfg.n_clusters).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    augmenter = Augmenter(mask_id=model.encoder.mask_id, pool=train.training_pool(data))
    head = head_users(data)
    trainable = np.flatnonzero(data.lengths >= 4)
    curve = []
    with default_backend(kernels):
        for step in range(steps):
            users = rng.choice(trainable, cfg.batch_size, replace=False)
            batch = train.make_batch(data, users, head, cfg, augmenter, rng, device)
            loss, terms, _ = train.train_step(model, optimizer, batch, cfg, step)
            curve.append([loss.item()] + [terms[t].item() for t in sorted(terms)])
    return np.array(curve)


def test_fused_kernels_train_like_the_references():
    # The whole objective through the Triton kernels (the interpreter on CPU: a few steps of a tiny
    # model; 100 steps of the default model on CUDA) follows the eager references' loss curve.
    cuda = torch.cuda.is_available()
    device, steps, small = ("cuda", 100, False) if cuda else ("cpu", 3, True)
    ref = _loss_curve("reference", steps, device, small)
    fused = _loss_curve("triton", steps, device, small)
    np.testing.assert_allclose(fused, ref, rtol=2e-2 if cuda else 1e-4, atol=1e-4)


def test_unwritable_run_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = _cli(["--epochs", "1", "--run-dir", str(blocker / "run"), *FAST], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and str(blocker) in proc.stderr


@pytest.mark.parametrize("name", ["sr-only", "sr-csd", "no-csd", "no-ssl", "no-gr"])
def test_ablation_flag_zeroes_its_terms_only(name):
    from s4rec.config import ABLATIONS
    cfg = train.resolve(["--ablation", name])
    base = Config()
    for term in ("alpha", "beta1", "beta2", "lam"):
        expected = 0.0 if term in ABLATIONS[name] else getattr(base, term)
        assert getattr(cfg, term) == expected, term


def test_ablation_refuses_a_weight_it_removes():
    from s4rec.config import ConfigError
    with pytest.raises(ConfigError, match="--ablation no-gr sets --lam to 0"):
        train.resolve(["--ablation", "no-gr", "--lam", "0.5"])
    assert train.resolve(["--ablation", "no-gr", "--lam", "0"]).lam == 0


def test_preset_fills_what_is_not_given_and_flags_win():
    from s4rec.config import PRESETS
    for name, values in PRESETS.items():
        cfg = train.resolve(["--preset", name])
        for key, value in values.items():
            assert getattr(cfg, key) == value, (name, key)
    key, value = next(iter(PRESETS["ml-1m"].items()))
    other = value * 2 if isinstance(value, int) else value / 2
    cfg = train.resolve(["--preset", "ml-1m", f"--{key.replace('_', '-')}", str(other)])
    assert getattr(cfg, key) == other


def test_sr_only_under_a_preset_builds_the_plain_model():
    """The presets' projection head and views serve only the self-supervised terms: SR-only under
    a preset keeps the defaults (the same parameters and random streams as without the preset)."""
    for name in ("beauty", "ml-1m", "default"):
        full = train.resolve(["--preset", name])
        assert (full.proj_head, full.augment, full.lam) == ("mlp", "length", 0.0)
        sr = train.resolve(["--preset", name, "--ablation", "sr-only"])
        assert (sr.proj_head, sr.augment) == ("none", "all")
        assert sr.alpha == sr.beta1 == sr.beta2 == sr.lam == 0
    assert train.resolve(["--preset", "beauty", "--ablation", "sr-only", "--proj-head", "linear"]
                         ).proj_head == "linear"


def test_bad_preset_is_one_line(tmp_path):
    out = _cli(["--preset", "nope"], tmp_path)
    assert out.returncode == 2
    assert "--preset" in out.stderr and "Traceback" not in out.stderr


def test_config_file_sets_every_flag_and_flags_win(tmp_path):
    saved = Config(hidden=16, layers=1, n_clusters=8, preset="beauty", tau2=0.1, tau3=1.0,
                   sr_loss="bce", run_dir=str(tmp_path / "old"), resume=None)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**vars(saved), "config": None}))
    cfg = train.resolve(["--config", str(path), "--layers", "2"])
    assert cfg.layers == 2 and cfg.hidden == 16 and cfg.sr_loss == "bce" and cfg.tau3 == 1.0
    assert cfg.run_dir is None  # a rerun is a new run: the saved run directory is not reused
    hand = tmp_path / "hand.json"
    hand.write_text('\ufeff{"lr": 0.002, "ablation": "sr-only"}')
    cfg = train.resolve(["--config", str(hand)])
    assert cfg.lr == 0.002 and cfg.alpha == cfg.beta1 == cfg.lam == 0


@pytest.mark.parametrize("text, message", [
    ('{"hiddn": 16}', "unknown setting 'hiddn'"),
    ('{"hidden": "16"}', "hidden must be int"),
    ('[1, 2]', "expected a JSON object"),
    ('{"hidden": 16,}', "line 1: not valid JSON"),
])
def test_bad_config_file_is_one_line(tmp_path, text, message):
    path = tmp_path / "c.json"
    path.write_text(text)
    proc = _cli(["--config", str(path)], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --config") and message in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_rerun_from_a_saved_config(tmp_path):
    first = _cli(["--epochs", "1", "--run-dir", str(tmp_path / "a"), *FAST], tmp_path)
    assert first.returncode == 0, first.stderr
    again = _cli(["--config", str(tmp_path / "a" / "config.json"), "--run-dir",
                  str(tmp_path / "b")], tmp_path)
    assert again.returncode == 0, again.stderr
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["test"] == b["test"]  # same settings, same seed: the same run


def test_more_clusters_than_users_is_named_at_start(tmp_path):
    data = tmp_path / "small.txt"
    rng = np.random.default_rng(0)
    data.write_text("".join(f"{u} " + " ".join(map(str, rng.integers(1, 30, 6))) + "\n"
                            for u in range(1, 41)))
    proc = _cli(["--data", str(data), "--n-clusters", "100", "--epochs", "1", "--hidden", "16",
                 "--layers", "1", "--progress", "false", "--run-dir", str(tmp_path / "r")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "warning: --n-clusters 100 exceeds the 40 trainable users of the data set" in proc.stderr
    proc = _cli(["--n-clusters", "100", "--batch-size", "64", "--epochs", "0", "--hidden", "16",
                 "--progress", "false", "--run-dir", str(tmp_path / "s")], tmp_path)
    assert "exceeds the 64 users of a batch" in proc.stderr
