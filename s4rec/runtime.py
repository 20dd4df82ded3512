"""A run's set-up: seeds, device, the data, and what is worth saying before training starts."""
from __future__ import annotations

import random
import sys
from typing import Dict

import numpy as np
import torch

from .config import Config, ConfigError
from .data import SequenceData, load_dataset, synthetic


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def synthetic_data(cfg: Config) -> SequenceData:
    """The embedded synthetic data set at the run's --synthetic-users and --synthetic-items."""
    return synthetic(n_users=cfg.synthetic_users, n_items=cfg.synthetic_items)


def load_data(cfg: Config) -> SequenceData:
    data = synthetic_data(cfg) if cfg.data is None else load_dataset(cfg.data, cfg.n_items)
    print(f"data {data.name}: {len(data)} users, {data.n_items} items, "
          f"{int(data.lengths.sum())} interactions")
    if data.n_skipped:
        print(f"skipped {data.n_skipped} users with fewer than 3 items (they cannot be split)")
    return data


def cluster_health(counts: np.ndarray) -> Dict[str, float]:
    """Entropy of cluster usage (ln K when even) and the number of prototypes nobody was assigned to."""
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    return {"cluster_entropy": float(-(nz * np.log(nz)).sum()), "empty_clusters": int((counts == 0).sum())}


def warn_clusters(cfg: Config, n_users: int) -> None:
    """A warning line when K exceeds the users of a batch or of the data set: the equipartition
    target spreads each batch over K prototypes, so the rest stay empty."""
    if cfg.alpha <= 0 and cfg.beta1 <= 0 and cfg.beta2 <= 0:
        return  # no term uses the prototypes
    batch = min(cfg.batch_size, n_users)
    if cfg.n_clusters > batch:
        where = (f"the {n_users} trainable users of the data set" if n_users <= cfg.batch_size
                 else f"the {batch} users of a batch (--batch-size)")
        print(f"warning: --n-clusters {cfg.n_clusters} exceeds {where}: at least "
              f"{cfg.n_clusters - batch} prototypes get no user in every step", file=sys.stderr,
              flush=True)
