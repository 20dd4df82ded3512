"""--precision auto|bf16|tf32|fp32: what each resolves to, the switches it sets, the fused ops'
operands under autocast, bf16 against fp32 training, and the protocol block."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import s4rec.train as train
from s4rec import precision
from s4rec.batches import make_augmenter, make_batch
from s4rec.config import Config
from s4rec.data import head_users, synthetic
from s4rec.losses import compute_losses
from s4rec.metrics import compute_ranks
from s4rec.model import S4Rec
from s4rec_kernels import _dispatch
from s4rec_kernels._item_common import fp32_dot_precision

ROOT = Path(__file__).resolve().parents[1]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_resolve_by_device():
    assert precision.resolve("auto", CPU) == ("fp32", "")
    assert precision.resolve("auto", CUDA) == ("bf16", "")
    assert precision.resolve("bf16", CPU) == ("bf16", "")
    assert precision.resolve("tf32", CUDA) == ("tf32", "")
    ran, note = precision.resolve("tf32", CPU)
    assert ran == "fp32" and "no TF32" in note
    assert precision.describe("fp32", "tf32").endswith("(--precision tf32)")
    with pytest.raises(ValueError, match="--precision must be one of auto, bf16, tf32, fp32"):
        precision.resolve("fp16", CPU)


def test_tf32_settings_are_set_and_restored():
    """On CUDA, tf32 turns on TF32 in torch's matmuls and convolutions and in the kernels' fp32
    products (the flags can be set without a GPU); the previous values come back after."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with precision.settings("tf32", CUDA):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert _dispatch.float32_dots_asked() == "tf32" and fp32_dot_precision() == "tf32"
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert _dispatch.float32_dots_asked() is None
    for name in ("fp32", "bf16"):
        with precision.settings(name, CUDA):
            assert _dispatch.float32_dots_asked() is None
    with precision.settings("tf32", CPU):  # resolve never gives tf32 on a CPU; nothing to set
        assert _dispatch.float32_dots_asked() is None


def test_op_inputs_take_autocast_dtype():
    a, b = torch.randn(3, 4), torch.randn(5, 4, dtype=torch.float64)
    assert precision.op_inputs(a, b) == (a, b)  # outside autocast: as given
    with precision.autocast("bf16", CPU):
        assert all(t.dtype == torch.bfloat16 for t in precision.op_inputs(a, b))
    with precision.autocast("fp32", CPU):
        assert precision.op_inputs(a)[0] is a


def _model_batch(seed=3):
    cfg = Config(hidden=16, layers=1, n_clusters=8, batch_size=48, dropout=0.0, seed=seed)
    data = synthetic(n_users=120, n_items=64)
    torch.manual_seed(seed)
    model = S4Rec.from_config(data.n_items, cfg)
    head = head_users(data, cfg.head_frac)
    augmenter = make_augmenter(cfg, data, model.encoder.mask_id)
    users = np.arange(cfg.batch_size)
    batch = make_batch(data, users, head, cfg, augmenter, np.random.default_rng(seed), "cpu")
    return cfg, data, head, model, batch


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or not _dispatch.triton_installed(),
                    reason="the kernels on a CPU need the Triton interpreter")
