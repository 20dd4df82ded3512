"""`python -m s4rec.recommend`: top-k unseen items with the original ids, and its errors."""

import csv
import json
import os
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from _data import data_path

from s4rec.config import Config
from s4rec.data import load_dataset, load_inter, load_sequences, pad_left, save_mapping, synthetic
from s4rec.model import S4Rec
from s4rec.recommend import load_run, main, recommend

ROOT = Path(__file__).resolve().parents[1]
USER_BASE = 1000  # user ids in the small file are 1000.., so ids and rows differ


def write_lines(d, path, user_base=USER_BASE):
    path.write_text("".join(f"{user_base + u} {' '.join(map(str, d.sequence(u).tolist()))}\n"
                            for u in range(len(d))))
    return path


def make_run(run_dir: Path, n_items: int, seed: int = 0, **settings) -> Path:
    """A run directory as s4rec.train leaves it, holding an untrained model."""
    cfg = Config(**{"hidden": 16, "heads": 2, "layers": 1, "dropout": 0.1, "max_len": 20,
                    "n_clusters": 4, **settings})
    torch.manual_seed(seed)
    model = S4Rec(n_items, cfg.hidden, cfg.heads, cfg.layers, cfg.dropout, cfg.max_len,
                  cfg.n_clusters)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg)))
    torch.save({"model": model.state_dict(), "config": asdict(cfg), "epoch": 0, "valid": {}},
               run_dir / "best.pt")
    return run_dir


def cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def parse_table(out: str):
    lines = out.strip().splitlines()
    assert lines[0].split() == ["user", "rank", "item", "score"]
    rows = [line.split() for line in lines[1:]]
    return [(u, int(r), i, float(s)) for u, r, i, s in rows]


def brute_force(run_dir, data, row, k):
    """Score every item with the plain encoder, drop the history, sort."""
    model, cfg = load_run(run_dir)
    seq = data.sequence(row)[-cfg.max_len:]
    with torch.no_grad():
        z = model.encoder(torch.as_tensor(pad_left([seq], cfg.max_len)))[:, -1]  # (1, d)
        scores = (z @ model.encoder.item_table().T)[0].double().numpy()  # (V,)
    scores[data.sequence(row) - 1] = -np.inf
    top = np.argsort(-scores, kind="stable")[:k]
    return (top + 1).tolist(), scores[top].tolist()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    return write_lines(synthetic(n_users=200, n_items=100, n_intents=4, seed=2), root / "small.txt")


@pytest.fixture(scope="module")
def trained_run(small):
    run_dir = small.parent / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "s4rec.train", "--data", str(small), "--epochs", "1", "--hidden",
         "16", "--layers", "1", "--n-clusters", "8", "--batch-size", "64", "--progress", "false",
         "--threads", "1", "--run-dir", str(run_dir)],
        cwd=small.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return run_dir


# ----------------------------------------------------------------------------------------------
# a trained run


def test_table_is_the_best_unseen_items(trained_run, small, capsys):
    code, out, err = cli(["--run", trained_run, "--data", small, "--users", "1003, 1010,1199",
                          "--k", 7], capsys)
    assert code == 0, err
    rows = parse_table(out)
    data = load_sequences(small)
    assert [r[0] for r in rows] == ["1003"] * 7 + ["1010"] * 7 + ["1199"] * 7
    for user in ("1003", "1010", "1199"):
        mine = [r for r in rows if r[0] == user]
        assert [r[1] for r in mine] == list(range(1, 8))
        row = int(np.flatnonzero(data.user_ids == int(user))[0])
        items, scores = brute_force(trained_run, data, row, 7)
        assert [int(r[2]) for r in mine] == items
        np.testing.assert_allclose([r[3] for r in mine], scores, atol=1e-4)
        assert not set(items) & set(data.sequence(row).tolist())


def test_all_users_as_csv_and_batch_size_does_not_matter(trained_run, small, tmp_path, capsys):
    outs = []
    for batch_size in (7, 1024):
        out = tmp_path / f"recs{batch_size}.csv"
        code, stdout, err = cli(["--run", trained_run, "--data", small, "--all", "--k", 5,
                                 "--out", out, "--batch-size", batch_size], capsys)
        assert code == 0, err
        assert f"wrote 1000 recommendations for 200 users to {out}" in stdout
        with open(out, newline="") as f:
            outs.append(list(csv.reader(f)))
    a, b = outs
    assert a[0] == ["user", "rank", "item", "score"] and len(a) == 1 + 200 * 5
    assert [r[:3] for r in a] == [r[:3] for r in b]
    np.testing.assert_allclose([float(r[3]) for r in a[1:]], [float(r[3]) for r in b[1:]],
                               atol=1e-4)
    data = load_sequences(small)
    assert [r[0] for r in a[1::5]] == [str(u) for u in data.user_ids]


