"""Backend selection and the input checks shared by every public op.

Backends:
  "reference"  the eager PyTorch definition in ``reference.py`` (any device).
  "triton"     the registered Triton implementation of the op. Needs CUDA tensors, or CPU tensors
               when the environment variable ``TRITON_INTERPRET=1`` is set (the Triton interpreter,
               which is how the kernels are tested without a GPU).
  "chunked"    the memory-bounded versions in ``chunked.py`` (item_softmax_ce, item_rank and
               item_topk only): the item table streamed in chunks, any device.
  "auto"       "triton" when the tensors are on CUDA, Triton is installed and a Triton
               implementation of the op is registered; otherwise "chunked" for the item ops whose
               (rows, items) scores would take more than ``LOGITS_BUDGET_MB`` (fp32, or fp64 for
               fp64 inputs), and "reference" for everything else.

Triton implementations are registered by op name with ``register_triton(op_name, fn)``. ``fn`` is
called with the validated arguments (index tensors already converted to int64) in the order and
with the meaning of the matching function in ``reference.py``, and must follow the same dtype rule.
Registering needs Triton, which is optional: ``import s4rec_kernels`` has to work on machines
without it, so the op modules define and register their kernels only when Triton imports.

Every check raises ``ValueError`` whose message starts with the op name, names the argument, and
says what was expected and what was got. Nothing here runs at import time.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import math
import numbers
import os
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

BACKENDS = ("auto", "reference", "triton", "chunked")
# The ops that have a chunked version (chunked.py).
CHUNKED_OPS = ("item_softmax_ce", "item_rank", "item_topk")
# Above this many MB of (rows, items) scores, backend "auto" streams the item table in chunks
# instead of running the reference; it also sizes the chunks. Change it with `logits_budget`.
LOGITS_BUDGET_MB = 256.0
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)

_TRITON_IMPLS: Dict[str, Callable] = {}


# ----------------------------------------------------------------------------------------------
# Registry of Triton implementations
# ----------------------------------------------------------------------------------------------


def register_triton(op_name: str, fn: Callable) -> Callable:
    """Register ``fn`` as the Triton implementation of ``op_name`` and return it.
    Registering again replaces the previous implementation."""
    if not isinstance(op_name, str) or not op_name:
        raise ValueError(f"register_triton: op_name must be a non-empty str; got {op_name!r}")
    if not callable(fn):
        raise ValueError(
            f"register_triton: fn for {op_name!r} must be callable; got {type(fn).__name__}"
        )
    _TRITON_IMPLS[op_name] = fn
    return fn


def unregister_triton(op_name: str) -> None:
    """Remove the Triton implementation of ``op_name`` if one is registered."""
    _TRITON_IMPLS.pop(op_name, None)


def triton_impl(op_name: str) -> Optional[Callable]:
    """The registered Triton implementation of ``op_name``, or None."""
    return _TRITON_IMPLS.get(op_name)


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    """True when Triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


_AUTO = ["auto"]  # what backend="auto" means; changed only through `default_backend`


@contextlib.contextmanager
def default_backend(backend: str) -> Iterator[None]:
    """Within the block, calls with backend="auto" use ``backend`` instead (e.g. the trainer's
    ``--kernels reference`` runs the whole model on the eager references)."""
    if backend not in BACKENDS:
        allowed = ", ".join(repr(b) for b in BACKENDS)
        raise ValueError(f"default_backend: backend must be one of {allowed}; got {backend!r}")
    previous = _AUTO[0]
    _AUTO[0] = backend
    try:
        yield
    finally:
        _AUTO[0] = previous


@contextlib.contextmanager
def logits_budget(mb: float) -> Iterator[None]:
    """Within the block, ``LOGITS_BUDGET_MB`` is ``mb`` (e.g. the trainer's --logits-budget-mb)."""
    global LOGITS_BUDGET_MB
    if isinstance(mb, bool) or not isinstance(mb, numbers.Real) or not mb > 0:
        raise ValueError(f"logits_budget: mb must be a number > 0; got {mb!r}")
    previous = LOGITS_BUDGET_MB
    LOGITS_BUDGET_MB = float(mb)
    try:
        yield
    finally:
        LOGITS_BUDGET_MB = previous


# tl.dot input precisions the kernels take for fp32 operands: true fp32, 3xTF32, one TF32 pass
FP32_DOTS = ("ieee", "tf32x3", "tf32")
_FP32_DOTS: list = [None]  # what `float32_dots` asked for; None: torch's matmul precision decides


