"""`torchrun -m s4rec.train` on CPU with gloo: a 2-rank run against a 1-rank run of the same seed
(losses of every epoch and the metrics), --resume from 2 ranks to 1 and from 1 to 2, and a rank
that is stopped mid-run ending the whole run with its one-line message. With --shard-items: the
sharded item lookup against nn.Embedding, a sharded 2-rank run against the unsharded 1- and 2-rank
runs, its checkpoint in the single-process layout, --resume between sharded and unsharded runs,
and the one-line error without torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _spawn import run_group

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
    """240 users over 61 items (an odd count: uneven slices), 5 to 20 interactions each."""
    rng = np.random.default_rng(0)
    lines = [" ".join(map(str, [u + 1, *rng.integers(1, 62, rng.integers(5, 21))]))
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
    (dir1, _), (dir2, proc2) = one_and_two[1], one_and_two[2]
    _same_losses(_log(dir1), _log(dir2))
    m1, m2 = _metrics(dir1), _metrics(dir2)
    for split in ("valid", "test"):
        for group in ("overall", "head", "tail"):
            assert m2[split][group] == pytest.approx(m1[split][group], abs=1e-12)
    assert m2["world_size"] == 2 and m2["train_seconds"] > 0  # what benchmarks.accuracy reads
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


def test_plain_process_resumes_a_torchrun_run(data_file, tmp_path):
    """A torchrun checkpoint has no generator state (its draws come from seed, epoch and user): a
    plain `python -m s4rec.train --resume` goes on with a fresh stream and says so."""
    run_dir = tmp_path / "run"
    _run(2, ["--data", data_file, "--epochs", "1", "--run-dir", str(run_dir), *FAST], tmp_path)
    proc = subprocess.run([sys.executable, "-m", "s4rec.train", "--resume", str(run_dir),
                           "--epochs", "2"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "was trained under torchrun" in proc.stdout
    assert [e["epoch"] for e in _log(run_dir)] == [0, 1]
    assert _metrics(run_dir)["best_epoch"] in (0, 1)


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


# ----------------------------------------------------------------------------------------------
# --shard-items
# ----------------------------------------------------------------------------------------------

SHARD = ["--shard-items", "true"]


def _lookup_worker(rank, world):
    """Rank r looks up its own ids (items of both slices, padding, the mask token; rank 1 calls
    twice, the second time with no ids); the values, the slice's gradient and the summed mask
    gradient must equal nn.Embedding's on all ids."""
    import torch

    from s4rec.sharded_items import ShardedItemEmbedding, item_slices

    n_items, d = 7, 3
    torch.manual_seed(0)
    full = torch.nn.Embedding(n_items + 2, d, padding_idx=0)
    ids = [torch.tensor([[0, 1, 7, 8], [3, 3, 4, 2]]), torch.tensor([[5, 0, 8], [7, 6, 1]])]
    weights = [torch.randn(*t.shape, d, generator=torch.Generator().manual_seed(r))
               for r, t in enumerate(ids)]
    ref = full(torch.cat([t.flatten() for t in ids]))
    (ref * torch.cat([w.flatten(0, 1) for w in weights])).sum().backward()
    start, stop = item_slices(n_items, world)[rank]
    emb = ShardedItemEmbedding(full, n_items, start, stop)
    (out,) = emb.embed_groups([ids[rank]])
    extra = emb.embed_groups([ids[rank][:1]] if rank == 0 else [])
    (out * weights[rank]).sum().backward()
    if extra:
        (0 * extra[0]).sum().backward()
    emb.flush_grads()
    mask_grad = emb.mask.grad.clone()
    torch.distributed.all_reduce(mask_grad)
    with torch.no_grad():
        (again,) = emb.embed_groups([ids[rank]])
    return {"values": bool(torch.equal(out, full(ids[rank])) and torch.equal(again, out)),
            "grad": float((emb.weight.grad - full.weight.grad[1 + start:1 + stop]).abs().max()),
            "mask": float((mask_grad - full.weight.grad[n_items + 1]).abs().max()),
            "rows": stop - start}


def test_sharded_lookup_matches_embedding():
    results = run_group(2, _lookup_worker, timeout=120)
    assert [r["rows"] for r in results] == [3, 4]
    for r in results:
        assert r["values"] and r["grad"] < 1e-6 and r["mask"] < 1e-6, r


