"""User item sequences: loading, a synthetic data set, the leave-one-out split and batching helpers.

All users' items live in one flat int32 array with int64 offsets (CSR layout), so ml-1m's million
interactions take 4 MB and every per-user sequence is a view. Users are addressed by their row
index ``u`` in ``0..len(data)-1``; ``data.user_ids[u]`` is the id written in the file.

Two file formats: the ICLRec line format (:func:`load_sequences`) and RecBole's atomic ``.inter``
files (:func:`load_inter`, whose original user and item tokens are kept for printing);
:func:`load_dataset` picks one by the file's suffix.

Leave-one-out (SPEC section 1), for a user sequence ``S`` of length ``n >= 3``::

    split     input      target
    train     S[:-2]     (the trainer makes S[:-3] -> S[1:-2])
    valid     S[:-2]     S[-2]
    test      S[:-1]     S[-1]
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

MIN_LEN = 3  # shortest sequence with a training item, a validation target and a test target
MAX_ITEM_ID = 2**31 - 1  # item ids are stored as int32
_SPLITS = ("valid", "test")
_INT_TOKEN = re.compile(r"[+-]?[0-9]+")
_ODD_CHAR = re.compile(r"[^0-9 \t\r\n\f\v+-]")


class DataError(ValueError):
    """An unusable data file; the one-line message names the file and, if it applies, the line."""


@dataclass
class SequenceData:
    items: np.ndarray  # (n_interactions,) int32: every user's items concatenated, time order
    offsets: np.ndarray  # (n_users + 1,) int64: user u's sequence is items[offsets[u]:offsets[u+1]]
    user_ids: np.ndarray  # (n_users,) int64: the ids as written in the file (.inter: 1, 2, ...)
    n_items: int  # item ids are 1..n_items; 0 is padding
    name: str  # e.g. "Beauty" or "synthetic"
    n_skipped: int = 0  # users dropped for having fewer than 3 items
    user_tokens: Optional[List[str]] = None  # original user token of each user row; None: user_ids
    item_tokens: Optional[List[str]] = None  # item_tokens[i - 1] = original token of item id i

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def lengths(self) -> np.ndarray:
        """(n_users,) int64 sequence lengths."""
        return np.diff(self.offsets)

    def sequence(self, u: int) -> np.ndarray:
        """User row ``u``'s full item sequence, a view into ``items``."""
        return self.items[self.offsets[u] : self.offsets[u + 1]]

    def __repr__(self) -> str:
        return (
            f"SequenceData(name={self.name!r}, users={len(self)}, n_items={self.n_items}, "
            f"interactions={len(self.items)}, n_skipped={self.n_skipped})"
        )


# ----------------------------------------------------------------------------------------------
# loading


def load_sequences(path, n_items: Optional[int] = None) -> SequenceData:
    """Read the line format ``user_id item_id item_id ...`` (whitespace separated, time order).

    Item ids start at 1 (0 is padding). Blank lines are ignored. Users with fewer than 3 items
    (a line with only a user id has 0) are skipped and counted in ``n_skipped``. ``n_items``
    defaults to the largest item id in the file (skipped users included); when given, every id
    must be <= n_items. Any problem raises :class:`DataError` with a one-line message naming the
    file and the 1-based line: for a file with several problems, the first token that is not an
    integer is reported, else the first out-of-range id, else the first duplicated user id.
    """
    path = os.fspath(path)
    name = os.path.splitext(os.path.basename(path))[0]
    n_items = _check_n_items(path, n_items)

    text = _read_text(path)
    lines = text.split("\n")
    tokens: list[str] = []
    counts = np.empty(len(lines), dtype=np.int64)  # tokens per line, blank lines included
    for i, line in enumerate(lines):
        toks = line.split()
        tokens.extend(toks)
        counts[i] = len(toks)
    del lines
    if not tokens:
        raise DataError(f"{path}: no users (only blank lines)")

    if _ODD_CHAR.search(text) is not None:
        _raise_first_bad_token(path, text)  # returns if only unusual whitespace was found
    del text
    try:
        values = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        _raise_first_bad_token(path, "\n".join(_lines_of(tokens, counts)))
        raise DataError(f"{path}: could not parse the file as integers") from None
    del tokens

    line_no = np.flatnonzero(counts) + 1  # (n_lines_with_data,) 1-based line numbers
    lens = counts[counts > 0]  # tokens per non-blank line: user id + items
    starts = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=starts[1:])
    user_ids = values[starts[:-1]]
    is_item = np.ones(len(values), dtype=bool)
    is_item[starts[:-1]] = False
    item_values = values[is_item]
    item_line = np.repeat(line_no, lens - 1)  # line of every item token

    _check_range(path, item_values, item_line, n_items)
    _check_duplicates(path, user_ids, line_no)

    n_seen = int(item_values.max()) if len(item_values) else 0
    if n_items is None:
        n_items = n_seen
    keep = (lens - 1) >= MIN_LEN
    n_skipped = int((~keep).sum())
    if not keep.any():
        raise DataError(
            f"{path}: all {len(lens)} users have fewer than {MIN_LEN} items, nothing to train on"
        )
    keep_item = np.repeat(keep, lens - 1)
    items = item_values[keep_item].astype(np.int32)
    offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(lens[keep] - 1, out=offsets[1:])
    return SequenceData(
        items=items,
        offsets=offsets,
        user_ids=np.ascontiguousarray(user_ids[keep]),
        n_items=int(n_items),
        name=name,
        n_skipped=n_skipped,
    )


