"""Negative items for the sampled SR losses: one per position (SASRec's BCE) or shared per batch.

`--sr-loss bce` draws, for every next-item target, one item uniformly from the items the user has
not interacted with in training (SASRec, Kang and McAuley 2018). `--sr-loss sampled` draws
`--n-negatives` items per step, shared by every position of the batch, uniformly or by training
popularity; `sampler_log_q` gives log Q for the log-Q correction (Bengio and Senecal 2008; Yi et
al. 2019).
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np

SAMPLERS = ("uniform", "popularity")


def user_negatives(histories: Sequence[np.ndarray], targets: Sequence[np.ndarray], n_items: int,
                   rng: np.random.Generator) -> List[np.ndarray]:
    """For each user, one item id per entry of `targets[u]`, uniform over 1..n_items minus the
    items in `histories[u]` (ids 0 in `targets` are padding and get 0). Redraws until every draw
    is outside the history; a user who has seen every item gets 0 (no negative)."""
    out = []
    for seen, tgt in zip(histories, targets):
        seen = np.unique(seen)
        neg = np.zeros(len(tgt), dtype=np.int64)
        todo = np.flatnonzero(tgt > 0)
        if len(seen) >= n_items:
            out.append(neg)
            continue
        while len(todo):
            draw = rng.integers(1, n_items + 1, size=len(todo))
            ok = ~np.isin(draw, seen, assume_unique=False)
            neg[todo[ok]] = draw[ok]
            todo = todo[~ok]
        out.append(neg)
    return out


def sampler_log_q(n_items: int, sampler: str = "uniform", pool: np.ndarray = None) -> np.ndarray:
    """(n_items + 1,) log Q: the log probability that one draw gives each item id (row 0 unused).
    "uniform": Q = 1 / n_items; "popularity": a draw from the training interactions `pool`,
    Q = count / len(pool) (an item never seen in training counts once, so its log Q is finite)."""
    if sampler == "uniform":
        return np.full(n_items + 1, -np.log(n_items))
    if sampler == "popularity":
        if pool is None or len(pool) == 0:
            raise ValueError("popularity sampling needs the training interactions (pool)")
        counts = np.maximum(np.bincount(pool, minlength=n_items + 1), 1)
        return np.log(counts / len(pool))
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")


def shared_negatives(n: int, n_items: int, rng: np.random.Generator, sampler: str = "uniform",
                     pool: np.ndarray = None) -> np.ndarray:
    """`n` item ids drawn with replacement, uniformly or ("popularity") from the training
    interactions `pool`."""
    if sampler == "uniform":
        return rng.integers(1, n_items + 1, size=n).astype(np.int64)
    if sampler == "popularity":
        return pool[rng.integers(0, len(pool), size=n)].astype(np.int64)
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
