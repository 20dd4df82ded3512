"""InfoNCE over two views with prototype negatives (SPEC eq. 10).

Layout, top to bottom: Triton forward/backward kernels, host launchers and the autograd.Function
(registered with ``_dispatch.register_triton("info_nce_proto", fn)``), then the public function.
"""

from __future__ import annotations

import torch

from s4rec_kernels import _dispatch, reference

OP = "info_nce_proto"

# ----------------------------------------------------------------------------------------------
# Triton kernels, launchers and autograd.Function
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def info_nce_proto(
    z1: torch.Tensor, z2: torch.Tensor, protos: torch.Tensor, assign: torch.Tensor,
    tau: float, *, backend: str = "auto",
) -> torch.Tensor:
    """Symmetric InfoNCE loss of two views whose negatives include the other prototypes.

    Args:
        z1, z2: (B, d) the two views of each sequence, B >= 1, d >= 1.
        protos: (K, d) prototypes, K >= 1.
        assign: (B,) int64 or int32 in [0, K), the prototype each user is assigned to.
        tau: temperature, > 0.
        backend: "auto", "reference" or "triton" (see ``_dispatch``).
        z1, z2 and protos share one float dtype (float16/bfloat16/float32/float64) and device.

    Returns:
        Scalar loss. With Z = cat(z1, z2) (2B, d), anchor Z[i] has positive Z[(i + B) mod 2B];
        its negatives are the other 2B - 2 rows of Z (itself excluded) and every prototype except
        protos[assign[i mod B]]; logits are dot products / tau, vectors used as given (no
        normalisation). loss = mean over the 2B anchors of logsumexp(all its logits) - positive
        logit. K = 1 means no prototype negatives. Differentiable in z1, z2 and protos.
        float64 inputs give float64; every other dtype is computed in and returned as float32.
    """
    _dispatch.check_matrix(OP, "z1", z1, "(B, d)")
    _dispatch.check_matrix(OP, "z2", z2, "(B, d)")
    _dispatch.check_matrix(OP, "protos", protos, "(K, d)")
    if tuple(z2.shape) != tuple(z1.shape):
        raise ValueError(
            f"{OP}: z2 has shape {tuple(z2.shape)} but z1 has shape {tuple(z1.shape)}; "
            f"expected the same shape"
        )
    if z1.shape[0] == 0:
        raise ValueError(f"{OP}: z1 has shape {tuple(z1.shape)}; expected B >= 1 rows")
    _dispatch.check_dim_size(OP, "protos", protos, 1, z1.shape[1], "d of z1")
    if protos.shape[0] == 0:
        raise ValueError(f"{OP}: protos has shape {tuple(protos.shape)}; expected K >= 1 rows")
    _dispatch.check_same_dtype(OP, ("z1", z1), ("z2", z2), ("protos", protos))
    assign = _dispatch.check_index(OP, "assign", assign, z1.shape[0])
    _dispatch.check_same_device(OP, ("z1", z1), ("z2", z2), ("protos", protos), ("assign", assign))
    _dispatch.check_index_range(OP, "assign", assign, protos.shape[0])
    tau = _dispatch.check_positive(OP, "tau", tau)
    if _dispatch.resolve_backend(OP, backend, z1, z2, protos, assign) == "triton":
        return _dispatch.triton_impl(OP)(z1, z2, protos, assign, tau)
    return reference.info_nce_proto(z1, z2, protos, assign, tau)
