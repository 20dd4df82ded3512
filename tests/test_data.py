"""Loader, leave-one-out split, batching helpers and the synthetic data set."""

import hashlib
import math
import time
import tracemalloc
from collections import Counter, defaultdict

import numpy as np
import pytest
from _data import data_path

from s4rec.data import (
    DataError,
    SequenceData,
    bucketize,
    head_users,
    history_csr,
    load_sequences,
    pad_left,
    split_input,
    split_target,
    synthetic,
    train_sequences,
)



def write(tmp_path, text, name="toy.txt"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def beauty():
    return load_sequences(data_path("Beauty.txt"))


# ----------------------------------------------------------------------------------------------
# loader


def test_round_trip(tmp_path):
    rows = {7: [3, 1, 2, 5], 2: [4, 4, 1], 10: [1, 2, 3, 4, 5, 6]}
    p = write(tmp_path, "".join(f"{u} {' '.join(map(str, s))}\n" for u, s in rows.items()))
    d = load_sequences(p)
    assert d.name == "toy" and len(d) == 3 and d.n_items == 6 and d.n_skipped == 0
    assert (
        d.items.dtype == np.int32 and d.offsets.dtype == np.int64 and d.user_ids.dtype == np.int64
    )
    assert d.user_ids.tolist() == [7, 2, 10]
    assert d.lengths.tolist() == [4, 3, 6] and d.lengths.dtype == np.int64
    for u, (uid, seq) in enumerate(rows.items()):
        assert d.sequence(u).tolist() == seq
        assert np.shares_memory(d.sequence(u), d.items)


def test_whitespace_blank_lines_and_crlf(tmp_path):
    p = write(tmp_path, "\n1\t1  2 3\r\n\n   \n2 3 2 1 \r\n\n")
    d = load_sequences(p)
    assert (
        len(d) == 2 and d.sequence(0).tolist() == [1, 2, 3] and d.sequence(1).tolist() == [3, 2, 1]
    )


def test_byte_order_mark_and_crlf_as_windows_tools_write_them(tmp_path):
    plain = load_sequences(write(tmp_path, "7 3 1 2\n2 4 4 1 5\n", "plain.txt"))
    p = tmp_path / "windows.txt"
    p.write_bytes(b"\xef\xbb\xbf7 3 1 2\r\n2 4 4 1 5\r\n")
    d = load_sequences(p)
    assert d.user_ids.tolist() == plain.user_ids.tolist() == [7, 2]
    assert d.items.tolist() == plain.items.tolist() and d.offsets.tolist() == plain.offsets.tolist()
    assert d.n_items == plain.n_items == 5


@pytest.mark.parametrize("text, line, token", [
    ("\ufeff\ufeff7 3 1 2\n", 1, "\ufeff7"),  # only one mark, at the very start
    ("7 3 1 2\r\n\ufeff2 4 4 1\r\n", 2, "\ufeff2"),
    ("7 3 1 2\n2 4 \ufeff4 1\n", 2, "\ufeff4"),
])
def test_byte_order_mark_elsewhere_is_an_error(tmp_path, text, line, token):
    p = write(tmp_path, text)
    with pytest.raises(DataError) as err:
        load_sequences(p)
    assert str(err.value) == f"{p} line {line}: {token!r} is not an integer"


def test_short_users_skipped_and_counted(tmp_path):
    p = write(tmp_path, "1 1 2 3\n2 4 5\n3\n4 6\n5 7 8 9 10\n")
    d = load_sequences(p)
    assert d.user_ids.tolist() == [1, 5] and d.n_skipped == 3
    assert d.n_items == 10  # largest id seen, skipped users included
    assert d.offsets.tolist() == [0, 3, 7]


def test_n_items_given_and_checked(tmp_path):
    p = write(tmp_path, "1 1 2 3\n2 3 2 5\n")
    assert load_sequences(p).n_items == 5
    assert load_sequences(p, n_items=9).n_items == 9
    with pytest.raises(DataError, match=r"toy\.txt line 2: item id 5 is larger than n_items=4"):
        load_sequences(p, n_items=4)
    with pytest.raises(DataError, match=r"toy\.txt: n_items must be in"):
        load_sequences(p, n_items=0)


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("1 1 2 3\n2 1 x 3\n", r"toy\.txt line 2: 'x' is not an integer"),
        ("1 1 2 3\n\n2 1 2.5 3\n", r"toy\.txt line 3: '2\.5' is not an integer"),
        ("1 1 2 3\n2 1 1-2 3\n", r"toy\.txt line 2: '1-2' is not an integer"),
        ("1 1 2 3\n2 1 1_0 3\n", r"toy\.txt line 2: '1_0' is not an integer"),
        ("u1 1 2 3\n", r"toy\.txt line 1: 'u1' is not an integer"),
        ("1 1 2 3\n2 1 0 3\n", r"toy\.txt line 2: item id 0 is smaller than 1"),
        ("1 1 2 3\n2 1 -4 3\n", r"toy\.txt line 2: item id -4 is smaller than 1"),
        (
            "1 1 2 3\n2 1 2147483648 3\n",
            r"toy\.txt line 2: item id 2147483648 is larger than 2147483647",
        ),
        (
            "1 1 2 3\n2 1 99999999999999999999999 3\n",
            r"toy\.txt line 2: 99999999999999999999999 is out of range",
        ),
        (
            "1 1 2 3\n2 4 5 6\n3 1 2 3\n2 7 8 9\n",
            r"toy\.txt line 4: user id 2 already appeared on line 2",
        ),
        ("5 1 2 3\n5\n", r"toy\.txt line 2: user id 5 already appeared on line 1"),
        ("1 1 2\n2\n3 1\n", r"toy\.txt: all 3 users have fewer than 3 items"),
        ("", r"toy\.txt: file is empty"),
        ("\n  \n\n", r"toy\.txt: no users"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, text, pattern):
    p = write(tmp_path, text)
    with pytest.raises(DataError, match=pattern) as e:
        load_sequences(p)
    assert "\n" not in str(e.value)
    assert str(p) in str(e.value)  # the full path, not only the name


def test_unreadable_inputs(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: no such file"):
        load_sequences(tmp_path / "nope.txt")
    with pytest.raises(DataError, match=r"is a directory"):
        load_sequences(tmp_path)
    p = tmp_path / "bin.txt"
    p.write_bytes(b"1 1 2 3\n2 1 \xff 3\n")
    with pytest.raises(DataError, match=r"bin\.txt line 2: not UTF-8"):
        load_sequences(p)
    assert issubclass(DataError, ValueError)


def test_beauty_loads(beauty):
    assert len(beauty) == 22363 and beauty.n_items == 12101 and len(beauty.items) == 198502
    assert beauty.n_skipped == 0 and beauty.name == "Beauty"
    assert beauty.items.dtype == np.int32 and beauty.items.min() >= 1
    nbytes = beauty.items.nbytes + beauty.offsets.nbytes + beauty.user_ids.nbytes
    assert nbytes < 2 * 2**20


def test_ml1m_loads_fast():
    t = time.perf_counter()
    d = load_sequences(data_path("ml-1m.txt"))
    elapsed = time.perf_counter() - t
    assert len(d) == 6040 and d.n_items == 3416 and len(d.items) == 999611
    assert elapsed < 3.0, f"ml-1m took {elapsed:.2f} s"


# ----------------------------------------------------------------------------------------------
# leave-one-out


def test_leave_one_out_positions(beauty):
    d, users = beauty, np.arange(len(beauty))
    v_in, v_tg = split_input(d, users, "valid"), split_target(d, users, "valid")
    t_in, t_tg = split_input(d, users, "test"), split_target(d, users, "test")
    tr = train_sequences(d, users)
    assert v_tg.dtype == np.int64 and v_tg.shape == (len(d),)
    for u in users:
        s, o = d.sequence(u), int(d.offsets[u])
        n = len(s)
        assert v_tg[u] == s[n - 2] and t_tg[u] == s[n - 1]
        assert np.array_equal(v_in[u], s[: n - 2]) and np.array_equal(t_in[u], s[: n - 1])
        assert t_in[u][-1] == v_tg[u]  # the test input ends with the validation target
        # positions in the flat array: the inputs are views, the held-out items lie past them
        for view, end in ((v_in[u], n - 2), (t_in[u], n - 1), (tr[u], n - 2)):
            assert np.shares_memory(view, d.items)
            assert view.__array_interface__["data"][0] == d.items[o:].__array_interface__["data"][0]
            assert len(view) == end
    assert np.array_equal(v_tg, d.items[d.offsets[1:] - 2]) and np.array_equal(
        t_tg, d.items[d.offsets[1:] - 1]
    )


def test_split_subset_and_errors():
    d = synthetic(n_users=50, n_items=64, n_intents=4)
    users = np.array([7, 3, 3, 40])
    assert [len(s) for s in split_input(d, users, "test")] == (d.lengths[users] - 1).tolist()
    assert split_target(d, users, "valid").tolist() == [int(d.sequence(u)[-2]) for u in users]
    with pytest.raises(ValueError, match="split"):
        split_input(d, users, "train")
    with pytest.raises(ValueError, match="split"):
        split_target(d, users, "validation")
    with pytest.raises(IndexError):
        split_target(d, np.array([50]), "test")


def test_history_csr_matches_loop(beauty):
    rng = np.random.default_rng(0)
    users = rng.choice(len(beauty), size=700, replace=False)
    for split in ("valid", "test"):
        indptr, indices = history_csr(beauty, users, split)
        assert indptr.dtype == np.int64 and indices.dtype == np.int64
        inputs = split_input(beauty, users, split)
        assert indptr[0] == 0 and len(indptr) == len(users) + 1
        for i, s in enumerate(inputs):
            assert indices[indptr[i] : indptr[i + 1]].tolist() == (s.astype(np.int64) - 1).tolist()
    indptr, indices = history_csr(beauty, np.array([], dtype=np.int64), "test")
    assert indptr.tolist() == [0] and len(indices) == 0


# ----------------------------------------------------------------------------------------------
# head users


def test_head_users_share_and_ties():
    lens = [3, 7, 5, 7, 4, 7, 3, 3, 6, 5]  # training lengths n - 2
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    d = SequenceData(
        items=np.ones(offsets[-1], dtype=np.int32),
        offsets=offsets,
        user_ids=np.arange(len(lens), dtype=np.int64),
        n_items=1,
        name="t",
    )
    assert np.flatnonzero(head_users(d, 0.2)).tolist() == [
        1,
        3,
    ]  # two of the three 7s: lowest rows win
    assert np.flatnonzero(head_users(d, 0.25)).tolist() == [1, 3, 5]  # ceil(2.5) = 3
    assert np.flatnonzero(head_users(d, 0.5)).tolist() == [1, 2, 3, 5, 8]  # first of the two 5s
    assert head_users(d, 0.0).sum() == 0 and head_users(d, 1.0).all()
    with pytest.raises(ValueError):
        head_users(d, 1.5)


def test_head_users_on_beauty(beauty):
    h = head_users(beauty)
    assert h.dtype == np.bool_ and h.sum() == math.ceil(0.2 * len(beauty))
    assert beauty.lengths[h].min() >= beauty.lengths[~h].max()


# ----------------------------------------------------------------------------------------------
# batching


def test_pad_left():
    seqs = [
        np.array([1, 2, 3], dtype=np.int32),
        np.array([], dtype=np.int32),
        np.arange(1, 8),
        np.array([9]),
    ]
    out = pad_left(seqs, 4)
    assert out.dtype == np.int64 and out.shape == (4, 4)
    assert out.tolist() == [[0, 1, 2, 3], [0, 0, 0, 0], [4, 5, 6, 7], [0, 0, 0, 9]]
    assert pad_left([], 5).shape == (0, 5)
    assert pad_left(seqs, 0).shape == (4, 0)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 100, size=rng.integers(0, 80)) for _ in range(200)]
    out = pad_left(seqs, 50)
    for row, s in zip(out, seqs):
        k = min(len(s), 50)
        assert (row[: 50 - k] == 0).all() and row[50 - k :].tolist() == s[len(s) - k :].tolist()


