"""The chunked item ops (s4rec_kernels/chunked.py) against the eager references: values and
gradients with a random upstream gradient, ignored rows, planted ties, exclusions, NaN, k larger
than a chunk, V not a multiple of the chunk, chunks of one item and of more than V, bf16 inputs;
and backend "auto" choosing them above the logits budget."""
from __future__ import annotations

import math

import pytest
import torch

import s4rec_kernels
from s4rec_kernels import _dispatch, chunked, reference
from _tolerances import ROUNDING_MARGIN, assert_close
from test_item_softmax import (brute_rank, loss_and_grads, max_err, randint_matrix, randn,
                               random_csr, random_targets, scale_of, to_csr, upstream_for)

CHUNKS = [1, 7, 64, 199, 200, 203]  # V = 200 below: one item, odd, exact fit, > V


def chunked_ce(chunk):
    def fn(h, it, targets, **kw):
        return chunked.item_softmax_ce(h, it, targets, chunk_size=chunk, **kw)
    return fn


# ----------------------------------------------------------------------------------------------
# item_softmax_ce
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_ce_matches_float64_truth(dtype, reduction, chunk):
    # 37 rows, every 4th ignored; truth from the same values in float64 (TOL's definition)
    hidden, items = randn(37, 13, seed=1, dtype=dtype), randn(200, 13, seed=2, dtype=dtype)
    targets = random_targets(37, 200, seed=3, ignore_every=4)
    targets[1], targets[2], targets[3] = 0, 199, min(chunk, 199)  # first, last, a boundary
    upstream = upstream_for(reduction, 37, seed=4, device="cpu")
    got = loss_and_grads(chunked_ce(chunk), hidden, items, targets, upstream, reduction=reduction)
    truth = loss_and_grads(reference.item_softmax_ce, hidden.double(), items.double(), targets,
                           upstream, reduction=reduction)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    for g, t in zip(got, truth):
        assert_close(g, t, dtype)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunk", [5, 64])
def test_ce_bfloat16_inputs(reduction, chunk):
    # computed in float32: the loss within TOL of the float64 truth of the rounded values; the
    # bf16 gradients no worse than eager's against the truth of the unrounded values
    hidden, items = randn(48, 32, seed=14, dtype=torch.float64), randn(301, 32, seed=15,
                                                                       dtype=torch.float64)
    targets = random_targets(48, 301, seed=16, ignore_every=7)
    upstream = upstream_for(reduction, 48, seed=17, device="cpu")
    h, it = hidden.to(torch.bfloat16), items.to(torch.bfloat16)
    got = loss_and_grads(chunked_ce(chunk), h, it, targets, upstream, reduction=reduction)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    rounded = loss_and_grads(reference.item_softmax_ce, h.double(), it.double(), targets, upstream,
                             reduction=reduction)
    assert_close(got[0], rounded[0], torch.bfloat16)
    truth = loss_and_grads(reference.item_softmax_ce, hidden, items, targets, upstream,
                           reduction=reduction)
    eager = loss_and_grads(reference.item_softmax_ce, h, it, targets, upstream,
                           reduction=reduction)
    for g, e, t in zip(got, eager, truth):
        assert max_err(g, t) <= max_err(e, t) + ROUNDING_MARGIN[torch.bfloat16] * scale_of(t)


def test_ce_large_logits_no_worse_than_eager():
    # logits in the thousands, half the rows with their best item as target, and near copies of
    # the best items (so log s is not ~0): the saved max and log-sum keep p as accurate as
    # log_softmax does, where one lse rounded at the logits' scale would not
    hidden = 30.0 * randn(40, 16, seed=18, dtype=torch.float64)
    items = 30.0 * randn(333, 16, seed=19, dtype=torch.float64)
    best = (hidden @ items.t()).argmax(1)
    items[300:320] = items[best[:20]] + 1e-4 * randn(20, 16, seed=25, dtype=torch.float64)
    targets = random_targets(40, 333, seed=20)
    targets[1::2] = (hidden @ items.t()).argmax(1)[1::2]
    targets[::6] = -100
    upstream = upstream_for("none", 40, seed=21, device="cpu")
    h, it = hidden.float(), items.float()
    truth = loss_and_grads(reference.item_softmax_ce, h.double(), it.double(), targets, upstream,
                           reduction="none")
    got = loss_and_grads(chunked_ce(50), h, it, targets, upstream, reduction="none")
    eager = loss_and_grads(reference.item_softmax_ce, h, it, targets, upstream, reduction="none")
    for g, e, t in zip(got, eager, truth):
        assert max_err(g, t) <= max_err(e, t) + ROUNDING_MARGIN[torch.float32] * scale_of(t)