def _check_n_items(path: str, n_items) -> Optional[int]:
    if n_items is None:
        return None
    if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)):
        raise DataError(f"{path}: n_items must be an integer, got {n_items!r}")
    if not 1 <= n_items <= MAX_ITEM_ID:
        raise DataError(f"{path}: n_items must be in 1..{MAX_ITEM_ID}, got {n_items}")
    return int(n_items)


def _read_bytes(path: str) -> bytes:
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a data file")
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _lines_of(tokens: list[str], counts: np.ndarray):
    """Rebuild the file's lines (tokens joined by one space) in order, blank lines included."""
    pos = 0
    for c in counts.tolist():
        yield " ".join(tokens[pos : pos + c])
        pos += c


def _raise_first_bad_token(path: str, text: str) -> None:
    """Raise DataError for the first token that is not a decimal integer in int64 range."""
    for i, line in enumerate(text.split("\n"), start=1):
        for tok in line.split():
            if _INT_TOKEN.fullmatch(tok) is None:
                raise DataError(f"{path} line {i}: {tok!r} is not an integer")
            if not -(2**63) <= int(tok) < 2**63:
                raise DataError(f"{path} line {i}: {tok} is out of range for an id")


def _check_range(path: str, item_values: np.ndarray, item_line: np.ndarray, n_items) -> None:
    limit = MAX_ITEM_ID if n_items is None else n_items
    bad = np.flatnonzero((item_values < 1) | (item_values > limit))
    if len(bad) == 0:
        return
    v, line = int(item_values[bad[0]]), int(item_line[bad[0]])
    if v < 1:
        raise DataError(f"{path} line {line}: item id {v} is smaller than 1 (0 is padding)")
    if n_items is not None and v > n_items:
        raise DataError(f"{path} line {line}: item id {v} is larger than n_items={n_items}")
    raise DataError(f"{path} line {line}: item id {v} is larger than {MAX_ITEM_ID} (int32)")


