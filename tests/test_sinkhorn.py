"""sinkhorn: checked against SwAV's exp-space definition and against the marginals it promises."""

from __future__ import annotations

import importlib

import pytest
import torch

import s4rec_kernels
from _tolerances import ROUNDING_MARGIN, assert_close, backends
from s4rec_kernels import _dispatch, reference

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


# ----------------------------------------------------------------------------------------------
# The Triton kernels, on every device they run on: CPU under TRITON_INTERPRET=1, and CUDA
# ----------------------------------------------------------------------------------------------

SK = importlib.import_module("s4rec_kernels.sinkhorn")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# "default": the size-based choice (one program at the small shapes); "multi": row-block programs
# at every size; "multi_tiled": row-block programs sweeping rows in 16-column tiles.
PATHS = ["default", "multi", "multi_tiled"]
KERNEL_SHAPES = [(7, 3), (333, 129), (1, 5), (5, 17), (3, 64)]
GPU_SHAPES = [(4096, 1024)]
# allowed excess of the kernel's error over eager float32's, both against a float64 truth
KERNEL_MARGIN = 2e-6


def kernel_device(device: str) -> torch.device:
    if _dispatch.triton_impl("sinkhorn") is None:
        pytest.skip("Triton is not installed")
    if device == "cpu" and not _dispatch.interpreter_enabled():
        pytest.skip("CPU tensors run the kernels only under TRITON_INTERPRET=1")
    return torch.device(device)


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param != "default":
        monkeypatch.setattr(SK, "SINGLE_PROGRAM_MAX_SCORES", 0)
    if request.param == "multi_tiled":
        monkeypatch.setattr(SK, "MAX_ROW_TILE", 16)
    return request.param


def shapes_for(device: str):
    return KERNEL_SHAPES + (GPU_SHAPES if device == "cuda" else [])


def max_error(q: torch.Tensor, truth: torch.Tensor) -> float:
    return float((q.double() - truth).abs().max())


def assert_kernel_accurate(q: torch.Tensor, scores: torch.Tensor, eps: float, n_iters: int,
                           truth_scores: torch.Tensor = None, margin: float = KERNEL_MARGIN):
    """Kernel error against the float64 definition <= eager PyTorch's own error + margin."""
    truth_scores = scores if truth_scores is None else truth_scores
    truth = reference.sinkhorn(truth_scores.double(), eps, n_iters)
    eager = reference.sinkhorn(scores, eps, n_iters)
    assert q.dtype == torch.float32 and q.shape == scores.shape and q.device == scores.device
    assert bool(torch.isfinite(q).all()) and bool((q >= 0).all())
    ours, torchs = max_error(q, truth), max_error(eager, truth)
    assert ours <= torchs + margin, f"kernel error {ours:.3g} vs eager float32 {torchs:.3g}"


def test_kernel_path_selection(monkeypatch):
    device = kernel_device("cuda" if torch.cuda.is_available() else "cpu")
    taken = []
    for name in ("_launch_single", "_launch_multi"):
        original = getattr(SK, name)
        monkeypatch.setattr(SK, name, lambda *a, _o=original, _n=name: (taken.append(_n), _o(*a)))
    scores = cosine_scores(40, 12, seed=1).float().to(device)
    SK.sinkhorn(scores, backend="triton")
    monkeypatch.setattr(SK, "SINGLE_PROGRAM_MAX_SCORES", 0)
    SK.sinkhorn(scores, backend="triton")
    assert taken == ["_launch_single", "_launch_multi"]
    # rows wider than MAX_ROW_TILE never go to the single program
    monkeypatch.setattr(SK, "SINGLE_PROGRAM_MAX_SCORES", 2**16)
    monkeypatch.setattr(SK, "MAX_ROW_TILE", 8)
    SK.sinkhorn(scores, backend="triton")
    assert taken[-1] == "_launch_multi"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [0.5, 0.05, 0.01])
