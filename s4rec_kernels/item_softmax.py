"""Full-item softmax cross-entropy (SPEC eq. 1) and the full-ranking evaluation ops.

Layout, top to bottom: Triton kernels, host launchers and the autograd.Function (registered with
``_dispatch.register_triton(op, fn)`` for op in "item_softmax_ce", "item_rank", "item_topk"),
then the shared checks and the public functions.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from s4rec_kernels import _dispatch, reference

# ----------------------------------------------------------------------------------------------
# Triton kernels, launchers and autograd.Function
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

REDUCTIONS = ("mean", "sum", "none")


def _check_hidden_items(op: str, hidden: torch.Tensor, items: torch.Tensor, rows: str) -> None:
    _dispatch.check_matrix(op, "hidden", hidden, f"({rows}, d)")
    _dispatch.check_matrix(op, "items", items, "(V, d)")
    _dispatch.check_dim_size(op, "items", items, 1, hidden.shape[1], "d of hidden")
    if items.shape[0] == 0:
        raise ValueError(f"{op}: items has shape {tuple(items.shape)}; expected V >= 1 rows")
    _dispatch.check_same_dtype(op, ("hidden", hidden), ("items", items))


def item_softmax_ce(
    hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, *,
    ignore_index: int = -100, reduction: str = "mean", backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of the softmax over all V items, without a bias.

    Args:
        hidden: (N, d) hidden states, N >= 0, d >= 1.
        items: (V, d) item embeddings, V >= 1; same float dtype and device as ``hidden``.
        targets: (N,) int64 or int32, each in [0, V) or equal to ``ignore_index``.
        ignore_index: target value of rows that take no part in the loss.
        reduction: "mean" (over non-ignored rows), "sum" or "none".
        backend: "auto", "reference" or "triton" (see ``_dispatch``).

    Returns:
        Row loss logsumexp_i(hidden[n] . items[i]) - hidden[n] . items[targets[n]], reduced
        exactly like F.cross_entropy: "mean" gives NaN when every row is ignored (or N = 0),
        "sum" gives 0, "none" gives (N,) with 0 at ignored rows. Differentiable in hidden and
        items. float64 inputs give float64; every other dtype is computed in and returned as
        float32.
    """
    op = "item_softmax_ce"
    _check_hidden_items(op, hidden, items, "N")
    targets = _dispatch.check_index(op, "targets", targets, hidden.shape[0])
    _dispatch.check_same_device(op, ("hidden", hidden), ("items", items), ("targets", targets))
    ignore_index = _dispatch.check_int(op, "ignore_index", ignore_index, -(2**63))
    reduction = _dispatch.check_choice(op, "reduction", reduction, REDUCTIONS)
    _dispatch.check_index_range(op, "targets", targets, items.shape[0], allowed_extra=ignore_index)
    if _dispatch.resolve_backend(op, backend, hidden, items, targets) == "triton":
        return _dispatch.triton_impl(op)(hidden, items, targets, ignore_index, reduction)
    return reference.item_softmax_ce(hidden, items, targets, ignore_index, reduction)


