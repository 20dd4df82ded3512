"""The public boundary: exports, backend selection and the input checks' error messages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import s4rec_kernels
from s4rec_kernels import _dispatch

LONG = torch.long


def valid_calls():
    """One valid call per public op: (name, function, positional args, keyword args)."""
    z = torch.randn(4, 3)
    hidden, items = torch.randn(3, 3), torch.randn(7, 3)
    indptr, indices = torch.tensor([0, 1, 1, 3]), torch.tensor([2, 5, 5])
    return [
        ("sinkhorn", s4rec_kernels.sinkhorn, (torch.randn(4, 5),), {}),
        ("info_nce_proto", s4rec_kernels.info_nce_proto,
         (z, z + 1, torch.randn(2, 3), torch.tensor([0, 1, 1, 0]), 0.1), {}),
        ("item_softmax_ce", s4rec_kernels.item_softmax_ce,
         (hidden, items, torch.tensor([0, 6, -100])), {}),
        ("item_rank", s4rec_kernels.item_rank,
         (hidden, items, torch.tensor([0, 6, 2]), indptr, indices), {}),
        ("item_topk", s4rec_kernels.item_topk, (hidden, items, 2, indptr, indices), {}),
    ]


CALLS = valid_calls()
IDS = [name for name, *_ in CALLS]


def call(fn, args, kwargs, **extra):
    return fn(*args, **{**kwargs, **extra})


def replaced(args, position, value):
    args = list(args)
    args[position] = value
    return tuple(args)


# ----------------------------------------------------------------------------------------------
# Exports and backends
# ----------------------------------------------------------------------------------------------


def test_exports():
    assert sorted(s4rec_kernels.__all__) == sorted(
        ["sinkhorn", "info_nce_proto", "item_softmax_ce", "item_rank", "item_topk"]
    )
    for name in s4rec_kernels.__all__:
        assert callable(getattr(s4rec_kernels, name))


def test_import_needs_neither_triton_nor_gpu():
    # Triton is optional (it does not exist on every platform): with it unimportable and no GPU,
    # the package imports and every op runs its reference.
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, s4rec_kernels\n"
            "q = s4rec_kernels.sinkhorn(torch.randn(4, 3))\n"
            "sys.exit(0 if q.shape == (4, 3) else 1)")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0


@pytest.mark.parametrize("name,fn,args,kwargs", CALLS, ids=IDS)
def test_valid_calls_run_on_every_cpu_backend(name, fn, args, kwargs):
    call(fn, args, kwargs)
    call(fn, args, kwargs, backend="reference")


@pytest.mark.parametrize("name,fn,args,kwargs", CALLS, ids=IDS)
@pytest.mark.parametrize("backend", ["cuda", "", None, "Triton"])
def test_unknown_backend(name, fn, args, kwargs, backend):
    with pytest.raises(ValueError, match=rf"{name}: backend must be one of .*got"):
        call(fn, args, kwargs, backend=backend)


@pytest.mark.parametrize("name,fn,args,kwargs", CALLS, ids=IDS)
def test_triton_without_kernel_is_not_implemented(name, fn, args, kwargs, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_dispatch, "_TRITON_IMPLS", {})
    with pytest.raises(NotImplementedError, match=rf"{name}: no Triton kernel exists yet"):
        call(fn, args, kwargs, backend="triton")


@pytest.mark.parametrize("name,fn,args,kwargs", CALLS, ids=IDS)
def test_registered_kernel_dispatch(name, fn, args, kwargs, monkeypatch):
    seen = []

    def fake(*a):
        seen.append(a)
        return "from triton"

    monkeypatch.setattr(_dispatch, "_TRITON_IMPLS", {})
    _dispatch.register_triton(name, fake)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # CPU tensors: "auto" stays on the reference, "triton" refuses without the interpreter
    assert call(fn, args, kwargs) != "from triton" and not seen
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
        call(fn, args, kwargs, backend="triton")
    # under the Triton interpreter CPU tensors go to the kernel, with the validated arguments
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert call(fn, args, kwargs, backend="triton") == "from triton"
    assert len(seen) == 1
    for passed in seen[0]:
        if isinstance(passed, torch.Tensor) and not passed.is_floating_point():
            assert passed.dtype == torch.int64
    assert call(fn, args, kwargs, backend="auto") != "from triton" and len(seen) == 1


def test_register_triton_checks_its_arguments():
    with pytest.raises(ValueError, match="op_name"):
        _dispatch.register_triton("", print)
    with pytest.raises(ValueError, match="callable"):
        _dispatch.register_triton("sinkhorn", 3)


def test_index_tensors_accept_int32():
    hidden, items = torch.randn(3, 3), torch.randn(7, 3)
    indptr, indices = torch.tensor([0, 1, 1, 3]), torch.tensor([2, 5, 5])
    targets = torch.tensor([0, 6, 2])
    as64 = s4rec_kernels.item_rank(hidden, items, targets, indptr, indices)
    as32 = s4rec_kernels.item_rank(hidden, items, targets.int(), indptr.int(), indices.int())
    assert torch.equal(as64, as32)


# ----------------------------------------------------------------------------------------------
# Input checks: every message names the argument
# ----------------------------------------------------------------------------------------------

z, p, a = torch.randn(4, 3), torch.randn(2, 3), torch.tensor([0, 1, 1, 0])
h, it = torch.randn(3, 3), torch.randn(7, 3)
ptr, idx, tgt = torch.tensor([0, 1, 1, 3]), torch.tensor([2, 5, 5]), torch.tensor([0, 6, 2])
meta = dict(device="meta")

BAD_CALLS = [
    # sinkhorn
    ("scores", s4rec_kernels.sinkhorn, ([[1.0, 2.0]],), {}),
    ("scores", s4rec_kernels.sinkhorn, (torch.randn(4),), {}),
    ("scores", s4rec_kernels.sinkhorn, (torch.ones(4, 5, dtype=LONG),), {}),
    ("scores", s4rec_kernels.sinkhorn, (torch.randn(0, 5),), {}),
    ("eps", s4rec_kernels.sinkhorn, (torch.randn(4, 5), 0.0), {}),
    ("eps", s4rec_kernels.sinkhorn, (torch.randn(4, 5), -0.1), {}),
    ("eps", s4rec_kernels.sinkhorn, (torch.randn(4, 5), float("nan")), {}),
    ("n_iters", s4rec_kernels.sinkhorn, (torch.randn(4, 5), 0.05, -1), {}),
    ("n_iters", s4rec_kernels.sinkhorn, (torch.randn(4, 5), 0.05, 2.5), {}),
    ("n_iters", s4rec_kernels.sinkhorn, (torch.randn(4, 5), 0.05, True), {}),
    # info_nce_proto
    ("z2", s4rec_kernels.info_nce_proto, (z, torch.randn(5, 3), p, a, 0.1), {}),
    ("z2", s4rec_kernels.info_nce_proto, (z, torch.randn(4, 2), p, a, 0.1), {}),
    ("z2", s4rec_kernels.info_nce_proto, (z, z.double(), p, a, 0.1), {}),
    ("z2", s4rec_kernels.info_nce_proto, (z, torch.randn(4, 3, **meta), p, a, 0.1), {}),
    ("z1", s4rec_kernels.info_nce_proto, (torch.randn(4, 3, 1), z, p, a, 0.1), {}),
    ("protos", s4rec_kernels.info_nce_proto, (z, z, torch.randn(2, 4), a, 0.1), {}),
    ("protos", s4rec_kernels.info_nce_proto, (z, z, p.half(), a, 0.1), {}),
    ("protos", s4rec_kernels.info_nce_proto, (z, z, p.to(**meta), a, 0.1), {}),
    ("protos", s4rec_kernels.info_nce_proto, (z, z, torch.randn(0, 3), a[:0], 0.1), {}),
    ("assign", s4rec_kernels.info_nce_proto, (z, z, p, torch.tensor([0, 1, 2, 0]), 0.1), {}),
    ("assign", s4rec_kernels.info_nce_proto, (z, z, p, torch.tensor([0, -1, 1, 0]), 0.1), {}),
    ("assign", s4rec_kernels.info_nce_proto, (z, z, p, torch.tensor([0, 1, 1]), 0.1), {}),
    ("assign", s4rec_kernels.info_nce_proto, (z, z, p, a.float(), 0.1), {}),
    ("assign", s4rec_kernels.info_nce_proto, (z, z, p, a.to(**meta), 0.1), {}),
    ("tau", s4rec_kernels.info_nce_proto, (z, z, p, a, 0), {}),
    ("tau", s4rec_kernels.info_nce_proto, (z, z, p, a, "0.1"), {}),
    # item_softmax_ce
    ("items", s4rec_kernels.item_softmax_ce, (h, torch.randn(7, 4), tgt), {}),
    ("items", s4rec_kernels.item_softmax_ce, (h, it.double(), tgt), {}),
    ("items", s4rec_kernels.item_softmax_ce, (h, it.to(**meta), tgt), {}),
    ("items", s4rec_kernels.item_softmax_ce, (h, torch.randn(0, 3), tgt), {}),
    ("hidden", s4rec_kernels.item_softmax_ce, (h.int(), it, tgt), {}),
    ("targets", s4rec_kernels.item_softmax_ce, (h, it, torch.tensor([0, 7, 1])), {}),
    ("targets", s4rec_kernels.item_softmax_ce, (h, it, torch.tensor([0, -1, 1])), {}),
    ("targets", s4rec_kernels.item_softmax_ce, (h, it, torch.tensor([0, 1])), {}),
    ("targets", s4rec_kernels.item_softmax_ce, (h, it, tgt.to(**meta)), {}),
    ("reduction", s4rec_kernels.item_softmax_ce, (h, it, tgt), dict(reduction="avg")),
    ("ignore_index", s4rec_kernels.item_softmax_ce, (h, it, tgt), dict(ignore_index=None)),
    # item_rank
    ("items", s4rec_kernels.item_rank, (h, torch.randn(7, 2), tgt, ptr, idx), {}),
    ("items", s4rec_kernels.item_rank, (h, it.half(), tgt, ptr, idx), {}),
    ("targets", s4rec_kernels.item_rank, (h, it, torch.tensor([0, 7, 2]), ptr, idx), {}),
    ("targets", s4rec_kernels.item_rank, (h, it, torch.tensor([0, 6, -100]), ptr, idx), {}),
    ("exclude_indptr", s4rec_kernels.item_rank, (h, it, tgt, torch.tensor([0, 1, 3]), idx), {}),
    ("exclude_indptr", s4rec_kernels.item_rank, (h, it, tgt, torch.tensor([1, 1, 1, 3]), idx), {}),
    ("exclude_indptr", s4rec_kernels.item_rank, (h, it, tgt, torch.tensor([0, 2, 1, 3]), idx), {}),
    ("exclude_indptr", s4rec_kernels.item_rank, (h, it, tgt, torch.tensor([0, 1, 1, 2]), idx), {}),
    ("exclude_indptr", s4rec_kernels.item_rank, (h, it, tgt, ptr.to(**meta), idx), {}),
    ("exclude_indices", s4rec_kernels.item_rank, (h, it, tgt, ptr, torch.tensor([2, 7, 5])), {}),
    ("exclude_indices", s4rec_kernels.item_rank, (h, it, tgt, ptr, idx.float()), {}),
    # item_topk
    ("k", s4rec_kernels.item_topk, (h, it, 0), {}),
    ("k", s4rec_kernels.item_topk, (h, it, 8), {}),
    ("k", s4rec_kernels.item_topk, (h, it, 2.0), {}),
    ("items", s4rec_kernels.item_topk, (h, torch.randn(7, 5), 2), {}),
    ("items", s4rec_kernels.item_topk, (h, it.to(**meta), 2), {}),
    ("exclude_indices", s4rec_kernels.item_topk, (h, it, 2, ptr, None), {}),
    ("exclude_indptr", s4rec_kernels.item_topk, (h, it, 2, None, idx), {}),
    ("exclude_indptr", s4rec_kernels.item_topk, (h, it, 2, torch.tensor([0, 2, 1, 3]), idx), {}),
    ("exclude_indices", s4rec_kernels.item_topk, (h, it, 2, ptr, torch.tensor([2, 5, -1])), {}),
]


@pytest.mark.parametrize(
    "arg,fn,args,kwargs", BAD_CALLS, ids=[f"{i}-{c[1].__name__}-{c[0]}" for i, c in enumerate(BAD_CALLS)]
)
def test_bad_input_names_the_argument(arg, fn, args, kwargs):
    with pytest.raises(ValueError, match=rf"^{fn.__name__}: .*\b{arg}\b"):
        fn(*args, **kwargs)


def test_shape_message_says_expected_and_got():
    with pytest.raises(ValueError) as info:
        s4rec_kernels.info_nce_proto(torch.randn(5, 8), torch.randn(5, 7), torch.randn(3, 8),
                                     torch.zeros(5, dtype=LONG), 0.1)
    assert str(info.value) == (
        "info_nce_proto: z2 has shape (5, 7) but z1 has shape (5, 8); expected the same shape"
    )


def test_out_of_range_message_gives_position_and_value():
    with pytest.raises(ValueError, match=r"targets\[1\] = 7 is out of range; expected values in \[0, 7\)"):
        s4rec_kernels.item_rank(h, it, torch.tensor([0, 7, 2]), ptr, idx)


def test_default_backend_changes_what_auto_means(monkeypatch):
    seen = []

    def fake(*args):
        seen.append(args)
        return torch.zeros(4, 3)

    monkeypatch.setitem(_dispatch._TRITON_IMPLS, "sinkhorn", fake)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    scores = torch.randn(4, 3)
    with _dispatch.default_backend("triton"):
        s4rec_kernels.sinkhorn(scores)
    assert len(seen) == 1
    with _dispatch.default_backend("reference"):
        s4rec_kernels.sinkhorn(scores, backend="triton")  # an explicit backend still wins
    assert len(seen) == 2
    s4rec_kernels.sinkhorn(scores)  # back to "auto": CPU tensors take the reference
    assert len(seen) == 2
    with pytest.raises(ValueError, match="backend"):
        with _dispatch.default_backend("fast"):
            pass