@contextlib.contextmanager
def float32_dots(precision: Optional[str]) -> Iterator[None]:
    """Within the block, the kernels' products of fp32 operands take ``precision`` ("ieee",
    "tf32x3" or "tf32"; e.g. the trainer's ``--precision tf32``) instead of following
    ``torch.get_float32_matmul_precision()``; None follows torch again. Only the kernels read it
    (torch's own matmuls keep their settings), and it does not reach the Triton interpreter,
    which computes fp32 products exactly."""
    if precision is not None and precision not in FP32_DOTS:
        allowed = ", ".join(repr(p) for p in FP32_DOTS)
        raise ValueError(f"float32_dots: precision must be one of {allowed} or None; "
                         f"got {precision!r}")
    previous = _FP32_DOTS[0]
    _FP32_DOTS[0] = precision
    try:
        yield
    finally:
        _FP32_DOTS[0] = previous


def float32_dots_asked() -> Optional[str]:
    """The precision ``float32_dots`` set for fp32 products, or None."""
    return _FP32_DOTS[0]


def over_budget(n_scores: int, dtype: torch.dtype) -> bool:
    """True when ``n_scores`` scores in the compute dtype of ``dtype`` exceed the budget."""
    size = 8 if dtype == torch.float64 else 4
    return n_scores * size > LOGITS_BUDGET_MB * 2**20


