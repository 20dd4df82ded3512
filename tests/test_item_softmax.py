"""item_softmax_ce, item_rank and item_topk: checked against F.cross_entropy on the full logits,
brute-force counting and torch.topk, with planted ties, exclusions and NaN."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import s4rec_kernels
from s4rec_kernels import reference
from _tolerances import ROUNDING_MARGIN, assert_close, backends

CE_BACKENDS = backends("item_softmax_ce")
RANK_BACKENDS = backends("item_rank")
TOPK_BACKENDS = backends("item_topk")


def randn(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def randint_matrix(*shape, seed, dtype=torch.float32):
    """Small integers: every dot product is exact, so ties are real ties in any summation order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=g).to(dtype)


def random_csr(n_users, n_items, seed, max_len=6, targets=None):
    """Exclusion lists with duplicates, and sometimes the user's own target listed."""
    g = torch.Generator().manual_seed(seed)
    lists = []
    for u in range(n_users):
        row = torch.randint(0, n_items, (int(torch.randint(0, max_len + 1, (1,), generator=g)),),
                            generator=g).tolist()
        if row:
            row.append(row[0])  # a duplicate
        if targets is not None and u % 3 == 0:
            row.append(int(targets[u]))
        lists.append(row)
    return to_csr(lists)


def to_csr(lists):
    indptr = torch.tensor([0] + [len(r) for r in lists]).cumsum(0)
    indices = torch.tensor([i for r in lists for i in r], dtype=torch.long)
    return indptr, indices


def excluded_sets(indptr, indices):
    return [set(indices[int(indptr[u]):int(indptr[u + 1])].tolist()) for u in range(len(indptr) - 1)]


# ----------------------------------------------------------------------------------------------
# item_softmax_ce
# ----------------------------------------------------------------------------------------------


def eager_ce(hidden, items, targets, **kw):
    return F.cross_entropy(hidden @ items.t(), targets, **kw)


@pytest.mark.parametrize("backend", CE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,v,d", [(37, 1003, 24), (1, 5, 3)])
def test_ce_matches_cross_entropy_forward_backward(backend, dtype, reduction, n, v, d):
    hidden, items = randn(n, d, seed=1, dtype=dtype), randn(v, d, seed=2, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3))
    targets[::5] = -100
    if n == 1:
        targets[0] = v - 1
    h, it = hidden.clone().requires_grad_(True), items.clone().requires_grad_(True)
    loss = s4rec_kernels.item_softmax_ce(h, it, targets, reduction=reduction, backend=backend)
    h_ref, it_ref = hidden.clone().requires_grad_(True), items.clone().requires_grad_(True)
    expected = eager_ce(h_ref, it_ref, targets, reduction=reduction)
    assert loss.dtype == dtype and loss.shape == expected.shape
    assert_close(loss, expected, dtype)
    upstream = randn(*loss.shape, seed=4, dtype=dtype)
    loss.backward(upstream)
    expected.backward(upstream)
    assert_close(h.grad, h_ref.grad, dtype)
    assert_close(it.grad, it_ref.grad, dtype)


@pytest.mark.parametrize("backend", CE_BACKENDS)
def test_ce_all_rows_ignored(backend):
    hidden, items = randn(4, 3, seed=5), randn(6, 3, seed=6)
    targets = torch.full((4,), -100)
    mean = s4rec_kernels.item_softmax_ce(hidden, items, targets, backend=backend)
    assert math.isnan(float(mean))
    h = hidden.clone().requires_grad_(True)
    total = s4rec_kernels.item_softmax_ce(h, items, targets, reduction="sum", backend=backend)
    assert float(total.detach()) == 0.0
    total.backward()
    assert float(h.grad.abs().sum()) == 0.0
    rows = s4rec_kernels.item_softmax_ce(hidden, items, targets, reduction="none", backend=backend)
    assert torch.equal(rows, torch.zeros(4))


