"""The four augmentation operators and the Augmenter that draws one per sequence."""

from collections import Counter

import numpy as np
import pytest

from s4rec.augment import DEFAULT_OPERATORS, Augmenter, crop, insert, insert_count, mask, reorder

MASK = 9999
POOL = np.array([1001, 1002, 1002, 1003, 1003, 1003], dtype=np.int64)
LENGTHS = [0, 1, 2, 3, 5, 9, 10, 17, 50, 200]


def seq_of(n, dtype=np.int32):
    return np.arange(1, n + 1, dtype=dtype)  # distinct items, so positions can be traced


def is_subsequence(small, big):
    it = iter(big.tolist())
    return all(x in it for x in small.tolist())


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.9])
def test_crop_keeps_contiguous_span(n, ratio):
    rng = np.random.default_rng(n)
    s = seq_of(n)
    for _ in range(20):
        out = crop(s, rng, ratio)
        assert out.dtype == s.dtype
        assert len(out) == (0 if n == 0 else max(1, int(ratio * n)))
        if n:
            start = int(out[0]) - 1
            assert np.array_equal(out, s[start : start + len(out)])


def test_crop_start_is_uniform():
    rng = np.random.default_rng(0)
    starts = Counter(int(crop(seq_of(10), rng, 0.2)[0]) for _ in range(9000))
    assert sorted(starts) == list(range(1, 10))  # 9 possible starts for a span of 2
    assert min(starts.values()) > 800


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.7, 1.0])
def test_mask_count_and_rest_unchanged(n, ratio):
    rng = np.random.default_rng(n)
    s = seq_of(n)
    out = mask(s, rng, ratio, mask_id=MASK)
    assert len(out) == n and out.dtype == s.dtype
    masked = out == MASK
    assert masked.sum() == int(ratio * n)
    assert np.array_equal(out[~masked], s[~masked])


@pytest.mark.parametrize("n", LENGTHS)
def test_reorder_is_a_permutation_of_one_span(n):
    rng = np.random.default_rng(n)
    s = seq_of(n)
    for _ in range(20):
        out = reorder(s, rng, 0.2)
        assert len(out) == n and out.dtype == s.dtype
        assert sorted(out.tolist()) == s.tolist()
        if n < 2:
            assert np.array_equal(out, s)
            continue
        k = max(2, int(0.2 * n))
        diff = np.flatnonzero(out != s)
        assert len(diff) >= 2  # the identity permutation is never drawn
        assert diff[-1] - diff[0] < k  # every moved item lies in one span of k positions


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 1.0])
def test_insert_adds_pool_items_around_the_original(n, ratio):
    rng = np.random.default_rng(n)
    s = seq_of(n)
    out = insert(s, rng, ratio, pool=POOL)
    k = 0 if n == 0 or ratio == 0 else max(1, int(ratio * n))
    assert insert_count(n, ratio) == k
    assert len(out) == n + k and out.dtype == s.dtype
    new = out[out > 1000]
    assert len(new) == k and set(new.tolist()) <= set(POOL.tolist())
    assert np.array_equal(out[out <= 1000], s)  # the original is a subsequence, in order
    assert is_subsequence(s, out)


def test_insert_draws_by_popularity_and_anywhere():
    rng = np.random.default_rng(0)
    s = seq_of(10)
    drawn, slots = Counter(), Counter()
    for _ in range(3000):
        out = insert(s, rng, 0.1, pool=POOL)  # one item into 11 slots
        pos = int(np.flatnonzero(out > 1000)[0])
        drawn[int(out[pos])] += 1
        slots[pos] += 1
    assert drawn[1003] > drawn[1002] > drawn[1001]  # frequencies follow the pool, 3 : 2 : 1
    assert sorted(slots) == list(range(11))  # front, between and after every item
    with pytest.raises(ValueError, match="pool"):
        insert(s, rng, 0.3, pool=np.array([], dtype=np.int64))


