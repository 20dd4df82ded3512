"""sinkhorn: checked against SwAV's exp-space definition and against the marginals it promises."""

from __future__ import annotations

import pytest
import torch

import s4rec_kernels
from _tolerances import assert_close, backends

BACKENDS = backends("sinkhorn")
SHAPES = [(7, 3), (333, 129), (1, 5), (5, 17)]


def swav_exp_space(scores: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """SwAV's loop as the paper writes it, on the (K, B) transpose, in exp space (float64)."""
    q = torch.exp(scores.double() / eps).t()  # (K, B)
    q = q / q.sum()
    n_protos, n_users = q.shape
    for _ in range(n_iters):
        q = q / q.sum(dim=1, keepdim=True) / n_protos
        q = q / q.sum(dim=0, keepdim=True) / n_users
    return (q * n_users).t()


def cosine_scores(n_users: int, n_protos: int, seed: int, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n_users, d, generator=g, dtype=torch.float64), dim=1)
    mu = torch.nn.functional.normalize(torch.randn(n_protos, d, generator=g, dtype=torch.float64), dim=1)
    return z @ mu.t()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.5, 0.05])
@pytest.mark.parametrize("n_iters", [0, 1, 3, 10])
def test_matches_exp_space_definition_float64(backend, shape, eps, n_iters):
    scores = cosine_scores(*shape, seed=shape[0] + shape[1])
    q = s4rec_kernels.sinkhorn(scores, eps, n_iters, backend=backend)
    assert q.dtype == torch.float64 and q.shape == shape
    assert_close(q, swav_exp_space(scores, eps, n_iters), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.5, 0.05, 0.01])
@pytest.mark.parametrize("n_iters", [1, 3, 10])
def test_rows_sum_to_one_float32(backend, shape, eps, n_iters):
    scores = cosine_scores(*shape, seed=7).float()
    q = s4rec_kernels.sinkhorn(scores, eps, n_iters, backend=backend)
    assert q.dtype == torch.float32
    assert bool((q >= 0).all())
    torch.testing.assert_close(q.sum(dim=1), torch.ones(shape[0]), rtol=1e-5, atol=1e-5)
    # the last step is the row step, so the total is exactly B
    torch.testing.assert_close(q.sum(), torch.tensor(float(shape[0])), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.5, 0.05])
def test_columns_converge_to_b_over_k(backend, shape, eps):
    n_users, n_protos = shape
    scores = cosine_scores(*shape, seed=3).float()
    errors = []
    for n_iters in (1, 3, 10, 30):
        q = s4rec_kernels.sinkhorn(scores, eps, n_iters, backend=backend)
        errors.append(float((q.sum(dim=0) - n_users / n_protos).abs().max()))
    # Sinkhorn's marginal error does not grow, and vanishes quickly for a well-conditioned kernel
    assert all(later <= earlier + 1e-5 for earlier, later in zip(errors, errors[1:]))
    if eps == 0.5:
        assert errors[-1] <= 1e-5 * max(1.0, n_users / n_protos)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_no_iterations_is_b_times_global_softmax(backend, shape):
    scores = cosine_scores(*shape, seed=11).float()
    q = s4rec_kernels.sinkhorn(scores, 0.05, 0, backend=backend)
    expected = shape[0] * torch.softmax((scores.double() / 0.05).reshape(-1), dim=0).reshape(shape)
    assert_close(q, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_user_is_uniform(backend):
    # planted: with B = 1 the column step makes every entry 1/K, and the row step keeps it
    scores = torch.tensor([[3.0, -2.0, 0.5, 9.0, 1.0]])
    q = s4rec_kernels.sinkhorn(scores, 0.05, 1, backend=backend)
    assert_close(q, torch.full((1, 5), 0.2), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.05, 0.01])
def test_extreme_scores_stay_finite(backend, eps):
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(64, 37, generator=g) * 2 - 1) * 50  # |s| up to 50: exp(s / eps) overflows
    q = s4rec_kernels.sinkhorn(scores, eps, 3, backend=backend)
    assert bool(torch.isfinite(q).all()) and bool((q >= 0).all())
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64), rtol=1e-5, atol=1e-5)
    q64 = s4rec_kernels.sinkhorn(scores.double(), eps, 3, backend=backend)
    assert_close(q, q64, torch.float32, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dominant_diagonal_gives_permutation(backend):
    # planted: each user has one prototype far above the rest, and they are all different
    perm = torch.tensor([3, 0, 4, 1, 2])
    scores = torch.full((5, 5), -50.0)
    scores[torch.arange(5), perm] = 50.0
    q = s4rec_kernels.sinkhorn(scores, 0.01, 3, backend=backend)
    expected = torch.zeros(5, 5)
    expected[torch.arange(5), perm] = 1.0
    assert_close(q, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_float32_of_upcast_scores(backend, dtype):
    scores = cosine_scores(33, 10, seed=5).to(dtype)
    q = s4rec_kernels.sinkhorn(scores, 0.05, 3, backend=backend)
    assert q.dtype == torch.float32
    assert_close(q, s4rec_kernels.sinkhorn(scores.float(), 0.05, 3, backend=backend), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invariant_to_constants(backend):
    scores = cosine_scores(19, 6, seed=9)
    q = s4rec_kernels.sinkhorn(scores, 0.05, 3, backend=backend)
    assert_close(s4rec_kernels.sinkhorn(scores + 3.7, 0.05, 3, backend=backend), q, torch.float64,
                 rtol=1e-9)
    # a constant per prototype is removed exactly by the first column step
    per_column = torch.linspace(-2.0, 2.0, 6, dtype=torch.float64)
    assert_close(s4rec_kernels.sinkhorn(scores + per_column, 0.05, 3, backend=backend), q,
                 torch.float64, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    scores = cosine_scores(12, 21, seed=2).float()
    strided = scores.t().contiguous().t()
    assert not strided.is_contiguous()
    assert_close(s4rec_kernels.sinkhorn(strided, 0.05, 3, backend=backend),
                 s4rec_kernels.sinkhorn(scores, 0.05, 3, backend=backend), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_does_not_require_grad(backend):
    scores = cosine_scores(8, 4, seed=1).float().requires_grad_(True)
    q = s4rec_kernels.sinkhorn(scores, backend=backend)
    assert not q.requires_grad and q.grad_fn is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_has_no_effect(backend):
    scores = cosine_scores(40, 12, seed=4).float()
    expected = s4rec_kernels.sinkhorn(scores, 0.05, 3, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = s4rec_kernels.sinkhorn(scores, 0.05, 3, backend=backend)
    assert q.dtype == torch.float32
    assert_close(q, expected, torch.float32)


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="scores"):
        s4rec_kernels.sinkhorn(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="scores"):
        s4rec_kernels.sinkhorn(torch.zeros(4, 0))


def test_default_arguments_are_swav():
    scores = cosine_scores(6, 4, seed=8)
    assert_close(s4rec_kernels.sinkhorn(scores), swav_exp_space(scores, 0.05, 3), torch.float64)
