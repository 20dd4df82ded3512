"""Sinkhorn-Knopp equipartition target (SwAV), SPEC section 3.

Layout, top to bottom: Triton kernels and their host launchers (registered with
``_dispatch.register_triton("sinkhorn", fn)``), then the public function.
"""

from __future__ import annotations

import torch

from s4rec_kernels import _dispatch, reference

OP = "sinkhorn"

# ----------------------------------------------------------------------------------------------
# Triton kernels and launchers
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def sinkhorn(
    scores: torch.Tensor, eps: float = 0.05, n_iters: int = 3, *, backend: str = "auto"
) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp soft assignment of B users to K prototypes.

    Args:
        scores: (B, K) float16/bfloat16/float32/float64, B >= 1 and K >= 1.
        eps: entropic temperature, > 0. Q starts proportional to exp(scores / eps).
        n_iters: number of {columns to 1/K, rows to 1/B} rounds, >= 0.
        backend: "auto", "reference" or "triton" (see ``_dispatch``).

    Returns:
        Q (B, K), not requiring grad: normalised to total 1, then ``n_iters`` times each column
        scaled to sum 1/K and each row to sum 1/B, finally multiplied by B. After at least one
        iteration every row sums to 1 and every column to about B/K; with ``n_iters=0`` Q is B
        times a softmax over all entries. Stable for any eps and score magnitude (log space).
        float64 scores give float64; every other dtype gives float32. Autocast has no effect.
    """
    _dispatch.check_matrix(OP, "scores", scores, "(B, K)")
    if scores.shape[0] == 0:
        raise ValueError(f"{OP}: scores has shape {tuple(scores.shape)}; expected B >= 1 rows")
    eps = _dispatch.check_positive(OP, "eps", eps)
    n_iters = _dispatch.check_int(OP, "n_iters", n_iters, 0)
    if _dispatch.resolve_backend(OP, backend, scores) == "triton":
        return _dispatch.triton_impl(OP)(scores, eps, n_iters)
    return reference.sinkhorn(scores, eps, n_iters)