def _padding_share(lengths, group):
    g = lengths[group]
    return 1.0 - g.sum() / (len(g) * g.max()) if g.max() > 0 else 0.0


@pytest.mark.parametrize("max_pad", [0.0, 0.1, 1 / 3, 0.5, 1.0])
def test_bucketize_covers_and_bounds(max_pad):
    rng = np.random.default_rng(2)
    lengths = np.minimum(rng.geometric(0.1, size=1000), 50)
    lengths[:30] = 0
    groups = bucketize(lengths, max_pad)
    rows = np.concatenate(groups)
    assert all(g.dtype == np.int64 for g in groups)
    assert np.array_equal(np.sort(rows), np.arange(len(lengths)))
    for g in groups:
        assert _padding_share(lengths, g) <= max_pad + 1e-12
    if max_pad == 1.0:
        assert len(groups) == 1
    if max_pad == 0.0:
        assert all(len(np.unique(lengths[g])) == 1 for g in groups)
    # greedy is maximal: adding the next row (in sorted order) to a group would break the bound
    order = np.concatenate(groups)
    pos = 0
    for g in groups[:-1]:
        pos += len(g)
        if lengths[g].max() > 0:
            assert _padding_share(lengths, np.append(g, order[pos])) > max_pad


def test_bucketize_edge_cases():
    assert bucketize(np.array([], dtype=np.int64)) == []
    groups = bucketize(np.zeros(5, dtype=np.int64))  # all-zero lengths: one group
    assert len(groups) == 1 and sorted(groups[0].tolist()) == [0, 1, 2, 3, 4]
    groups = bucketize(np.array([0, 3, 0, 3, 3]), 0.2)
    assert [g.tolist() for g in groups] == [[1, 3, 4], [0, 2]]
    groups = bucketize(np.array([0, 3, 0, 3, 3]), 1 / 3)  # a zero row joins while the bound holds
    assert [g.tolist() for g in groups] == [[1, 3, 4, 0], [2]]
    assert [g.tolist() for g in bucketize(np.array([5, 1, 5, 4]), 0.2)] == [[0, 2, 3], [1]]
    assert [g.tolist() for g in bucketize(np.array([5, 1, 5, 4]), 0.25)] == [
        [0, 2, 3, 1]
    ]  # share 0.25
    with pytest.raises(ValueError):
        bucketize(np.array([1, -1]))


