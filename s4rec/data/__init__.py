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

Modules: ``sequences`` (:class:`SequenceData`, :class:`DataError`), ``formats`` (both file formats
and the token mapping), ``synthetic``, ``split`` (leave-one-out, head users, histories) and
``batching`` (padding, length buckets). Every name is importable from ``s4rec.data``.
"""

from .batching import bucketize, pad_left
from .formats import (INTER_TYPES, MAPPING_FILE, load_dataset, load_inter, load_mapping,
                      load_sequences, save_mapping)
from .sequences import MAX_ITEM_ID, MIN_LEN, DataError, SequenceData
from .split import head_users, history_csr, split_input, split_target, train_sequences
from .synthetic import synthetic

__all__ = [
    "MIN_LEN", "MAX_ITEM_ID", "DataError", "SequenceData",
    "INTER_TYPES", "MAPPING_FILE", "load_sequences", "load_inter", "load_dataset", "save_mapping",
    "load_mapping",
    "synthetic",
    "split_input", "split_target", "train_sequences", "head_users", "history_csr",
    "pad_left", "bucketize",
]
