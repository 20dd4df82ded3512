"""SequenceData (every user's item sequence in one CSR layout) and DataError, for bad data files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

MIN_LEN = 3  # shortest sequence with a training item, a validation target and a test target
MAX_ITEM_ID = 2**31 - 1  # item ids are stored as int32


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