def test_inputs_untouched_and_outputs_are_copies():
    rng = np.random.default_rng(0)
    data = np.arange(1, 31, dtype=np.int32)
    s = data[5:25]  # a view, as the loader hands them out
    before = data.copy()
    outs = [
        crop(s, rng, 0.5),
        mask(s, rng, 0.7, mask_id=MASK),
        reorder(s, rng, 0.5),
        insert(s, rng, 0.3, pool=POOL),
    ]
    assert np.array_equal(data, before)
    for out in outs:
        assert not np.shares_memory(out, data)
    one = np.array([7], dtype=np.int32)
    assert crop(one, rng).tolist() == [7] and reorder(one, rng).tolist() == [7]
    assert mask(one, rng, 0.7, mask_id=MASK).tolist() == [7]  # int(0.7) = 0 masks
    assert mask(one, rng, 1.0, mask_id=MASK).tolist() == [MASK]
    assert len(insert(one, rng, 0.3, pool=POOL)) == 2


def test_empty_sequence_unchanged():
    rng = np.random.default_rng(0)
    e = np.array([], dtype=np.int32)
    for out in (
        crop(e, rng),
        mask(e, rng, mask_id=MASK),
        reorder(e, rng),
        insert(e, rng, pool=POOL),
    ):
        assert len(out) == 0 and out.dtype == np.int32
    aug = Augmenter(mask_id=MASK, pool=POOL)
    assert [len(v) for v in aug.views([e, e, e], rng)] == [0, 0, 0]


def test_deterministic_under_seed():
    seqs = [seq_of(n) for n in (3, 8, 20, 50)] * 5
    aug = Augmenter(mask_id=MASK, pool=POOL)
    a = aug.views(seqs, np.random.default_rng(42))
    b = aug.views(seqs, np.random.default_rng(42))
    c = aug.views(seqs, np.random.default_rng(43))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))


def _which(out, s):
    """Which operator made ``out`` from ``s`` (distinct items, n = 20, default ratios)."""
    if len(out) < len(s):
        return "crop"
    if len(out) > len(s):
        return "insert"
    if (out == MASK).any():
        return "mask"
    return "reorder"


def test_views_draws_operators_evenly():
    rng = np.random.default_rng(0)
    s = seq_of(20)
    aug = Augmenter(mask_id=MASK, pool=POOL)
    counts = Counter(_which(v, s) for v in aug.views([s] * 4000, rng))
    assert set(counts) == set(DEFAULT_OPERATORS)
    for op in DEFAULT_OPERATORS:
        assert abs(counts[op] - 1000) < 120, counts  # about 4 standard deviations
    only = Augmenter(mask_id=MASK, operators=("crop", "reorder"))
    counts = Counter(_which(v, s) for v in only.views([s] * 2000, rng))
    assert set(counts) == {"crop", "reorder"} and abs(counts["crop"] - 1000) < 120


def test_augmenter_ratios_and_validation():
    rng = np.random.default_rng(0)
    s = seq_of(20)
    aug = Augmenter(mask_id=MASK, pool=POOL, crop_ratio=0.5, operators=("crop",))
    assert all(len(v) == 10 for v in aug.views([s] * 10, rng))
    aug = Augmenter(mask_id=MASK, mask_ratio=0.25, operators=("mask",))
    assert all((v == MASK).sum() == 5 for v in aug.views([s] * 10, rng))
    aug = Augmenter(mask_id=MASK, pool=POOL, insert_ratio=0.5, operators=["insert"])
    assert all(len(v) == 30 for v in aug.views([s] * 10, rng))
    assert aug.operators == ("insert",)
    with pytest.raises(ValueError, match="pool"):
        Augmenter(mask_id=MASK)  # insert is among the default operators
    with pytest.raises(ValueError, match="unknown"):
        Augmenter(mask_id=MASK, pool=POOL, operators=("crop", "shuffle"))
    with pytest.raises(ValueError, match="mask_ratio"):
        Augmenter(mask_id=MASK, pool=POOL, mask_ratio=1.5)
    with pytest.raises(ValueError):
        Augmenter(mask_id=MASK, pool=POOL, operators=())
