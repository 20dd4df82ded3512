"""The leave-one-out split (valid and test inputs and targets), head users and input histories."""

from __future__ import annotations

import math

import numpy as np

from .sequences import SequenceData

_SPLITS = ("valid", "test")


def _users(data: SequenceData, users) -> np.ndarray:
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    if len(users) and (users.min() < 0 or users.max() >= len(data)):
        raise IndexError(
            f"user rows must be in 0..{len(data) - 1}, got {users.min()}..{users.max()}"
        )
    return users


def _held_out(split: str) -> int:
    """How many items at the end of the sequence the split's input leaves out."""
    if split == "valid":
        return 2
    if split == "test":
        return 1
    raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")


def split_input(data: SequenceData, users, split: str) -> list[np.ndarray]:
    """Input prefixes (views): S[:-2] for ``"valid"``, S[:-1] for ``"test"``."""
    cut = _held_out(split)
    users = _users(data, users)
    starts, ends = data.offsets[users].tolist(), (data.offsets[users + 1] - cut).tolist()
    return [data.items[s:e] for s, e in zip(starts, ends)]


def split_target(data: SequenceData, users, split: str) -> np.ndarray:
    """(len(users),) int64 held-out items: S[-2] for ``"valid"``, S[-1] for ``"test"``."""
    cut = _held_out(split)
    users = _users(data, users)
    return data.items[data.offsets[users + 1] - cut].astype(np.int64)


def train_sequences(data: SequenceData, users) -> list[np.ndarray]:
    """Training sequences S[:-2] (views); the trainer predicts S[1:-2] from S[:-3]."""
    return split_input(data, users, "valid")


def head_users(data: SequenceData, frac: float = 0.2) -> np.ndarray:
    """(n_users,) bool: True for the ceil(frac * n_users) users with the longest training sequences.

    Users are ranked by training length (n - 2) with a stable sort, so among users of equal
    length the ones earlier in the data (lower row index) are head first.
    """
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"frac must be in [0, 1], got {frac}")
    n = len(data)
    k = min(n, math.ceil(round(frac * n, 9)))  # round: 0.2 * 3000 must give 600, not 601
    order = np.argsort(-(data.lengths - 2), kind="stable")
    head = np.zeros(n, dtype=bool)
    head[order[:k]] = True
    return head


def history_csr(data: SequenceData, users, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Each user's full input history for ``split`` as CSR over item rows (item id - 1).

    Returns ``indptr`` (len(users) + 1,) int64 and ``indices`` (nnz,) int64; user ``i``'s history
    rows are ``indices[indptr[i]:indptr[i+1]]`` in time order (repeats kept). Not cut to max_len.
    """
    cut = _held_out(split)
    users = _users(data, users)
    starts = data.offsets[users]
    lens = data.offsets[users + 1] - cut - starts  # (B,)
    indptr = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    gather = np.arange(indptr[-1], dtype=np.int64) + np.repeat(starts - indptr[:-1], lens)
    indices = data.items[gather].astype(np.int64) - 1
    return indptr, indices
