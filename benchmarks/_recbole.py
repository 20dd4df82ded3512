"""RecBole's SASRec with the CE loss as a training-step provider for bench_train.

RecBole (https://recbole.io, 1.2.x) is an optional benchmark dependency: nothing here imports it
until `unavailable()` or `time_steps` is called, and `unavailable()` says why it cannot be used.

The comparison is set up as RecBole users run SASRec: its own Config, dataset, split and
dataloader, built through the public API from the same interactions our loader read (written as
an atomic `.inter` file with timestamp = position in the user's sequence), with our settings where
both have one. Everything RecBole writes goes to a temporary folder that is removed afterwards.

RecBole 1.2.1 predates numpy 2 and changes process-wide state; `_recbole_env` makes it run here
and puts everything back when it is done:
- `Config.compatibility_settings` assigns `np.float = np.float_` (and `np.complex_`,
  `np.unicode_`), names numpy 2 removed: they are provided for the duration, then removed again
  together with the aliases RecBole adds (`np.float`, `np.int`, `np.object`, ...).
- Importing `recbole.model.sequential_recommender` (which any SASRec import does) runs
  `torch.autograd.set_detect_anomaly(True)` in its `sine.py`, which makes every backward pass
  in the process check its outputs (a SASRec training step took twice as long on a CPU). The previous
  setting is restored right after the import, so neither RecBole's timed steps nor ours pay it.
- `Config` reads `--key=value` pairs from `sys.argv` (hidden while it runs), writes
  `CUDA_VISIBLE_DEVICES` (restored), and `init_seed` sets cuDNN flags (restored).
- RecBole logs to the root logger and pandas 3 warns about its in-place `fillna`; both are quiet
  while RecBole runs. The working directory is the temporary folder, so relative paths it may
  write to (`saved/`, `log/`) land there.
No checkpoint is loaded, so `torch.load`'s `weights_only` default does not come into play.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, Iterator, Optional

import numpy as np
import torch

from s4rec.config import Config as S4Config
from s4rec.data import SequenceData

from ._harness import peak_extra_mb

PROVIDER = "RecBole SASRec (CE)"
# aliases numpy 2 removed that RecBole 1.2.1's Config.compatibility_settings reads
_NUMPY_REMOVED = {"float_": "float64", "complex_": "complex128", "unicode_": "str_"}
# aliases that compatibility_settings then assigns
_NUMPY_ASSIGNED = ("bool", "int", "float", "complex", "object", "str", "long", "unicode")


@contextlib.contextmanager
def _recbole_env(workdir: Path) -> Iterator[None]:
    """Let RecBole 1.2.1 run in this process; undo what it changes globally (module docstring)."""
    np_dict = vars(np)
    saved_np = {name: np_dict[name] for name in (*_NUMPY_REMOVED, *_NUMPY_ASSIGNED)
                if name in np_dict}
    anomaly = (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled())
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    argv, cwd = sys.argv, os.getcwd()
    log_disabled = logging.root.manager.disable
    for old, new in _NUMPY_REMOVED.items():
        if old not in np_dict:
            setattr(np, old, getattr(np, new))
    sys.argv = argv[:1]
    os.chdir(workdir)
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(log_disabled)
        os.chdir(cwd)
        sys.argv = argv
        if cuda_visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        torch.autograd.set_detect_anomaly(*anomaly)
        for name in (*_NUMPY_REMOVED, *_NUMPY_ASSIGNED):
            if name in saved_np:
                setattr(np, name, saved_np[name])
            elif name in np_dict:
                delattr(np, name)


def unavailable() -> Optional[str]:
    """None when RecBole's SASRec can be timed here, else one line saying why not."""
    anomaly = (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled())
    try:
        import recbole
        import recbole.config  # noqa: F401
        import recbole.data  # noqa: F401
        import recbole.model.sequential_recommender  # noqa: F401
    except ImportError as err:  # not installed, or installed without what its imports need
        return f"recbole is not importable ({err})"
    finally:
        torch.autograd.set_detect_anomaly(*anomaly)
    if not recbole.__version__.startswith("1."):
        return f"recbole {recbole.__version__} is untested here (1.2.x expected)"
    return None


