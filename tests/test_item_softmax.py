"""item_softmax_ce, item_rank and item_topk: checked against F.cross_entropy on the full logits
(float64 ground truth, and eager PyTorch's own error in low precision), brute-force counting and
torch.topk, with planted ties, exclusions and NaN; the Triton kernels on every split path, under
no_grad, inference_mode and torch.compile, and through torch.library's op checks.

Every test runs on each (device, backend) pair: CPU with the reference, CPU with the Triton
kernels in the interpreter (TRITON_INTERPRET=1, set by conftest when there is no GPU), and on
CUDA, when present, with both.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import s4rec_kernels
from s4rec_kernels import _dispatch, _item_common, reference
from _tolerances import ROUNDING_MARGIN, assert_close, backends


def cases(op):
    """(device, backend) pairs to run ``op``'s tests on."""
    found = [("cpu", b) for b in backends(op)]
    if torch.cuda.is_available():
        found.append(("cuda", "reference"))
        if _dispatch.triton_impl(op) is not None:
            found.append(("cuda", "triton"))
    return found


def parametrize_cases(op):
    pairs = cases(op)
    return pytest.mark.parametrize("device,backend", pairs, ids=[f"{d}-{b}" for d, b in pairs])


CE_CASES = parametrize_cases("item_softmax_ce")
RANK_CASES = parametrize_cases("item_rank")
TOPK_CASES = parametrize_cases("item_topk")
KERNEL_CASES = [(d, b) for d, b in cases("item_softmax_ce") if b == "triton"]
needs_kernels = pytest.mark.skipif(not KERNEL_CASES,
                                   reason="no Triton: neither CUDA nor TRITON_INTERPRET=1")
KERNEL_DEVICES = sorted({d for d, _ in KERNEL_CASES})


def set_programs(monkeypatch, device, programs):
    """How many programs the launchers aim for: per SM on CUDA, in all under the interpreter."""
    if device == "cpu":
        monkeypatch.setattr(_item_common, "INTERPRET_TARGET_PROGRAMS", programs)
    else:
        monkeypatch.setattr(_item_common, "PROGRAMS_PER_SM", programs)


