"""Data files: the ICLRec line format, RecBole's atomic .inter files, and the token mapping."""

from __future__ import annotations

import json
import math
import os
import re
from typing import List, Optional, Tuple

import numpy as np

from .sequences import MAX_ITEM_ID, MIN_LEN, DataError, SequenceData

_INT_TOKEN = re.compile(r"[+-]?[0-9]+")
_ODD_CHAR = re.compile(r"[^0-9 \t\r\n\f\v+-]")


# ----------------------------------------------------------------------------------------------
# the line format


def load_sequences(path, n_items: Optional[int] = None) -> SequenceData:
    """Read the line format ``user_id item_id item_id ...`` (whitespace separated, time order).

    UTF-8 text; a leading byte-order mark is dropped and lines may end in CRLF.
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
    columns = _inter_header(path, lines[0])
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
    """The file as UTF-8 text without a leading byte-order mark (one, as Windows tools write);
    an empty file, bytes that are not UTF-8 and NUL raise DataError naming the line."""
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
    return text.removeprefix("\ufeff")


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
