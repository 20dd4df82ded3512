"""The ops with group= / shard= on 2 and 3 gloo processes against the single-process op on the
rows of all ranks concatenated: values (summed over the ranks) and gradients (each rank's own
rows, or its own slice of the item table), uneven row counts and item slices, slices out of rank
order, an empty slice, targets held by another rank, ignored rows, bf16 inputs, and the one-line
errors for slices that overlap or leave items out.

One process group of three ranks is spawned for the module (ranks 0 and 1 also form a group of
two); every case runs inside it on each backend, and each case is reported as its own test.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import pytest
import torch
import torch.distributed as dist

import s4rec_kernels
from s4rec_kernels import _dispatch, reference
from s4rec_kernels.distributed import VocabShard
from _spawn import run_group
from _tolerances import ROUNDING_MARGIN, assert_close, backends

D = 5


def randn(*shape, seed, dtype=torch.float32, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def small_ints(*shape, seed, dtype=torch.float32):
    """Every dot product is exact: ties are real ties in any summation order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, shape, generator=g).to(dtype)


def own(t: torch.Tensor, sizes: List[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def summed(x: torch.Tensor, group) -> torch.Tensor:
    x = x.detach().clone()
    dist.all_reduce(x, group=group)
    return x


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def check_grad(ours, single, truth, dtype, what):
    """fp32/fp64: close to the single-process gradient. bf16: no further from the float64 truth
    than the single-process op's own bf16 gradient, plus the rounding margin."""
    if ours is None:
        ours = torch.zeros_like(single)
    if dtype in (torch.float32, torch.float64):
        assert_close(ours, single, dtype, msg=lambda m: f"{what}: {m}")
    else:
        bound = max_err(single, truth) + ROUNDING_MARGIN[dtype] * max(float(truth.abs().max()), 1)
        assert max_err(ours, truth) <= bound, f"{what}: error {max_err(ours, truth)} > {bound}"


# ----------------------------------------------------------------------------------------------
# Cases: each runs on every rank of its group with (rank, world, group, backend)
# ----------------------------------------------------------------------------------------------

ROWS = {2: [5, 3], 3: [4, 1, 3]}  # uneven rows per rank


def sinkhorn_case(eps, n_iters, dtype=torch.float32, known_rows=False):
    """known_rows: the caller gives every rank's row count (group_rows), so none is gathered."""
    def run(rank, world, group, backend):
        sizes = ROWS[world]
        scores = randn(sum(sizes), 7, seed=1, scale=1.0).to(dtype)
        q_single = s4rec_kernels.sinkhorn(scores, eps, n_iters, backend=backend)
        q = s4rec_kernels.sinkhorn(own(scores, sizes, rank), eps, n_iters, backend=backend,
                                   group=group, group_rows=sizes if known_rows else None)
        assert_close(q, own(q_single, sizes, rank), dtype)
        assert not q.requires_grad
    return run


def info_nce_case(dtype=torch.float32, tau=0.5, known_rows=False):
    def run(rank, world, group, backend):
        sizes = ROWS[world]
        n, k = sum(sizes), 4
        z1, z2 = randn(n, D, seed=2, dtype=dtype), randn(n, D, seed=3, dtype=dtype)
        protos = randn(k, D, seed=4, dtype=dtype)
        assign = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(5))
        leaves = [t.clone().requires_grad_() for t in (z1, z2, protos)]
        loss = s4rec_kernels.info_nce_proto(*leaves, assign, tau, backend=backend)
        loss.backward()
        truth = [t.double().requires_grad_() for t in (z1, z2, protos)]
        reference.info_nce_proto(*truth, assign, tau).backward()
        mine = [own(z1, sizes, rank).clone().requires_grad_(),
                own(z2, sizes, rank).clone().requires_grad_(), protos.clone().requires_grad_()]
        part = s4rec_kernels.info_nce_proto(*mine, own(assign, sizes, rank), tau,
                                            backend=backend, group=group,
                                            group_rows=sizes if known_rows else None)
        part.backward()
        assert_close(summed(part, group), loss.detach(), dtype)
        for name, m, s, t in zip(("z1", "z2"), mine, leaves, truth):
            check_grad(m.grad, own(s.grad, sizes, rank), own(t.grad, sizes, rank), dtype, name)
        # each rank's prototype gradient is its anchors' share: they sum to the single one
        check_grad(summed(mine[2].grad, group).to(dtype), leaves[2].grad, truth[2].grad, dtype,
                   "protos")
    return run


def group_rows_error_case():
    """group_rows that do not fit the group or this rank's rows: a ValueError on every rank,
    before any collective (so no rank waits for another)."""
    def run(rank, world, group, backend):
        sizes = ROWS[world]
        scores = randn(sizes[rank], 7, seed=1)
        z = randn(sizes[rank], D, seed=2)
        wrong = [sizes[:-1], [s + 1 for s in sizes], [*sizes[:-1], 0]]
        for rows in wrong:
            with pytest.raises(ValueError, match=r"sinkhorn: group_rows="):
                s4rec_kernels.sinkhorn(scores, backend=backend, group=group, group_rows=rows)
            with pytest.raises(ValueError, match=r"info_nce_proto: group_rows="):
                s4rec_kernels.info_nce_proto(z, z, randn(3, D, seed=4), torch.zeros(len(z)).long(),
                                             0.5, backend=backend, group=group, group_rows=rows)
    return run


def info_nce_bad_assign_case():
    """An assign out of [0, K) on one rank is not checked on the host (that would wait): that
    rank's loss is NaN, so is the sum over the ranks, and _dispatch.deferred_errors() names it."""
    def run(rank, world, group, backend):
        sizes = ROWS[world]
        n = sizes[rank]
        assign = torch.zeros(n, dtype=torch.int64)
        if rank == 0:
            assign[1] = 4  # K = 4
        _dispatch.deferred_errors()  # forget other cases' records
        part = s4rec_kernels.info_nce_proto(randn(n, D, seed=2), randn(n, D, seed=3),
                                            randn(4, D, seed=4), assign, 0.5, backend=backend,
                                            group=group, group_rows=sizes)
        assert torch.isnan(summed(part, group)), part
        assert torch.isnan(part) == (rank == 0), part
        errors = _dispatch.deferred_errors()
        if rank == 0:
            assert len(errors) == 1 and "info_nce_proto: assign[1] = 4 is out of range" in errors[0]
        else:
            assert errors == []
    return run


SLICES = {  # item slices per rank, V = 11
    "uneven": {2: [(0, 4), (4, 11)], 3: [(0, 2), (2, 9), (9, 11)]},
    "empty": {2: [(0, 0), (0, 11)], 3: [(0, 6), (6, 6), (6, 11)]},
    "out-of-order": {2: [(6, 11), (0, 6)], 3: [(8, 11), (0, 3), (3, 8)]},
}
V = 11


def ce_targets(n: int, seed: int, ignore_every: int, slices, sizes) -> torch.Tensor:
    """Random targets, every ``ignore_every``-th row ignored, and rank 0's first row planted in
    the last rank's slice (a target owned by another rank)."""
    t = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))
    if ignore_every:
        t[1::ignore_every] = -100
    lo, hi = slices[-1]
    if hi > lo:
        t[0] = hi - 1
    return t