def _check_duplicates(path: str, user_ids: np.ndarray, line_no: np.ndarray) -> None:
    order = np.argsort(user_ids, kind="stable")
    sorted_ids = user_ids[order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if len(dup) == 0:
        return
    # report the duplicate that appears first in the file, and its earliest earlier line
    second = order[dup + 1]
    k = int(np.argmin(second))
    uid = int(sorted_ids[dup[k] + 1])
    first = int(order[np.searchsorted(sorted_ids, uid)])
    raise DataError(
        f"{path} line {int(line_no[second[k]])}: user id {uid} already appeared "
        f"on line {int(line_no[first])}"
    )


# ----------------------------------------------------------------------------------------------
# RecBole atomic files (.inter), choosing a loader, and the token mapping

INTER_TYPES = ("token", "token_seq", "float", "float_seq")  # RecBole's field types
_INTER_FIELDS = (("user_id", "token"), ("item_id", "token"), ("timestamp", "float"))
_INTER_EXAMPLE = "user_id:token<TAB>item_id:token<TAB>timestamp:float"
MAPPING_FILE = "mapping.json"


def load_inter(path, n_items: Optional[int] = None) -> SequenceData:
    """Read a RecBole atomic interaction file: tab-separated UTF-8 text with a typed header.

    The first line names every column as ``name:type`` (type one of token, token_seq, float,
    float_seq), e.g. ``user_id:token  item_id:token  rating:float  timestamp:float``, in any order.
    ``user_id:token`` and ``item_id:token`` are required; ``timestamp:float`` is optional; other
    columns are carried along unread. Every later line is one interaction with exactly as many
    tab-separated values as the header has columns; a value's surrounding whitespace is ignored
    (so CRLF line ends work), lines holding only whitespace are skipped, a leading byte-order mark
    is dropped. A timestamp is a finite number as Python's ``float`` reads it.

    Sequences: each user's interactions sorted by timestamp; ties, and every interaction when there
    is no timestamp column, keep their order in the file.
    Ids: users are numbered 1, 2, ... by their first line in the file (``user_ids``); items are
    numbered 1..n by first appearance when the sorted sequences are read one after the other, users
    in that same order. A line-format file whose items were themselves numbered by first appearance
    (Beauty.txt, ml-1m.txt) therefore keeps its item ids when written out as ``.inter``.
    The original tokens are kept: ``user_tokens[u]`` for user row ``u``, ``item_tokens[i - 1]`` for
    item id ``i``. Users with fewer than 3 interactions are skipped and counted in ``n_skipped``;
    their items are numbered all the same, as the line format counts their ids in ``n_items``.
    ``n_items`` defaults to the number of distinct items; a larger value adds ids without a token.

    Any problem raises :class:`DataError` with a one-line message naming the file and the 1-based
    line: the first malformed line in the file is reported, and timestamps are checked after the
    columns of every line.
    """
    path = os.fspath(path)
    name = os.path.splitext(os.path.basename(path))[0]
    n_items = _check_n_items(path, n_items)
    lines = _read_text(path).split("\n")
    columns = _inter_header(path, lines[0].removeprefix("\ufeff"))
    n_cols = len(columns)
    u_col, i_col = columns.index("user_id"), columns.index("item_id")
    t_col = columns.index("timestamp") if "timestamp" in columns else None

    users: List[str] = []
    items: List[str] = []
    stamps: List[str] = []
    line_no: List[int] = []
    for no in range(1, len(lines)):
        line = lines[no]
        if not line or line.isspace():
            continue
        values = line.split("\t")
        if len(values) != n_cols:
            raise DataError(f"{path} line {no + 1}: {len(values)} tab-separated values, "
                            f"the header has {n_cols} columns")
        user, item = values[u_col].strip(), values[i_col].strip()
        if not user or not item:
            field = "user_id" if not user else "item_id"
            raise DataError(f"{path} line {no + 1}: empty {field}")
        users.append(user)
        items.append(item)
        if t_col is not None:
            stamps.append(values[t_col].strip())
        line_no.append(no + 1)
    del lines
    if not users:
        raise DataError(f"{path}: no interactions, only the header")

    user_index: dict = {}
    user_of = np.fromiter((user_index.setdefault(u, len(user_index)) for u in users),
                          dtype=np.int64, count=len(users))  # (n,) user number of each line
    del users
    if t_col is None:
        order = np.argsort(user_of, kind="stable")
    else:
        times = _parse_timestamps(path, stamps, line_no)
        order = np.argsort(times, kind="stable")
        order = order[np.argsort(user_of[order], kind="stable")]  # by user, then time, then line
    item_index: dict = {}
    ids = np.fromiter(  # (n,) item ids, in sorted order
        (item_index.setdefault(items[j], len(item_index) + 1) for j in order.tolist()),
        dtype=np.int64, count=len(order))
    del items
    if n_items is None:
        n_items = len(item_index)
    elif len(item_index) > n_items:
        raise DataError(f"{path}: {len(item_index)} distinct items, more than n_items={n_items}")

    lens = np.bincount(user_of, minlength=len(user_index))  # (n_users_in_file,)
    keep = lens >= MIN_LEN
    if not keep.any():
        raise DataError(
            f"{path}: all {len(lens)} users have fewer than {MIN_LEN} items, nothing to train on"
        )
    offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(lens[keep], out=offsets[1:])
    user_tokens = [tok for tok, k in zip(user_index, keep.tolist()) if k]
    return SequenceData(
        items=ids[keep[user_of[order]]].astype(np.int32),
        offsets=offsets,
        user_ids=np.flatnonzero(keep).astype(np.int64) + 1,
        n_items=int(n_items),
        name=name,
        n_skipped=int((~keep).sum()),
        user_tokens=user_tokens,
        item_tokens=list(item_index),
    )


def _read_text(path: str) -> str:
    raw = _read_bytes(path)
    if not raw:
        raise DataError(f"{path}: file is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte {raw[e.start]:#04x})") from None
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise DataError(f"{path} line {line}: NUL byte (a binary file?)")
    return text


def _inter_header(path: str, line: str) -> List[str]:
    """The field names of the header line, after checking it; raises DataError."""
    if not line.strip():
        raise DataError(f"{path} line 1: expected a typed header such as {_INTER_EXAMPLE}, "
                        "got a blank line")
    names: List[str] = []
    types: List[str] = []
    for j, field in enumerate(line.split("\t"), start=1):
        field = field.strip()
        name, colon, kind = field.rpartition(":")
        name = name.strip()
        if not colon or not name:
            raise DataError(f"{path} line 1: header column {j} is {field!r}, expected name:type "
                            f"as in {_INTER_EXAMPLE}")
        if kind.strip() not in INTER_TYPES:
            raise DataError(f"{path} line 1: header column {j} {field!r} has type {kind!r}, "
                            f"expected one of {', '.join(INTER_TYPES)}")
        if name in names:
            raise DataError(f"{path} line 1: header column {j} repeats the field {name!r}")
        names.append(name)
        types.append(kind.strip())
    for name, kind in _INTER_FIELDS:
        if name not in names:
            if name == "timestamp":
                continue
            found = ", ".join(repr(n) for n in names)
            raise DataError(f"{path} line 1: the header has no {name} column (it has {found}); "
                            f"expected e.g. {_INTER_EXAMPLE}")
        got = types[names.index(name)]
        if got != kind:
            raise DataError(f"{path} line 1: {name} must be of type {kind}, got {name}:{got}")
    return names


def _parse_timestamps(path: str, stamps: List[str], line_no: List[int]) -> np.ndarray:
    """(n,) float64 timestamps; the first one (in file order) that is not a finite number raises."""
    try:
        times = np.array([float(t) for t in stamps], dtype=np.float64)
        if np.isfinite(times).all():
            return times
    except ValueError:
        pass
    values = []  # the slow way, to name the first bad one
    for t, no in zip(stamps, line_no):
        try:
            value = float(t)
        except ValueError:
            raise DataError(f"{path} line {no}: timestamp {t!r} is not a number") from None
        if not math.isfinite(value):
            raise DataError(f"{path} line {no}: timestamp {t!r} is not a finite number")
        values.append(value)
    return np.array(values, dtype=np.float64)


def load_dataset(path, n_items: Optional[int] = None) -> SequenceData:
    """Load a data file by its suffix: ``.inter`` (any case) -> :func:`load_inter`, else the line
    format (:func:`load_sequences`)."""
    if os.fspath(path).lower().endswith(".inter"):
        return load_inter(path, n_items)
    return load_sequences(path, n_items)


def save_mapping(data: SequenceData, path) -> Optional[str]:
    """Write the original tokens as JSON ``{"users": [...], "items": [...]}`` (``users[u]`` for
    user row ``u``, ``items[i - 1]`` for item id ``i``; a list is null when the data has none).

    ``path`` is the file, or a folder to write ``mapping.json`` in. The file is written through a
    temporary file and a rename. Data without tokens (the line format, whose ids are their own
    tokens) writes nothing. Returns the path written, or None.
    """
    if data.user_tokens is None and data.item_tokens is None:
        return None
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MAPPING_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"users": data.user_tokens, "items": data.item_tokens}, f)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_mapping(path) -> Tuple[Optional[List[str]], Optional[List[str]]]:
    """(user tokens, item tokens) from a file written by :func:`save_mapping`.

    ``path`` is the file or the folder holding ``mapping.json``. A missing file gives
    ``(None, None)``, a missing or null list gives None; anything else malformed raises DataError.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MAPPING_FILE)
    if not os.path.exists(path):
        return None, None
    try:
        obj = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object with \"users\" and \"items\" lists")
    out = []
    for key in ("users", "items"):
        tokens = obj.get(key)
        if tokens is not None and (
            not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens)
        ):
            raise DataError(f"{path}: \"{key}\" must be a list of strings or null")
        out.append(tokens)
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------
# synthetic data with planted intents


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

    lengths = np.minimum(5 + np.floor(rng.lognormal(1.4, 1.0, n_users)).astype(np.int64), 60)
    intents = rng.choice(n_intents, size=n_users, p=intent_p)
    items = np.empty(int(lengths.sum()), dtype=np.int32)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    pos = 0
    for u in range(n_users):
        cycle = groups[intents[u]]
        m = len(cycle)
        within_p = _zipf(m, 1.0)
        seen: set[int] = set()
        r = int(rng.choice(m, p=within_p))
        moves = rng.random(lengths[u])
        for t in range(lengths[u]):
            if t == 0:
                step = 0
            elif moves[t] < 0.70:
                step = 1
            elif moves[t] < 0.80:
                step = 2
            elif moves[t] < 0.90:
                r = int(rng.choice(m, p=within_p))
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
                item = _noise_item(rng, global_p, seen)
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


def _noise_item(rng: np.random.Generator, p: np.ndarray, seen: set) -> int:
    """An item by popularity ``p`` that is not in ``seen``; repeats only once every item is seen."""
    for _ in range(64):
        item = int(rng.choice(len(p), p=p))
        if item not in seen:
            return item
    unseen = np.setdiff1d(np.flatnonzero(p), np.fromiter(seen, dtype=np.int64, count=len(seen)))
    if len(unseen):
        return int(rng.choice(unseen))
    return int(rng.choice(len(p), p=p))


def _zipf(n: int, a: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** a
    return w / w.sum()


# ----------------------------------------------------------------------------------------------
# leave-one-out split


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


# ----------------------------------------------------------------------------------------------
# batching


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