@pytest.mark.parametrize("backend", CE_BACKENDS)
def test_ce_no_rows_behaves_like_cross_entropy(backend):
    hidden, items, targets = torch.zeros(0, 3), randn(6, 3, seed=6), torch.zeros(0, dtype=torch.long)
    assert math.isnan(float(s4rec_kernels.item_softmax_ce(hidden, items, targets, backend=backend)))
    assert float(s4rec_kernels.item_softmax_ce(hidden, items, targets, reduction="sum",
                                               backend=backend)) == 0.0
    assert s4rec_kernels.item_softmax_ce(hidden, items, targets, reduction="none",
                                         backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", CE_BACKENDS)
def test_ce_custom_ignore_index_and_int32_targets(backend):
    hidden, items = randn(9, 4, seed=7), randn(11, 4, seed=8)
    targets = torch.tensor([0, -1, 3, 10, -1, 5, 5, 2, 1], dtype=torch.int32)
    loss = s4rec_kernels.item_softmax_ce(hidden, items, targets, ignore_index=-1, backend=backend)
    assert_close(loss, eager_ce(hidden, items, targets.long(), ignore_index=-1), torch.float32)


@pytest.mark.parametrize("backend", CE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ce_gradcheck_float64(backend, reduction):
    hidden, items = randn(5, 4, seed=9, dtype=torch.float64), randn(11, 4, seed=10, dtype=torch.float64)
    targets = torch.tensor([3, -100, 0, 10, 3])

    def fn(h, it):
        return s4rec_kernels.item_softmax_ce(h, it, targets, reduction=reduction, backend=backend)

    assert torch.autograd.gradcheck(fn, (hidden.requires_grad_(True), items.requires_grad_(True)))


@pytest.mark.parametrize("backend", CE_BACKENDS)
def test_ce_planted_best_targets_give_small_loss(backend):
    items = 20.0 * torch.eye(16)  # orthogonal items
    targets = torch.tensor([3, 0, 15, 7, 7])
    loss = s4rec_kernels.item_softmax_ce(items[targets], items, targets, backend=backend)
    assert float(loss) < 1e-6


@pytest.mark.parametrize("backend", CE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ce_half_inputs_against_float64_truth(backend, dtype):
    hidden, items = randn(64, 16, seed=11, dtype=torch.float64), randn(300, 16, seed=12, dtype=torch.float64)
    targets = torch.randint(0, 300, (64,), generator=torch.Generator().manual_seed(13))
    truth = eager_ce(hidden, items, targets)
    h, it = hidden.to(dtype).requires_grad_(True), items.to(dtype).requires_grad_(True)
    loss = s4rec_kernels.item_softmax_ce(h, it, targets, backend=backend)
    assert loss.dtype == torch.float32
    assert_close(loss, eager_ce(h.detach().double(), it.detach().double(), targets), dtype)
    eager_err = abs(float(eager_ce(h.detach(), it.detach(), targets)) - float(truth))
    assert abs(float(loss.detach()) - float(truth)) <= eager_err + ROUNDING_MARGIN[dtype]
    loss.backward()
    assert h.grad.dtype == dtype and it.grad.dtype == dtype


@pytest.mark.parametrize("backend", CE_BACKENDS)
def test_ce_ignores_autocast(backend):
    hidden, items = randn(7, 5, seed=14), randn(13, 5, seed=15)
    targets = torch.arange(7)
    expected = s4rec_kernels.item_softmax_ce(hidden, items, targets, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = s4rec_kernels.item_softmax_ce(hidden, items, targets, backend=backend)
    assert loss.dtype == torch.float32
    assert_close(loss, expected, torch.float32)


# ----------------------------------------------------------------------------------------------
# item_rank
# ----------------------------------------------------------------------------------------------


def brute_rank(hidden, items, targets, indptr, indices):
    """Count, user by user, the non-target non-excluded items not scoring below the target."""
    scores = (hidden.double() @ items.double().t()).tolist()
    excluded = excluded_sets(indptr, indices)
    ranks = []
    for u, row in enumerate(scores):
        t = int(targets[u])
        count = 0
        for i, s in enumerate(row):
            if i == t or (i in excluded[u] and i != t):
                continue
            if math.isnan(row[t]) or math.isnan(s) or s >= row[t]:
                count += 1
        ranks.append(count)
    return torch.tensor(ranks, dtype=torch.long)


@pytest.mark.parametrize("backend", RANK_BACKENDS)
@pytest.mark.parametrize("n_users,n_items,d", [(13, 57, 5), (1, 1, 2), (40, 300, 7)])
def test_rank_matches_brute_force(backend, n_users, n_items, d):
    hidden, items = randint_matrix(n_users, d, seed=1), randint_matrix(n_items, d, seed=2)
    targets = torch.randint(0, n_items, (n_users,), generator=torch.Generator().manual_seed(3))
    indptr, indices = random_csr(n_users, n_items, seed=4, targets=targets)
    rank = s4rec_kernels.item_rank(hidden, items, targets, indptr, indices, backend=backend)
    assert rank.dtype == torch.int64 and rank.shape == (n_users,)
    assert torch.equal(rank, brute_rank(hidden, items, targets, indptr, indices))


@pytest.mark.parametrize("backend", RANK_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_rank_random_scores(backend, dtype):
    hidden, items = randn(17, 9, seed=5, dtype=dtype), randn(211, 9, seed=6, dtype=dtype)
    targets = torch.randint(0, 211, (17,), generator=torch.Generator().manual_seed(7))
    indptr, indices = random_csr(17, 211, seed=8, targets=targets)
    rank = s4rec_kernels.item_rank(hidden, items, targets, indptr, indices, backend=backend)
    assert torch.equal(rank, brute_rank(hidden, items, targets, indptr, indices))


@pytest.mark.parametrize("backend", RANK_BACKENDS)
def test_rank_planted_ties_count_against_target(backend):
    items = randint_matrix(10, 4, seed=9)
    items[7] = items[2]
    items[8] = items[2]  # two copies of the target item
    hidden = randint_matrix(3, 4, seed=10)
    targets = torch.tensor([2, 2, 7])
    indptr, indices = to_csr([[], [8], []])
    rank = s4rec_kernels.item_rank(hidden, items, targets, indptr, indices, backend=backend)
    scores = hidden @ items.t()
    above = (scores > scores.gather(1, targets[:, None])).sum(1)
    assert rank.tolist() == [int(above[0]) + 2, int(above[1]) + 1, int(above[2]) + 2]


@pytest.mark.parametrize("backend", RANK_BACKENDS)
def test_rank_constant_scores(backend):
    n_items = 12
    hidden, items = torch.zeros(3, 4), randn(n_items, 4, seed=11)
    targets = torch.tensor([0, 5, 11])
    # user 0 lists its own target and a duplicate; user 2 excludes nothing
    indptr, indices = to_csr([[0, 3, 3, 4], [1, 2, 6, 7, 8], []])
    rank = s4rec_kernels.item_rank(hidden, items, targets, indptr, indices, backend=backend)
    assert rank.tolist() == [n_items - 1 - 2, n_items - 1 - 5, n_items - 1]


@pytest.mark.parametrize("backend", RANK_BACKENDS)
def test_rank_target_listed_in_exclusions_is_kept(backend):
    hidden, items = randn(4, 3, seed=12), randn(20, 3, seed=13)
    targets = torch.tensor([0, 4, 9, 19])
    plain_indptr, plain_indices = to_csr([[1, 2], [], [3], [5, 6]])
    listed_indptr, listed_indices = to_csr([[0, 1, 2], [4, 4], [3, 9], [19, 5, 6]])
    plain = s4rec_kernels.item_rank(hidden, items, targets, plain_indptr, plain_indices, backend=backend)
    listed = s4rec_kernels.item_rank(hidden, items, targets, listed_indptr, listed_indices,
                                     backend=backend)
    assert torch.equal(plain, listed)


@pytest.mark.parametrize("backend", RANK_BACKENDS)
def test_rank_planted_best_target_is_rank_zero(backend):
    items = torch.eye(30)
    targets = torch.tensor([4, 29, 0])
    hidden = 3.0 * items[targets] + 0.1
    indptr, indices = to_csr([[], [], []])
    assert s4rec_kernels.item_rank(hidden, items, targets, indptr, indices,
                                   backend=backend).tolist() == [0, 0, 0]


@pytest.mark.parametrize("backend", RANK_BACKENDS)
def test_rank_nan_counts_against_target(backend):
    hidden, items = randn(3, 4, seed=14), randn(9, 4, seed=15)
    targets = torch.tensor([1, 2, 3])
    hidden[0] = float("nan")  # every score of user 0 is NaN
    items[2, 0] = float("nan")  # the target of user 1 scores NaN
    indptr, indices = to_csr([[5, 5, 6], [0], []])
    rank = s4rec_kernels.item_rank(hidden, items, targets, indptr, indices, backend=backend)
    assert rank[0] == 9 - 1 - 2 and rank[1] == 9 - 1 - 1
    # user 2 has an ordinary target; the NaN-scoring item 2 counts against it
    scores = hidden[2] @ items.t()
    expected = int((scores[torch.arange(9) != 3] >= scores[3]).sum()) + 1
    assert rank[2] == expected
    assert torch.equal(rank, brute_rank(hidden, items, targets, indptr, indices))


@pytest.mark.parametrize("backend", RANK_BACKENDS)
def test_rank_no_users(backend):
    rank = s4rec_kernels.item_rank(torch.zeros(0, 3), randn(5, 3, seed=1), torch.zeros(0, dtype=torch.long),
                                   torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                                   backend=backend)
    assert rank.shape == (0,) and rank.dtype == torch.int64


@pytest.mark.parametrize("backend", RANK_BACKENDS)
@pytest.mark.parametrize("chunk", [1, 50, 200])
def test_rank_chunking_gives_identical_results(backend, chunk, monkeypatch):
    hidden, items = randint_matrix(21, 6, seed=16), randint_matrix(57, 6, seed=17)
    targets = torch.randint(0, 57, (21,), generator=torch.Generator().manual_seed(18))
    indptr, indices = random_csr(21, 57, seed=19, targets=targets)
    whole = s4rec_kernels.item_rank(hidden, items, targets, indptr, indices, backend=backend)
    monkeypatch.setattr(reference, "MAX_SCORES_PER_CHUNK", chunk)
    chunked = s4rec_kernels.item_rank(hidden, items, targets, indptr, indices, backend=backend)
    assert torch.equal(whole, chunked)


# ----------------------------------------------------------------------------------------------
# item_topk
# ----------------------------------------------------------------------------------------------


def masked_scores(hidden, items, indptr, indices):
    scores = hidden.double() @ items.double().t()
    if indptr is not None:
        for u, excluded in enumerate(excluded_sets(indptr, indices)):
            scores[u, sorted(excluded)] = -math.inf
    return scores


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("with_exclusions", [False, True])
@pytest.mark.parametrize("n_users,n_items,d,k", [(13, 57, 5, 10), (1, 3, 2, 1), (31, 403, 8, 20)])
def test_topk_matches_torch_topk(backend, with_exclusions, n_users, n_items, d, k):
    hidden = randn(n_users, d, seed=20, dtype=torch.float64)
    items = randn(n_items, d, seed=21, dtype=torch.float64)
    indptr, indices = random_csr(n_users, n_items, seed=22, max_len=2) if with_exclusions else (None, None)
    scores, index = s4rec_kernels.item_topk(hidden, items, k, indptr, indices, backend=backend)
    assert scores.shape == index.shape == (n_users, k)
    assert scores.dtype == torch.float64 and index.dtype == torch.int64
    expected_scores, expected_index = torch.topk(masked_scores(hidden, items, indptr, indices), k)
    assert_close(scores, expected_scores, torch.float64)
    found = index >= 0
    assert torch.equal(index[found], expected_index[found])
    assert bool(torch.isneginf(expected_scores[~found]).all())
    if indptr is not None:
        for u, excluded in enumerate(excluded_sets(indptr, indices)):
            assert not set(index[u].tolist()) & excluded


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
def test_topk_pads_when_too_few_items_remain(backend):
    hidden, items = randn(3, 4, seed=23), randn(6, 4, seed=24)
    indptr, indices = to_csr([[0, 1, 2, 3, 3], [], [0, 1, 2, 3, 4, 5]])
    scores, index = s4rec_kernels.item_topk(hidden, items, 5, indptr, indices, backend=backend)
    assert sorted(index[0, :2].tolist()) == [4, 5] and index[0, 2:].tolist() == [-1, -1, -1]
    assert bool(torch.isneginf(scores[0, 2:]).all()) and bool(torch.isfinite(scores[0, :2]).all())
    assert scores[0, 0] >= scores[0, 1]
    assert bool((index[1] >= 0).all())
    assert index[2].tolist() == [-1] * 5 and bool(torch.isneginf(scores[2]).all())


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
def test_topk_best_first_and_planted(backend):
    items = torch.eye(8)
    hidden = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7]])
    scores, index = s4rec_kernels.item_topk(hidden, items, 8, backend=backend)
    assert index.tolist() == [[7, 6, 5, 4, 3, 2, 1, 0]]
    assert scores.tolist() == [[7.0, 6, 5, 4, 3, 2, 1, 0]]
    indptr, indices = to_csr([[7, 5]])
    scores, index = s4rec_kernels.item_topk(hidden, items, 3, indptr, indices, backend=backend)
    assert index.tolist() == [[6, 4, 3]]


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
def test_topk_dtype_rule_and_no_grad(backend):
    hidden = randn(5, 4, seed=25, dtype=torch.float16).requires_grad_(True)
    items = randn(9, 4, seed=26, dtype=torch.float16)
    scores, index = s4rec_kernels.item_topk(hidden, items, 3, backend=backend)
    assert scores.dtype == torch.float32 and not scores.requires_grad
    expected = torch.topk(hidden.detach().float() @ items.float().t(), 3)
    assert_close(scores, expected.values, torch.float16)
    assert torch.equal(index, expected.indices)


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
def test_topk_nan_ranks_first(backend):
    hidden, items = randn(2, 3, seed=27), randn(6, 3, seed=28)
    items[4, 1] = float("nan")
    scores, index = s4rec_kernels.item_topk(hidden, items, 2, backend=backend)
    assert index[:, 0].tolist() == [4, 4] and bool(torch.isnan(scores[:, 0]).all())


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
def test_topk_no_users(backend):
    scores, index = s4rec_kernels.item_topk(torch.zeros(0, 3), randn(5, 3, seed=1), 2, backend=backend)
    assert scores.shape == index.shape == (0, 2)


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("chunk", [1, 50, 200])
def test_topk_chunking_gives_identical_results(backend, chunk, monkeypatch):
    hidden, items = randint_matrix(21, 6, seed=29), randint_matrix(57, 6, seed=30)
    items[:, 0] = torch.arange(57.0)
    hidden[:, 0] = 100.0  # integer scores 100 i + (|rest| <= 45): distinct, so the order is unique
    indptr, indices = random_csr(21, 57, seed=31)
    whole = s4rec_kernels.item_topk(hidden, items, 9, indptr, indices, backend=backend)
    monkeypatch.setattr(reference, "MAX_SCORES_PER_CHUNK", chunk)
    chunked = s4rec_kernels.item_topk(hidden, items, 9, indptr, indices, backend=backend)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
