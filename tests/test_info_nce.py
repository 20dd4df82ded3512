"""info_nce_proto: checked against a per-anchor loop written from SPEC eq. 10, gradcheck, and
planted alignments whose loss is known; the Triton kernels against the reference, forward and
backward, on every tile path, in every dtype, and under torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import s4rec_kernels
from s4rec_kernels import _dispatch, info_nce
from _tolerances import ROUNDING_MARGIN, TOL, assert_close, backends

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


# ----------------------------------------------------------------------------------------------
# The Triton kernels against the reference: on CPU under the Triton interpreter, and on CUDA
# ----------------------------------------------------------------------------------------------

KERNEL_DEVICES = (["cpu"] if "triton" in BACKENDS else []) + (
    ["cuda"] if torch.cuda.is_available() and _dispatch.triton_impl("info_nce_proto") else []
)
needs_kernels = pytest.mark.skipif(not KERNEL_DEVICES,
                                   reason="no Triton: neither CUDA nor TRITON_INTERPRET=1")


def on(device, *tensors):
    return [t.to(device) for t in tensors]


def loss_and_grads(z1, z2, protos, assign, tau, upstream, backend):
    """Loss and the gradients of upstream * loss for z1, z2 and protos."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (z1, z2, protos)]
    loss = s4rec_kernels.info_nce_proto(*inputs, assign, tau, backend=backend)
    grads = torch.autograd.grad(loss, inputs, upstream.to(loss))
    return loss.detach(), grads


def truth(z1, z2, protos, assign, tau, upstream):
    """The reference in float64 on the same (rounded) input values."""
    return loss_and_grads(z1.double(), z2.double(), protos.double(), assign, tau, upstream,
                          backend="reference")