def test_ce_all_rows_ignored_and_no_rows():
    hidden = randn(4, 3, seed=5).requires_grad_(True)
    items = randn(6, 3, seed=6).requires_grad_(True)
    targets = torch.full((4,), -100)
    assert math.isnan(float(chunked.item_softmax_ce(hidden, items, targets, chunk_size=2).detach()))
    total = chunked.item_softmax_ce(hidden, items, targets, reduction="sum", chunk_size=2)
    total.backward()
    assert float(total.detach()) == 0.0
    assert float(hidden.grad.abs().sum()) == 0.0 and float(items.grad.abs().sum()) == 0.0
    rows = chunked.item_softmax_ce(hidden, items, targets, reduction="none", chunk_size=2)
    assert torch.equal(rows.detach(), torch.zeros(4))
    empty = torch.zeros(0, 3)
    none = torch.zeros(0, dtype=torch.long)
    assert math.isnan(float(chunked.item_softmax_ce(empty, items, none, chunk_size=2).detach()))
    assert chunked.item_softmax_ce(empty, items, none, reduction="none").shape == (0,)


def test_ce_custom_ignore_index_ignored_rows_get_no_gradient():
    hidden, items = randn(12, 8, seed=7), randn(50, 8, seed=8)
    targets = random_targets(12, 50, seed=9)
    targets[::3] = -1
    upstream = torch.ones(12, dtype=torch.float64)
    got = loss_and_grads(chunked_ce(9), hidden, items, targets, upstream, reduction="none",
                         ignore_index=-1)
    want = loss_and_grads(reference.item_softmax_ce, hidden.double(), items.double(), targets,
                          upstream, reduction="none", ignore_index=-1)
    assert float(got[1][targets == -1].abs().sum()) == 0.0
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


@pytest.mark.parametrize("which", ["hidden", "items"])
def test_ce_one_input_requires_grad(which):
    hidden, items = randn(10, 6, seed=22), randn(40, 6, seed=23)
    targets = random_targets(10, 40, seed=24)
    leaf = (hidden if which == "hidden" else items).clone().requires_grad_(True)
    args = (leaf, items) if which == "hidden" else (hidden, leaf)
    chunked.item_softmax_ce(*args, targets, chunk_size=7).backward()
    h = hidden.double().requires_grad_(which == "hidden")
    it = items.double().requires_grad_(which == "items")
    reference.item_softmax_ce(h, it, targets).backward()
    assert_close(leaf.grad, (h if which == "hidden" else it).grad, torch.float32)


def test_ce_gradcheck_float64():
    hidden = randn(5, 4, seed=9, dtype=torch.float64).requires_grad_(True)
    items = randn(11, 4, seed=10, dtype=torch.float64).requires_grad_(True)
    targets = torch.tensor([3, -100, 0, 10, 3])

    def fn(h, it):
        return chunked.item_softmax_ce(h, it, targets, reduction="none", chunk_size=3)

    assert torch.autograd.gradcheck(fn, (hidden, items))