def ce_case(slices_name, reduction, dtype=torch.float32, ignore_every=3, all_ignored=False):
    def run(rank, world, group, backend):
        sizes, slices = ROWS[world], SLICES[slices_name][world]
        n = sum(sizes)
        hidden, items = randn(n, D, seed=6, dtype=dtype), randn(V, D, seed=7, dtype=dtype)
        targets = ce_targets(n, 8, ignore_every, slices, sizes)
        if all_ignored:
            targets[:] = -100
        upstream = randn(n, seed=9, dtype=torch.float64, scale=1.0)

        def objective(out, weights):
            return out if reduction != "none" else (out * weights.to(out.dtype)).sum()

        h, e = hidden.clone().requires_grad_(), items.clone().requires_grad_()
        single = s4rec_kernels.item_softmax_ce(h, e, targets, reduction=reduction,
                                               backend=backend)
        objective(single, upstream).backward()
        h64, e64 = hidden.double().requires_grad_(), items.double().requires_grad_()
        objective(reference.item_softmax_ce(h64, e64, targets, reduction=reduction),
                  upstream).backward()

        start, stop = slices[rank]
        mh = own(hidden, sizes, rank).clone().requires_grad_()
        me = items[start:stop].clone().requires_grad_()
        out = s4rec_kernels.item_softmax_ce(mh, me, own(targets, sizes, rank),
                                            reduction=reduction, backend=backend,
                                            shard=VocabShard(start, stop, group))
        objective(out, own(upstream, sizes, rank)).backward()
        if reduction == "none":
            assert_close(out, own(single, sizes, rank).detach(), dtype)
        else:
            assert_close(summed(out, group), single.detach(), dtype)
        if all_ignored:
            return
        check_grad(mh.grad, own(h.grad, sizes, rank), own(h64.grad, sizes, rank), dtype, "hidden")
        check_grad(me.grad, e.grad[start:stop], e64.grad[start:stop], dtype, "items")
    return run