def write_inter(data: SequenceData, folder: Path, name: str) -> Path:
    """Write every user's sequence as RecBole's atomic `<folder>/<name>/<name>.inter` file.

    One row per interaction: the user's row index as its token, the item id as its token, and the
    item's position in the sequence as the timestamp, so RecBole's time order is the file's.
    """
    lengths = np.diff(data.offsets)
    users = np.repeat(np.arange(len(lengths)), lengths)
    positions = np.arange(len(data.items)) - np.repeat(data.offsets[:-1], lengths)
    path = Path(folder) / name / f"{name}.inter"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = np.stack([users, data.items.astype(np.int64), positions], axis=1)
    with open(path, "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        np.savetxt(f, rows, fmt="%d", delimiter="\t")
    return path


def settings(cfg: S4Config, device: torch.device, seed: int = 0) -> Dict:
    """RecBole's config_dict for SASRec at our settings (hidden, layers, heads, dropout, ...)."""
    return {
        # data: the atomic file's columns, sequences cut to max_len, leave-one-out by time
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": cfg.max_len,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
                      "mode": "full"},
        # model: SASRec as ours (the feed-forward is 4 d wide, GELU, LayerNorm eps 1e-12)
        "hidden_size": cfg.hidden, "inner_size": 4 * cfg.hidden, "n_layers": cfg.layers,
        "n_heads": cfg.heads, "hidden_dropout_prob": cfg.dropout, "attn_dropout_prob": cfg.dropout,
        "hidden_act": "gelu", "layer_norm_eps": 1e-12, "initializer_range": 0.02,
        "loss_type": "CE", "train_neg_sample_args": None,
        # training
        "train_batch_size": cfg.batch_size, "learning_rate": cfg.lr,
        "weight_decay": cfg.weight_decay, "learner": "adam", "shuffle": True,
        # environment
        "seed": seed, "reproducibility": True, "worker": 0, "show_progress": False,
        "state": "ERROR", "use_gpu": device.type == "cuda",
        "gpu_id": str(device.index or 0) if device.type == "cuda" else "",
        "save_dataset": False, "save_dataloaders": False, "log_wandb": False,
    }


def _dataset_name(data: SequenceData) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", data.name) or "data"


def time_steps(data: SequenceData, cfg: S4Config, steps: int, warmup: int, device: torch.device,
               seed: int = 0) -> Dict:
    """Median seconds of one RecBole SASRec training step, after `warmup` untimed steps.

    A step is what RecBole's trainer does per batch: take the next batch from its training
    dataloader, move it to the device, `calculate_loss`, backward, Adam step. Its epoch is one pass
    over its training samples, one per prefix of every user's training sequence.
    """
    with tempfile.TemporaryDirectory(prefix="s4rec-recbole-") as tmp, _recbole_env(Path(tmp)):
        t0 = time.perf_counter()
        from recbole.config import Config
        from recbole.data import create_dataset, data_preparation
        from recbole.model.sequential_recommender import SASRec
        from recbole.utils import init_seed

        torch.autograd.set_detect_anomaly(False)  # sine.py turned it on at import
        name = _dataset_name(data)
        write_inter(data, Path(tmp), name)
        config_dict = {**settings(cfg, device, seed), "data_path": tmp,
                       "checkpoint_dir": str(Path(tmp) / "saved")}
        config = Config(model="SASRec", dataset=name, config_dict=config_dict)
        torch.autograd.set_detect_anomaly(False)
        init_seed(config["seed"], config["reproducibility"])
        dataset = create_dataset(config)
        train_data, _, _ = data_preparation(config, dataset)
        init_seed(config["seed"], config["reproducibility"])
        model = SASRec(config, train_data.dataset).to(device)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"],
                                     weight_decay=config["weight_decay"])
        setup_s = time.perf_counter() - t0
        batches = iter(train_data)
        max_len = config["MAX_ITEM_LIST_LENGTH"]

        def step():
            nonlocal batches
            try:
                interaction = next(batches)
            except StopIteration:
                batches = iter(train_data)
                interaction = next(batches)
            interaction = interaction.to(device)
            loss = model.calculate_loss(interaction)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            lengths = interaction[model.ITEM_SEQ_LEN]
            return len(lengths), float(lengths.sum()) / (len(lengths) * max_len)

        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        warm_s = time.perf_counter() - t0
        samples, sizes, filled = [], [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            size, fill = step()
            samples.append(time.perf_counter() - t0)
            sizes.append(size)
            filled.append(fill)
        peak = peak_extra_mb(step, device)
        n_samples = len(train_data.dataset)
        per_epoch = len(train_data)
    median = float(np.median(samples))
    batch = float(np.mean(sizes))
    return {"s_per_step": median, "p20_s": float(np.percentile(samples, 20)),
            "p80_s": float(np.percentile(samples, 80)), "steps_per_epoch": per_epoch,
            "s_per_epoch": median * per_epoch, "users_per_s": batch / median,
            "targets_per_s": batch / median, "warmup_s": warm_s, "peak_mb": peak,
            "padding_share": 1.0 - float(np.mean(filled)), "setup_s": setup_s,
            "train_samples": n_samples}
