"""Property tests of the loaders on random, mostly malformed files.

Each generated file goes to the loader and to a small independent reading of the documented format
(the oracle below). Both must agree: the loader raises DataError exactly when the oracle finds a
problem, with a one-line message naming the file and the line the oracle names; otherwise it
returns exactly the sequences the oracle reads, with a consistent layout and a valid split.
No other exception may escape.
"""

import math
import os
import re
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from s4rec.data import (
    MAX_ITEM_ID,
    MIN_LEN,
    DataError,
    load_dataset,
    load_inter,
    load_sequences,
    split_input,
    split_target,
)

SETTINGS = settings(max_examples=500, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
INT = re.compile(r"[+-]?[0-9]+")


class Bad(Exception):
    """The oracle's verdict on a bad file: the 1-based line (or None) and a message fragment."""

    def __init__(self, line, fragment):
        super().__init__(line, fragment)
        self.line, self.fragment = line, fragment


# ----------------------------------------------------------------------------------------------
# oracles: the formats as documented, read the simplest way


def decode(raw: bytes) -> str:
    if not raw:
        raise Bad(None, "file is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Bad(raw[:e.start].count(b"\n") + 1, "not UTF-8") from None
    if "\x00" in text:
        raise Bad(text[:text.index("\x00")].count("\n") + 1, "NUL byte")
    return text[1:] if text.startswith("\ufeff") else text  # one byte-order mark at the start


def read_lines_oracle(raw: bytes, n_items):
    """-> (user ids, sequences, n_items, n_skipped) of the kept users, or raises Bad."""
    if n_items is not None and (type(n_items) is not int or not 1 <= n_items <= MAX_ITEM_ID):
        raise Bad(None, "n_items must be")
    text = decode(raw)
    lines = [(no, line.split()) for no, line in enumerate(text.split("\n"), start=1)]
    lines = [(no, toks) for no, toks in lines if toks]
    if not lines:
        raise Bad(None, "no users")
    for no, toks in lines:
        for tok in toks:
            if not INT.fullmatch(tok):
                raise Bad(no, "is not an integer")
            if not -2**63 <= int(tok) < 2**63:
                raise Bad(no, "out of range for an id")
    limit = MAX_ITEM_ID if n_items is None else n_items
    for no, toks in lines:
        for tok in toks[1:]:
            if int(tok) < 1:
                raise Bad(no, "is smaller than 1")
            if int(tok) > limit:
                raise Bad(no, "is larger than")
    seen = set()
    for no, toks in lines:
        if int(toks[0]) in seen:
            raise Bad(no, "already appeared")
        seen.add(int(toks[0]))
    kept = [(int(t[0]), [int(x) for x in t[1:]]) for _, t in lines if len(t) - 1 >= MIN_LEN]
    if not kept:
        raise Bad(None, f"have fewer than {MIN_LEN} items")
    if n_items is None:
        n_items = max((int(x) for _, t in lines for x in t[1:]), default=0)
    return [u for u, _ in kept], [s for _, s in kept], n_items, len(lines) - len(kept)


def read_inter_oracle(raw: bytes, n_items):
    """-> (user tokens, item-token sequences, item tokens by id, n_items, n_skipped), or Bad."""
    if n_items is not None and (type(n_items) is not int or not 1 <= n_items <= MAX_ITEM_ID):
        raise Bad(None, "n_items must be")
    text = decode(raw)
    lines = text.split("\n")
    header = lines[0]
    if header.strip() == "":
        raise Bad(1, "blank line")
    names, types = [], []
    for field in header.split("\t"):
        name, _, kind = field.strip().rpartition(":")
        if ":" not in field or not name.strip():
            raise Bad(1, "expected name:type")
        if kind.strip() not in ("token", "token_seq", "float", "float_seq"):
            raise Bad(1, "has type")
        if name.strip() in names:
            raise Bad(1, "repeats the field")
        names.append(name.strip())
        types.append(kind.strip())
    for name, kind in (("user_id", "token"), ("item_id", "token"), ("timestamp", "float")):
        if name not in names:
            if name != "timestamp":
                raise Bad(1, f"no {name} column")
        elif types[names.index(name)] != kind:
            raise Bad(1, f"{name} must be of type {kind}")
    rows = []  # (line, user, item, timestamp text or None)
    for no, line in enumerate(lines[1:], start=2):
        if line.strip() == "":
            continue
        values = line.split("\t")
        if len(values) != len(names):
            raise Bad(no, "tab-separated values")
        rec = dict(zip(names, (v.strip() for v in values)))
        if rec["user_id"] == "":
            raise Bad(no, "empty user_id")
        if rec["item_id"] == "":
            raise Bad(no, "empty item_id")
        rows.append((no, rec["user_id"], rec["item_id"], rec.get("timestamp")))
    if not rows:
        raise Bad(None, "no interactions")
    stamps = []
    for no, _, _, t in rows:
        if t is None:
            stamps.append(0.0)
            continue
        try:
            value = float(t)
        except ValueError:
            raise Bad(no, "is not a number") from None
        if not math.isfinite(value):
            raise Bad(no, "is not a finite number")
        stamps.append(value)
    users = list(dict.fromkeys(u for _, u, _, _ in rows))
    seqs = {u: [] for u in users}
    for k in sorted(range(len(rows)), key=lambda k: stamps[k]):  # sorted() is stable
        seqs[rows[k][1]].append(rows[k][2])
    item_tokens = list(dict.fromkeys(i for u in users for i in seqs[u]))
    if n_items is None:
        n_items = len(item_tokens)
    elif len(item_tokens) > n_items:
        raise Bad(None, "distinct items, more than")
    kept = [u for u in users if len(seqs[u]) >= MIN_LEN]
    if not kept:
        raise Bad(None, f"have fewer than {MIN_LEN} items")
    ids = [users.index(u) + 1 for u in kept]
    return kept, ids, [seqs[u] for u in kept], item_tokens, n_items, len(users) - len(kept)


# ----------------------------------------------------------------------------------------------
# checks shared by both formats


def check_layout_and_split(d, n_items):
    n = len(d)
    assert n >= 1 and d.n_items == n_items
    assert d.items.dtype == np.int32 and d.offsets.dtype == np.int64
    assert d.user_ids.dtype == np.int64
    assert d.offsets.shape == (n + 1,) and d.offsets[0] == 0 and d.offsets[-1] == len(d.items)
    assert (d.lengths >= MIN_LEN).all()
    assert len(d.items) == 0 or (d.items.min() >= 1 and d.items.max() <= d.n_items)
    users = np.arange(n)
    for split, cut in (("valid", 2), ("test", 1)):
        targets = split_target(d, users, split)
        for u, (inp, tgt) in enumerate(zip(split_input(d, users, split), targets)):
            seq = d.sequence(u)
            assert np.array_equal(inp, seq[:-cut]) and tgt == seq[-cut]


def check_error(err: DataError, path: str, bad: Bad):
    msg = str(err)
    assert msg.startswith(path), msg
    assert len(msg.splitlines()) == 1 and "\n" not in msg and "\r" not in msg, msg
    if bad.line is not None:
        assert msg.startswith(f"{path} line {bad.line}: "), (msg, bad.line, bad.fragment)
    else:
        assert msg.startswith(f"{path}: "), (msg, bad.fragment)
    assert bad.fragment in msg, (msg, bad.fragment)


def run_both(loader, oracle, raw, n_items, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data" + suffix)
        with open(path, "wb") as f:
            f.write(raw)
        try:
            expected = oracle(raw, n_items)
        except Bad as bad:
            with pytest.raises(DataError) as e:
                loader(path, n_items)
            check_error(e.value, path, bad)
            return None
        return expected, loader(path, n_items)


# ----------------------------------------------------------------------------------------------
# generators

WHITESPACE = [" ", " ", " ", "\t", "  ", "\x0b", "\x0c", "\u3000", "\u2028", "\x85"]
JUNK = ["x", "2.5", "1e3", "+7", "-0", "007", "0", "-4", "1_0", "1-2", "+", "٣", "Ⅻ", "\x00",
        "1\x00", "9" * 25, str(2**31), str(2**31 - 1), str(2**63), str(-2**63), "ü", "\ufeff1",
        "🙂", "\x7f", "NaN"]


def token(valid):
    return st.one_of(valid.map(str), st.sampled_from(JUNK), st.text(max_size=4))


@st.composite
def line_files(draw):
    """A line-format file: mostly well formed, with a few random faults."""
    users = draw(st.lists(st.integers(-2, 40), max_size=8, unique=True))
    lines = [[str(u)] + [str(i) for i in draw(st.lists(st.integers(1, 9), max_size=6))]
             for u in users]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["token", "insert", "blank", "drop", "short", "copy"]))
        if kind == "token" and lines:
            row = draw(st.integers(0, len(lines) - 1))
            col = draw(st.integers(0, len(lines[row])))
            lines[row].insert(col, draw(token(st.integers(-3, 20))))
        elif kind == "insert":
            at = draw(st.integers(0, len(lines)))
            lines.insert(at, draw(st.lists(token(st.integers(1, 9)), min_size=1, max_size=5)))
        elif kind == "blank":
            lines.insert(draw(st.integers(0, len(lines))), [])
        elif kind == "drop" and lines:
            row = draw(st.integers(0, len(lines) - 1))
            lines[row] = lines[row][:draw(st.integers(0, 2))]
        elif kind == "copy" and lines:  # a duplicate user
            lines.insert(draw(st.integers(0, len(lines))), list(draw(st.sampled_from(lines))))
        elif kind == "short":
            lines.append([str(draw(st.integers(20, 30)))])
    sep = st.sampled_from(WHITESPACE)
    out = []
    for toks in lines:
        text = draw(sep).join(toks) if draw(st.booleans()) else " ".join(toks)
        out.append(text + draw(st.sampled_from(["", "", "\r", " ", "\t\r"])))
    raw = "\n".join(out) + draw(st.sampled_from(["", "\n", "\n\n", "\r\n"]))
    bom = draw(st.sampled_from(["", "", "\ufeff", "\ufeff\ufeff"]))
    return corrupt(draw, (bom + raw).encode("utf-8"))


def corrupt(draw, raw: bytes) -> bytes:
    if draw(st.integers(0, 9)) == 7:  # sometimes a stray byte, possibly breaking UTF-8
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\n", b"\t"])) + raw[at:]
    return raw


N_ITEMS = st.one_of(st.none(), st.none(), st.integers(-1, 14), st.sampled_from([True, 2.5, "9"]))
ANY_BYTES = st.one_of(st.binary(max_size=80), st.text(max_size=80).map(str.encode))


@SETTINGS
@given(raw=st.one_of(line_files(), line_files(), ANY_BYTES), n_items=N_ITEMS)
@example(raw=b"1 1 2 3\n1 4 5 6\n", n_items=None)
@example(raw="\n\n1\t1\x0b2\u3000 3\r\n".encode(), n_items=None)
@example(raw="\ufeff1 1 2 3\r\n2 4 5 6\r\n".encode(), n_items=None)
@example(raw="\ufeff\ufeff1 1 2 3\n".encode(), n_items=None)
@example(raw="1 1 2 3\n\ufeff2 4 5 6\n".encode(), n_items=None)
@example(raw=b"5 1 2 3\n6 1 2 99999999999999999999\n", n_items=None)
def test_line_format_error_or_exact(raw, n_items):
    result = run_both(load_sequences, read_lines_oracle, raw, n_items, ".txt")
    if result is None:
        return
    (user_ids, seqs, n, n_skipped), d = result
    check_layout_and_split(d, n)
    assert d.user_ids.tolist() == user_ids and d.n_skipped == n_skipped
    assert [d.sequence(u).tolist() for u in range(len(d))] == seqs
    assert d.user_tokens is None and d.item_tokens is None


USER_TOKENS = ["1", "01", "u", "ü", "a b", "🙂", "user:1", "-1"]
ITEM_TOKENS = ["1", "2", "i", "ß", "x y", "3.0", "item\u2028"]
STAMPS = ["1", "2", "2", "3.5", "-7", "1e3", "0", "-0.0", " 4 ", "1_0", "١٢"]
BAD_STAMPS = ["nan", "inf", "-Infinity", "x", "", "1e999", "1,5", "--1"]


@st.composite
def inter_files(draw):
    """A .inter file: a typed header in random column order and rows, with a few random faults."""
    cols = ["user_id:token", "item_id:token"]
    if draw(st.integers(0, 3)):
        cols.append("timestamp:float")
    cols += draw(st.lists(st.sampled_from(["rating:float", "tags:token_seq", "w:float_seq"]),
                          max_size=2, unique=True))
    cols = draw(st.permutations(cols))
    fault = draw(st.sampled_from(["none"] * 6 + ["header", "row", "stamp", "both"]))
    if fault in ("header", "both"):
        j = draw(st.integers(0, len(cols) - 1))
        cols = list(cols)
        cols[j] = draw(st.sampled_from([
            "user_id", "item_id:int", ":token", "user_id:token", "item_id:float", "timestamp:token",
            "uid:token", " item_id : token ", "timestamp:float", "x:y:token"]))
    user_pool = draw(st.lists(st.sampled_from(USER_TOKENS), min_size=1, max_size=3, unique=True))
    rows = []
    for _ in range(draw(st.integers(1, 14))):
        row = {}
        for c in cols:
            name = c.rpartition(":")[0].strip()
            if name == "user_id":
                row[c] = draw(st.sampled_from(user_pool))
            elif name == "item_id":
                row[c] = draw(st.sampled_from(ITEM_TOKENS))
            elif name == "timestamp":
                row[c] = draw(st.sampled_from(STAMPS))
            else:
                row[c] = draw(st.sampled_from(["5", "", "a b", "1.5"]))
        values = [row[c] for c in cols]
        if fault in ("row", "both") and draw(st.integers(0, 4)) == 0:
            kind = draw(st.sampled_from(["drop", "extra", "empty", "junk", "spaces"]))
            if kind == "drop":
                values.pop(draw(st.integers(0, len(values) - 1)))
            elif kind == "extra":
                values.append(draw(st.text(max_size=3)))
            elif kind == "empty":
                values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from(["", " "]))
            elif kind == "junk":
                values = [draw(st.text(max_size=12))]
            else:
                values = [" ".join(values)]
        if fault == "stamp" and draw(st.integers(0, 4)) == 0:
            for j, c in enumerate(cols):
                if c.startswith("timestamp"):
                    values[j] = draw(st.sampled_from(BAD_STAMPS))
        rows.append("\t".join(values))
    for _ in range(draw(st.integers(0, 2))):
        rows.insert(draw(st.integers(0, len(rows))), draw(st.sampled_from(["", " ", "\t\t", "\r"])))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    bom = draw(st.sampled_from(["", "", "\ufeff"]))
    raw = bom + "\t".join(cols) + eol + eol.join(rows) + draw(st.sampled_from(["", eol]))
    return corrupt(draw, raw.encode("utf-8"))


