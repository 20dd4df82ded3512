"""info_nce_proto: checked against a per-anchor loop written from SPEC eq. 10, gradcheck, and
planted alignments whose loss is known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import s4rec_kernels
from _tolerances import ROUNDING_MARGIN, assert_close, backends

BACKENDS = backends("info_nce_proto")


def per_anchor_loss(z1, z2, protos, assign, tau):
    """One anchor at a time, in the dtype of the inputs: eq. 10 with both views as anchors."""
    n = z1.shape[0]
    views = [z1[u] for u in range(n)] + [z2[u] for u in range(n)]
    total = 0.0
    for i in range(2 * n):
        anchor, pos = views[i], (i + n) % (2 * n)
        own = int(assign[i % n])
        logits = [anchor @ views[pos] / tau]
        logits += [anchor @ views[j] / tau for j in range(2 * n) if j not in (i, pos)]
        logits += [anchor @ protos[k] / tau for k in range(protos.shape[0]) if k != own]
        total = total + torch.logsumexp(torch.stack(logits), dim=0) - logits[0]
    return total / (2 * n)


def make_inputs(n, n_protos, d, seed, dtype=torch.float64, normalise=True):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    protos = torch.randn(n_protos, d, generator=g, dtype=torch.float64)
    if normalise:
        z1, z2, protos = (F.normalize(t, dim=1) for t in (z1, z2, protos))
    assign = torch.randint(0, n_protos, (n,), generator=g)
    return z1.to(dtype), z2.to(dtype), protos.to(dtype), assign


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.05, 1.0])
@pytest.mark.parametrize("n,n_protos,d", [(4, 5, 6), (1, 3, 2), (6, 1, 3), (3, 7, 9)])
def test_matches_per_anchor_loop(backend, tau, n, n_protos, d):
    z1, z2, protos, assign = make_inputs(n, n_protos, d, seed=n * 100 + n_protos)
    loss = s4rec_kernels.info_nce_proto(z1, z2, protos, assign, tau, backend=backend)
    assert loss.shape == () and loss.dtype == torch.float64
    assert_close(loss, per_anchor_loss(z1, z2, protos, assign, tau), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_assignments(backend):
    z1, z2, protos, _ = make_inputs(5, 4, 8, seed=3, normalise=False)
    for assign in (torch.full((5,), 2), torch.tensor([0, 0, 3, 3, 0])):
        loss = s4rec_kernels.info_nce_proto(z1, z2, protos, assign, 0.5, backend=backend)
        assert_close(loss, per_anchor_loss(z1, z2, protos, assign, 0.5), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    z1, z2, protos, assign = make_inputs(5, 3, 7, seed=1, normalise=False)
    inputs = tuple(t.clone().requires_grad_(True) for t in (z1, z2, protos))

    def fn(a, b, c):
        return s4rec_kernels.info_nce_proto(a, b, c, assign, 0.7, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_all_inputs(backend):
    z1, z2, protos, assign = make_inputs(6, 4, 5, seed=2, dtype=torch.float32)
    z1, z2, protos = (t.requires_grad_(True) for t in (z1, z2, protos))
    s4rec_kernels.info_nce_proto(z1, z2, protos, assign, 0.1, backend=backend).backward()
    for t in (z1, z2, protos):
        assert t.grad is not None and t.grad.dtype == torch.float32
        assert bool(torch.isfinite(t.grad).all()) and float(t.grad.abs().sum()) > 0
    # the gradient matches the per-anchor loop's
    ref = [t.detach().double().requires_grad_(True) for t in (z1, z2, protos)]
    per_anchor_loss(*ref[:3], assign, 0.1).backward()
    for t, r in zip((z1, z2, protos), ref):
        assert_close(t.grad, r.grad, torch.float32, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_aligned_views_give_small_loss(backend):
    eye = torch.eye(8)
    z = 10.0 * eye[:4]  # each user on its own axis, both views identical
    protos = eye[5:8]  # orthogonal to every view
    assign = torch.tensor([0, 1, 2, 0])
    loss = s4rec_kernels.info_nce_proto(z, z.clone(), protos, assign, 0.1, backend=backend)
    assert float(loss) < 1e-6
    # misaligned positives: the positive logit is 0 while another view scores 1000
    shuffled = z[torch.tensor([1, 2, 3, 0])]
    loss = s4rec_kernels.info_nce_proto(z, shuffled, protos, assign, 0.1, backend=backend)
    assert float(loss) > 100.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_own_prototype_is_not_a_negative(backend):
    z = 5.0 * torch.eye(3, dtype=torch.float64)
    protos = z.clone()  # prototype u sits exactly on user u
    own = s4rec_kernels.info_nce_proto(z, z.clone(), protos, torch.arange(3), 0.1, backend=backend)
    assert float(own) < 1e-9
    # assigned elsewhere, prototype u becomes a negative as strong as the positive: loss = log 2
    other = s4rec_kernels.info_nce_proto(z, z.clone(), protos, torch.tensor([1, 2, 0]), 0.1,
                                         backend=backend)
    assert abs(float(other) - math.log(2.0)) < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_prototype_means_no_prototype_negatives(backend):
    z1, z2, _, _ = make_inputs(4, 1, 6, seed=4)
    far = 100.0 * torch.ones(1, 6, dtype=torch.float64)
    loss = s4rec_kernels.info_nce_proto(z1, z2, far, torch.zeros(4, dtype=torch.long), 0.2,
                                        backend=backend)
    views_only = per_anchor_loss(z1, z2, far[:0], torch.zeros(4, dtype=torch.long), 0.2)
    assert_close(loss, views_only, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_against_float64_truth(backend, dtype):
    z1, z2, protos, assign = make_inputs(16, 8, 32, seed=5)
    tau = 0.1
    truth = s4rec_kernels.info_nce_proto(z1, z2, protos, assign, tau, backend="reference")
    low = [t.to(dtype).requires_grad_(True) for t in (z1, z2, protos)]
    loss = s4rec_kernels.info_nce_proto(*low, assign, tau, backend=backend)
    assert loss.dtype == torch.float32
    # computed in float32, it is as good as float64 on the same rounded inputs ...
    rounded = s4rec_kernels.info_nce_proto(*(t.detach().double() for t in low), assign, tau)
    assert_close(loss, rounded, dtype)
    # ... and no worse than eager PyTorch in this dtype against the unrounded truth
    eager = per_anchor_loss(*(t.detach() for t in low), assign, tau)
    ours_err = abs(float(loss.detach()) - float(truth))
    eager_err = abs(float(eager) - float(truth))
    assert ours_err <= eager_err + ROUNDING_MARGIN[dtype]
    loss.backward()
    for t in low:
        assert t.grad is not None and t.grad.dtype == dtype and bool(torch.isfinite(t.grad).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtype_rule_and_autocast(backend):
    z1, z2, protos, assign = make_inputs(5, 3, 4, seed=6, dtype=torch.float32)
    loss = s4rec_kernels.info_nce_proto(z1, z2, protos, assign.int(), 0.3, backend=backend)
    assert loss.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = s4rec_kernels.info_nce_proto(z1, z2, protos, assign, 0.3, backend=backend)
    assert under.dtype == torch.float32
    assert_close(under, loss, torch.float32)


def test_empty_batch_is_an_error():
    empty = torch.zeros(0, 4)
    with pytest.raises(ValueError, match="z1"):
        s4rec_kernels.info_nce_proto(empty, empty, torch.zeros(3, 4),
                                     torch.zeros(0, dtype=torch.long), 0.1)