def randn(*shape, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def randint_matrix(*shape, seed, dtype=torch.float32, device="cpu"):
    """Small integers: every dot product is exact, so ties are real ties in any summation order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=g).to(device=device, dtype=dtype)


def random_targets(n, v, seed, device="cpu", ignore_every=0):
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    if ignore_every:
        targets[::ignore_every] = -100
    return targets.to(device)


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


def to_csr(lists, device="cpu"):
    indptr = torch.tensor([0] + [len(r) for r in lists]).cumsum(0)
    indices = torch.tensor([i for r in lists for i in r], dtype=torch.long)
    return indptr.to(device), indices.to(device)


def excluded_sets(indptr, indices):
    indptr, indices = indptr.cpu(), indices.cpu()
    return [set(indices[int(indptr[u]):int(indptr[u + 1])].tolist())
            for u in range(len(indptr) - 1)]


# ----------------------------------------------------------------------------------------------
# item_softmax_ce
# ----------------------------------------------------------------------------------------------


def eager_ce(hidden, items, targets, **kw):
    return F.cross_entropy(hidden @ items.t(), targets, **kw)


def loss_and_grads(fn, hidden, items, targets, upstream, **kw):
    """fn(hidden, items, targets, **kw) and the gradients of sum(upstream * loss)."""
    h = hidden.detach().clone().requires_grad_(True)
    it = items.detach().clone().requires_grad_(True)
    loss = fn(h, it, targets, **kw)
    grads = torch.autograd.grad(loss, (h, it), upstream.to(loss))
    return (loss.detach(), *grads)


def ours(backend):
    def fn(h, it, targets, **kw):
        return s4rec_kernels.item_softmax_ce(h, it, targets, backend=backend, **kw)
    return fn


def max_err(got, truth):
    return float((got.double() - truth.double()).abs().max()) if truth.numel() else 0.0


def scale_of(truth):
    """The size of a result's entries, at least 1: tolerances are relative to it."""
    return max(1.0, float(truth.abs().max())) if truth.numel() else 1.0


def assert_no_worse_than_eager(hidden, items, targets, backend, upstream, margin, **kw):
    """CCE's rule: against a float64 truth computed from the float64 values that ``hidden`` and
    ``items`` were rounded from, the op's error in loss and both gradients is at most eager
    PyTorch's own error in the inputs' dtype plus ``margin`` (times the size of the entries)."""
    truth = loss_and_grads(eager_ce, hidden.double(), items.double(), targets, upstream.double(),
                           **kw)
    got = loss_and_grads(ours(backend), hidden, items, targets, upstream, **kw)
    eager = loss_and_grads(eager_ce, hidden, items, targets, upstream, **kw)
    assert got[0].dtype == (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    assert got[1].dtype == hidden.dtype and got[2].dtype == items.dtype
    for name, g, e, t in zip(("loss", "grad_hidden", "grad_items"), got, eager, truth):
        assert max_err(g, t) <= max_err(e, t) + margin * scale_of(t), (
            f"{name}: error {max_err(g, t):.3g} vs eager {max_err(e, t):.3g}")


def upstream_for(reduction, n, seed, device):
    """A random upstream gradient: (N,) for "none", a scalar otherwise."""
    shape = (n,) if reduction == "none" else ()
    return randn(*shape, seed=seed, dtype=torch.float64, device=device)


@CE_CASES
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,v,d", [(37, 1003, 24), (1, 5, 3), (90, 200, 40)])
def test_ce_forward_backward_float32(device, backend, reduction, n, v, d):
    # odd shapes; V over many tiles; N over several row blocks with ignored rows inside
    hidden, items = randn(n, d, seed=1, device=device), randn(v, d, seed=2, device=device)
    targets = random_targets(n, v, seed=3, device=device, ignore_every=5 if n > 1 else 0)
    if n == 1:
        targets[0] = v - 1
    upstream = upstream_for(reduction, n, seed=4, device=device)
    assert_no_worse_than_eager(hidden, items, targets, backend, upstream,
                               ROUNDING_MARGIN[torch.float32], reduction=reduction)


@CE_CASES
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ce_forward_backward_float64(device, backend, reduction):
    hidden = randn(37, 24, seed=1, dtype=torch.float64, device=device)
    items = randn(1003, 24, seed=2, dtype=torch.float64, device=device)
    targets = random_targets(37, 1003, seed=3, device=device, ignore_every=5)
    upstream = upstream_for(reduction, 37, seed=4, device=device)
    got = loss_and_grads(ours(backend), hidden, items, targets, upstream, reduction=reduction)
    want = loss_and_grads(eager_ce, hidden, items, targets, upstream, reduction=reduction)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        assert_close(g, w, torch.float64)


@CE_CASES
def test_ce_all_rows_ignored(device, backend):
    hidden, items = randn(4, 3, seed=5, device=device), randn(6, 3, seed=6, device=device)
    targets = torch.full((4,), -100, device=device)
    mean = s4rec_kernels.item_softmax_ce(hidden, items, targets, backend=backend)
    assert math.isnan(float(mean))
    h = hidden.clone().requires_grad_(True)
    it = items.clone().requires_grad_(True)
    total = s4rec_kernels.item_softmax_ce(h, it, targets, reduction="sum", backend=backend)
    assert float(total.detach()) == 0.0
    total.backward()
    assert float(h.grad.abs().sum()) == 0.0 and float(it.grad.abs().sum()) == 0.0
    rows = s4rec_kernels.item_softmax_ce(hidden, items, targets, reduction="none", backend=backend)
    assert torch.equal(rows, torch.zeros(4, device=device))


@CE_CASES
def test_ce_ignored_rows_get_no_gradient(device, backend):
    # a non-zero upstream gradient at ignored rows must not reach them
    hidden, items = randn(12, 8, seed=7, device=device), randn(50, 8, seed=8, device=device)
    targets = random_targets(12, 50, seed=9, device=device, ignore_every=3)
    upstream = torch.ones(12, device=device)
    _, grad_h, _ = loss_and_grads(ours(backend), hidden, items, targets, upstream, reduction="none")
    assert float(grad_h[targets == -100].abs().sum()) == 0.0
    assert float(grad_h[targets != -100].abs().sum()) > 0.0


@CE_CASES
def test_ce_no_rows_behaves_like_cross_entropy(device, backend):
    hidden, items = torch.zeros(0, 3, device=device), randn(6, 3, seed=6, device=device)
    targets = torch.zeros(0, dtype=torch.long, device=device)
    assert math.isnan(float(s4rec_kernels.item_softmax_ce(hidden, items, targets, backend=backend)))
    assert float(s4rec_kernels.item_softmax_ce(hidden, items, targets, reduction="sum",
                                               backend=backend)) == 0.0
    assert s4rec_kernels.item_softmax_ce(hidden, items, targets, reduction="none",
                                         backend=backend).shape == (0,)


@CE_CASES
def test_ce_custom_ignore_index_and_int32_targets(device, backend):
    hidden, items = randn(9, 4, seed=7, device=device), randn(11, 4, seed=8, device=device)
    targets = torch.tensor([0, -1, 3, 10, -1, 5, 5, 2, 1], dtype=torch.int32, device=device)
    loss = s4rec_kernels.item_softmax_ce(hidden, items, targets, ignore_index=-1, backend=backend)
    assert_close(loss, eager_ce(hidden, items, targets.long(), ignore_index=-1), torch.float32)


@CE_CASES
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ce_gradcheck_float64(device, backend, reduction):
    hidden = randn(5, 4, seed=9, dtype=torch.float64, device=device)
    items = randn(11, 4, seed=10, dtype=torch.float64, device=device)
    targets = torch.tensor([3, -100, 0, 10, 3], device=device)

    def fn(h, it):
        return s4rec_kernels.item_softmax_ce(h, it, targets, reduction=reduction, backend=backend)

    assert torch.autograd.gradcheck(fn, (hidden.requires_grad_(True), items.requires_grad_(True)))


@CE_CASES
def test_ce_planted_best_targets_give_small_loss(device, backend):
    items = 20.0 * torch.eye(16, device=device)  # orthogonal items
    targets = torch.tensor([3, 0, 15, 7, 7], device=device)
    loss = s4rec_kernels.item_softmax_ce(items[targets], items, targets, backend=backend)
    assert float(loss) < 1e-6


@CE_CASES
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ce_half_inputs_against_float64_truth(device, backend, dtype):
    hidden = randn(64, 16, seed=11, dtype=torch.float64, device=device)
    items = randn(300, 16, seed=12, dtype=torch.float64, device=device)
    targets = random_targets(64, 300, seed=13, device=device)
    truth = eager_ce(hidden, items, targets)
    h, it = hidden.to(dtype).requires_grad_(True), items.to(dtype).requires_grad_(True)
    loss = s4rec_kernels.item_softmax_ce(h, it, targets, backend=backend)
    assert loss.dtype == torch.float32
    assert_close(loss, eager_ce(h.detach().double(), it.detach().double(), targets), dtype)
    eager_err = abs(float(eager_ce(h.detach(), it.detach(), targets)) - float(truth))
    assert abs(float(loss.detach()) - float(truth)) <= eager_err + ROUNDING_MARGIN[dtype]
    loss.backward()
    assert h.grad.dtype == dtype and it.grad.dtype == dtype


@CE_CASES
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ce_half_gradients_no_worse_than_eager(device, backend, dtype, reduction):
    # the rule applied to the gradients as well: truth from the unrounded float64 values
    hidden = randn(48, 32, seed=14, dtype=torch.float64, device=device)
    items = randn(500, 32, seed=15, dtype=torch.float64, device=device)
    targets = random_targets(48, 500, seed=16, device=device, ignore_every=7)
    upstream = upstream_for(reduction, 48, seed=17, device=device)
    truth = loss_and_grads(eager_ce, hidden, items, targets, upstream, reduction=reduction)
    h, it = hidden.to(dtype), items.to(dtype)
    got = loss_and_grads(ours(backend), h, it, targets, upstream, reduction=reduction)
    eager = loss_and_grads(eager_ce, h, it, targets, upstream, reduction=reduction)
    for g, e, t in zip(got, eager, truth):
        assert max_err(g, t) <= max_err(e, t) + ROUNDING_MARGIN[dtype] * scale_of(t)


@CE_CASES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ce_large_logit_scale(device, backend, dtype):
    # hidden and items x30: logits in the thousands, softmax nearly one-hot
    hidden = 30.0 * randn(40, 16, seed=18, dtype=torch.float64, device=device)
    items = 30.0 * randn(700, 16, seed=19, dtype=torch.float64, device=device)
    targets = random_targets(40, 700, seed=20, device=device, ignore_every=6)
    best = (hidden @ items.t()).argmax(1)
    targets[1::2] = best[1::2]  # half the rows have the best item as target: loss near 0
    targets[::6] = -100
    upstream = upstream_for("none", 40, seed=21, device=device)
    h, it = hidden.to(dtype), items.to(dtype)
    if dtype == torch.float32:
        assert_no_worse_than_eager(h, it, targets, backend, upstream, ROUNDING_MARGIN[dtype],
                                   reduction="none")
    else:  # truth from the unrounded values
        truth = loss_and_grads(eager_ce, hidden, items, targets, upstream, reduction="none")
        got = loss_and_grads(ours(backend), h, it, targets, upstream, reduction="none")
        eager = loss_and_grads(eager_ce, h, it, targets, upstream, reduction="none")
        for g, e, t in zip(got, eager, truth):
            assert torch.isfinite(g).all()
            assert max_err(g, t) <= max_err(e, t) + ROUNDING_MARGIN[dtype] * scale_of(t)


@CE_CASES
def test_ce_ignores_autocast(device, backend):
    hidden, items = randn(7, 5, seed=14, device=device), randn(13, 5, seed=15, device=device)
    targets = torch.arange(7, device=device)
    expected = s4rec_kernels.item_softmax_ce(hidden, items, targets, backend=backend)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = s4rec_kernels.item_softmax_ce(hidden, items, targets, backend=backend)
    assert loss.dtype == torch.float32
    assert_close(loss, expected, torch.float32)


@CE_CASES
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_ce_without_autograd(device, backend, mode):
    hidden = randn(20, 8, seed=22, device=device).requires_grad_(True)
    items = randn(70, 8, seed=23, device=device).requires_grad_(True)
    targets = random_targets(20, 70, seed=24, device=device, ignore_every=4)
    expected = s4rec_kernels.item_softmax_ce(hidden, items, targets, reduction="none",
                                             backend=backend)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        for reduction in ("mean", "sum", "none"):
            loss = s4rec_kernels.item_softmax_ce(hidden, items, targets, reduction=reduction,
                                                 backend=backend)
            assert not loss.requires_grad and loss.grad_fn is None
        assert_close(loss, expected.detach(), torch.float32)


@CE_CASES
@pytest.mark.parametrize("which", ["hidden", "items"])
def test_ce_one_input_requires_grad(device, backend, which):
    hidden, items = randn(15, 6, seed=25, device=device), randn(40, 6, seed=26, device=device)
    targets = random_targets(15, 40, seed=27, device=device, ignore_every=4)
    grad_h, grad_e = loss_and_grads(eager_ce, hidden, items, targets, torch.tensor(1.0))[1:]
    h = hidden.clone().requires_grad_(which == "hidden")
    it = items.clone().requires_grad_(which == "items")
    loss = s4rec_kernels.item_softmax_ce(h, it, targets, backend=backend)
    (grad,) = torch.autograd.grad(loss, h if which == "hidden" else it)
    assert_close(grad, grad_h if which == "hidden" else grad_e, torch.float32, atol=1e-5)


@CE_CASES
def test_ce_strided_inputs(device, backend):
    # hidden a transposed view, items a row slice of a wider table with a padding row (as the
    # model passes its embedding weight)
    hidden = randn(10, 19, seed=28, device=device).t()  # (19, 10), strides (1, 19)
    table = randn(61, 12, seed=29, device=device)
    items = table[1:, :10]  # (60, 10), strides (12, 1)
    targets = random_targets(19, 60, seed=30, device=device, ignore_every=5)
    upstream = upstream_for("none", 19, seed=31, device=device)
    got = loss_and_grads(ours(backend), hidden, items, targets, upstream, reduction="none")
    want = loss_and_grads(eager_ce, hidden.double(), items.double(), targets, upstream,
                          reduction="none")
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32, atol=1e-5)


@CE_CASES
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ce_compiled_matches_eager(device, backend, reduction):
    # fullgraph: the public function, the dispatch and the op compile without a graph break.
    # On CPU "aot_eager" (dynamo, fake tensors and AOT autograd; no C++ build), inductor on CUDA.
    hidden = randn(33, 12, seed=32, device=device).requires_grad_(True)
    items = randn(150, 12, seed=33, device=device).requires_grad_(True)
    targets = random_targets(33, 150, seed=34, device=device, ignore_every=4)
    upstream = upstream_for(reduction, 33, seed=35, device=device).float()

    def step(h, it, t):
        loss = s4rec_kernels.item_softmax_ce(h, it, t, reduction=reduction, backend=backend)
        return loss * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True,
                             backend="inductor" if device == "cuda" else "aot_eager")
    got = loss_and_grads(lambda h, it, t: compiled(h, it, t), hidden, items, targets, upstream)
    want = loss_and_grads(step, hidden, items, targets, upstream)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("programs", [1, 64])