def item_rank(
    hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
    exclude_indptr: torch.Tensor, exclude_indices: torch.Tensor, *, backend: str = "auto",
) -> torch.Tensor:
    """0-based rank of each user's target among all non-excluded items (full ranking).

    Args:
        hidden: (U, d) user states, U >= 0, d >= 1.
        items: (V, d) item embeddings, V >= 1; same float dtype and device as ``hidden``.
        targets: (U,) int64 or int32 in [0, V).
        exclude_indptr: (U + 1,) int64/int32 CSR row pointer: non-decreasing, starts at 0, ends
            at len(exclude_indices).
        exclude_indices: (E,) int64/int32 item rows in [0, V); user u excludes
            exclude_indices[exclude_indptr[u]:exclude_indptr[u + 1]]. Duplicates are allowed; the
            target is never excluded, even when listed.
        backend: "auto", "reference" or "triton" (see ``_dispatch``).

    Returns:
        (U,) int64, no gradient: the number of items i != targets[u], not excluded for u, with
        hidden[u] . items[i] >= the target's score. Ties count against the target (pessimistic).
        NaN counts against the target as well: items with a NaN score are counted, and a user
        whose target score is NaN gets the worst rank, the count of all non-target non-excluded
        items. hit@k = rank < k. Scores are computed in float32 (float64 for float64 inputs).
        The reference scores users in chunks of at most 2**24 (user, item) scores (one user at a
        time when V is larger), so the (U, V) score matrix never exists at once.
    """
    op = "item_rank"
    _check_hidden_items(op, hidden, items, "U")
    n_users, n_items = hidden.shape[0], items.shape[0]
    targets = _dispatch.check_index(op, "targets", targets, n_users)
    exclude_indptr = _dispatch.check_index(op, "exclude_indptr", exclude_indptr, n_users + 1)
    exclude_indices = _dispatch.check_index(op, "exclude_indices", exclude_indices)
    _dispatch.check_same_device(
        op, ("hidden", hidden), ("items", items), ("targets", targets),
        ("exclude_indptr", exclude_indptr), ("exclude_indices", exclude_indices),
    )
    _dispatch.check_index_range(op, "targets", targets, n_items)
    exclude_indptr, exclude_indices = _dispatch.check_csr(
        op, exclude_indptr, exclude_indices, n_users, n_items
    )
    if _dispatch.resolve_backend(
        op, backend, hidden, items, targets, exclude_indptr, exclude_indices
    ) == "triton":
        return _dispatch.triton_impl(op)(hidden, items, targets, exclude_indptr, exclude_indices)
    return reference.item_rank(hidden, items, targets, exclude_indptr, exclude_indices)


def item_topk(
    hidden: torch.Tensor, items: torch.Tensor, k: int,
    exclude_indptr: Optional[torch.Tensor] = None, exclude_indices: Optional[torch.Tensor] = None,
    *, backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k best non-excluded items of each user.

    Args:
        hidden: (U, d) user states, U >= 0, d >= 1.
        items: (V, d) item embeddings, V >= 1; same float dtype and device as ``hidden``.
        k: int, 1 <= k <= V.
        exclude_indptr, exclude_indices: optional CSR exclusion lists as in ``item_rank``; give
            both or neither.
        backend: "auto", "reference" or "triton" (see ``_dispatch``).

    Returns:
        (scores (U, k), indices (U, k) int64), best first, no gradient. Scores are float32
        (float64 for float64 inputs). Excluded items are never returned. When fewer than k items
        remain for a user, the missing last slots hold score -inf and index -1. NaN scores rank
        above every number (as in torch.topk); order among equal scores is unspecified; items
        whose score is -inf (only possible with infinite inputs) may be reported as missing
        slots. Chunked over users like ``item_rank``.
    """
    op = "item_topk"
    _check_hidden_items(op, hidden, items, "U")
    n_users, n_items = hidden.shape[0], items.shape[0]
    k = _dispatch.check_int(op, "k", k, 1, n_items)
    if (exclude_indptr is None) != (exclude_indices is None):
        given, missing = (
            ("exclude_indptr", "exclude_indices") if exclude_indices is None
            else ("exclude_indices", "exclude_indptr")
        )
        raise ValueError(f"{op}: {given} was given but {missing} is None; expected both or neither")
    if exclude_indptr is not None:
        exclude_indptr = _dispatch.check_index(op, "exclude_indptr", exclude_indptr, n_users + 1)
        exclude_indices = _dispatch.check_index(op, "exclude_indices", exclude_indices)
    _dispatch.check_same_device(
        op, ("hidden", hidden), ("items", items),
        ("exclude_indptr", exclude_indptr), ("exclude_indices", exclude_indices),
    )
    if exclude_indptr is not None:
        exclude_indptr, exclude_indices = _dispatch.check_csr(
            op, exclude_indptr, exclude_indices, n_users, n_items
        )
    if _dispatch.resolve_backend(
        op, backend, hidden, items, exclude_indptr, exclude_indices
    ) == "triton":
        return _dispatch.triton_impl(op)(hidden, items, k, exclude_indptr, exclude_indices)
    return reference.item_topk(hidden, items, k, exclude_indptr, exclude_indices)
