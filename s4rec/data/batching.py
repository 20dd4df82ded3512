"""Batching helpers: left padding to a fixed length and grouping rows by length."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pad_left(seqs: Sequence[np.ndarray], length: int) -> np.ndarray:
    """(len(seqs), length) int64: the last ``length`` items of each sequence, left-padded with 0."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    out = np.zeros((len(seqs), length), dtype=np.int64)
    if len(seqs) == 0 or length == 0:
        return out
    keep = np.array([min(len(s), length) for s in seqs], dtype=np.int64)  # (B,)
    flat = np.concatenate([np.asarray(s)[len(s) - k :] for s, k in zip(seqs, keep.tolist())])
    rows = np.repeat(np.arange(len(seqs)), keep)
    first = np.zeros(len(seqs), dtype=np.int64)
    np.cumsum(keep[:-1], out=first[1:])
    cols = np.arange(len(flat)) - np.repeat(first, keep) + np.repeat(length - keep, keep)
    out[rows, cols] = flat
    return out


def bucketize(lengths, max_pad: float = 1 / 3) -> list[np.ndarray]:
    """Group rows so that padding each group to its own longest member wastes at most ``max_pad``.

    Rows are sorted by length, longest first (stable: equal lengths keep their order). A group
    starts at the longest row not yet placed and takes the following rows while its padding share
    ``1 - sum(len) / (count * max_len)`` stays <= ``max_pad``. Since each added row is no longer
    than the rows before it, the share only grows, so this greedy pass is a prefix rule and
    gives the fewest groups of any split into runs of the sorted order. Rows of length 0 have no
    padding share (0 / 0): they form one last group of their own; a group with a positive longest
    member never takes them unless the bound allows it.

    Returns a list of int64 row-index arrays, longest group first, covering every row once.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if not 0.0 <= max_pad <= 1.0:
        raise ValueError(f"max_pad must be in [0, 1], got {max_pad}")
    if len(lengths) and lengths.min() < 0:
        raise ValueError(f"lengths must be >= 0, got {lengths.min()}")
    order = np.argsort(-lengths.astype(np.int64), kind="stable")
    sl = lengths[order].astype(np.float64)  # descending
    csum = np.concatenate([[0.0], np.cumsum(sl)])
    groups = []
    i, n = 0, len(sl)
    while i < n:
        top = sl[i]
        if top == 0:
            groups.append(order[i:].astype(np.int64))
            break
        count = np.arange(1, n - i + 1, dtype=np.float64)
        ok = csum[i + 1 :] - csum[i] >= (1.0 - max_pad) * count * top - 1e-9 * count * top
        j = n if ok.all() else i + int(np.argmin(ok))  # first row that breaks the bound
        groups.append(order[i:j].astype(np.int64))
        i = j
    return groups