def test_ce_kernels_on_every_split_path(device, programs, monkeypatch):
    # one item range per row block (no partials), and many ranges (partials summed after)
    set_programs(monkeypatch, device, programs)
    hidden, items = randn(45, 20, seed=36, device=device), randn(333, 20, seed=37, device=device)
    targets = random_targets(45, 333, seed=38, device=device, ignore_every=4)
    upstream = upstream_for("none", 45, seed=39, device=device)
    assert_no_worse_than_eager(hidden, items, targets, "triton", upstream,
                               ROUNDING_MARGIN[torch.float32], reduction="none")


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_ce_kernels_are_deterministic(device):
    # bitwise repeatable, and nothing on the path refuses torch's deterministic mode
    hidden, items = randn(70, 16, seed=40, device=device), randn(400, 16, seed=41, device=device)
    targets = random_targets(70, 400, seed=42, device=device, ignore_every=9)
    upstream = upstream_for("none", 70, seed=43, device=device)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = loss_and_grads(ours("triton"), hidden, items, targets, upstream, reduction="none")
        second = loss_and_grads(ours("triton"), hidden, items, targets, upstream, reduction="none")
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_library_ops_pass_opcheck(device):
    hidden = randn(21, 8, seed=44, device=device).requires_grad_(True)
    items = randn(90, 8, seed=45, device=device).requires_grad_(True)
    targets = random_targets(21, 90, seed=46, device=device, ignore_every=4)
    ops = torch.ops.s4rec_kernels
    torch.library.opcheck(ops.item_softmax_ce_fwd.default, (hidden, items, targets, -100))
    lse2 = ops.item_softmax_ce_fwd(hidden, items, targets, -100)[1].detach()
    grad = randn(21, seed=47, device=device)
    torch.library.opcheck(ops.item_softmax_ce_bwd.default,
                          (grad, hidden.detach(), items.detach(), targets, lse2, -100, True, True))
    indptr, indices = random_csr(21, 90, seed=48, targets=targets.clamp(min=0))
    indptr, indices = indptr.to(device), indices.to(device)
    h, it = hidden.detach(), items.detach()
    torch.library.opcheck(ops.item_rank.default, (h, it, targets.clamp(min=0), indptr, indices))
    torch.library.opcheck(ops.item_topk.default, (h, it, 5, indptr, indices))
    torch.library.opcheck(ops.item_topk.default, (h, it, 5, None, None))