# ----------------------------------------------------------------------------------------------
# item_rank
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 5, 56, 57, 100])
@pytest.mark.parametrize("user_block", [4, 1024])
def test_rank_matches_brute_force(chunk, user_block, monkeypatch):
    # small integers: every score exact, many real ties; duplicates and listed targets in the
    # exclusions; user blocks of 4 over 13 users
    monkeypatch.setattr(chunked, "RANK_USER_BLOCK", user_block)
    hidden, items = randint_matrix(13, 5, seed=1), randint_matrix(57, 5, seed=2)
    targets = random_targets(13, 57, seed=3)
    indptr, indices = random_csr(13, 57, seed=4, targets=targets)
    rank = chunked.item_rank(hidden, items, targets, indptr, indices, chunk_size=chunk)
    assert rank.dtype == torch.int64
    assert torch.equal(rank, brute_rank(hidden, items, targets, indptr, indices))
    assert torch.equal(rank, reference.item_rank(hidden, items, targets, indptr, indices))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rank_copies_of_the_target_tie_in_other_chunks(dtype):
    # copies of a target's embedding in other chunks than the target's score exactly like it
    items, hidden = randn(700, 24, seed=11, dtype=dtype), randn(9, 24, seed=12, dtype=dtype)
    targets = torch.tensor([5, 100, 350, 699, 0, 64, 65, 500, 5])
    copies = [3, 130, 420, 690]
    items[copies] = items[350].clone()
    none = to_csr([[] for _ in range(9)])
    rank = chunked.item_rank(hidden, items, targets, *none, chunk_size=64)
    excluding = to_csr([copies if u == 2 else [] for u in range(9)])
    without = chunked.item_rank(hidden, items, targets, *excluding, chunk_size=64)
    assert int(rank[2]) - int(without[2]) == len(copies)
    assert torch.equal(rank, reference.item_rank(hidden, items, targets, *none))
    assert torch.equal(rank, brute_rank(hidden, items, targets, *none))


def test_rank_nan_counts_against_the_target():
    hidden, items = randn(4, 3, seed=30), randn(20, 3, seed=31)
    items[6, 0] = math.nan  # every user's score of item 6 is NaN
    hidden[1, 0] = math.nan  # user 1: every score NaN, the worst rank
    targets = torch.tensor([6, 2, 11, 19])
    indptr, indices = to_csr([[1, 2], [3, 3], [], [6]])
    rank = chunked.item_rank(hidden, items, targets, indptr, indices, chunk_size=6)
    assert torch.equal(rank, reference.item_rank(hidden, items, targets, indptr, indices))
    assert int(rank[1]) == 20 - 1 - 1  # all but the target and the one excluded item


def test_rank_no_users():
    got = chunked.item_rank(torch.zeros(0, 3), randn(8, 3, seed=1),
                            torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                            torch.zeros(0, dtype=torch.long), chunk_size=3)
    assert got.shape == (0,) and got.dtype == torch.int64


# ----------------------------------------------------------------------------------------------
# item_topk
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k,chunk", [(1, 7), (5, 7), (50, 7), (203, 64), (10, 300)])
@pytest.mark.parametrize("with_exclusions", [False, True])
def test_topk_matches_reference(dtype, k, chunk, with_exclusions):
    # random scores (no ties); k above the chunk size; V = 203 is not a multiple of the chunk
    hidden, items = randn(11, 9, seed=40, dtype=dtype), randn(203, 9, seed=41, dtype=dtype)
    csr = random_csr(11, 203, seed=42, max_len=30) if with_exclusions else (None, None)
    got = chunked.item_topk(hidden, items, k, *csr, chunk_size=chunk)
    want = reference.item_topk(hidden, items, k, *csr)
    assert got[0].dtype == want[0].dtype and got[1].dtype == torch.int64
    assert got[0].shape == (11, k) and got[1].shape == (11, k)
    assert torch.equal(got[1], want[1])
    assert_close(got[0], want[0], dtype)


def test_topk_planted_ties_and_missing_slots():
    # integer scores: the k best values exactly; users whose exclusions leave fewer than k items
    # get -inf / -1 in the last slots; excluded items never come back
    hidden, items = randint_matrix(6, 3, seed=43), randint_matrix(30, 3, seed=44)
    lists = [list(range(27)), [], list(range(0, 30, 2)), [29, 29, 0], list(range(30))[1:], []]
    indptr, indices = to_csr(lists)
    values, index = chunked.item_topk(hidden, items, 12, indptr, indices, chunk_size=4)
    want_values, _ = reference.item_topk(hidden, items, 12, indptr, indices)
    assert torch.equal(values, want_values)
    for u, excluded in enumerate(lists):
        found = index[u][index[u] >= 0]
        assert not set(found.tolist()) & set(excluded)
        assert len(set(found.tolist())) == len(found) == min(12, 30 - len(set(excluded)))
        assert torch.equal(values[u, :len(found)], (hidden[u] @ items[found].t()))
        assert bool((values[u, len(found):] == -math.inf).all())