def ce_error_case(bad_slices, expected):
    def run(rank, world, group, backend):
        start, stop = bad_slices[world][rank]
        hidden = randn(2, D, seed=1)
        items = randn(stop - start, D, seed=2)
        with pytest.raises(ValueError, match=expected):
            s4rec_kernels.item_softmax_ce(hidden, items, torch.tensor([0, 1]), backend=backend,
                                          shard=VocabShard(start, stop, group))
    return run


def rank_data(n, seed, integer):
    make = small_ints if integer else randn
    hidden, items = make(n, D, seed=seed), make(V, D, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    targets = torch.randint(0, V, (n,), generator=g)
    lengths = torch.randint(0, 5, (n,), generator=g)
    indptr = torch.zeros(n + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(lengths, 0)
    indices = torch.randint(0, V, (int(indptr[-1]),), generator=g)  # duplicates, own targets
    return hidden, items, targets, indptr, indices


def own_csr(indptr, indices, sizes, rank):
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    return indptr[lo:hi + 1] - indptr[lo], indices[indptr[lo]:indptr[hi]]


def rank_case(slices_name, integer, dtype=torch.float32):
    def run(rank, world, group, backend):
        sizes, slices = ROWS[world], SLICES[slices_name][world]
        hidden, items, targets, indptr, indices = rank_data(sum(sizes), 10, integer)
        hidden, items = hidden.to(dtype), items.to(dtype)
        single = s4rec_kernels.item_rank(hidden, items, targets, indptr, indices, backend=backend)
        start, stop = slices[rank]
        ours = s4rec_kernels.item_rank(own(hidden, sizes, rank), items[start:stop],
                                       own(targets, sizes, rank), *own_csr(indptr, indices, sizes,
                                                                           rank),
                                       backend=backend, shard=VocabShard(start, stop, group))
        assert torch.equal(ours, own(single, sizes, rank)), (ours, own(single, sizes, rank))
        if integer:  # ties planted: a real test of the pessimistic count across slices
            scores = hidden.double() @ items.double().t()
            tied = scores == scores.gather(1, targets.unsqueeze(1))
            assert int(tied.sum()) > len(targets), "no tie besides the targets themselves"
    return run


def topk_case(slices_name, k, integer, exclusions=True):
    def run(rank, world, group, backend):
        sizes, slices = ROWS[world], SLICES[slices_name][world]
        hidden, items, _, indptr, indices = rank_data(sum(sizes), 20, integer)
        csr = (indptr, indices) if exclusions else (None, None)
        s_single, i_single = s4rec_kernels.item_topk(hidden, items, k, *csr, backend=backend)
        start, stop = slices[rank]
        mine = own_csr(indptr, indices, sizes, rank) if exclusions else (None, None)
        s_ours, i_ours = s4rec_kernels.item_topk(own(hidden, sizes, rank), items[start:stop], k,
                                                 *mine, backend=backend,
                                                 shard=VocabShard(start, stop, group))
        expected_s, expected_i = own(s_single, sizes, rank), own(i_single, sizes, rank)
        if integer:  # small integers are exact in any order of summation
            assert torch.equal(s_ours, expected_s), (s_ours, expected_s)
        else:
            # a slice puts an item at another place in its tile (Triton's tl.dot) or its
            # matmul (eager) than the full table does, and neither product promises the same
            # rounding at every place: the interpreter's tl.dot is NumPy's BLAS, whose rounding
            # differs between CPUs
            assert_close(s_ours, expected_s, torch.float32)
        if integer:  # tied scores: any of the tied items may fill a slot, each with its score
            h = own(hidden, sizes, rank)
            found = i_ours >= 0
            assert torch.equal(found, expected_i >= 0)
            rescored = (h.unsqueeze(1) * items[i_ours.clamp(min=0)]).sum(-1)
            assert torch.equal(rescored[found], s_ours[found])
            assert all(len(set(row[row >= 0].tolist())) == int((row >= 0).sum()) for row in i_ours)
        else:
            assert torch.equal(i_ours, expected_i), (i_ours, expected_i)
    return run


def case_table() -> Dict[str, Callable]:
    cases = {
        "sinkhorn-eps0.05-3iters": sinkhorn_case(0.05, 3),
        "sinkhorn-eps0.5-0iters": sinkhorn_case(0.5, 0),
        "sinkhorn-bf16": sinkhorn_case(0.05, 3, torch.bfloat16),
        "info_nce": info_nce_case(),
        "info_nce-bf16": info_nce_case(torch.bfloat16),
        "sinkhorn-group-rows": sinkhorn_case(0.05, 3, known_rows=True),
        "info_nce-group-rows": info_nce_case(known_rows=True),
        "group-rows-error": group_rows_error_case(),
        "info_nce-assign-out-of-range": info_nce_bad_assign_case(),
        "ce-uneven-mean": ce_case("uneven", "mean"),
        "ce-uneven-sum": ce_case("uneven", "sum"),
        "ce-uneven-none": ce_case("uneven", "none"),
        "ce-empty-slice-mean": ce_case("empty", "mean"),
        "ce-out-of-order-none": ce_case("out-of-order", "none", ignore_every=0),
        "ce-bf16-mean": ce_case("uneven", "mean", torch.bfloat16),
        "ce-all-ignored-mean": ce_case("uneven", "mean", all_ignored=True),
        "ce-overlap-error": ce_error_case(
            {2: [(0, 6), (5, 11)], 3: [(0, 4), (4, 8), (7, 11)]}, "shard slices overlap"),
        "ce-gap-error": ce_error_case(
            {2: [(0, 5), (6, 11)], 3: [(0, 5), (6, 8), (8, 11)]}, r"leave items \[5, 6\)"),
        "rank-uneven-ties": rank_case("uneven", integer=True),
        "rank-empty-floats": rank_case("empty", integer=False),
        "rank-out-of-order-bf16": rank_case("out-of-order", integer=False, dtype=torch.bfloat16),
        "topk-uneven-k3": topk_case("uneven", 3, integer=False),
        "topk-empty-k8-ties": topk_case("empty", 8, integer=True),
        "topk-out-of-order-k11-missing": topk_case("out-of-order", 11, integer=False),
        "topk-uneven-k4-no-exclusions": topk_case("uneven", 4, integer=False, exclusions=False),
    }
    return cases


BACKENDS = backends("item_softmax_ce")
CASE_IDS = [f"{name}-{b}-w{w}" for name in case_table() for b in BACKENDS for w in (2, 3)]


def worker(rank: int, world: int) -> Dict[str, str]:
    """Every case on this rank: "ok" or the failure's message."""
    pair = dist.new_group([0, 1])
    results = {}
    for name, run in case_table().items():
        for backend in BACKENDS:
            for w in (2, 3):
                if w == 2 and rank >= 2:
                    continue
                case_id = f"{name}-{backend}-w{w}"
                try:
                    run(rank, w, pair if w == 2 else dist.group.WORLD, backend)
                    results[case_id] = "ok"
                except Exception as exc:  # noqa: BLE001 (reported per case by the parent)
                    results[case_id] = f"{type(exc).__name__}: {exc}"
    return results


@pytest.fixture(scope="module")
def outcomes() -> List[Dict[str, str]]:
    return run_group(3, worker)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_matches_single_process(outcomes, case_id):
    w = int(case_id.rsplit("-w", 1)[1])
    for rank in range(w):
        assert outcomes[rank].get(case_id) == "ok", f"rank {rank}: {outcomes[rank].get(case_id)}"


def test_group_needs_an_initialised_process_group():
    with pytest.raises(ValueError, match="not initialised"):
        s4rec_kernels.sinkhorn(torch.zeros(2, 3), group=object())
    with pytest.raises(ValueError, match="VocabShard"):
        s4rec_kernels.item_softmax_ce(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]),
                                      shard=(0, 2))