def chunked_float64_ce(hidden, items, targets, chunk=256):
    """Mean loss and both gradients in float64, a block of rows at a time."""
    items64 = items.double()
    n_rows = hidden.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    grad_h = torch.empty(hidden.shape, dtype=torch.float64, device=hidden.device)
    grad_e = torch.zeros(items.shape, dtype=torch.float64, device=hidden.device)
    for start in range(0, n_rows, chunk):
        h = hidden[start:start + chunk].double()
        t = targets[start:start + chunk]
        logits = h @ items64.t()  # (chunk, V)
        total += F.cross_entropy(logits, t, reduction="sum")
        p = torch.softmax(logits, dim=1)
        p[torch.arange(len(t), device=h.device), t] -= 1.0
        p /= n_rows
        grad_h[start:start + chunk] = p @ items64
        grad_e += p.t() @ h
        del logits, p
    return total / n_rows, grad_h, grad_e


@pytest.mark.skipif("cuda" not in KERNEL_DEVICES, reason="needs CUDA and the Triton kernels")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_ce_past_two_to_the_31_logits_cuda(dtype, tol):
    n, v, d = 4096, 600_000, 64  # 2.46e9 logits: any flat (row, item) offset would overflow int32
    g = torch.Generator(device="cuda").manual_seed(49)
    hidden = (torch.randn(n, d, device="cuda", generator=g) * 0.5).to(dtype)
    items = (torch.randn(v, d, device="cuda", generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[-3:] = v - 1  # the last rows of the table
    loss, grad_h, grad_e = loss_and_grads(ours("triton"), hidden, items, targets, torch.tensor(1.0))
    want = chunked_float64_ce(hidden, items, targets)  # from the same (rounded) values
    assert max_err(loss, want[0]) <= tol * scale_of(want[0])
    # relative to the largest entry (the gradients of a mean are small); they come back in the
    # inputs' dtype, and bf16 rounds them to 2**-9
    for got, w in zip((grad_h, grad_e), want[1:]):
        assert max_err(got, w) <= tol * float(w.abs().max())


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


@RANK_CASES
@pytest.mark.parametrize("n_users,n_items,d", [(13, 57, 5), (1, 1, 2), (40, 300, 7), (70, 900, 20)])
def test_rank_matches_brute_force(device, backend, n_users, n_items, d):
    hidden = randint_matrix(n_users, d, seed=1, device=device)
    items = randint_matrix(n_items, d, seed=2, device=device)
    targets = random_targets(n_users, n_items, seed=3)
    indptr, indices = random_csr(n_users, n_items, seed=4, targets=targets,
                                 max_len=6 if n_items < 500 else 80)
    rank = s4rec_kernels.item_rank(hidden, items, targets.to(device), indptr.to(device),
                                   indices.to(device), backend=backend)
    assert rank.dtype == torch.int64 and rank.shape == (n_users,)
    assert torch.equal(rank.cpu(), brute_rank(hidden.cpu(), items.cpu(), targets, indptr, indices))


@RANK_CASES
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_rank_random_scores(device, backend, dtype):
    hidden, items = randn(17, 9, seed=5, dtype=dtype), randn(211, 9, seed=6, dtype=dtype)
    targets = random_targets(17, 211, seed=7)
    indptr, indices = random_csr(17, 211, seed=8, targets=targets)
    rank = s4rec_kernels.item_rank(hidden.to(device), items.to(device), targets.to(device),
                                   indptr.to(device), indices.to(device), backend=backend)
    assert torch.equal(rank.cpu(), brute_rank(hidden, items, targets, indptr, indices))


@RANK_CASES
def test_rank_planted_ties_count_against_target(device, backend):
    items = randint_matrix(10, 4, seed=9, device=device)
    items[7] = items[2]
    items[8] = items[2]  # two copies of the target item
    hidden = randint_matrix(3, 4, seed=10, device=device)
    targets = torch.tensor([2, 2, 7], device=device)
    indptr, indices = to_csr([[], [8], []], device)
    rank = s4rec_kernels.item_rank(hidden, items, targets, indptr, indices, backend=backend)
    scores = hidden @ items.t()
    above = (scores > scores.gather(1, targets[:, None])).sum(1)
    assert rank.tolist() == [int(above[0]) + 2, int(above[1]) + 1, int(above[2]) + 2]


@RANK_CASES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_copies_of_the_target_tie_with_random_values(device, backend, dtype):
    # copies of a target's embedding, in other tiles and item ranges than the target, must score
    # exactly like it and count as ties, although the values are not exact in any precision
    n_items, n_users = 700, 9
    items = randn(n_items, 24, seed=11, dtype=dtype, device=device)
    hidden = randn(n_users, 24, seed=12, dtype=dtype, device=device)
    targets = torch.tensor([5, 100, 350, 699, 0, 64, 65, 500, 5], device=device)
    copies = [3, 130, 420, 690]
    items[copies] = items[350].clone()
    no_exclusions = to_csr([[] for _ in range(n_users)], device)
    rank = s4rec_kernels.item_rank(hidden, items, targets, *no_exclusions, backend=backend)
    excluding_copies = to_csr([copies if u == 2 else [] for u in range(n_users)], device)
    without = s4rec_kernels.item_rank(hidden, items, targets, *excluding_copies, backend=backend)
    assert int(rank[2]) - int(without[2]) == len(copies)
    assert torch.equal(rank, reference.item_rank(hidden, items, targets, *no_exclusions))


@RANK_CASES
def test_rank_constant_scores(device, backend):
    n_items = 12
    hidden, items = torch.zeros(3, 4, device=device), randn(n_items, 4, seed=11, device=device)
    targets = torch.tensor([0, 5, 11], device=device)
    # user 0 lists its own target and a duplicate; user 2 excludes nothing
    indptr, indices = to_csr([[0, 3, 3, 4], [1, 2, 6, 7, 8], []], device)
    rank = s4rec_kernels.item_rank(hidden, items, targets, indptr, indices, backend=backend)
    assert rank.tolist() == [n_items - 1 - 2, n_items - 1 - 5, n_items - 1]


@RANK_CASES
def test_rank_target_listed_in_exclusions_is_kept(device, backend):
    hidden, items = randn(4, 3, seed=12, device=device), randn(20, 3, seed=13, device=device)
    targets = torch.tensor([0, 4, 9, 19], device=device)
    plain_indptr, plain_indices = to_csr([[1, 2], [], [3], [5, 6]], device)
    listed_indptr, listed_indices = to_csr([[0, 1, 2], [4, 4], [3, 9], [19, 5, 6]], device)
    plain = s4rec_kernels.item_rank(hidden, items, targets, plain_indptr, plain_indices,
                                    backend=backend)
    listed = s4rec_kernels.item_rank(hidden, items, targets, listed_indptr, listed_indices,
                                     backend=backend)
    assert torch.equal(plain, listed)


@RANK_CASES
def test_rank_unsorted_exclusions_across_tiles(device, backend):
    # long, unsorted lists with duplicates that span every tile and item range
    n_items = 1000
    hidden, items = randint_matrix(6, 8, seed=14), randint_matrix(n_items, 8, seed=15)
    targets = torch.tensor([0, 999, 500, 63, 64, 128])
    g = torch.Generator().manual_seed(16)
    lists = [torch.randint(0, n_items, (k,), generator=g).tolist()
             for k in (150, 0, 400, 1, 64, 250)]
    lists[3] = [999, 0, 999]
    indptr, indices = to_csr(lists)
    rank = s4rec_kernels.item_rank(hidden.to(device), items.to(device), targets.to(device),
                                   indptr.to(device), indices.to(device), backend=backend)
    assert torch.equal(rank.cpu(), brute_rank(hidden, items, targets, indptr, indices))


@RANK_CASES
def test_rank_planted_best_target_is_rank_zero(device, backend):
    items = torch.eye(30, device=device)
    targets = torch.tensor([4, 29, 0], device=device)
    hidden = 3.0 * items[targets] + 0.1
    indptr, indices = to_csr([[], [], []], device)
    assert s4rec_kernels.item_rank(hidden, items, targets, indptr, indices,
                                   backend=backend).tolist() == [0, 0, 0]


@RANK_CASES
def test_rank_nan_counts_against_target(device, backend):
    hidden, items = randn(3, 4, seed=14), randn(9, 4, seed=15)
    targets = torch.tensor([1, 2, 3])
    hidden[0] = float("nan")  # every score of user 0 is NaN
    items[2, 0] = float("nan")  # the target of user 1 scores NaN
    indptr, indices = to_csr([[5, 5, 6], [0], []])
    rank = s4rec_kernels.item_rank(hidden.to(device), items.to(device), targets.to(device),
                                   indptr.to(device), indices.to(device), backend=backend).cpu()
    assert rank[0] == 9 - 1 - 2 and rank[1] == 9 - 1 - 1
    # user 2 has an ordinary target; the NaN-scoring item 2 counts against it
    scores = hidden[2] @ items.t()
    expected = int((scores[torch.arange(9) != 3] >= scores[3]).sum()) + 1
    assert rank[2] == expected
    assert torch.equal(rank, brute_rank(hidden, items, targets, indptr, indices))


@RANK_CASES
def test_rank_no_users(device, backend):
    rank = s4rec_kernels.item_rank(torch.zeros(0, 3, device=device),
                                   randn(5, 3, seed=1, device=device),
                                   torch.zeros(0, dtype=torch.long, device=device),
                                   torch.zeros(1, dtype=torch.long, device=device),
                                   torch.zeros(0, dtype=torch.long, device=device), backend=backend)
    assert rank.shape == (0,) and rank.dtype == torch.int64


@RANK_CASES
@pytest.mark.parametrize("chunk", [1, 50, 200])
def test_rank_chunking_gives_identical_results(device, backend, chunk, monkeypatch):
    hidden, items = randint_matrix(21, 6, seed=16), randint_matrix(57, 6, seed=17)
    targets = random_targets(21, 57, seed=18)
    indptr, indices = random_csr(21, 57, seed=19, targets=targets)
    args = [t.to(device) for t in (hidden, items, targets, indptr, indices)]
    whole = s4rec_kernels.item_rank(*args, backend=backend)
    monkeypatch.setattr(reference, "MAX_SCORES_PER_CHUNK", chunk)
    chunked = s4rec_kernels.item_rank(*args, backend=backend)
    assert torch.equal(whole, chunked)


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("programs", [1, 64])
def test_rank_kernel_on_every_split_path(device, programs, monkeypatch):
    set_programs(monkeypatch, device, programs)
    hidden, items = randint_matrix(35, 6, seed=20), randint_matrix(500, 6, seed=21)
    targets = random_targets(35, 500, seed=22)
    indptr, indices = random_csr(35, 500, seed=23, targets=targets, max_len=40)
    args = [t.to(device) for t in (hidden, items, targets, indptr, indices)]
    rank = s4rec_kernels.item_rank(*args, backend="triton")
    assert torch.equal(rank.cpu(), brute_rank(hidden, items, targets, indptr, indices))


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_rank_and_topk_compile_fullgraph(device):
    hidden, items = randn(9, 8, seed=24, device=device), randn(80, 8, seed=25, device=device)
    targets = random_targets(9, 80, seed=26, device=device)
    indptr, indices = random_csr(9, 80, seed=27, targets=targets)
    indptr, indices = indptr.to(device), indices.to(device)

    def evaluate(h, it, t, ptr, idx):
        rank = s4rec_kernels.item_rank(h, it, t, ptr, idx, backend="triton")
        scores, index = s4rec_kernels.item_topk(h, it, 5, ptr, idx, backend="triton")
        return rank, scores, index

    torch._dynamo.reset()
    compiled = torch.compile(evaluate, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(hidden, items, targets, indptr, indices),
                         evaluate(hidden, items, targets, indptr, indices)):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# item_topk
# ----------------------------------------------------------------------------------------------


def masked_scores(hidden, items, indptr, indices):
    scores = hidden.double() @ items.double().t()
    if indptr is not None:
        for u, excluded in enumerate(excluded_sets(indptr, indices)):
            scores[u, sorted(excluded)] = -math.inf
    return scores


@TOPK_CASES
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_exclusions", [False, True])
@pytest.mark.parametrize("n_users,n_items,d,k", [(13, 57, 5, 10), (1, 3, 2, 1), (31, 403, 8, 20),
                                                 (5, 300, 8, 128), (3, 300, 4, 200)])
def test_topk_matches_torch_topk(device, backend, dtype, with_exclusions, n_users, n_items, d, k):
    hidden = randn(n_users, d, seed=20, dtype=dtype)
    items = randn(n_items, d, seed=21, dtype=dtype)
    indptr, indices = ((None, None) if not with_exclusions
                       else random_csr(n_users, n_items, seed=22, max_len=2))
    on = (lambda t: None if t is None else t.to(device))
    scores, index = s4rec_kernels.item_topk(on(hidden), on(items), k, on(indptr), on(indices),
                                            backend=backend)
    scores, index = scores.cpu(), index.cpu()
    assert scores.shape == index.shape == (n_users, k)
    assert scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert index.dtype == torch.int64
    expected_scores, expected_index = torch.topk(masked_scores(hidden, items, indptr, indices), k)
    assert_close(scores, expected_scores, dtype)
    found = index >= 0
    assert torch.equal(index[found], expected_index[found])  # random scores: no ties
    assert bool(torch.isneginf(expected_scores[~found]).all())
    if indptr is not None:
        for u, excluded in enumerate(excluded_sets(indptr, indices)):
            assert not set(index[u].tolist()) & excluded


@TOPK_CASES
def test_topk_planted_ties_and_exclusions(device, backend):
    # integer scores with many ties: the returned scores are exactly the k best, each index
    # has its score, none is excluded or repeated
    n_users, n_items, k = 12, 260, 30
    hidden, items = randint_matrix(n_users, 5, seed=23), randint_matrix(n_items, 5, seed=24)
    indptr, indices = random_csr(n_users, n_items, seed=25, max_len=50)
    scores, index = s4rec_kernels.item_topk(hidden.to(device), items.to(device), k,
                                            indptr.to(device), indices.to(device), backend=backend)
    scores, index = scores.cpu(), index.cpu()
    full = masked_scores(hidden, items, indptr, indices)
    expected = torch.topk(full, k).values
    assert torch.equal(scores.double(), expected)
    for u, excluded in enumerate(excluded_sets(indptr, indices)):
        row = index[u].tolist()
        assert len(set(row)) == k and not set(row) & excluded
        assert torch.equal(full[u, index[u]], scores[u].double())


@TOPK_CASES
def test_topk_pads_when_too_few_items_remain(device, backend):
    hidden, items = randn(3, 4, seed=23, device=device), randn(6, 4, seed=24, device=device)
    indptr, indices = to_csr([[0, 1, 2, 3, 3], [], [0, 1, 2, 3, 4, 5]], device)
    scores, index = s4rec_kernels.item_topk(hidden, items, 5, indptr, indices, backend=backend)
    assert sorted(index[0, :2].tolist()) == [4, 5] and index[0, 2:].tolist() == [-1, -1, -1]
    assert bool(torch.isneginf(scores[0, 2:]).all()) and bool(torch.isfinite(scores[0, :2]).all())
    assert scores[0, 0] >= scores[0, 1]
    assert bool((index[1] >= 0).all())
    assert index[2].tolist() == [-1] * 5 and bool(torch.isneginf(scores[2]).all())


@TOPK_CASES
def test_topk_best_first_and_planted(device, backend):
    items = torch.eye(8, device=device)
    hidden = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7]], device=device)
    scores, index = s4rec_kernels.item_topk(hidden, items, 8, backend=backend)
    assert index.tolist() == [[7, 6, 5, 4, 3, 2, 1, 0]]
    assert scores.tolist() == [[7.0, 6, 5, 4, 3, 2, 1, 0]]
    indptr, indices = to_csr([[7, 5]], device)
    scores, index = s4rec_kernels.item_topk(hidden, items, 3, indptr, indices, backend=backend)
    assert index.tolist() == [[6, 4, 3]]