def _epoch_waits_worker(rank, world):
    """The waits of one data-parallel epoch through the Triton kernels, after a warm-up epoch."""
    import numpy as np
    import torch

    from s4rec import distributed
    from s4rec.batches import make_augmenter
    from s4rec.config import Config
    from s4rec.data import head_users, synthetic
    from s4rec.model import S4Rec
    from s4rec_kernels import _dispatch
    from _waits import count_waits

    data = synthetic(n_users=120, n_items=90, n_intents=4)
    cfg = Config(hidden=16, layers=1, dropout=0.0, n_clusters=8, batch_size=32, progress=False)
    torch.manual_seed(0)
    model = S4Rec.from_config(data.n_items, cfg)
    # the fused Adam keeps its step counters with the parameters (see test_sync_free)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    augmenter = make_augmenter(cfg, data, model.encoder.mask_id)
    trainable, head = np.flatnonzero(data.lengths >= 4)[:64], head_users(data)
    device = torch.device("cpu")
    with _dispatch.default_backend("triton"):
        _, step = distributed.train_epoch(model, optimizer, data, trainable, head, cfg, augmenter,
                                          device, 0, 0)
        with count_waits() as seen:
            stats, step = distributed.train_epoch(model, optimizer, data, trainable, head, cfg,
                                                  augmenter, device, step, 1)
    return {"seen": seen, "steps": step // 2, "stats": stats}


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the kernels need CUDA or the Triton interpreter")
def test_a_data_parallel_epoch_waits_once_a_step():
    """Each step waits only in its non-finite check: the ranks' row counts come from the batch
    split (not gathered), the terms and cluster sizes are summed on the device and read at the
    end (two reads)."""
    results = run_group(2, _epoch_waits_worker, timeout=240)
    for r in results:
        assert r["steps"] == 2, r
        assert len(r["seen"]) <= r["steps"] + 2, r["seen"]
        assert r["stats"] == results[0]["stats"]  # every rank logs the global values
        assert r["stats"]["empty_clusters"] >= 0 and r["stats"]["loss_total"] > 0


def _ranks_worker(rank, world):
    """Ranks of a random model over a 301-item table, sharded against one process, at fp32 and
    under bf16 autocast (which moves some users' ranks: the test checks that it does)."""
    import numpy as np
    import torch

    from s4rec import metrics, sharded_items
    from s4rec.data import synthetic
    from s4rec.model import S4Rec

    data = synthetic(n_users=90, n_items=301, n_intents=4)
    torch.manual_seed(0)
    model = S4Rec(data.n_items, 16, 2, 1, 0.0, 50, 8)
    users = np.arange(len(data))
    precisions = ("fp32", "bf16")
    whole = {p: metrics.compute_ranks(model, data, "test", 16, users=users, precision=p)
             for p in precisions}
    sharded_items.shard_model(model, world, rank)
    mine = np.array_split(users, world)[rank]
    split = {p: sharded_items.compute_ranks(model, data, "test", mine, 16, precision=p)
             for p in precisions}
    return {"same": {p: bool(np.array_equal(split[p], whole[p][mine])) for p in precisions},
            "bf16 moves ranks": int((whole["bf16"] != whole["fp32"]).sum())}


def test_sharded_ranks_follow_the_precision():
    for r in run_group(2, _ranks_worker, timeout=120):
        assert r["same"] == {"fp32": True, "bf16": True}, r
        assert r["bf16 moves ranks"] > 0, r


@pytest.fixture(scope="module")
def sharded_two(tmp_path_factory, data_file):
    run_dir = tmp_path_factory.mktemp("sharded") / "w2"
    proc = _run(2, ["--data", data_file, "--epochs", "2", "--run-dir", str(run_dir), *FAST,
                    *SHARD], run_dir.parent)
    return run_dir, proc


def test_sharded_items_match_unsharded_and_one_rank(one_and_two, sharded_two):
    run_dir, proc = sharded_two
    assert "item table split by rows, rank 0 holds [0, 30) of 61" in proc.stdout
    for world in (1, 2):
        straight = one_and_two[world][0]
        _same_losses(_log(straight), _log(run_dir))
        for split in ("valid", "test"):
            for group in ("overall", "head", "tail"):
                assert _metrics(run_dir)[split][group] == pytest.approx(
                    _metrics(straight)[split][group], abs=1e-12)
    # the checkpoint holds the whole table and Adam's state in the single-process layout
    ours = torch.load(run_dir / "last.pt", weights_only=True)
    theirs = torch.load(one_and_two[2][0] / "last.pt", weights_only=True)
    assert list(ours["model"]) == list(theirs["model"])
    assert ours["model"]["encoder.item_emb.weight"].shape == (63, 16)
    for key, value in theirs["model"].items():
        assert torch.allclose(ours["model"][key].cpu(), value.cpu(), rtol=1e-4, atol=1e-6), key
    assert ours["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
    for index, entry in theirs["optimizer"]["state"].items():
        for key, value in entry.items():
            assert torch.allclose(ours["optimizer"]["state"][index][key].cpu(), value.cpu(),
                                  rtol=1e-4, atol=1e-7), (index, key)


@pytest.mark.parametrize("first,then", [((2, SHARD), (1, ["--shard-items", "false"])),
                                        ((1, []), (2, SHARD))], ids=["2sharded-1", "1-2sharded"])
def test_resume_between_sharded_and_unsharded(one_and_two, data_file, tmp_path, first, then):
    run_dir = tmp_path / "run"
    _run(first[0], ["--data", data_file, "--epochs", "1", "--run-dir", str(run_dir), *FAST,
                    *first[1]], tmp_path)
    proc = _run(then[0], ["--resume", str(run_dir), "--epochs", "2", *then[1]], tmp_path)
    assert f"resumed {run_dir} at epoch 1 on {then[0]} ranks" in proc.stdout
    straight = one_and_two[then[0]][0]
    _same_losses(_log(run_dir), _log(straight))
    for split in ("valid", "test"):
        assert _metrics(run_dir)[split]["overall"] == pytest.approx(
            _metrics(straight)[split]["overall"], abs=1e-12)


def test_shard_items_without_torchrun_is_one_line(capsys, monkeypatch):
    from s4rec import train

    for name in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert train.main(["--shard-items", "true", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --shard-items splits the item table across the ranks")
    assert len(err.splitlines()) == 1
