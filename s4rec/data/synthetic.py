"""A synthetic data set with planted intents, built from a seed."""

from __future__ import annotations

import numpy as np

from .sequences import SequenceData


def synthetic(
    n_users: int = 3000, n_items: int = 800, n_intents: int = 16, seed: int = 0
) -> SequenceData:
    """A small data set with structure a sequential recommender can find, built from ``seed``.

    * Items are shuffled into ``n_intents`` groups of (almost) equal size; each group has a fixed
      cyclic order. Each user has one intent (group), drawn with Zipf-like weights ~ 1/(g+1)^0.8.
    * A user starts at a Zipf-distributed position of the group's cycle (weight ~ 1/(r+1), so the
      items near the head of every cycle are visited far more often) and then steps:
      70%: the next item of the cycle; 10%: skip one; 10%: jump to an item of the group drawn by
      within-group popularity; 10%: a "noise" item from any group drawn by global popularity,
      which does not move the user's position in the cycle. Items already in the sequence are
      skipped over (walking on along the cycle), so a sequence repeats an item only when it is
      longer than ``n_items``.
    * Lengths are long-tailed: 5 + floor(lognormal(1.4, 1.0)), capped at 60 (mean about 11).
      The 20% head users are then clearly longer than the tail users.

    The most frequent successor of an item in the training data predicts the held-out items
    for about 60% of the users (chance is 1/n_items).

    Cost: O(n_items) memory and time to set up, then O(log n_items) per drawn item, so a
    million-item catalogue takes about as long as the default one per user. (Draws are by
    inverse CDF, the way ``Generator.choice`` draws with weights, so the same seed gives the
    same data set as a plain ``choice`` would.)
    """
    if n_intents < 1 or n_items < 2 * n_intents:
        raise ValueError(
            f"need n_items >= 2 * n_intents >= 2, got n_items={n_items}, n_intents={n_intents}"
        )
    if n_users < 1:
        raise ValueError(f"n_users must be >= 1, got {n_users}")
    rng = np.random.default_rng(seed)
    groups = np.array_split(rng.permutation(n_items) + 1, n_intents)  # cycle order per group
    intent_p = _zipf(n_intents, 0.8)
    global_p = np.zeros(n_items + 1)
    for g, cycle in enumerate(groups):
        global_p[cycle] = intent_p[g] * _zipf(len(cycle), 1.0)
    global_p /= global_p.sum()
    global_cdf = _cdf(global_p)
    within_cdfs: dict = {}  # cycle length -> CDF of the Zipf position weights

    lengths = np.minimum(5 + np.floor(rng.lognormal(1.4, 1.0, n_users)).astype(np.int64), 60)
    intents = rng.choice(n_intents, size=n_users, p=intent_p)
    items = np.empty(int(lengths.sum()), dtype=np.int32)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    pos = 0
    for u in range(n_users):
        cycle = groups[intents[u]]
        m = len(cycle)
        if m not in within_cdfs:
            within_cdfs[m] = _cdf(_zipf(m, 1.0))
        within = within_cdfs[m]
        seen: set[int] = set()
        r = _draw(rng, within)
        moves = rng.random(lengths[u])
        for t in range(lengths[u]):
            if t == 0:
                step = 0
            elif moves[t] < 0.70:
                step = 1
            elif moves[t] < 0.80:
                step = 2
            elif moves[t] < 0.90:
                r = _draw(rng, within)
                step = 0
            else:
                step = -1
            if step >= 0:
                r = (r + step) % m
                for _ in range(m):  # walk on past items already in the sequence
                    if int(cycle[r]) not in seen:
                        break
                    r = (r + 1) % m
                else:
                    step = -1  # the whole group is used up: fall back to a noise item
            if step >= 0:
                item = int(cycle[r])
            else:
                item = _noise_item(rng, global_cdf, seen)
            seen.add(item)
            items[pos] = item
            pos += 1
    return SequenceData(
        items=items,
        offsets=offsets,
        user_ids=np.arange(1, n_users + 1, dtype=np.int64),
        n_items=n_items,
        name="synthetic",
    )


def _cdf(p: np.ndarray) -> np.ndarray:
    """The cumulative weights ``Generator.choice`` draws from: cumsum(p) scaled to end at 1."""
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    return cdf


def _draw(rng: np.random.Generator, cdf: np.ndarray) -> int:
    """One index drawn with the weights of ``cdf``: what ``rng.choice(len(cdf), p=p)`` returns,
    from the same single uniform draw, in O(log n) instead of O(n)."""
    return int(cdf.searchsorted(rng.random(), side="right"))


def _noise_item(rng: np.random.Generator, cdf: np.ndarray, seen: set) -> int:
    """An item by popularity (``cdf`` over item ids) not in ``seen``; repeats only once every
    item is seen."""
    for _ in range(64):
        item = _draw(rng, cdf)
        if item not in seen:
            return item
    weights = np.diff(cdf, prepend=0.0)
    unseen = np.setdiff1d(np.flatnonzero(weights),
                          np.fromiter(seen, dtype=np.int64, count=len(seen)))
    if len(unseen):
        return int(rng.choice(unseen))
    return _draw(rng, cdf)


def _zipf(n: int, a: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** a
    return w / w.sum()