def test_topk_nan_ranks_first():
    hidden, items = randn(3, 4, seed=45), randn(25, 4, seed=46)
    items[17, 1] = math.nan
    values, index = chunked.item_topk(hidden, items, 3, chunk_size=4)
    assert index[:, 0].tolist() == [17, 17, 17] and bool(values[:, 0].isnan().all())
    want = reference.item_topk(hidden, items, 3)
    assert torch.equal(index, want[1])


# ----------------------------------------------------------------------------------------------
# backend "auto" and the budget
# ----------------------------------------------------------------------------------------------


def counting(monkeypatch, name):
    calls = []
    original = getattr(chunked, name)

    def spy(*args, **kw):
        calls.append(name)
        return original(*args, **kw)

    monkeypatch.setattr(chunked, name, spy)
    return calls


def test_auto_picks_chunked_above_the_budget(monkeypatch):
    hidden, items = randn(30, 8, seed=50), randn(500, 8, seed=51)  # 60 KB of fp32 logits
    targets = random_targets(30, 500, seed=52, ignore_every=5)
    wanted = random_targets(30, 500, seed=54)
    indptr, indices = random_csr(30, 500, seed=53, targets=wanted)
    calls = {n: counting(monkeypatch, n) for n in ("item_softmax_ce", "item_rank", "item_topk")}
    under = (s4rec_kernels.item_softmax_ce(hidden, items, targets),
             s4rec_kernels.item_rank(hidden, items, wanted, indptr, indices),
             s4rec_kernels.item_topk(hidden, items, 10, indptr, indices))
    assert not any(calls.values())  # 60 KB is far under 256 MB: the reference ran
    with _dispatch.logits_budget(0.05):  # 50 KB
        over = (s4rec_kernels.item_softmax_ce(hidden, items, targets),
                s4rec_kernels.item_rank(hidden, items, wanted, indptr, indices),
                s4rec_kernels.item_topk(hidden, items, 10, indptr, indices))
        with _dispatch.default_backend("reference"):  # the eager ground truth stays reachable
            s4rec_kernels.item_softmax_ce(hidden, items, targets)
        assert chunked.chunk_items("item_softmax_ce", 30, 500) == int(0.05 * 2**20) // (30 * 8)
    assert [len(c) for c in calls.values()] == [1, 1, 1]
    assert _dispatch.LOGITS_BUDGET_MB == 256.0
    assert_close(over[0], under[0], torch.float32)
    assert torch.equal(over[1], under[1]) and torch.equal(over[2][1], under[2][1])


def test_chunk_size_follows_the_budget(monkeypatch):
    monkeypatch.setattr(_dispatch, "LOGITS_BUDGET_MB", 1.0)
    assert chunked.chunk_items("item_softmax_ce", 1000, 10**6) == 2**20 // (1000 * 8)
    assert chunked.chunk_items("item_softmax_ce", 10, 500) == 500  # never more than V
    assert chunked.chunk_items("item_rank", 10**6, 10**6) == chunked.MIN_CHUNK
    assert chunked.chunk_items("item_topk", 5, 10**6, chunk_size=3) == 3


def test_bad_budget_and_backend_are_one_line_errors():
    with pytest.raises(ValueError, match=r"logits_budget: mb must be a number > 0; got 0"):
        with _dispatch.logits_budget(0):
            pass
    with pytest.raises(NotImplementedError, match=r"sinkhorn: no chunked version"):
        s4rec_kernels.sinkhorn(torch.zeros(4, 3), backend="chunked")
    with _dispatch.default_backend("chunked"):  # ops without a chunked version run the reference
        assert s4rec_kernels.sinkhorn(torch.zeros(4, 3)).shape == (4, 3)


def test_explicit_chunked_backend_checks_inputs():
    with pytest.raises(ValueError, match=r"item_softmax_ce: targets\[1\] = 9 is out of range"):
        s4rec_kernels.item_softmax_ce(randn(2, 3, seed=1), randn(9, 3, seed=2),
                                      torch.tensor([0, 9]), backend="chunked")