def test_bucketize_on_beauty_batches(beauty):
    lengths = np.minimum(beauty.lengths - 2, 50)
    rng = np.random.default_rng(0)
    n_groups, shares = [], []
    for _ in range(20):
        batch = lengths[rng.choice(len(lengths), size=512, replace=False)]
        groups = bucketize(batch, 1 / 3)
        padded = sum(len(g) * batch[g].max() for g in groups)
        shares.append(1.0 - batch.sum() / padded)
        n_groups.append(len(groups))
        assert shares[-1] <= 1 / 3
    print(
        f"Beauty batches of 512: groups {min(n_groups)}-{max(n_groups)}, "
        f"padding share {np.mean(shares):.3f} (vs {1 - lengths.mean() / 50:.3f} padded to 50)"
    )
    assert max(n_groups) <= 12


# ----------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_deterministic_and_sized():
    a, b = synthetic(seed=3), synthetic(seed=3)
    assert np.array_equal(a.items, b.items) and np.array_equal(a.offsets, b.offsets)
    assert not np.array_equal(synthetic(seed=4).items[:200], a.items[:200])
    assert len(a) == 3000 and a.n_items == 800 and a.name == "synthetic" and a.n_skipped == 0
    assert a.items.dtype == np.int32 and a.offsets.dtype == np.int64
    assert a.items.min() >= 1 and a.items.max() <= 800
    L = a.lengths
    assert L.min() >= 5 and L.max() <= 60 and 10 <= L.mean() <= 15
    small = synthetic(n_users=100, n_items=50, n_intents=5, seed=1)
    assert len(small) == 100 and small.items.max() <= 50