def test_unknown_user_is_one_line_without_traceback(trained_run, small):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "s4rec.recommend", "--run", str(trained_run), "--data", str(small),
         "--users", "1003,99999"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: user 99999 is not in small.txt\n"


# ----------------------------------------------------------------------------------------------
# original tokens


def test_inter_file_prints_original_tokens(tmp_path, capsys):
    d = synthetic(n_users=60, n_items=40, n_intents=4, seed=5)
    lines = [f"user-{u}\titem-{i}\t{t}\n" for u in range(len(d))
             for t, i in enumerate(d.sequence(u).tolist())]
    random.Random(0).shuffle(lines)
    path = tmp_path / "shop.inter"
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "".join(lines))
    data = load_inter(path)
    run_dir = make_run(tmp_path / "run", data.n_items)
    save_mapping(data, run_dir)
    code, out, err = cli(["--run", run_dir, "--data", path, "--users", "user-7,user-0", "--k", 4],
                         capsys)
    assert code == 0, err
    rows = parse_table(out)
    assert [r[0] for r in rows] == ["user-7"] * 4 + ["user-0"] * 4
    for user, u in (("user-7", 7), ("user-0", 0)):
        items = [r[2] for r in rows if r[0] == user]
        assert all(i.startswith("item-") for i in items) and len(set(items)) == 4
        seen = {f"item-{i}" for i in d.sequence(u).tolist()}
        assert not set(items) & seen
    # the same recommendations without mapping.json: the .inter file's own tokens
    (run_dir / "mapping.json").unlink()
    code, out2, _ = cli(["--run", run_dir, "--data", path, "--users", "user-7,user-0", "--k", 4],
                        capsys)
    assert code == 0 and out2 == out


def test_mapping_json_names_users_and_items(tmp_path, capsys):
    d = synthetic(n_users=30, n_items=20, n_intents=2, seed=1)
    small = write_lines(d, tmp_path / "d.txt", user_base=1)
    data = load_sequences(small)
    run_dir = make_run(tmp_path / "run", data.n_items)
    data.user_tokens = [f"U{u}" for u in range(len(data))]
    data.item_tokens = [f"I{i}" for i in range(1, data.n_items + 1)]
    save_mapping(data, run_dir)
    code, out, err = cli(["--run", run_dir, "--data", small, "--users", "U3", "--k", 3], capsys)
    assert code == 0, err
    rows = parse_table(out)
    items, _ = brute_force(run_dir, data, 3, 3)
    assert rows and all(r[0] == "U3" for r in rows)
    assert [r[2] for r in rows] == [f"I{i}" for i in items]
    code, _, err = cli(["--run", run_dir, "--data", small, "--users", "4"], capsys)
    assert code == 2 and err == "error: user 4 is not in d.txt\n"  # mapping names the users


def test_line_format_ids_and_few_unseen_items(tmp_path, capsys):
    small = tmp_path / "tiny.txt"
    small.write_text("7 1 2 3\n8 1 2 3 4 5 4\n9 5 4 3 2\n")
    run_dir = make_run(tmp_path / "run", 5)
    code, out, err = cli(["--run", run_dir, "--data", small, "--users", "007,+8,9", "--k", 5],
                         capsys)
    assert code == 0, err
    rows = parse_table(out)
    assert sorted(int(r[2]) for r in rows if r[0] == "7") == [4, 5]  # only two unseen items
    assert [r[1] for r in rows if r[0] == "7"] == [1, 2]
    assert [r for r in rows if r[0] == "8"] == []  # user 8 has seen every item
    assert [int(r[2]) for r in rows if r[0] == "9"] == [1]


def test_recommend_function(tmp_path):
    d = synthetic(n_users=50, n_items=30, n_intents=3)
    model, _ = load_run(make_run(tmp_path / "run", d.n_items))
    users = np.array([4, 0, 4])
    ids, scores = recommend(model, d, users, k=6, batch_size=2)
    assert ids.shape == scores.shape == (3, 6) and ids.dtype == np.int64
    assert np.array_equal(ids[0], ids[2]) and (np.diff(scores, axis=1) <= 0).all()
    for row, u in zip(ids, users):
        assert not set(row.tolist()) & set(d.sequence(u).tolist()) and row.min() >= 1