def resolve_backend(op_name: str, backend: str, *tensors: Optional[torch.Tensor],
                    n_scores: Optional[int] = None) -> str:
    """Return "triton", "chunked" or "reference" for a call of ``op_name`` on ``tensors`` (None
    ignored); ``n_scores`` is the number of (row, item) scores the reference would hold.

    Raises ValueError for an unknown ``backend``, NotImplementedError when ``backend="triton"`` and
    no Triton implementation of the op is registered or ``backend="chunked"`` for an op without a
    chunked version, and ValueError when ``backend="triton"`` is asked for tensors that are not on
    CUDA while the Triton interpreter is off.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        allowed = ", ".join(repr(b) for b in BACKENDS)
        raise ValueError(f"{op_name}: backend must be one of {allowed}; got {backend!r}")
    asked = backend
    if backend == "auto":
        backend = _AUTO[0]
    if backend == "reference":
        return "reference"
    if backend == "chunked":
        if op_name not in CHUNKED_OPS:
            if asked == "auto":  # default_backend("chunked"): the other ops run the reference
                return "reference"
            raise NotImplementedError(
                f"{op_name}: no chunked version exists for this op; chunked serves "
                f"{', '.join(CHUNKED_OPS)}"
            )
        return "chunked"
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    registered = triton_impl(op_name) is not None
    if backend == "auto":
        if on_cuda and registered and triton_installed():
            return "triton"
        if (op_name in CHUNKED_OPS and n_scores is not None and present
                and over_budget(n_scores, present[0].dtype)):
            return "chunked"
        return "reference"
    # backend == "triton"
    if not registered:
        raise NotImplementedError(
            f"{op_name}: no Triton kernel exists yet for this op; "
            f"use backend='reference' or backend='auto'"
        )
    if not on_cuda and not interpreter_enabled():
        devices = sorted({str(t.device) for t in present})
        raise ValueError(
            f"{op_name}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the "
            f"kernels on CPU in the Triton interpreter; got tensors on {', '.join(devices)}"
        )
    return "triton"


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def _has_values(t: torch.Tensor) -> bool:
    """False for tensors whose values cannot be read (meta tensors)."""
    return t.device.type != "meta"


def check_tensor(op: str, name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")


def check_ndim(op: str, name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    check_tensor(op, name, t)
    if t.dim() != ndim:
        raise ValueError(
            f"{op}: {name} must have {ndim} dimension(s) {layout}; got shape {_shape(t)}"
        )


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{op}: {name} must be float16, bfloat16, float32 or float64; got {t.dtype}"
        )


def check_matrix(op: str, name: str, t: object, layout: str = "(rows, d)") -> None:
    """A 2-D floating-point tensor with at least one column."""
    check_ndim(op, name, t, 2, layout)
    check_float(op, name, t)
    if t.shape[1] == 0:
        raise ValueError(f"{op}: {name} has shape {_shape(t)}; expected at least one column")


def check_same_dtype(op: str, *named: Tuple[str, torch.Tensor]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise ValueError(
                f"{op}: {name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}; "
                f"expected the same dtype"
            )


def check_same_device(op: str, *named: Tuple[str, Optional[torch.Tensor]]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on device {t.device} but {first_name} is on device "
                f"{first.device}; expected the same device"
            )


def check_dim_size(op: str, name: str, t: torch.Tensor, dim: int, size: int, what: str) -> None:
    """``t.shape[dim] == size``; ``what`` says where ``size`` comes from."""
    if t.shape[dim] != size:
        raise ValueError(
            f"{op}: {name} has shape {_shape(t)}; expected size {size} in dimension {dim} "
            f"({what})"
        )


def check_index(op: str, name: str, t: object, length: Optional[int] = None) -> torch.Tensor:
    """A 1-D int64/int32 tensor (of ``length`` entries if given); returned as int64."""
    check_ndim(op, name, t, 1, "(n,)")
    if t.dtype not in INDEX_DTYPES:
        raise ValueError(f"{op}: {name} must be int64 or int32; got {t.dtype}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{op}: {name} has shape {_shape(t)}; expected ({length},)")
    return t.long()


def check_index_range(
    op: str, name: str, t: torch.Tensor, high: int, allowed_extra: Optional[int] = None
) -> None:
    """Every entry of ``t`` lies in [0, high) or equals ``allowed_extra``."""
    if t.numel() == 0 or not _has_values(t):
        return
    bad = (t < 0) | (t >= high)
    if allowed_extra is not None:
        bad &= t != allowed_extra
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        extra = f" or equal to {allowed_extra}" if allowed_extra is not None else ""
        raise ValueError(
            f"{op}: {name}[{pos}] = {int(t[pos])} is out of range; expected values in "
            f"[0, {high}){extra}"
        )


# Value checks recorded instead of run (running one waits for the device): (op, name, tensor,
# high, allowed_extra) of the latest calls, newest last
_DEFERRED: "collections.deque" = collections.deque(maxlen=16)


def defer_index_range(op: str, name: str, t: torch.Tensor, high: int,
                      allowed_extra: Optional[int] = None) -> None:
    """Record the check of ``check_index_range`` for ``deferred_errors`` instead of running it:
    a kernel given an index out of range makes its result NaN, and whoever sees the NaN (the
    trainer's non-finite check) asks which input was wrong."""
    if t.numel() and _has_values(t):
        _DEFERRED.append((op, name, t.detach(), high, allowed_extra))


def deferred_errors() -> list:
    """The messages of the recorded checks that fail, oldest first (waits for the device), and
    forgets the records."""
    errors = []
    while _DEFERRED:
        op, name, t, high, allowed_extra = _DEFERRED.popleft()
        try:
            check_index_range(op, name, t, high, allowed_extra)
        except ValueError as err:
            errors.append(str(err))
    return errors


def check_csr(
    op: str, indptr: object, indices: object, n_rows: int, n_items: int,
    indptr_name: str = "exclude_indptr", indices_name: str = "exclude_indices",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A CSR list of item rows per user: ``indptr`` (n_rows + 1,) non-decreasing from 0 to
    ``len(indices)``, ``indices`` in [0, n_items). Returned as int64."""
    indptr = check_index(op, indptr_name, indptr, n_rows + 1)
    indices = check_index(op, indices_name, indices)
    if not _has_values(indptr) or not _has_values(indices):
        return indptr, indices
    first, last = int(indptr[0]), int(indptr[-1])
    if first != 0:
        raise ValueError(f"{op}: {indptr_name}[0] = {first}; expected 0")
    if last != indices.shape[0]:
        raise ValueError(
            f"{op}: {indptr_name}[-1] = {last}; expected len({indices_name}) = {indices.shape[0]}"
        )
    steps = indptr[1:] - indptr[:-1]
    if steps.numel() and bool((steps < 0).any()):
        pos = int((steps < 0).nonzero()[0, 0])
        raise ValueError(
            f"{op}: {indptr_name} must be non-decreasing; got {indptr_name}[{pos}] = "
            f"{int(indptr[pos])} > {indptr_name}[{pos + 1}] = {int(indptr[pos + 1])}"
        )
    check_index_range(op, indices_name, indices, n_items)
    return indptr, indices


def check_positive(op: str, name: str, value: object) -> float:
    """A finite real number > 0 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{op}: {name} must be a positive number; got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: {name} must be a finite number > 0; got {value!r}")
    return value


def check_int(op: str, name: str, value: object, low: int, high: Optional[int] = None) -> int:
    """An integer (bools refused) with ``low <= value`` (``<= high`` if given)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{op}: {name} must be an int; got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{op}: {name} = {value} is out of range; expected {span}")
    return value


def check_choice(op: str, name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{op}: {name} must be one of {allowed}; got {value!r}")
    return value