def _fingerprint(d: SequenceData) -> str:
    digest = hashlib.sha256(d.items.astype("<i4").tobytes())
    digest.update(d.offsets.astype("<i8").tobytes())
    return digest.hexdigest()


def test_synthetic_default_is_unchanged():
    # the embedded data set behind the README's synthetic numbers, byte for byte (as generated
    # before the generator learned to draw in O(log n_items))
    assert _fingerprint(synthetic()) == (
        "c3f60e41e0f020c04030b6701ba1c76f04c2ec5490b0c2a98e40703b5990b6f9")
    assert _fingerprint(synthetic(n_users=100, n_items=50, n_intents=5, seed=1)) == (
        "d5f1d4ca66e2fe4298e91a300676534b65d53d868bbf8d77fe1fb6e7de65a7e2")


def test_synthetic_million_items_memory_is_bounded():
    # O(n_items) set-up (a few arrays of 1M floats), nothing per user and item
    tracemalloc.start()
    try:
        d = synthetic(n_users=400, n_items=1_000_000, seed=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak
    assert d.n_items == 1_000_000 and len(d) == 400
    assert d.items.min() >= 1 and d.items.max() <= 1_000_000
    assert all(len(set(d.sequence(u).tolist())) == len(d.sequence(u)) for u in range(len(d)))


def test_synthetic_head_longer_and_popularity_long_tailed():
    d = synthetic()
    h = head_users(d)
    assert h.sum() == 600
    assert d.lengths[h].mean() > 2 * d.lengths[~h].mean()
    counts = np.sort(np.bincount(d.items, minlength=d.n_items + 1)[1:])[::-1]
    assert (
        counts[: d.n_items // 10].sum() > 0.3 * counts.sum()
    )  # top 10% of items: > 30% of interactions


def test_synthetic_structure_is_learnable():
    """An item's most frequent successor in training predicts held-out items far above chance."""
    d = synthetic()
    users = np.arange(len(d))
    succ = defaultdict(Counter)
    for s in train_sequences(d, users):
        for a, b in zip(s[:-1].tolist(), s[1:].tolist()):
            succ[a][b] += 1
    best = {a: c.most_common(1)[0][0] for a, c in succ.items()}
    for split in ("valid", "test"):
        inputs, targets = split_input(d, users, split), split_target(d, users, split)
        hit = np.mean([best.get(int(s[-1]), -1) == t for s, t in zip(inputs, targets)])
        assert hit > 100 / d.n_items, hit  # chance is 1 / n_items