def test_recommend_at_bf16_scores_bf16_operands(tmp_path):
    """--precision bf16 encodes under autocast and scores bf16 z against the bf16 table (fp32
    products): the top-k scores equal those of the rounded operands, and differ from fp32's."""
    from s4rec.model import pack
    from s4rec.precision import autocast

    d = synthetic(n_users=60, n_items=40, n_intents=3)
    model, _ = load_run(make_run(tmp_path / "run", d.n_items))
    users = np.arange(12)
    ids, scores = recommend(model, d, users, k=5, batch_size=5, precision="bf16")
    fp_ids, fp_scores = recommend(model, d, users, k=5, batch_size=5)
    with torch.no_grad(), autocast("bf16", torch.device("cpu")):
        packed = pack([d.sequence(u) for u in users], model.encoder.max_len, 1 / 3, "cpu")
        z, _ = model.encoder.encode(packed)
    table = model.encoder.item_table().detach()
    want = z.to(torch.bfloat16).float() @ table.to(torch.bfloat16).float().T  # (U, V)
    got = np.take_along_axis(want.numpy(), ids - 1, axis=1)
    np.testing.assert_allclose(scores, got, rtol=1e-5, atol=1e-6)
    assert not np.allclose(scores, fp_scores, rtol=1e-5, atol=1e-6)


def test_config_inside_the_checkpoint_is_enough(tmp_path, capsys):
    small = write_lines(synthetic(n_users=20, n_items=16, n_intents=2), tmp_path / "d.txt")
    run_dir = make_run(tmp_path / "run", 16, max_len=8)
    (run_dir / "config.json").unlink()
    model, cfg = load_run(run_dir)
    assert cfg.max_len == 8 and model.encoder.max_len == 8
    code, out, err = cli(["--run", run_dir, "--data", small, "--users", "1000", "--k", 2], capsys)
    assert code == 0 and len(parse_table(out)) == 2, err


# ----------------------------------------------------------------------------------------------
# errors: one line, exit status 2


@pytest.fixture
def plain_run(tmp_path):
    small = write_lines(synthetic(n_users=20, n_items=16, n_intents=2), tmp_path / "d.txt")
    return make_run(tmp_path / "run", 16), small


@pytest.mark.parametrize("case", ["no run dir", "no best.pt", "bad best.pt", "items differ",
                                  "unknown users", "k too large", "mapping of other data",
                                  "bad data", "config mismatch", "unwritable out"])
def test_errors_are_one_line(plain_run, tmp_path, capsys, case):
    run_dir, small = plain_run
    args = ["--run", run_dir, "--data", small, "--users", "1000"]
    expect = {
        "no run dir": f"{tmp_path / 'nope'}: no such run directory",
        "no best.pt": "no best.pt",
        "bad best.pt": "cannot read the checkpoint",
        "items differ": "d.txt has 16 items but the model in",
        "unknown users": "users 5, x are not in d.txt",
        "k too large": "--k must be in 1..16",
        "mapping of other data": "mapping.json lists 3 users, the data has 20",
        "bad data": "d.txt line 2: 'x' is not an integer",
        "config mismatch": "does not fit the run's config",
        "unwritable out": "No such file or directory",
    }[case]
    if case == "no run dir":
        args[1] = tmp_path / "nope"
    elif case == "no best.pt":
        (run_dir / "best.pt").unlink()
    elif case == "bad best.pt":
        (run_dir / "best.pt").write_bytes(b"not a checkpoint")
    elif case == "items differ":
        make_run(run_dir, 17)
    elif case == "unknown users":
        args[-1] = "1000,5,x"
    elif case == "k too large":
        args += ["--k", "17"]
    elif case == "mapping of other data":
        (run_dir / "mapping.json").write_text('{"users": ["a", "b", "c"], "items": null}')
    elif case == "bad data":
        small.write_text("1 1 2 3\n2 1 x 3\n")
    elif case == "config mismatch":
        cfg = json.loads((run_dir / "config.json").read_text())
        (run_dir / "config.json").write_text(json.dumps({**cfg, "layers": 2}))
    elif case == "unwritable out":
        args += ["--out", tmp_path / "no" / "such" / "dir.csv"]
    code, out, err = cli(args, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err, err


# ----------------------------------------------------------------------------------------------
# Beauty


def test_beauty_user_gets_unseen_items_with_original_ids(tmp_path, capsys):
    path = data_path("Beauty.txt")
    data = load_dataset(path)
    run_dir = make_run(tmp_path / "run", data.n_items, max_len=50)
    code, out, err = cli(["--run", run_dir, "--data", path, "--users", "1,22363,5000"], capsys)
    assert code == 0, err
    rows = parse_table(out)
    assert len(rows) == 30
    for user in ("1", "22363", "5000"):
        items = [int(r[2]) for r in rows if r[0] == user]
        row = int(np.flatnonzero(data.user_ids == int(user))[0])
        assert len(set(items)) == 10 and min(items) >= 1 and max(items) <= 12101
        assert not set(items) & set(data.sequence(row).tolist())
        assert items == brute_force(run_dir, data, row, 10)[0]
    code, _, err = cli(["--run", run_dir, "--data", path, "--users", "99999"], capsys)
    assert code == 2 and err == "error: user 99999 is not in Beauty.txt\n"
