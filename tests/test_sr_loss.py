"""The SR loss variants (--sr-loss ce | bce | sampled) and their negative samplers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s4rec.losses import sr_loss
from s4rec.negatives import sampler_log_q, shared_negatives, user_negatives


def _inputs(seed=0, n_items=13, d=5):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(n_items, d, generator=g, dtype=torch.float64, requires_grad=True)
    hidden = [torch.randn(2, 4, d, generator=g, dtype=torch.float64),
              torch.randn(1, 3, d, generator=g, dtype=torch.float64)]
    targets = [torch.tensor([[0, 3, 5, 13], [0, 0, 1, 2]]), torch.tensor([[7, 7, 9]])]
    return table, hidden, targets


def _rows(hidden, targets):
    h = torch.cat([hb[tb > 0] for hb, tb in zip(hidden, targets)])
    t = torch.cat([tb[tb > 0] for tb in targets]) - 1
    return h, t


def test_ce_is_the_full_softmax():
    table, hidden, targets = _inputs()
    h, t = _rows(hidden, targets)
    expect = F.cross_entropy(h @ table.T, t)
    assert torch.allclose(sr_loss(table, hidden, targets, "ce"), expect)


def test_bce_is_sasrec_loss_on_target_and_negative():
    table, hidden, targets = _inputs(1)
    negatives = [torch.tensor([[0, 4, 6, 1], [0, 0, 11, 12]]), torch.tensor([[2, 8, 10]])]
    h, t = _rows(hidden, targets)
    n = torch.cat([nb[tb > 0] for nb, tb in zip(negatives, targets)]) - 1
    pos, neg = (h * table[t]).sum(1), (h * table[n]).sum(1)
    expect = -(torch.log(torch.sigmoid(pos)) + torch.log(1 - torch.sigmoid(neg))).mean()
    got = sr_loss(table, hidden, targets, "bce", negatives=negatives)
    assert torch.allclose(got, expect)
    got.backward()
    assert table.grad is not None and torch.isfinite(table.grad).all()


@pytest.mark.parametrize("sampler", ["uniform", "popularity"])
def test_sampled_softmax_with_log_q_and_accidental_hits(sampler):
    table, hidden, targets = _inputs(2)
    pool = np.array([1, 1, 1, 2, 3, 3, 5, 7, 7, 7, 7, 9, 12, 13])
    log_q = torch.as_tensor(sampler_log_q(13, sampler, pool))
    ids = torch.tensor([3, 4, 7, 7, 11])  # 3 and 7 are also targets: accidental hits
    h, t = _rows(hidden, targets)
    m = len(ids)
    rows = []
    for i in range(len(t)):
        logits = [h[i] @ table[t[i]] - (log_q[t[i] + 1] + math.log(m))]
        for j in ids.tolist():
            if j - 1 != t[i]:
                logits.append(h[i] @ table[j - 1] - (log_q[j] + math.log(m)))
        logits = torch.stack(logits)
        rows.append(torch.logsumexp(logits, 0) - logits[0])
    expect = torch.stack(rows).mean()
    got = sr_loss(table, hidden, targets, "sampled", shared=(ids, log_q))
    assert torch.allclose(got, expect)


def test_uniform_log_q_cancels():
    """Under uniform sampling the correction is one constant, so the loss is the plain sampled
    softmax over the target and the negatives."""
    table, hidden, targets = _inputs(3)
    ids = torch.tensor([2, 6, 10, 12])
    log_q = torch.as_tensor(sampler_log_q(13, "uniform"))
    h, t = _rows(hidden, targets)
    cand = torch.cat([t[:, None], (ids - 1).expand(len(t), -1)], 1)
    logits = (h[:, None, :] * table[cand]).sum(-1)
    logits[:, 1:] = logits[:, 1:].masked_fill(cand[:, 1:] == t[:, None], float("-inf"))
    expect = F.cross_entropy(logits, torch.zeros(len(t), dtype=torch.long))
    assert torch.allclose(sr_loss(table, hidden, targets, "sampled", shared=(ids, log_q)), expect)


def test_user_negatives_avoid_the_history_and_padding():
    rng = np.random.default_rng(0)
    histories = [np.array([1, 2, 3, 4, 5, 6, 7]), np.array([9]), np.arange(1, 11)]
    targets = [np.array([0, 0, 2, 3]), np.array([0, 9]), np.array([4, 5])]
    neg = user_negatives(histories, targets, 10, rng)
    assert neg[0][:2].tolist() == [0, 0] and set(neg[0][2:]) <= {8, 9, 10}
    assert neg[1][0] == 0 and neg[1][1] in set(range(1, 11)) - {9}
    assert neg[2].tolist() == [0, 0]  # every item seen: no negative
    many = user_negatives([np.array([1, 2])] * 50, [np.ones(20, dtype=np.int64)] * 50, 4, rng)
    drawn = np.concatenate(many)
    assert set(drawn) == {3, 4}  # uniform over the unseen items: both appear in 1000 draws


def test_shared_negatives_follow_the_sampler():
    rng = np.random.default_rng(0)
    pool = np.array([5] * 90 + [2] * 10)
    ids = shared_negatives(2000, 6, rng, "popularity", pool)
    assert set(ids) == {2, 5} and 0.85 < (ids == 5).mean() < 0.95
    ids = shared_negatives(2000, 6, rng, "uniform")
    assert set(ids) == set(range(1, 7))
    assert np.allclose(sampler_log_q(6, "popularity", pool)[[2, 5]], np.log([0.1, 0.9]))
    with pytest.raises(ValueError, match="sampler"):
        sampler_log_q(6, "zipf")


def test_log_q_is_computed_once_per_pool_and_dropped_with_it():
    import gc

    from s4rec import batches

    pool = np.array([1, 2, 2, 5, 5, 5], dtype=np.int64)
    first = batches.shared_log_q(6, "popularity", pool, "cpu")
    assert batches.shared_log_q(6, "popularity", pool, "cpu") is first
    assert first.dtype == torch.float32
    assert torch.equal(first, torch.as_tensor(sampler_log_q(6, "popularity", pool),
                                              dtype=torch.float32))
    other = pool.copy()  # another run's pool: its own entry
    assert batches.shared_log_q(6, "popularity", other, "cpu") is not first
    before = len(batches._LOG_Q)
    del pool, other, first
    gc.collect()
    assert len(batches._LOG_Q) == before - 2
