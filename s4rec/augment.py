"""Sequence augmentations for the contrastive views (SPEC section 3, paper Appendix A).

Each operator takes one 1-D integer sequence and a ``numpy.random.Generator`` and returns a new
array of the same dtype; the input is never modified. An empty sequence comes back empty.
Counts follow ICLRec's code (``int(ratio * n)``, Python's truncation), with the lower bounds
noted on each operator so that short sequences still change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

OPERATORS = ("crop", "mask", "reorder", "insert", "substitute")
DEFAULT_OPERATORS = ("crop", "mask", "reorder", "insert")


def crop(seq: np.ndarray, rng: np.random.Generator, ratio: float = 0.2) -> np.ndarray:
    """Keep a random contiguous span of ``max(1, int(ratio * n))`` items (start uniform)."""
    seq = np.asarray(seq)
    n = len(seq)
    if n == 0:
        return seq.copy()
    k = min(n, max(1, int(ratio * n)))
    start = int(rng.integers(0, n - k + 1))
    return seq[start : start + k].copy()


def mask(
    seq: np.ndarray, rng: np.random.Generator, ratio: float = 0.7, *, mask_id: int
) -> np.ndarray:
    """Replace ``int(ratio * n)`` distinct positions, drawn uniformly, with ``mask_id``.

    ``mask_id`` is keyword-only and has no default: it is the id of the model's mask token
    (usually ``n_items + 1``, a row past the real items).
    """
    seq = np.asarray(seq)
    n = len(seq)
    out = seq.copy()
    k = min(n, int(ratio * n))
    if k > 0:
        out[rng.choice(n, size=k, replace=False)] = mask_id
    return out


def reorder(seq: np.ndarray, rng: np.random.Generator, ratio: float = 0.2) -> np.ndarray:
    """Shuffle a random contiguous span of ``max(2, int(ratio * n))`` items (n < 2: unchanged).

    The span's order is a uniformly drawn permutation other than the identity (rejection
    sampling), so the positions always move; the values may still repeat if the span holds
    equal items. At least 2 items so that short sequences (Beauty's mean is 8.9, where
    ``int(0.2 * n)`` would be 1) are not returned unchanged.
    """
    seq = np.asarray(seq)
    n = len(seq)
    out = seq.copy()
    if n < 2:
        return out
    k = min(n, max(2, int(ratio * n)))
    start = int(rng.integers(0, n - k + 1))
    ident = np.arange(k)
    perm = rng.permutation(k)
    while np.array_equal(perm, ident):
        perm = rng.permutation(k)
    out[start : start + k] = seq[start : start + k][perm]
    return out


def insert_count(n: int, ratio: float) -> int:
    """Items :func:`insert` adds to a sequence of length ``n``: ``max(1, int(ratio * n))`` for
    ``n >= 1`` and ``ratio > 0``, else 0."""
    if n == 0 or ratio <= 0:
        return 0
    return max(1, int(ratio * n))


def insert(
    seq: np.ndarray, rng: np.random.Generator, ratio: float = 0.3, *, pool: np.ndarray
) -> np.ndarray:
    """Insert :func:`insert_count` items drawn uniformly (with replacement) from ``pool``.

    ``pool`` is a 1-D array of all training interactions, so a uniform draw from it is a draw by
    item popularity. The output has length ``n + k``; the ``k`` new items take ``k`` distinct
    slots chosen uniformly among the ``n + k``, and the original items fill the other slots in
    their order, so the input is a subsequence of the output.
    """
    seq = np.asarray(seq)
    n = len(seq)
    k = insert_count(n, ratio)
    if k == 0:
        return seq.copy()
    pool = np.asarray(pool)
    if pool.ndim != 1 or len(pool) == 0:
        raise ValueError(f"pool must be a non-empty 1-D array, got shape {pool.shape}")
    out = np.empty(n + k, dtype=seq.dtype)
    new = np.zeros(n + k, dtype=bool)
    new[rng.choice(n + k, size=k, replace=False)] = True
    out[new] = pool[rng.integers(0, len(pool), size=k)]
    out[~new] = seq
    return out


def neighbours(seqs: Sequence[np.ndarray], n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Each item's neighbours in training order, as CSR over item ids: the items right before or
    after it in some sequence (with repeats, so a frequent neighbour is drawn more often)."""
    left = np.concatenate([s[:-1] for s in seqs if len(s) > 1] or [np.zeros(0, np.int64)])
    right = np.concatenate([s[1:] for s in seqs if len(s) > 1] or [np.zeros(0, np.int64)])
    src, dst = np.concatenate([left, right]), np.concatenate([right, left])
    order = np.argsort(src, kind="stable")
    indptr = np.zeros(n_items + 2, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n_items + 1), out=indptr[1:])
    return indptr, dst[order].astype(np.int64)


