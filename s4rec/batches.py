"""Training batches: next-item pairs, the two augmented views, and the SR loss's negatives."""
from __future__ import annotations

import weakref
from typing import Dict, Optional

import numpy as np
import torch

from .augment import Augmenter, neighbours
from .config import Config, parse_ops
from .data import SequenceData, train_sequences
from .losses import Batch, needs_views
from .model import pack
from .negatives import sampler_log_q, shared_negatives, user_negatives


def training_pool(data: SequenceData) -> np.ndarray:
    """Every training interaction (the last two items of each user held out): draws by popularity."""
    keep = np.ones(len(data.items), dtype=bool)
    keep[data.offsets[1:] - 1] = False
    keep[data.offsets[1:] - 2] = False
    return data.items[keep]


def make_augmenter(cfg: Config, data: SequenceData, mask_id: int) -> Augmenter:
    """The views' augmenter: any operator for any sequence (--augment all), or by length
    (--augment length: --short-ops up to --short-len items, --long-ops above)."""
    ops = {"operators": ("crop", "mask", "reorder", "insert")}
    if cfg.augment == "length":
        ops = {"operators": parse_ops(cfg.long_ops), "short_ops": parse_ops(cfg.short_ops),
               "short_len": cfg.short_len}
    used = ops["operators"] + ops.get("short_ops", ())
    graph = None
    if "substitute" in used:
        graph = neighbours(train_sequences(data, np.arange(len(data))), data.n_items)
    return Augmenter(mask_id=mask_id, pool=training_pool(data), crop_ratio=cfg.crop_ratio,
                     mask_ratio=cfg.mask_ratio, reorder_ratio=cfg.reorder_ratio,
                     insert_ratio=cfg.insert_ratio, substitute_ratio=cfg.substitute_ratio,
                     graph=graph, **ops)


def window(seq: np.ndarray, size: int, how: str, rng: np.random.Generator) -> np.ndarray:
    """The part of a training sequence one step learns from: its last `size` items, or ("random")
    the `size` items ending at a uniformly drawn point, so long histories are seen in full."""
    if how == "last" or len(seq) <= size:
        return seq[-size:]
    end = int(rng.integers(size, len(seq) + 1))
    return seq[end - size:end]


_LOG_Q: Dict[tuple, torch.Tensor] = {}


def shared_log_q(n_items: int, sampler: str, pool: Optional[np.ndarray], device) -> torch.Tensor:
    """sampler_log_q as a float32 tensor on ``device``, computed once per training pool: a run's
    pool lives as long as its augmenter, and the entry is dropped when the pool is freed."""
    key = (id(pool), n_items, sampler, str(torch.device(device)))
    if key not in _LOG_Q:
        _LOG_Q[key] = torch.as_tensor(sampler_log_q(n_items, sampler, pool), dtype=torch.float32,
                                      device=device)
        if pool is not None:
            weakref.finalize(pool, _LOG_Q.pop, key, None)
    return _LOG_Q[key]


def make_batch(data: SequenceData, users: np.ndarray, head: np.ndarray, cfg: Config,
               augmenter: Augmenter, rng: np.random.Generator, device) -> Batch:
    """Next-item pairs S[:-3] -> S[1:-2] for each user, two augmented views of the inputs, and
    the negatives of a sampled SR loss (--sr-loss bce: one per target, outside the user's training
    items; sampled: --n-negatives shared by the batch). "ce" draws no negatives."""
    train = train_sequences(data, users)
    cut = [window(s, cfg.max_len + 1, cfg.train_window, rng) for s in train]
    inputs = [s[:-1] for s in cut]
    targets = [s[1:] for s in cut]
    negatives = user_negatives(train, targets, data.n_items, rng) if cfg.sr_loss == "bce" else None
    original = pack(inputs, cfg.max_len, cfg.max_pad, device, targets, negatives)
    shared = None
    if cfg.sr_loss == "sampled":
        ids = shared_negatives(cfg.n_negatives, data.n_items, rng, cfg.negative_sampler,
                               augmenter.pool)
        shared = (torch.as_tensor(ids, device=device),
                  shared_log_q(data.n_items, cfg.negative_sampler, augmenter.pool, device))
    view1 = view2 = None
    if needs_views(cfg):
        view1 = pack(augmenter.views(inputs, rng), cfg.max_len, cfg.max_pad, device)
        view2 = pack(augmenter.views(inputs, rng), cfg.max_len, cfg.max_pad, device)
    labels = torch.as_tensor(head[users].astype(np.int64), device=device)
    return Batch(original, view1, view2, labels, shared)