@TOPK_CASES
def test_topk_dtype_rule_and_no_grad(device, backend):
    hidden = randn(5, 4, seed=25, dtype=torch.float16, device=device).requires_grad_(True)
    items = randn(9, 4, seed=26, dtype=torch.float16, device=device)
    scores, index = s4rec_kernels.item_topk(hidden, items, 3, backend=backend)
    assert scores.dtype == torch.float32 and not scores.requires_grad
    expected = torch.topk(hidden.detach().float() @ items.float().t(), 3)
    assert_close(scores, expected.values, torch.float16)
    assert torch.equal(index, expected.indices)


@TOPK_CASES
def test_topk_nan_ranks_first(device, backend):
    hidden, items = randn(2, 3, seed=27, device=device), randn(6, 3, seed=28, device=device)
    items[4, 1] = float("nan")
    scores, index = s4rec_kernels.item_topk(hidden, items, 2, backend=backend)
    assert index[:, 0].tolist() == [4, 4] and bool(torch.isnan(scores[:, 0]).all())


@TOPK_CASES
def test_topk_no_users(device, backend):
    scores, index = s4rec_kernels.item_topk(torch.zeros(0, 3, device=device),
                                            randn(5, 3, seed=1, device=device), 2, backend=backend)
    assert scores.shape == index.shape == (0, 2)