@SETTINGS
@given(raw=st.one_of(inter_files(), inter_files(), ANY_BYTES), n_items=N_ITEMS)
@example(raw=b"user_id:token\titem_id:token\n\xef\xbb\xbfu\ta\n", n_items=None)
@example(raw="\ufeff\ufeffuser_id:token\titem_id:token\nu\ta\nu\tb\nu\tc\n".encode(), n_items=None)
@example(raw=b"item_id:token\tuser_id:token\ttimestamp:float\na\tu\t2\nb\tu\t1\nc\tu\t1\n",
         n_items=None)
@example(raw=b"user_id:token\titem_id:token\ttimestamp:float\nu\t1\tnan\nu\t1\t1\nu\t1\tx\n",
         n_items=None)  # the first bad timestamp in the file is named, whatever is wrong with it
def test_inter_error_or_exact(raw, n_items):
    result = run_both(load_inter, read_inter_oracle, raw, n_items, ".inter")
    if result is None:
        return
    (users, ids, seqs, item_tokens, n, n_skipped), d = result
    check_layout_and_split(d, n)
    assert d.user_tokens == users and d.user_ids.tolist() == ids and d.n_skipped == n_skipped
    assert d.item_tokens == item_tokens
    assert [[d.item_tokens[i - 1] for i in d.sequence(u).tolist()] for u in range(len(d))] == seqs


@settings(max_examples=60, deadline=None)
@given(raw=st.one_of(line_files(), inter_files()), inter=st.booleans())
def test_load_dataset_only_raises_data_error(raw, inter):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "f.inter" if inter else "f.txt")
        with open(path, "wb") as f:
            f.write(raw)
        try:
            d = load_dataset(path)
        except DataError as e:
            assert len(str(e).splitlines()) == 1 and str(e).startswith(path)
            return
        assert (d.user_tokens is not None) == inter
        check_layout_and_split(d, d.n_items)