def substitute(seq: np.ndarray, rng: np.random.Generator, ratio: float = 0.3, *,
               graph: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Replace ``max(1, int(ratio * n))`` distinct positions by a neighbour of their item drawn
    from ``graph`` (:func:`neighbours`): an item that was next to it in training order, the
    correlated substitute of CoSeRec (Liu et al. 2021). An item without neighbours stays."""
    seq = np.asarray(seq)
    n = len(seq)
    out = seq.copy()
    if n == 0 or ratio <= 0:
        return out
    indptr, indices = graph
    pos = rng.choice(n, size=min(n, max(1, int(ratio * n))), replace=False)
    items = seq[pos]
    lo, count = indptr[items], indptr[items + 1] - indptr[items]
    has = count > 0
    pick = lo[has] + (rng.random(int(has.sum())) * count[has]).astype(np.int64)
    out[pos[has]] = indices[pick]
    return out


@dataclass
class Augmenter:
    """Makes one augmented view per sequence, each with an operator drawn uniformly at random."""

    mask_id: int  # id written by mask (the model's mask token, usually n_items + 1)
    pool: Optional[np.ndarray] = None  # all training interactions, drawn from by insert
    crop_ratio: float = 0.2  # share of the sequence crop keeps
    mask_ratio: float = 0.7  # share of the positions mask replaces (gamma)
    reorder_ratio: float = 0.2  # share of the sequence reorder shuffles
    insert_ratio: float = 0.3  # items insert adds, as a share of the length
    operators: Sequence[str] = DEFAULT_OPERATORS  # the operators to draw from
    substitute_ratio: float = 0.3  # share of the positions substitute replaces
    graph: Optional[tuple] = None  # neighbours(training sequences), needed by substitute
    short_len: int = 0  # > 0: sequences up to this length draw from short_ops, longer from operators
    short_ops: Sequence[str] = ("insert", "substitute")  # operators for short sequences

    def __post_init__(self) -> None:
        self.operators, self.short_ops = tuple(self.operators), tuple(self.short_ops)
        used = self.operators + (self.short_ops if self.short_len > 0 else ())
        for name, ops in (("operators", self.operators), ("short_ops", self.short_ops)):
            if not ops:
                raise ValueError(f"{name} must name at least one of " + ", ".join(OPERATORS))
            unknown = [op for op in ops if op not in OPERATORS]
            if unknown:
                raise ValueError(f"unknown operator(s) {unknown}; expected some of {list(OPERATORS)}")
        for name in ("crop_ratio", "mask_ratio", "reorder_ratio", "insert_ratio", "substitute_ratio"):
            r = getattr(self, name)
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {r}")
        if "insert" in used:
            if self.pool is None or len(self.pool) == 0:
                raise ValueError("insert needs a non-empty pool of training interactions")
            self.pool = np.asarray(self.pool)
        if "substitute" in used and self.graph is None:
            raise ValueError("substitute needs the item graph (augment.neighbours)")

    def apply(self, op: str, seq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One named operator on one sequence."""
        if op == "crop":
            return crop(seq, rng, self.crop_ratio)
        if op == "mask":
            return mask(seq, rng, self.mask_ratio, mask_id=self.mask_id)
        if op == "reorder":
            return reorder(seq, rng, self.reorder_ratio)
        if op == "insert":
            return insert(seq, rng, self.insert_ratio, pool=self.pool)
        if op == "substitute":
            return substitute(seq, rng, self.substitute_ratio, graph=self.graph)
        raise ValueError(f"unknown operator {op!r}; expected one of {list(OPERATORS)}")

    def choose(self, n: int, rng: np.random.Generator) -> list[str]:
        """Draw ``n`` operator names uniformly from ``operators``."""
        return [self.operators[i] for i in rng.integers(0, len(self.operators), size=n).tolist()]

    def views(self, seqs: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        """One augmented copy of every sequence, each with its own uniformly drawn operator (from
        short_ops for a sequence of at most short_len items when short_len > 0)."""
        ops = self.choose(len(seqs), rng)
        if self.short_len > 0:
            short = rng.integers(0, len(self.short_ops), size=len(seqs)).tolist()
            ops = [self.short_ops[j] if len(s) <= self.short_len else op
                   for op, j, s in zip(ops, short, seqs)]
        return [self.apply(op, s, rng) for op, s in zip(ops, seqs)]
