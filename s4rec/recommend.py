"""Top-k unseen items per user from a trained run:

    python -m s4rec.recommend --run RUN_DIR [--data PATH] (--users 1,2,3 | --all) [--k 10]
                              [--out recs.csv] [--batch-size 1024] [--device auto]
                              [--precision auto|bf16|tf32|fp32]

The model is the run's best.pt, built with the run's config.json. Each requested user's whole
sequence (every item, cut to the last max_len: the next item after everything seen) is encoded,
every item of the user's history is excluded, and `item_topk` returns the k best of the rest.
Users are given and printed by their original ids or tokens, and so are items: the run's
mapping.json when it has one, else the data file's own (a .inter file's tokens, the line
format's ids). Output is a table (user, rank, item, score) on stdout, or CSV with --out.
`--precision` (default: the run's own) encodes and scores as the trainer does: bf16 autocast, tf32
or fp32. Problems (unknown user, missing run files, data that does not fit the checkpoint) end with
one line `error: ...` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from s4rec_kernels import item_topk
from s4rec_kernels._dispatch import logits_budget

from .checkpoint import first_line
from .config import Config
from .data import MAPPING_FILE, DataError, SequenceData, load_dataset, load_mapping
from .model import S4Rec, pack
from .precision import PRECISIONS, autocast, op_inputs, resolve, settings
from .runtime import synthetic_data

_INT = re.compile(r"[+-]?[0-9]+")


class RecommendError(ValueError):
    """A run or request that cannot be served; the one-line message says what was wrong."""


# ----------------------------------------------------------------------------------------------
# loading a run


def load_run(run_dir, device="cpu") -> Tuple[S4Rec, Config]:
    """The model of ``run_dir/best.pt`` (in eval mode, on ``device``) and the run's config."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RecommendError(f"{run}: no such run directory")
    best = run / "best.pt"
    if not best.is_file():
        raise RecommendError(f"{run}: no best.pt (the run has not finished an evaluated epoch)")
    try:
        ckpt = torch.load(best, map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise RecommendError(f"{best}: cannot read the checkpoint ({first_line(e)})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise RecommendError(f"{best}: not a checkpoint of s4rec.train (no model state)")
    state = ckpt["model"]
    cfg = _read_config(run, ckpt)
    if "encoder.item_emb.weight" not in state:
        raise RecommendError(f"{best}: not an S4Rec state (no encoder.item_emb.weight)")
    n_items = state["encoder.item_emb.weight"].shape[0] - 2  # rows: padding, items, mask token
    model = S4Rec.from_config(n_items, cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise RecommendError(f"{best} does not fit the run's config ({first_line(e)})") from None
    return model.to(device).eval(), cfg


def _read_config(run: Path, ckpt: dict) -> Config:
    """config.json of the run, else the copy inside the checkpoint."""
    path = run / "config.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecommendError(f"{path}: not valid JSON ({first_line(e)})") from None
    elif isinstance(ckpt.get("config"), dict):
        saved = ckpt["config"]
    else:
        raise RecommendError(f"{run}: no config.json")
    if not isinstance(saved, dict):
        raise RecommendError(f"{path}: expected a JSON object of settings")
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in saved.items() if k in known})


def run_precision(asked: str, device, run_dir, note_to=None) -> str:
    """The precision a command runs a saved run at (--precision, else the run's own), resolved for
    ``device``; its note, if any, goes to ``note_to`` (stdout by default). A bad value in the run's
    config.json is a RecommendError."""
    try:
        prec, note = resolve(asked, torch.device(device))
    except ValueError as err:
        raise RecommendError(f"{run_dir}: {err}") from None
    if note:
        print(note, file=note_to)
    return prec


def run_data(model: S4Rec, cfg: Config, run_dir, path: Optional[str] = None) -> Tuple[SequenceData, str]:
    """(data, its name): the file at `path`, else the run's own data (config.json's --data, or the
    embedded synthetic set, which is generated the same way every time). It must have the
    model's catalogue."""
    path = path if path is not None else cfg.data
    data = synthetic_data(cfg) if path is None else load_dataset(path, cfg.n_items)
    name = data.name if path is None else os.path.basename(path)
    if data.n_items != model.encoder.n_items:
        raise RecommendError(f"{name} has {data.n_items} items but the model in {run_dir} "
                             f"was trained on {model.encoder.n_items}")
    return data, name


# ----------------------------------------------------------------------------------------------
# original ids


def labels(data: SequenceData, run_dir=None) -> Tuple[List[str], np.ndarray, bool]:
    """(user label of each user row, item label of each item id as an object array ([0] unused),
    whether the user labels are the integer ids of the line format).

    Labels come from ``run_dir/mapping.json`` when it exists, else from the data's tokens, else
    they are the ids written in the file. Item ids past the mapping's end print as numbers.
    """
    users, items = load_mapping(run_dir) if run_dir is not None else (None, None)
    where = os.path.join(str(run_dir), MAPPING_FILE)
    if users is not None and len(users) != len(data):
        raise RecommendError(f"{where} lists {len(users)} users, the data has {len(data)}: "
                             "not the data of this run")
    if items is not None and len(items) > data.n_items:
        raise RecommendError(f"{where} lists {len(items)} items, the data has {data.n_items}: "
                             "not the data of this run")
    users = users if users is not None else data.user_tokens
    items = items if items is not None else data.item_tokens
    numeric = users is None
    if numeric:
        users = [str(u) for u in data.user_ids.tolist()]
    items = list(items) if items is not None else []
    table = np.empty(data.n_items + 1, dtype=object)
    table[0] = ""
    table[1:len(items) + 1] = items
    table[len(items) + 1:] = [str(i) for i in range(len(items) + 1, data.n_items + 1)]
    return users, table, numeric


def find_users(wanted: Sequence[str], user_labels: List[str], numeric: bool,
               data_name: str, n_skipped: int = 0) -> np.ndarray:
    """Rows of the users given by their original ids/tokens; an unknown one raises."""
    if numeric:  # ids of the line format: "007" and "+7" name user 7
        wanted = [str(int(w)) if _INT.fullmatch(w) else w for w in wanted]
    row_of: Dict[str, int] = {}
    for u, label in enumerate(user_labels):
        row_of.setdefault(label, u)
    missing = [w for w in wanted if w not in row_of]
    if missing:
        shown = ", ".join(missing[:5])
        if len(missing) > 5:
            shown += f" and {len(missing) - 5} more"
        subject = f"user {shown} is" if len(missing) == 1 else f"users {shown} are"
        hint = f" (or had fewer than 3 items: {n_skipped} such users were skipped)" \
            if n_skipped else ""
        raise RecommendError(f"{subject} not in {data_name}{hint}")
    return np.array([row_of[w] for w in wanted], dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# recommending


def sequence_csr(data: SequenceData, users: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Each user's whole sequence as CSR over item rows (item id - 1): the items to exclude."""
    starts, lens = data.offsets[users], data.lengths[users]
    indptr = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    gather = np.arange(indptr[-1], dtype=np.int64) + np.repeat(starts - indptr[:-1], lens)
    return indptr, data.items[gather].astype(np.int64) - 1


@torch.no_grad()
def recommend(model: S4Rec, data: SequenceData, users: np.ndarray, k: int,
              batch_size: int = 1024, max_pad: float = 1 / 3,
              precision: str = "fp32") -> Tuple[np.ndarray, np.ndarray]:
    """The k best items each user has not seen: (item ids (U, k) int64, scores (U, k) float32),
    best first; a user with fewer than k unseen items gets id 0 and score -inf in the last slots.
    Encoded and scored at `precision` (a resolved one, as in metrics.compute_ranks)."""
    encoder = model.encoder
    if data.n_items != encoder.n_items:
        raise RecommendError(f"the data has {data.n_items} items, the model {encoder.n_items}")
    if not 1 <= k <= data.n_items:
        raise RecommendError(f"--k must be in 1..{data.n_items} (the number of items), got {k}")
    if batch_size < 1:
        raise RecommendError(f"--batch-size must be positive, got {batch_size}")
    device = encoder.item_emb.weight.device
    model.eval()
    table = encoder.item_table()  # (V, d)
    ids = np.zeros((len(users), k), dtype=np.int64)
    scores = np.full((len(users), k), -np.inf, dtype=np.float32)
    with autocast(precision, device):
        for start in range(0, len(users), batch_size):
            batch = users[start:start + batch_size]
            packed = pack([data.sequence(u) for u in batch], encoder.max_len, max_pad, device)
            z, _ = encoder.encode(packed)  # (b, d)
            indptr, indices = sequence_csr(data, batch)
            top, rows = item_topk(*op_inputs(z, table), k, torch.as_tensor(indptr, device=device),
                                  torch.as_tensor(indices, device=device))  # (b, k) each
            ids[start:start + len(batch)] = rows.cpu().numpy() + 1  # -1 (no item) becomes 0
            scores[start:start + len(batch)] = top.float().cpu().numpy()
    return ids, scores


def rows_of(users: np.ndarray, ids: np.ndarray, scores: np.ndarray, user_labels: List[str],
            item_labels: np.ndarray) -> List[Tuple[str, int, str, float]]:
    """(user, rank from 1, item, score) for every filled slot, users in the order asked."""
    out = []
    for u, row_ids, row_scores in zip(users.tolist(), ids.tolist(), scores.tolist()):
        for rank, (item, score) in enumerate(zip(row_ids, row_scores), start=1):
            if item:
                out.append((user_labels[u], rank, item_labels[item], score))
    return out


def format_rows(rows: List[Tuple[str, int, str, float]]) -> str:
    heads = ("user", "rank", "item", "score")
    wu = max([len(heads[0])] + [len(r[0]) for r in rows])
    wi = max([len(heads[2])] + [len(r[2]) for r in rows])
    lines = [f"{heads[0]:<{wu}}  {heads[1]:>4}  {heads[2]:<{wi}}  {heads[3]:>10}"]
    lines += [f"{u:<{wu}}  {r:>4}  {i:<{wi}}  {s:>10.4f}" for u, r, i, s in rows]
    return "\n".join(lines)


def write_csv(rows: List[Tuple[str, int, str, float]], path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user", "rank", "item", "score"])
        writer.writerows((u, r, i, f"{s:.6f}") for u, r, i, s in rows)


# ----------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m s4rec.recommend",
        description="Top-k unseen items per user from a trained run, with the original ids.")
    parser.add_argument("--run", required=True, metavar="RUN_DIR",
                        help="run directory of s4rec.train (best.pt, config.json, mapping.json)")
    parser.add_argument("--data", metavar="PATH",
                        help="the data file (line format, or .inter) whose users to serve "
                        "(default: the run's own data, the embedded synthetic set included)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--users", metavar="IDS",
                     help="comma-separated original user ids or tokens, e.g. 1,2,3")
    who.add_argument("--all", action="store_true", help="every user of the data")
    parser.add_argument("--k", type=int, default=10, help="items per user (default: 10)")
    parser.add_argument("--out", metavar="CSV", help="write CSV (user,rank,item,score) here "
                        "instead of printing a table")
    parser.add_argument("--batch-size", type=int, default=1024,
                        help="users encoded at once (default: 1024)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run the model (default: auto, cuda when present)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="auto (bf16 on CUDA, fp32 on a CPU), bf16, tf32 or fp32; default: "
                        "the run's own setting")
    return parser


def run(args: argparse.Namespace) -> Tuple[List[Tuple[str, int, str, float]], int]:
    """(user, rank, item, score) rows and the number of users served."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RecommendError("--device cuda was asked for, but no CUDA device is available")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = load_run(args.run, device)
    data, data_name = run_data(model, cfg, args.run, args.data)
    user_labels, item_labels, numeric = labels(data, args.run)
    if args.all:
        users = np.arange(len(data), dtype=np.int64)
    else:
        wanted = [w.strip() for w in args.users.split(",") if w.strip()]
        if not wanted:
            raise RecommendError("--users names no user")
        users = find_users(wanted, user_labels, numeric, data_name, data.n_skipped)
    prec = run_precision(args.precision or cfg.precision, device, args.run, sys.stderr)
    # the run's own logits budget: above it, items are streamed
    with logits_budget(cfg.logits_budget_mb), settings(prec, torch.device(device)):
        ids, scores = recommend(model, data, users, args.k, args.batch_size, cfg.max_pad, prec)
    return rows_of(users, ids, scores, user_labels, item_labels), len(users)


def one_line_errors(work: Callable[[], object], out: Optional[str] = None) -> int:
    """Run a command's ``work``: 0, or 2 after one line ``error: ...`` on stderr for a bad request
    (RecommendError, DataError) or a file that cannot be read or written (``out`` names the file
    when the error does not)."""
    try:
        work()
    except (RecommendError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err.filename or out}: {err.strerror or err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        rows, n_users = run(args)
        if args.out:
            write_csv(rows, args.out)
            print(f"wrote {len(rows)} recommendations for {n_users} users to {args.out}")
        else:
            print(format_rows(rows))

    return one_line_errors(work, args.out)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