@pytest.mark.parametrize("n_iters", [0, 1, 3])
def test_kernel_matches_reference(device, path, eps, n_iters):
    device = kernel_device(device)
    for shape in shapes_for(device.type):
        scores = cosine_scores(*shape, seed=shape[0] * 7 + shape[1]).float().to(device)
        q = s4rec_kernels.sinkhorn(scores, eps, n_iters, backend="triton")
        assert_kernel_accurate(q, scores, eps, n_iters)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_many_rounds(device, path):
    device = kernel_device(device)
    scores = cosine_scores(61, 23, seed=12).float().to(device)
    q = s4rec_kernels.sinkhorn(scores, 0.05, 10, backend="triton")
    assert_kernel_accurate(q, scores, 0.05, 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [0.5, 0.05, 0.01])
def test_kernel_marginals(device, path, eps):
    """After the last row step every row sums to 1 exactly (up to rounding); the columns sum to
    what the algorithm makes them after n rounds, which is B/K only once Sinkhorn has converged."""
    device = kernel_device(device)
    for n_users, n_protos in shapes_for(device.type):
        scores = cosine_scores(n_users, n_protos, seed=5).float().to(device)
        q = s4rec_kernels.sinkhorn(scores, eps, 3, backend="triton")
        ones = torch.ones(n_users, device=device)
        torch.testing.assert_close(q.sum(dim=1), ones, rtol=1e-5, atol=0.0)
        truth = reference.sinkhorn(scores.double(), eps, 3)
        torch.testing.assert_close(q.sum(dim=0).double(), truth.sum(dim=0), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_columns_reach_b_over_k_once_converged(device, path):
    device = kernel_device(device)
    n_users, n_protos = 150, 37
    scores = cosine_scores(n_users, n_protos, seed=5).float().to(device)
    q = s4rec_kernels.sinkhorn(scores, 0.5, 30, backend="triton")
    torch.testing.assert_close(q.sum(dim=0), torch.full((n_protos,), n_users / n_protos,
                                                        device=device), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(n_users, device=device), rtol=1e-5,
                               atol=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_scores(device, path, dtype):
    device = kernel_device(device)
    exact = cosine_scores(333, 129, seed=6).to(device)
    scores = exact.to(dtype)
    q = s4rec_kernels.sinkhorn(scores, 0.05, 3, backend="triton")
    # loaded and computed in float32: the same as the kernel on the upcast scores
    torch.testing.assert_close(q, s4rec_kernels.sinkhorn(scores.float(), 0.05, 3, backend="triton"),
                               rtol=1e-6, atol=1e-7)
    assert_kernel_accurate(q, scores, 0.05, 3)
    # against the unrounded scores, the kernel loses no more than eager does in this dtype
    assert_kernel_accurate(q, scores, 0.05, 3, truth_scores=exact, margin=ROUNDING_MARGIN[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [0.05, 0.01])
def test_kernel_extreme_scores(device, path, eps):
    device = kernel_device(device)
    g = torch.Generator().manual_seed(0)
    scores = ((torch.rand(64, 37, generator=g) * 2 - 1) * 50).to(device)  # |s| up to 50
    q = s4rec_kernels.sinkhorn(scores, eps, 3, backend="triton")
    assert_kernel_accurate(q, scores, eps, 3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64, device=device), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [1e-3, 1e-4])
def test_kernel_eps_below_float32_exp_range(device, path, eps):
    # exp((s - max) / eps) underflows for most entries; only entries below 2**-126 of their row's
    # largest are lost, so the result stays finite and matches the log-space definition
    device = kernel_device(device)
    scores = cosine_scores(96, 24, seed=13).float().to(device)
    for n_iters in (1, 3):
        q = s4rec_kernels.sinkhorn(scores, eps, n_iters, backend="triton")
        assert_kernel_accurate(q, scores, eps, n_iters)
        torch.testing.assert_close(q.sum(dim=1), torch.ones(96, device=device), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_keeps_a_prototype_every_user_scores_low(device, path):
    # planted: prototype 4 sits 2.0 below every user's best score, so at eps = 0.01 each of its
    # entries is exp(-200) of its row's largest, far below float32's range; the column step still
    # gives it 1/K of the mass (a kernel storing exp(x - row max) would divide 0 by 0 here)
    device = kernel_device(device)
    scores = cosine_scores(16, 5, seed=14) * 0.5
    scores[:, 4] = scores[:, :4].max(dim=1).values - 2.0
    scores = scores.float().to(device)
    for n_iters in (1, 3):
        q = s4rec_kernels.sinkhorn(scores, 0.01, n_iters, backend="triton")
        assert_kernel_accurate(q, scores, 0.01, n_iters)
        assert float(q[:, 4].sum()) > 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_one_row(device, path):
    device = kernel_device(device)
    scores = torch.tensor([[3.0, -2.0, 0.5, 9.0, 1.0, -40.0, 0.0]], device=device)
    for n_iters in (1, 3):
        q = s4rec_kernels.sinkhorn(scores, 0.05, n_iters, backend="triton")
        torch.testing.assert_close(q, torch.full((1, 7), 1 / 7, device=device), rtol=1e-6, atol=0.0)
    q = s4rec_kernels.sinkhorn(scores, 0.5, 0, backend="triton")
    assert_kernel_accurate(q, scores, 0.5, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_more_prototypes_than_users(device, path):
    # K > B: columns get B/K < 1 on average and some prototypes are nobody's argmax
    device = kernel_device(device)
    scores = cosine_scores(6, 50, seed=15).float().to(device)
    q = s4rec_kernels.sinkhorn(scores, 0.05, 3, backend="triton")
    assert_kernel_accurate(q, scores, 0.05, 3)
    assert len(set(q.argmax(dim=1).tolist())) <= 6 < 50
    torch.testing.assert_close(q.sum(), torch.tensor(6.0, device=device), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_under_autocast(device, path):
    # scores produced by a matmul inside autocast come in half precision; exp(scores / eps) in
    # half would overflow at eps = 0.05, the kernel computes in float32 whatever autocast says
    device = kernel_device(device)
    half = torch.bfloat16 if device.type == "cpu" else torch.float16
    g = torch.Generator().manual_seed(16)
    z = torch.nn.functional.normalize(torch.randn(48, 16, generator=g), dim=1).to(device)
    mu = torch.nn.functional.normalize(torch.randn(20, 16, generator=g), dim=1).to(device)
    with torch.autocast(device.type, dtype=half):
        scores = z @ mu.t()
        assert scores.dtype == half
        q = s4rec_kernels.sinkhorn(scores, 0.05, 3, backend="triton")
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, s4rec_kernels.sinkhorn(scores.float(), 0.05, 3, backend="triton"),
                               rtol=1e-6, atol=1e-7)
    assert_kernel_accurate(q, scores, 0.05, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_non_contiguous_scores(device, path):
    device = kernel_device(device)
    scores = cosine_scores(37, 29, seed=17).float().to(device)
    strided = scores.t().contiguous().t()
    torch.testing.assert_close(s4rec_kernels.sinkhorn(strided, 0.05, 3, backend="triton"),
                               s4rec_kernels.sinkhorn(scores, 0.05, 3, backend="triton"),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_nan_scores_give_nan(device, path):
    device = kernel_device(device)
    scores = cosine_scores(9, 4, seed=18).float().to(device)
    scores[3, 2] = float("nan")
    q = s4rec_kernels.sinkhorn(scores, 0.05, 2, backend="triton")
    assert bool(torch.isnan(q).all())
    assert bool(torch.isnan(reference.sinkhorn(scores, 0.05, 2)).all())


def test_kernel_float64_keeps_float64_accuracy():
    device = kernel_device("cuda" if torch.cuda.is_available() else "cpu")
    scores = cosine_scores(20, 7, seed=19).to(device)
    q = s4rec_kernels.sinkhorn(scores, 0.05, 3, backend="triton")
    assert q.dtype == torch.float64
    assert_close(q, swav_exp_space(scores.cpu(), 0.05, 3).to(device), torch.float64)
