import numpy as np
import pytest
import torch

from s4rec.data import SequenceData, split_input, synthetic
from s4rec.metrics import compute_ranks, evaluate, rank_metrics
from s4rec.model import S4Rec


def _model(n_items, seed=0):
    torch.manual_seed(seed)
    return S4Rec(n_items, hidden=16, heads=2, layers=1, dropout=0.0, max_len=20, n_clusters=4)


@pytest.fixture(scope="module")
def small():
    return synthetic(n_users=300, n_items=120, n_intents=4, seed=3)


def test_rank_metrics_formula():
    m = rank_metrics(np.array([0, 1, 4, 5, 9, 19, 20, 1000]))
    assert m["hit@5"] == pytest.approx(3 / 8)
    assert m["hit@10"] == pytest.approx(5 / 8)
    assert m["hit@20"] == pytest.approx(6 / 8)
    expected = (1 + 1 / np.log2(3) + 1 / np.log2(6)) / 8
    assert m["ndcg@5"] == pytest.approx(expected)
    expected20 = expected + (1 / np.log2(7) + 1 / np.log2(11) + 1 / np.log2(21)) / 8
    assert m["ndcg@20"] == pytest.approx(expected20)


def test_equal_scores_give_zero_hits(small):
    # Ties count against the target, so a model that cannot tell items apart hits nothing.
    model = _model(small.n_items)
    with torch.no_grad():
        model.encoder.item_emb.weight.zero_()
    ranks = compute_ranks(model, small, "test", batch_size=64)
    history = split_input(small, np.arange(len(small)), "test")
    n_hist = np.array([len(np.unique(h[h != t])) for h, t in
                       zip(history, small.items[small.offsets[1:] - 1])])
    np.testing.assert_array_equal(ranks, small.n_items - 1 - n_hist)
    res = evaluate(model, small, "test", np.zeros(len(small), bool), batch_size=64)
    assert all(res["overall"][k] == 0.0 for k in res["overall"])


def test_metrics_do_not_depend_on_batch_size(small):
    model = _model(small.n_items, seed=1)
    ranks = [compute_ranks(model, small, "valid", batch_size=b) for b in (1, 7, 4096)]
    np.testing.assert_array_equal(ranks[0], ranks[1])
    np.testing.assert_array_equal(ranks[0], ranks[2])


def test_planted_best_item_ranks_first():
    # Item 6 is every user's test target, never in a history; give it the top score for each user.
    seqs = [[1, 2, 3, 6], [2, 3, 4, 6], [4, 1, 2, 6]]
    items = np.concatenate(seqs).astype(np.int32)
    offsets = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
    data = SequenceData(items, offsets, np.arange(1, 4), n_items=7, name="planted")
    model = _model(7).eval()
    with torch.no_grad():
        z = model.encoder(torch.as_tensor([[1, 2, 3], [2, 3, 4], [4, 1, 2]]))[:, -1]  # (3, d)
        target_row = torch.linalg.lstsq(z, torch.full((3, 1), 100.0)).solution[:, 0]
        model.encoder.item_emb.weight[6] = target_row
    assert (compute_ranks(model, data, "test", batch_size=2) == 0).all()
    with torch.no_grad():  # and the worst score ranks it behind every other candidate
        model.encoder.item_emb.weight[6] = -target_row
    n_candidates = 7 - 1 - 3  # every item but the target and the three in each history
    assert (compute_ranks(model, data, "test", batch_size=2) == n_candidates).all()


def test_excluding_history_never_worsens_a_rank(small):
    model = _model(small.n_items, seed=2)
    r_all = compute_ranks(model, small, "test", 128, exclude_history="all")
    r_none = compute_ranks(model, small, "test", 128, exclude_history="none")
    assert (r_all <= r_none).all() and (r_all < r_none).any()
    with pytest.raises(ValueError, match="exclude_history"):
        compute_ranks(model, small, "test", 128, exclude_history="some")