@TOPK_CASES
@pytest.mark.parametrize("chunk", [1, 50, 200])
def test_topk_chunking_gives_identical_results(device, backend, chunk, monkeypatch):
    hidden, items = randint_matrix(21, 6, seed=29), randint_matrix(57, 6, seed=30)
    items[:, 0] = torch.arange(57.0)
    hidden[:, 0] = 100.0  # integer scores 100 i + (|rest| <= 45): distinct, so the order is unique
    indptr, indices = random_csr(21, 57, seed=31)
    args = [t.to(device) for t in (hidden, items)]
    exclusions = (indptr.to(device), indices.to(device))
    whole = s4rec_kernels.item_topk(*args, 9, *exclusions, backend=backend)
    monkeypatch.setattr(reference, "MAX_SCORES_PER_CHUNK", chunk)
    chunked = s4rec_kernels.item_topk(*args, 9, *exclusions, backend=backend)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("programs", [1, 64])
def test_topk_kernel_on_every_split_path(device, programs, monkeypatch):
    set_programs(monkeypatch, device, programs)
    hidden, items = randn(40, 6, seed=32), randn(500, 6, seed=33)
    indptr, indices = random_csr(40, 500, seed=34, max_len=30)
    scores, index = s4rec_kernels.item_topk(hidden.to(device), items.to(device), 17,
                                            indptr.to(device), indices.to(device), backend="triton")
    expected_scores, expected_index = torch.topk(masked_scores(hidden, items, indptr, indices), 17)
    assert_close(scores.cpu(), expected_scores, torch.float32)
    assert torch.equal(index.cpu(), expected_index)