def test_bf16_step_kernels_match_reference_rule():
    """Under bf16 autocast the model hands the fused ops bf16 operands; the kernels (in the
    interpreter) and the references both compute in fp32 from those values (the dtype rule), so
    every term, its gradients and the evaluation ranks agree to fp32 rounding."""
    cfg, data, head, model, batch = _model_batch()
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        with _dispatch.default_backend(backend), precision.autocast("bf16", CPU):
            terms, _ = compute_losses(model, batch, cfg)
            ranks = compute_ranks(model, data, "valid", 64, precision="bf16")
        sum(terms.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = ({k: float(v.detach()) for k, v in terms.items()}, grads, ranks)
    (ref_terms, ref_grads, ref_ranks), (got_terms, got_grads, got_ranks) = (
        results["reference"], results["triton"])
    assert set(got_terms) == {"sr", "clust", "scl", "ckd", "adv"}
    for name, value in ref_terms.items():
        assert got_terms[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    # gradients: the ops return them in bf16 and the autocast layers' backward runs in bf16, so
    # an fp32 difference in the last bits can flip a bf16 rounding on the way (one bf16 step,
    # 2**-7 relative, at the largest entry); measured up to 0.7% of each parameter's largest
    # gradient in the dense layers, 0.02% elsewhere
    eps = torch.finfo(torch.bfloat16).eps
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=0,
                                   atol=2 * eps * float(grad.abs().max()), msg=name)
    # the ranks of users whose target ties no item within fp32 rounding are the same
    assert (got_ranks == ref_ranks).mean() >= 0.98


def _run(prec, run_dir):
    code = train.main(["--epochs", "2", "--synthetic-users", "600", "--kernels", "reference",
                       "--precision", prec, "--progress", "false", "--threads", "1",
                       "--grad-share", "false", "--run-dir", str(run_dir)])
    assert code == 0
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return log, json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("precision")
    return {p: _run(p, base / p) for p in ("fp32", "bf16")}


# Tolerances of a bf16 run against an fp32 run of the same seed (synthetic default, 600 users,
# 2 epochs, the reference ops). bf16 keeps 8 significant bits: each operand of the dense layers
# and of the fused ops is rounded by at most 2**-9 relative, 2**-8 between two neighbours. The
# losses are means over thousands of such products, whose rounding errors mostly cancel, and the
# weights stay fp32, so no epoch's mean loss term may move by more than one bf16 step of its own
# value (LOSS_REL). Measured: 3e-6 (L_SR) to 1.8e-3 (L_CKD, whose teacher is the argmax of bf16
# cosine scores, so users near a tie change teacher) relative, 6e-5 for the total. Metrics move
# only when a user's rank changes: one user of 600 leaving the top 20 moves ndcg@20 by up to
# 1/600; NDCG_TOL allows about two (measured: 1.5e-4). Neither bound is vacuous: one epoch of
# fp32 training moves L_SR by 0.7% and doubles valid ndcg@20 (0.019 -> 0.038), asserted below,
# so a bf16 run that skipped updates, trained on other data or lost a term fails.
LOSS_REL = 2.0**-8  # relative, on each epoch's mean of every loss term
NDCG_TOL = 4e-3  # absolute, on valid ndcg@20 of each epoch and on test ndcg@20


def test_bf16_run_ends_close_to_fp32_run(two_runs):
    (log32, metrics32), (log16, metrics16) = two_runs["fp32"], two_runs["bf16"]
    assert len(log32) == len(log16) == 2
    changed = False
    for e32, e16 in zip(log32, log16):
        for key in [k for k in e32 if k.startswith("loss_")]:
            assert abs(e16[key] - e32[key]) <= LOSS_REL * abs(e32[key]), (
                e32["epoch"], key, e32[key], e16[key])
            changed |= e16[key] != e32[key]
        assert abs(e16["valid"]["ndcg@20"] - e32["valid"]["ndcg@20"]) <= NDCG_TOL
    assert changed, "bf16 changed nothing: the autocast did not take effect"
    assert abs(metrics16["test"]["overall"]["ndcg@20"] -
               metrics32["test"]["overall"]["ndcg@20"]) <= NDCG_TOL
    # the bounds are not vacuous: one epoch moves both numbers by more than them
    first, second = log32
    assert first["loss_sr"] - second["loss_sr"] > LOSS_REL * first["loss_sr"]
    assert second["valid"]["ndcg@20"] - first["valid"]["ndcg@20"] > 2 * NDCG_TOL


def test_protocol_records_the_precision(two_runs):
    for prec, (_, metrics) in two_runs.items():
        assert metrics["protocol"]["precision"] == precision.DESCRIPTIONS[prec]
        assert metrics["config"]["precision"] == prec


def _cli(args, cwd, module="s4rec.train"):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bad_precision_is_one_line(tmp_path):
    proc = _cli(["--precision", "fp16", "--epochs", "1"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: --precision must be one of auto, bf16, tf32, fp32")
    path = tmp_path / "c.json"
    path.write_text('{"precision": "half"}')
    proc = _cli(["--config", str(path)], tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "'half'" in proc.stderr
