"""Tolerances by dtype, in one place, and the backends each op's tests run on.

``TOL[dtype]`` bounds the error of an op whose inputs have ``dtype`` against a float64 ground truth
computed from the same (rounded) input values, so it reflects the compute precision (float32 for
every non-float64 dtype). ``ROUNDING_MARGIN[dtype]`` is the slack allowed on top of eager PyTorch's
own error when the ground truth uses the unrounded float64 inputs (``ours <= torch + margin``).
"""

from __future__ import annotations

import os
from typing import List

import torch

from s4rec_kernels import _dispatch

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-6),
}

ROUNDING_MARGIN = {
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, **kw) -> None:
    """Compare with the tolerance of input dtype ``dtype`` (upcasting ``expected`` if needed)."""
    tol = dict(TOL[dtype])
    tol.update(kw)
    torch.testing.assert_close(actual, expected.to(actual.dtype), equal_nan=True, **tol)


def backends(op: str) -> List[str]:
    """Backends to test ``op`` with on CPU tensors: always the reference, plus the Triton
    implementation when one is registered and the Triton interpreter is on."""
    import s4rec_kernels  # noqa: F401  (importing the ops registers their Triton implementations)

    found = ["reference"]
    if _dispatch.triton_impl(op) is not None and os.environ.get("TRITON_INTERPRET") == "1":
        found.append("triton")
    return found
