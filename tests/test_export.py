"""`python -m s4rec.export`: a run as a torch.export program that plain torch loads and serves.

The program is loaded in a separate Python, isolated from the checkout and with s4rec made
unimportable, and must give the items and scores `s4rec.recommend` gives for the same users.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from s4rec.data import load_sequences, pad_left, synthetic
from s4rec.export import main
from s4rec.recommend import load_run, recommend

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 8  # shorter than most sequences: the program must encode only the newest items
K = 6

SERVE = r"""
import json, sys
sys.modules["s4rec"] = sys.modules["s4rec_kernels"] = None  # importing either now fails
import torch
meta = {"s4rec.json": ""}
program = torch.export.load(sys.argv[1], extra_files=meta).module()
outs = [program(seqs) for seqs in torch.load(sys.argv[2], weights_only=True)]
torch.save(outs, sys.argv[3])
print(json.dumps({"meta": json.loads(meta["s4rec.json"]),
                  "s4rec_loaded": sorted(name for name, module in sys.modules.items()
                                         if name.startswith("s4rec") and module is not None)}))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    d = synthetic(n_users=150, n_items=60, n_intents=4, seed=3)
    data = root / "small.txt"
    data.write_text("".join(f"{u + 1} {' '.join(map(str, d.sequence(u).tolist()))}\n"
                            for u in range(len(d))))
    run_dir = root / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "s4rec.train", "--data", str(data), "--epochs", "1", "--hidden",
         "16", "--layers", "1", "--n-clusters", "8", "--batch-size", "64", "--max-len",
         str(MAX_LEN), "--progress", "false", "--threads", "1", "--run-dir", str(run_dir)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr
    return run_dir, data


def serve_elsewhere(program: Path, batches, tmp_path):
    """Run the program in `python -I` from an empty folder: (outputs per batch, printed JSON)."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    torch.save(batches, tmp_path / "in.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", SERVE, str(program), str(tmp_path / "in.pt"),
                           str(tmp_path / "out.pt")], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return torch.load(tmp_path / "out.pt", weights_only=True), json.loads(proc.stdout)


def test_exported_program_serves_what_recommend_serves(run, tmp_path, capsys):
    run_dir, data_file = run
    program = tmp_path / "model.pt2"
    assert main(["--run", str(run_dir), "--out", str(program), "--k", str(K)]) == 0
    assert f"wrote {program}" in capsys.readouterr().out

    data = load_sequences(data_file)
    lengths = data.lengths
    long_users = np.flatnonzero(lengths > 2 * MAX_LEN)[:3]  # history reaches past the window
    short_users = np.flatnonzero(lengths < MAX_LEN)[:2]
    assert len(long_users) == 3 and len(short_users) == 2
    users = np.concatenate([long_users, short_users])
    whole = [data.sequence(u) for u in users]
    batches = [
        torch.as_tensor(pad_left(whole, int(lengths[users].max()))),  # (5, longest)
        torch.as_tensor(pad_left(whole[-1:], len(whole[-1]))),  # (1, its own length), no padding
        torch.as_tensor(pad_left(whole[:2], int(lengths[users[:2]].max()) + 5)),  # extra padding
    ]
    outs, printed = serve_elsewhere(program, batches, tmp_path)
    assert printed["s4rec_loaded"] == []
    assert printed["meta"]["k"] == K and printed["meta"]["max_len"] == MAX_LEN

    model, cfg = load_run(run_dir)
    want_ids, want_scores = recommend(model, data, users, K, max_pad=cfg.max_pad)
    for (ids, scores), rows in zip(outs, [slice(None), slice(-1, None), slice(0, 2)]):
        assert ids.dtype == torch.int64 and scores.dtype == torch.float32
        assert ids.tolist() == want_ids[rows].tolist()
        torch.testing.assert_close(scores, torch.as_tensor(want_scores[rows]))
    for u, ids in zip(users, outs[0][0].tolist()):
        assert not set(ids) & set(data.sequence(u).tolist())


def test_rows_with_fewer_than_k_items_left_end_in_zeros(run, tmp_path):
    run_dir, _ = run
    program = tmp_path / "model.pt2"
    assert main(["--run", str(run_dir), "--out", str(program), "--k", "60"]) == 0
    seqs = torch.tensor([list(range(1, 58)), [0] * 54 + [1, 2, 3]])  # 57 of 60 items, and 3
    ids, scores = torch.export.load(program).module()(seqs)
    assert ids[0, 3:].tolist() == [0] * 57 and torch.isneginf(scores[0, 3:]).all()
    assert sorted(ids[0, :3].tolist()) == [58, 59, 60] and torch.isfinite(scores[0, :3]).all()
    assert sorted(ids[1, :57].tolist()) == list(range(4, 61)) and ids[1, 57:].tolist() == [0] * 3


@pytest.mark.parametrize("argv, message", [
    (["--run", "{tmp}/nothing"], "no such run directory"),
    (["--run", "{run}", "--k", "0"], "--k must be in 1..60"),
    (["--run", "{run}", "--out", "{tmp}/no/such/folder/m.pt2"], "No such file or directory"),
])
def test_bad_requests_are_one_line(run, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, run=run[0]) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "m.pt2")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
