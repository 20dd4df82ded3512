"""A training step through the Triton kernels waits for the device at most once (the trainer's
non-finite check), and inputs out of range still give an error without a wait: the kernels make
the loss NaN and the check names the op and the argument.

Waits are counted by tests/_waits.py (aten ops that copy a value to the host, and the Python calls
that wait, inside custom ops too). Under the interpreter every tensor is on the CPU, where Adam's
foreach step reads its CPU step counters (which stay on the CPU on a CUDA run too, so they are
not waits there); the fused Adam keeps them with the parameters, so the test uses it.
"""
import os

import numpy as np
import pytest
import torch

import s4rec_kernels
from s4rec import train
from s4rec.augment import Augmenter
from s4rec.config import Config
from s4rec.data import head_users, synthetic
from s4rec.model import S4Rec
from s4rec_kernels import _dispatch
from _waits import count_waits

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="the kernels need CUDA or the Triton interpreter")


def _setup():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = synthetic(n_users=120, n_items=90, n_intents=4)
    cfg = Config(hidden=16, layers=1, dropout=0.0, n_clusters=8, batch_size=32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = S4Rec(data.n_items, cfg.hidden, cfg.heads, cfg.layers, cfg.dropout, cfg.max_len,
                  cfg.n_clusters).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    augmenter = Augmenter(mask_id=model.encoder.mask_id, pool=train.training_pool(data))
    users = rng.choice(np.flatnonzero(data.lengths >= 4), cfg.batch_size, replace=False)
    batch = train.make_batch(data, users, head_users(data), cfg, augmenter, rng, device)
    return model, optimizer, batch, cfg


def test_the_counter_sees_waits_inside_custom_ops_and_outside():
    with count_waits() as seen:
        x = torch.arange(5.0)
        bool(x.sum() > 0)
        x[x > 2]
    assert seen == ["Tensor.__bool__", "aten.index.Tensor"]
    with count_waits() as seen:  # inside a custom op the dispatch mode is off
        _waiting_op(torch.arange(3))
    assert seen == ["Tensor.__int__"]


@torch.library.custom_op("s4rec_tests::waits", mutates_args=())
def _waiting_op(x: torch.Tensor) -> torch.Tensor:
    return x + int(x.sum())


def test_a_training_step_through_the_kernels_waits_at_most_once():
    model, optimizer, batch, cfg = _setup()
    with _dispatch.default_backend("triton"):
        train.train_step(model, optimizer, batch, cfg, 0)  # warm-up: compiles, caches
        with count_waits() as seen:
            train.train_step(model, optimizer, batch, cfg, 1)
    assert len(seen) <= 1, seen


def test_a_training_epoch_waits_once_a_step_and_reads_its_sums_at_the_end():
    from dataclasses import replace

    from s4rec.checkpoint import StopFlag

    model, optimizer, batch, cfg = _setup()
    cfg = replace(cfg, progress=False, grad_share=False)
    data = synthetic(n_users=120, n_items=90, n_intents=4)
    trainable = np.flatnonzero(data.lengths >= 4)[:96]  # three batches of 32
    augmenter = Augmenter(mask_id=model.encoder.mask_id, pool=train.training_pool(data))
    device = model.prototypes.device
    with _dispatch.default_backend("triton"):
        train.train_step(model, optimizer, batch, cfg, 0)  # warm-up: compiles, caches
        with count_waits() as seen:
            stats, step = train.train_epoch(model, optimizer, data, trainable, head_users(data),
                                            cfg, augmenter, np.random.default_rng(1), device, 1, 0,
                                            StopFlag())
    assert step == 4
    assert len(seen) <= 3 + 2, seen  # each step's non-finite check; the sums and the cluster sizes
    assert {"loss_sr", "loss_total", "loss_clust"} <= set(stats)
    assert np.isfinite(stats["loss_total"]) and stats["loss_total"] > 0


def test_out_of_range_targets_poison_the_loss_and_the_step_names_them():
    h, items = torch.randn(6, 8), torch.randn(5, 8)
    targets = torch.tensor([0, 4, -1, 7, 2, 3])
    _dispatch.deferred_errors()  # forget earlier records
    loss = s4rec_kernels.item_softmax_ce(h, items, targets, ignore_index=-1, backend="triton")
    assert torch.isnan(loss)
    rows = s4rec_kernels.item_softmax_ce(h, items, targets, ignore_index=-1, reduction="none",
                                         backend="triton")
    assert torch.isnan(rows[3]) and rows[2] == 0 and torch.isfinite(rows[[0, 1, 4, 5]]).all()
    errors = _dispatch.deferred_errors()
    assert errors and errors[0] == ("item_softmax_ce: targets[3] = 7 is out of range; expected "
                                    "values in [0, 5) or equal to -1")
    assert _dispatch.deferred_errors() == []


def test_out_of_range_assign_poisons_info_nce_and_is_named():
    z1, z2, protos = torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 8)
    _dispatch.deferred_errors()
    loss = s4rec_kernels.info_nce_proto(z1, z2, protos, torch.tensor([0, 2, 3, 1]), 0.5,
                                        backend="triton")
    assert torch.isnan(loss)
    assert _dispatch.deferred_errors() == [
        "info_nce_proto: assign[2] = 3 is out of range; expected values in [0, 3)"]
    ok = s4rec_kernels.info_nce_proto(z1, z2, protos, torch.tensor([0, 2, 2, 1]), 0.5,
                                      backend="triton")
    assert torch.isfinite(ok) and _dispatch.deferred_errors() == []


def test_the_trainer_names_the_op_and_argument_of_a_bad_input(monkeypatch):
    from s4rec import losses

    model, optimizer, batch, cfg = _setup()

    original = losses.item_softmax_ce

    def shifted(hidden, items, targets, **kwargs):  # one target past the table
        targets = targets.clone()
        targets[torch.argmax((targets >= 0).int())] = items.shape[0]
        return original(hidden, items, targets, **kwargs)

    monkeypatch.setattr(losses, "item_softmax_ce", shifted)
    with _dispatch.default_backend("triton"):
        with pytest.raises(train.NonFiniteLoss, match=r"sr .*item_softmax_ce: targets\[\d+\] = "
                                                      r"\d+ is out of range"):
            train.train_step(model, optimizer, batch, cfg, 0)
