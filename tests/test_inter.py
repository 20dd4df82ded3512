"""RecBole atomic .inter files, choosing a loader by suffix, and the saved token mapping."""

import json
import random

import numpy as np
import pytest
from _data import data_path

from s4rec.data import (
    DataError,
    SequenceData,
    load_dataset,
    load_inter,
    load_mapping,
    load_sequences,
    save_mapping,
    split_input,
    split_target,
)

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def write(tmp_path, text, name="toy.inter"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8", newline="")
    return p


def rows(*lines):
    return "".join("\t".join(map(str, line)) + "\n" for line in lines)


def sequences_by_token(d: SequenceData) -> dict:
    """{user token: [item token, ...]} for every user row."""
    users = d.user_tokens if d.user_tokens is not None else [str(u) for u in d.user_ids]
    out = {}
    for u, user in enumerate(users):
        seq = d.sequence(u).tolist()
        out[user] = [d.item_tokens[i - 1] for i in seq] if d.item_tokens is not None else \
            [str(i) for i in seq]
    return out


def to_inter(src, dst, shuffle_seed=None):
    """A line-format file as .inter: tokens are the ids as written, timestamps the positions."""
    lines = []
    for text in open(src).read().splitlines():
        uid, *items = text.split()
        lines.extend(f"{uid}\t{i}\t5.0\t{t}\n" for t, i in enumerate(items))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(lines)
    dst.write_text(HEADER + "".join(lines))
    return dst


# ----------------------------------------------------------------------------------------------
# reading


def test_sorted_by_time_and_tokens_kept(tmp_path):
    text = HEADER + rows(
        ("alice", "x", 1, 30), ("bob", "y", 1, 5), ("alice", "z", 1, 10), ("bob", "x", 1, 6),
        ("alice", "y", 1, 20), ("bob", "w", 1, 7), ("carol", "x", 1, 1), ("alice", "w", 1, 40),
    )
    d = load_inter(write(tmp_path, text))
    assert d.name == "toy" and len(d) == 2 and d.n_skipped == 1  # carol has one interaction
    assert d.user_tokens == ["alice", "bob"] and d.user_ids.tolist() == [1, 2]
    # items numbered by first appearance in the time-sorted sequences, users in file order
    assert d.item_tokens == ["z", "y", "x", "w"] and d.n_items == 4
    assert sequences_by_token(d) == {"alice": ["z", "y", "x", "w"], "bob": ["y", "x", "w"]}
    assert d.sequence(0).tolist() == [1, 2, 3, 4] and d.sequence(1).tolist() == [2, 3, 4]
    assert d.items.dtype == np.int32 and d.offsets.dtype == np.int64
    assert d.user_ids.dtype == np.int64


def test_column_order_ties_and_no_timestamp(tmp_path):
    text = "timestamp:float\titem_id:token\tuser_id:token\n" + rows(
        (2, "b", "u"), (1, "a", "u"), (2, "c", "u"), (2.0, "d", "u"), (-1e3, "e", "u"),
    )
    d = load_inter(write(tmp_path, text))
    assert sequences_by_token(d) == {"u": ["e", "a", "b", "c", "d"]}  # ties keep file order
    text = "item_id:token\tuser_id:token\n" + rows(("b", "u"), ("a", "u"), ("b", "u"), ("c", "v"),
                                                   ("a", "v"), ("d", "v"))
    d = load_inter(write(tmp_path, text))
    assert sequences_by_token(d) == {"u": ["b", "a", "b"], "v": ["c", "a", "d"]}  # repeats kept
    assert d.item_tokens == ["b", "a", "c", "d"]


def test_whitespace_crlf_blank_lines_and_unicode(tmp_path):
    text = ("\ufeffuser_id:token \t item_id:token\ttimestamp:float\r\n"
            "u 1\t café \t3\r\n\r\n  \n\t\t\nu 1\tx y\t1\r\nu 1\t☃\t2\r\n")
    d = load_inter(write(tmp_path, text))
    assert sequences_by_token(d) == {"u 1": ["x y", "☃", "café"]}


def test_n_items(tmp_path):
    p = write(tmp_path, HEADER + rows(*[("u", f"i{k}", 1, k) for k in range(5)]))
    assert load_inter(p).n_items == 5
    d = load_inter(p, n_items=9)
    assert d.n_items == 9 and len(d.item_tokens) == 5
    with pytest.raises(DataError, match=r"toy\.inter: 5 distinct items, more than n_items=4"):
        load_inter(p, n_items=4)
    with pytest.raises(DataError, match=r"toy\.inter: n_items must be in"):
        load_inter(p, n_items=0)


GOOD = rows(("u", "a", 1, 1), ("u", "b", 1, 2), ("u", "c", 1, 3))


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("", r"toy\.inter: file is empty"),
        ("\n" + GOOD, r"toy\.inter line 1: expected a typed header .* got a blank line"),
        ("user_id\titem_id\n" + GOOD, r"line 1: header column 1 is 'user_id', expected name:type"),
        ("user_id:token\titem_id:int\n", r"line 1: header column 2 'item_id:int' has type 'int'"),
        ("user_id:token\t:float\n", r"line 1: header column 2 is ':float'"),
        ("user_id:token\titem_id:token\tuser_id:token\n", r"line 1: .* repeats the field 'user_id"),
        ("uid:token\titem_id:token\n" + GOOD, r"line 1: the header has no user_id column"),
        ("user_id:token\ttimestamp:float\n", r"line 1: the header has no item_id column"),
        ("user_id:float\titem_id:token\n", r"line 1: user_id must be of type token"),
        ("user_id:token\titem_id:token\ttimestamp:token\n", r"timestamp must be of type float"),
        (HEADER, r"toy\.inter: no interactions, only the header"),
        (HEADER + "\n \n", r"toy\.inter: no interactions, only the header"),
        (HEADER + GOOD + "u\ta\t1\n", r"toy\.inter line 5: 3 tab-separated values, the header has"),
        (HEADER + "u a 1 1\n", r"toy\.inter line 2: 1 tab-separated values, the header has 4"),
        (HEADER + GOOD + "u\ta\t1\t2\t\n", r"line 5: 5 tab-separated values"),
        (HEADER + GOOD + " \ta\t1\t2\n", r"toy\.inter line 5: empty user_id"),
        (HEADER + GOOD + "u\t\t1\t2\n", r"toy\.inter line 5: empty item_id"),
        (HEADER + GOOD + "u\ta\t1\tmonday\n", r"line 5: timestamp 'monday' is not a number"),
        (HEADER + GOOD + "u\ta\t1\t\n", r"line 5: timestamp '' is not a number"),
        (HEADER + GOOD + "u\ta\t1\tnan\n", r"line 5: timestamp 'nan' is not a finite number"),
        (HEADER + GOOD + "u\ta\t1\t-inf\n", r"line 5: timestamp '-inf' is not a finite number"),
        (HEADER + GOOD + "u\ta\t1\t1e999\n", r"line 5: timestamp '1e999' is not a finite number"),
        (HEADER + GOOD + "u\ta\x00\t1\t1\n", r"toy\.inter line 5: NUL byte"),
        (HEADER + rows(("u", "a", 1, 1), ("v", "b", 1, 2)), r"all 2 users have fewer than 3"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, text, pattern):
    p = write(tmp_path, text)
    with pytest.raises(DataError, match=pattern) as e:
        load_inter(p)
    assert len(str(e.value).splitlines()) == 1
    assert str(e.value).startswith(str(p))  # the full path, not only the name


def test_unreadable_inputs(tmp_path):
    with pytest.raises(DataError, match=r"nope\.inter: no such file"):
        load_inter(tmp_path / "nope.inter")
    with pytest.raises(DataError, match=r"is a directory"):
        load_inter(tmp_path)
    p = tmp_path / "bin.inter"
    p.write_bytes(HEADER.encode() + b"u\ta\t1\t1\nu\t\xff\t1\t2\n")
    with pytest.raises(DataError, match=r"bin\.inter line 3: not UTF-8"):
        load_inter(p)


def test_load_dataset_picks_by_suffix(tmp_path):
    inter = write(tmp_path, HEADER + GOOD, "a.INTER")
    line = write(tmp_path, "7 1 2 3\n", "a.txt")
    d = load_dataset(inter)
    assert d.user_tokens == ["u"] and d.item_tokens == ["a", "b", "c"]
    d = load_dataset(line, n_items=5)
    assert d.user_tokens is None and d.item_tokens is None and d.n_items == 5
    assert d.user_ids.tolist() == [7]
    with pytest.raises(DataError, match=r"a\.txt line 1: item id 3 is larger than n_items=2"):
        load_dataset(line, n_items=2)


def test_existing_constructor_still_works():
    d = SequenceData(np.array([1, 2, 3], dtype=np.int32), np.array([0, 3]), np.array([1]), 3, "t")
    assert d.user_tokens is None and d.item_tokens is None and d.n_skipped == 0


# ----------------------------------------------------------------------------------------------
# mapping.json


def test_mapping_round_trip(tmp_path):
    d = load_inter(write(tmp_path, HEADER + GOOD + rows(("v", "é", 1, 0), ("v", "a", 1, 0),
                                                        ("v", "d", 1, 0))))
    path = save_mapping(d, tmp_path)
    assert path == str(tmp_path / "mapping.json")
    assert json.loads((tmp_path / "mapping.json").read_text()) == {
        "users": ["u", "v"], "items": ["a", "b", "c", "é", "d"]}
    assert load_mapping(tmp_path) == (["u", "v"], ["a", "b", "c", "é", "d"])
    assert load_mapping(tmp_path / "mapping.json") == (["u", "v"], ["a", "b", "c", "é", "d"])
    assert not list(tmp_path.glob("*.tmp"))
    other = tmp_path / "other.json"
    assert save_mapping(d, other) == str(other) and load_mapping(other)[0] == ["u", "v"]


def test_mapping_is_none_safe(tmp_path):
    d = load_sequences(write(tmp_path, "1 1 2 3\n", "a.txt"))
    assert save_mapping(d, tmp_path) is None and not (tmp_path / "mapping.json").exists()
    assert load_mapping(tmp_path) == (None, None)
    assert load_mapping(tmp_path / "nothing.json") == (None, None)
    d.item_tokens = ["p", "q", "r"]
    save_mapping(d, tmp_path)
    assert load_mapping(tmp_path) == (None, ["p", "q", "r"])
    (tmp_path / "mapping.json").write_text('{"items": ["a"]}')
    assert load_mapping(tmp_path) == (None, ["a"])


@pytest.mark.parametrize("text, pattern", [
    ("{", r"mapping\.json line 1: not valid JSON"),
    ("[1, 2]", r"mapping\.json: expected a JSON object"),
    ('{"users": [1, 2]}', r'mapping\.json: "users" must be a list of strings or null'),
    ('{"users": [], "items": "abc"}', r'"items" must be a list of strings or null'),
    ("", r"mapping\.json: file is empty"),
])
def test_bad_mapping(tmp_path, text, pattern):
    (tmp_path / "mapping.json").write_text(text)
    with pytest.raises(DataError, match=pattern) as e:
        load_mapping(tmp_path)
    assert len(str(e.value).splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# a data set and its .inter twin give the same split


def assert_same_data(line: SequenceData, inter: SequenceData):
    assert len(inter) == len(line) and inter.n_items == line.n_items
    assert inter.n_skipped == line.n_skipped and len(inter.items) == len(line.items)
    assert sequences_by_token(inter) == sequences_by_token(line)
    # the same leave-one-out split, user by user, through the tokens
    row_of = {tok: u for u, tok in enumerate(inter.user_tokens)}
    rows_inter = np.array([row_of[str(int(uid))] for uid in line.user_ids])
    rows_line = np.arange(len(line))
    items = np.array([0] + [int(t) for t in inter.item_tokens])  # dense id -> original id
    for split in ("valid", "test"):
        assert np.array_equal(items[split_target(inter, rows_inter, split)],
                              split_target(line, rows_line, split))
        for a, b in zip(split_input(inter, rows_inter, split), split_input(line, rows_line, split)):
            assert np.array_equal(items[a], b)


@pytest.mark.parametrize("shuffle_seed", [None, 0])
def test_beauty_as_inter_gives_the_same_split(tmp_path, shuffle_seed):
    src = data_path("Beauty.txt")
    line = load_sequences(src)
    inter = load_inter(to_inter(src, tmp_path / "Beauty.inter", shuffle_seed))
    assert inter.name == "Beauty"
    assert_same_data(line, inter)
    if shuffle_seed is None:
        # Beauty's items are numbered by first appearance, user by user: the ids are kept
        assert np.array_equal(inter.items, line.items)
        assert np.array_equal(inter.offsets, line.offsets)
        assert inter.user_tokens == [str(u) for u in line.user_ids.tolist()]


def test_ml1m_as_inter_gives_the_same_split(tmp_path):
    src = data_path("ml-1m.txt")
    line = load_sequences(src)
    inter = load_inter(to_inter(src, tmp_path / "ml-1m.inter", shuffle_seed=1))
    assert_same_data(line, inter)


def test_short_users_match_the_line_format(tmp_path):
    src = write(tmp_path, "3 4 1 2\n9 5\n1 2 2 6 1\n4 7 3\n", "s.txt")
    line = load_sequences(src)
    inter = load_inter(to_inter(src, tmp_path / "s.inter", shuffle_seed=3))
    assert line.n_skipped == 2 and line.n_items == 7
    assert_same_data(line, inter)  # skipped users' items count in n_items in both formats


def test_inter_twin_trains_to_the_same_metrics(tmp_path):
    # Same users in the same order, same ids, same seed: the trainer cannot tell the formats apart.
    # (A shuffled .inter gives the same split too, tested above, but numbers users and items in
    # another order, so its random batches differ.)
    import s4rec.train as train

    rng = np.random.default_rng(0)
    lines = [" ".join(map(str, [u + 1, *rng.integers(1, 60, size=int(rng.integers(4, 25)))]))
             for u in range(150)]
    # ids numbered by first appearance, as load_inter numbers them, so the twins share item ids
    first = {}
    for line in lines:
        for tok in line.split()[1:]:
            first.setdefault(tok, len(first) + 1)
    lines = [" ".join([ln.split()[0], *(str(first[t]) for t in ln.split()[1:])]) for ln in lines]
    line_file = tmp_path / "twin.txt"
    line_file.write_text("\n".join(lines) + "\n")
    inter_file = to_inter(line_file, tmp_path / "twin.inter")  # rows in the same order
    flags = ["--epochs", "2", "--hidden", "16", "--layers", "1", "--n-clusters", "8",
             "--batch-size", "32", "--progress", "false", "--threads", "1"]
    results = []
    for path in (line_file, inter_file):
        run_dir = tmp_path / path.suffix[1:]
        assert train.main(["--data", str(path), "--run-dir", str(run_dir), *flags]) == 0
        metrics = json.loads((run_dir / "metrics.json").read_text())
        results.append((metrics["valid"], metrics["test"]))
    assert results[0] == results[1]
    assert json.loads((tmp_path / "inter" / "mapping.json").read_text())["items"][:3] == ["1", "2", "3"]