def check_against_reference(z1, z2, protos, assign, tau, seed):
    # a random upstream gradient, times 2B so each anchor's share of it is O(1)
    upstream = torch.randn((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    upstream = (2 * z1.shape[0] * upstream).to(z1.device)
    loss, grads = loss_and_grads(z1, z2, protos, assign, tau, upstream, backend="triton")
    want_loss, want_grads = truth(z1, z2, protos, assign, tau, upstream)
    assert loss.dtype == (torch.float64 if z1.dtype == torch.float64 else torch.float32)
    assert_close(loss, want_loss, z1.dtype)
    for got, want, name in zip(grads, want_grads, ("z1", "z2", "protos")):
        assert got.dtype == z1.dtype and got.shape == want.shape, name
        # entries are O(1/tau): the absolute tolerance scales with the largest one
        atol = TOL[z1.dtype]["atol"] * max(1.0, float(want.abs().max()))
        assert_close(got, want, z1.dtype, atol=atol)


# (B, K, d): odd and tiny; anchors and keys over several tiles with ragged tails, z1/z2 and
# view/prototype boundaries inside a tile; d padded to a power of two
SHAPES = [(5, 3, 7), (37, 19, 20), (300, 129, 64)]


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [0.05, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_reference(device, dtype, tau, shape):
    n, n_protos, d = shape
    z1, z2, protos, assign = on(device, *make_inputs(n, n_protos, d, seed=n + d, dtype=dtype))
    check_against_reference(z1, z2, protos, assign, tau, seed=n)


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("n,d", [(3, 5), (40, 33)])
def test_kernels_single_prototype(device, n, d):
    # K = 1: every user is assigned to it, so no prototype is ever a negative
    z1, z2, protos, assign = on(device, *make_inputs(n, 1, d, seed=7, dtype=torch.float64))
    check_against_reference(z1, z2, protos, assign, 0.2, seed=1)
    one = torch.tensor(1.0, device=device)
    _, grads = loss_and_grads(z1, z2, protos, assign, 0.2, one, "triton")
    assert float(grads[2].abs().max()) == 0.0


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernels_repeated_assignments(device):
    z1, z2, protos, _ = make_inputs(45, 6, 16, seed=8, dtype=torch.float64, normalise=False)
    patterns = [torch.full((45,), 4), torch.arange(45) % 2, torch.zeros(45, dtype=torch.long)]
    for assign in patterns:
        check_against_reference(*on(device, z1, z2, protos, assign), 0.5, seed=2)


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_with_smallest_tiles(device, dtype, monkeypatch):
    # 16 x 16 tiles: 5 anchor blocks and 6 key blocks, the last of each ragged, d = 20 in 32
    monkeypatch.setattr(info_nce, "MAX_BLOCK_M", 16)
    monkeypatch.setattr(info_nce, "MAX_BLOCK_N", 16)
    z1, z2, protos, assign = on(device, *make_inputs(37, 19, 20, seed=9, dtype=dtype))
    assign[:10] = 18  # several users on the last prototype, which sits in the ragged key tile
    check_against_reference(z1, z2, protos, assign, 0.1, seed=3)


# Key and anchor ranges forced at small shapes: (programs aimed for, B, K, d). With 16 x 16 tiles
# B = 37, K = 19 gives 5 anchor blocks and 6 key blocks (93 keys): 64 programs put every block
# in its own range; 7 programs give 2 key ranges of 3 blocks (48 and 45 keys) and 2 anchor
# ranges of 3 and 2 blocks, neither dividing the count; B = 21, K = 1 has one prototype
SPLIT_CASES = [(64, 37, 19, 20), (7, 37, 19, 20), (5, 21, 1, 9)]


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "p{}-{}x{}x{}".format(*c))
def test_kernels_split_ranges_match_reference(device, dtype, case, monkeypatch):
    programs, n, n_protos, d = case
    monkeypatch.setattr(info_nce, "MAX_BLOCK_M", 16)
    monkeypatch.setattr(info_nce, "MAX_BLOCK_N", 16)
    monkeypatch.setattr(info_nce, "INTERPRET_PROGRAMS", programs)
    z1, z2, protos, assign = on(device, *make_inputs(n, n_protos, d, seed=programs + d,
                                                     dtype=dtype))
    if device == "cpu":  # the split really happens on both sides
        plan = info_nce._plan(torch.cat([z1, z2, protos]), n, 16, 16, 4, "ieee")
        assert plan.key_splits > 1 and plan.row_splits > 1
    if dtype in (torch.float32, torch.float64):
        check_against_reference(z1, z2, protos, assign, 0.1, seed=programs)
        return
    # half inputs: computed in fp32 from the rounded values, the gradients rounded once to dtype
    upstream = torch.tensor(2.0 * n, dtype=torch.float64)
    loss, grads = loss_and_grads(z1, z2, protos, assign, 0.1, upstream.to(device), "triton")
    want_loss, want_grads = truth(z1, z2, protos, assign, 0.1, upstream.to(device))
    assert_close(loss, want_loss, dtype)
    eps = torch.finfo(dtype).eps  # twice the largest relative rounding error
    for got, want in zip(grads, want_grads):
        assert got.dtype == dtype
        assert_close(got.double(), want, dtype, rtol=eps, atol=eps * float(want.abs().max()))


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernels_split_ranges_are_bitwise_repeatable(device, monkeypatch):
    monkeypatch.setattr(info_nce, "MAX_BLOCK_M", 16)
    monkeypatch.setattr(info_nce, "MAX_BLOCK_N", 16)
    monkeypatch.setattr(info_nce, "INTERPRET_PROGRAMS", 7)
    z1, z2, protos, assign = on(device, *make_inputs(37, 19, 20, seed=15, dtype=torch.float32))
    one = torch.tensor(1.0, device=device)
    first = loss_and_grads(z1, z2, protos, assign, 0.2, one, "triton")
    second = loss_and_grads(z1, z2, protos, assign, 0.2, one, "triton")
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.skipif("triton" not in BACKENDS and not KERNEL_DEVICES, reason="needs Triton")
@pytest.mark.parametrize("n,splits", [(512, True), (4096, True), (65536, False)])
def test_launches_fill_the_device_by_shape(n, splits):
    """On an H100 (132 SMs, 264 programs aimed for) the training batch B = 512 is split on both
    sides to fill the device; B = 65536 has blocks enough and takes one range."""
    target = info_nce.PROGRAMS_PER_SM * 132
    for dtype in (torch.bfloat16, torch.float32):
        config = info_nce._launch_config(64, dtype)
        plan = info_nce.info_nce_launches(n, 2 * n + 128, 64, dtype, *config, target)
        assert (plan.key_splits > 1) == splits and (plan.row_splits > 1) == splits
        for launch in (plan.fwd, plan.dq, plan.dk):
            assert launch.grid[0] * launch.grid[1] >= target
        # every range holds keys (anchors): none is empty, together they cover all
        n_keys, block_m, block_n = 2 * n + 128, config[0], config[1]
        assert plan.keys_per_split % block_n == 0 and plan.rows_per_split % block_m == 0
        assert (plan.key_splits - 1) * plan.keys_per_split < n_keys <= (
            plan.key_splits * plan.keys_per_split)
        assert (plan.row_splits - 1) * plan.rows_per_split < 2 * n <= (
            plan.row_splits * plan.rows_per_split)


def test_tf32_asked_for_reaches_the_launches():
    """float32_dots("tf32") (the trainer's --precision tf32) makes every product one TF32 pass;
    otherwise fp32 inputs take 3xTF32 and half inputs' softmax-weighted sums too."""
    from s4rec_kernels._item_common import fp32_dot_precision

    def precisions(dtype):
        plan = info_nce.info_nce_launches(512, 1152, 64, dtype, 32, 32, 4, 264,
                                          fp32_dot_precision())
        return plan.fwd.meta["QK_PRECISION"], plan.dq.meta["GRAD_PRECISION"]

    assert precisions(torch.float32) == ("tf32x3", "tf32x3")
    assert precisions(torch.bfloat16) == ("tf32", "tf32x3")
    with _dispatch.float32_dots("tf32"):
        assert precisions(torch.float32) == ("tf32", "tf32")
        assert precisions(torch.bfloat16) == ("tf32", "tf32")
        assert precisions(torch.float64) == ("ieee", "ieee")
    assert precisions(torch.float32) == ("tf32x3", "tf32x3")
    with pytest.raises(ValueError, match="float32_dots"):
        with _dispatch.float32_dots("bf16"):
            pass


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernels_strided_inputs(device):
    z1, z2, protos, assign = on(device, *make_inputs(9, 4, 6, seed=10, dtype=torch.float64))
    wide = torch.cat([z1, z2], dim=1)  # z1 and z2 as column slices of one (B, 2d) matrix
    protos_t = protos.t().contiguous().t()  # column-major
    every_other = torch.stack([assign, assign], dim=1).reshape(-1)[::2]  # assign, strided
    args = (wide[:, :6], wide[:, 6:], protos_t, every_other)
    assert not any(t.is_contiguous() for t in (args[0], args[2], args[3]))
    check_against_reference(*args, 0.3, seed=4)


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_half_inputs_no_worse_than_eager(device, dtype):
    """CCE's rule: against the float64 truth on the unrounded inputs, the kernels' error (loss and
    gradients) is at most eager PyTorch's own error in ``dtype`` plus a margin."""
    z1, z2, protos, assign = make_inputs(40, 9, 32, seed=11)  # float64, 80 anchors: 2 blocks
    tau, upstream = 0.1, torch.tensor(1.5, dtype=torch.float64)
    want_loss, want_grads = truth(z1, z2, protos, assign, tau, upstream)
    low = [t.to(dtype) for t in (z1, z2, protos)]
    loss, grads = loss_and_grads(*on(device, *low, assign), tau, upstream.to(device), "triton")
    assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    # eager PyTorch in dtype: the per-anchor loop, differentiated by autograd in dtype
    eager_in = [t.detach().clone().requires_grad_(True) for t in low]
    eager_loss = per_anchor_loss(*eager_in, assign, tau)
    eager_grads = torch.autograd.grad(eager_loss, eager_in, upstream.to(dtype))

    def err(got, want):
        return float((got.detach().cpu().double() - want).abs().max())

    margin = ROUNDING_MARGIN[dtype]
    assert err(loss, want_loss) <= err(eager_loss, want_loss) + margin
    for got, eager, want in zip(grads, eager_grads, want_grads):
        assert err(got, want) <= err(eager, want) + margin


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernels_under_torch_compile_fullgraph(device):
    # the kernels run as torch.library ops with fake implementations inside an autograd.Function,
    # so the whole call, forward and backward, traces into one graph
    z1, z2, protos, assign = on(device, *make_inputs(12, 5, 8, seed=12, dtype=torch.float32))

    def step(a, b, c):
        return 2.0 * s4rec_kernels.info_nce_proto(a, b, c, assign, 0.2, backend="triton")

    backend = "inductor" if device == "cuda" else "aot_eager"  # no C++ toolchain needed on CPU
    torch._dynamo.reset()
    compiled_step = torch.compile(step, fullgraph=True, backend=backend)
    inputs = [t.clone().requires_grad_(True) for t in (z1, z2, protos)]
    loss = compiled_step(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    eager_inputs = [t.clone().requires_grad_(True) for t in (z1, z2, protos)]
    eager_loss = step(*eager_inputs)
    eager_grads = torch.autograd.grad(eager_loss, eager_inputs)
    assert_close(loss, eager_loss, torch.float32)
    for got, want in zip(grads, eager_grads):
        assert_close(got, want, torch.float32)


@needs_kernels
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_library_ops_pass_opcheck(device):
    z1, z2, protos, assign = on(device, *make_inputs(6, 3, 8, seed=13, dtype=torch.float32))
    keys = torch.cat([z1, z2, protos])
    config = info_nce._launch_config(8, torch.float32)
    fwd = torch.ops.s4rec_kernels.info_nce_proto_fwd
    bwd = torch.ops.s4rec_kernels.info_nce_proto_bwd
    torch.library.opcheck(fwd.default, (keys, assign, 6, 0.3, *config))
    lse2, _ = fwd(keys, assign, 6, 0.3, *config)
    grad = torch.tensor(0.7, device=device)
    torch.library.opcheck(bwd.default, (grad, keys, assign, lse2, 6, 0.3, *config))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory is measured on CUDA")
def test_kernels_memory_is_linear_in_batch():
    n, n_protos, d = 16384, 128, 64
    z1, z2, protos, assign = on("cuda", *make_inputs(n, n_protos, d, seed=14, dtype=torch.float32))
    inputs = [t.requires_grad_(True) for t in (z1, z2, protos)]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = s4rec_kernels.info_nce_proto(*inputs, assign, 0.1, backend="triton")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits_bytes = 2 * n * (2 * n + n_protos) * 4  # what the eager reference keeps: 4.3 GB
    assert extra < 16 * (2 * n + n_protos) * d * 4  # a few (2B + K, d) buffers: 34 MB here
    assert extra < logits_bytes / 50
