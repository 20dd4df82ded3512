"""Where one model beats another: the same users ranked by two groups of runs, side by side.

  python -m benchmarks.compare_runs --base RUN [RUN ...] --other RUN [RUN ...]
                                    [--split test] [--data PATH] [--bounds 5,8,15]
                                    [--resamples 2000] [--out FILE.json]

Every run's best checkpoint ranks every user's held-out item of the split under the trainer's
protocol (s4rec.evaluate). A user's ndcg@20 and hit@20 are averaged over the runs of a group (the
seeds), and the users are grouped by the length of the input the split ranks from (the training
sequence for valid, one item more for test; by default in quartiles) and by head / tail (the run's --head-frac). For every
group the table gives both sides, the relative difference, and a 95% interval of the ndcg@20
difference from a paired bootstrap over users (the users are resampled, both sides move
together). The interval says how much the users alone could move the difference; the spread
over seeds is the other half of the noise, and is in the accuracy tables.

Problems end with one line `error: ...` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from s4rec.data import head_users, split_input
from s4rec.metrics import compute_ranks, user_gains
from s4rec.recommend import RecommendError, load_run, run_data

K = 20


def group_gains(runs: Sequence[str], split: str, data_path: Optional[str], batch_size: int):
    """(per-user ndcg@K and hit@K averaged over `runs`, the data, head mask): the runs must share
    one data set."""
    sums = None
    data = head = None
    for run in runs:
        model, cfg = load_run(run, "cpu")
        run_data_, _ = run_data(model, cfg, run, data_path)
        if data is not None and len(run_data_) != len(data):
            raise RecommendError(f"{run}: {len(run_data_)} users, the first run has {len(data)}")
        data = run_data_
        if head is None:
            head = head_users(data, cfg.head_frac)
        ranks = compute_ranks(model, data, split, batch_size, cfg.exclude_history, cfg.max_pad)
        gains = user_gains(ranks, K)
        sums = gains if sums is None else {k: sums[k] + v for k, v in gains.items()}
    return {k: v / len(runs) for k, v in sums.items()}, data, head


def paired_interval(base: np.ndarray, other: np.ndarray, resamples: int, seed: int = 0):
    """95% percentile interval of mean(other - base) over users resampled with replacement."""
    diff = other - base
    if len(diff) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(resamples):
        means[i] = diff[rng.integers(0, len(diff), len(diff))].mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def compare(base: Dict[str, np.ndarray], other: Dict[str, np.ndarray], groups: Dict[str, np.ndarray],
            resamples: int) -> List[Dict]:
    rows = []
    for name, mask in groups.items():
        row = {"users": name, "n": int(mask.sum())}
        for metric in ("ndcg", "hit"):
            b, o = float(base[metric][mask].mean()), float(other[metric][mask].mean())
            row[f"base {metric}@{K}"], row[f"other {metric}@{K}"] = b, o
            row[f"{metric} change"] = (o - b) / b if b > 0 else float("nan")
        row["ndcg diff 95%"] = paired_interval(base["ndcg"][mask], other["ndcg"][mask], resamples)
        rows.append(row)
    return rows


def length_groups(lengths: np.ndarray, head: np.ndarray, bounds: Sequence[int]) -> Dict[str, np.ndarray]:
    """All users; head and tail; then input lengths [1, b0], (b0, b1], ..., (b_last, inf),
    leaving out empty groups."""
    out = {"all": np.ones(len(lengths), bool), "head": head, "tail": ~head}
    lo = 0
    for hi in [*bounds, None]:
        mask = lengths > lo if hi is None else (lengths > lo) & (lengths <= hi)
        if mask.any():  # named by the lengths it holds: "4-5", "6", "9+"
            first, last = int(lengths[mask].min()), hi
            name = f"{first}+" if last is None else (f"{first}" if first == last else f"{first}-{last}")
            out[f"length {name}"] = mask
        lo = hi if hi is not None else lo
    return out


def format_rows(rows: List[Dict]) -> str:
    lines = [f"| users | n | base ndcg@{K} | other ndcg@{K} | change | 95% of the difference "
             f"| base hit@{K} | other hit@{K} | change |", "| --- " * 9 + "|"]
    for r in rows:
        lo, hi = r["ndcg diff 95%"]
        lines.append(f"| {r['users']} | {r['n']} | {r[f'base ndcg@{K}']:.4f} | "
                     f"{r[f'other ndcg@{K}']:.4f} | {r['ndcg change']:+.1%} | "
                     f"[{lo:+.4f}, {hi:+.4f}] | {r[f'base hit@{K}']:.4f} | "
                     f"{r[f'other hit@{K}']:.4f} | {r['hit change']:+.1%} |")
    return "\n".join(lines)


def parse_bounds(text: str) -> List[int]:
    """"3,5,8" -> [3, 5, 8]: increasing positive integers, else a RecommendError."""
    try:
        bounds = [int(x) for x in text.split(",")]
    except ValueError:
        bounds = []
    if not bounds or bounds[0] < 1 or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise RecommendError(f"--bounds must be increasing positive integers, got {text!r}")
    return bounds


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_runs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", nargs="+", required=True, metavar="RUN", help="the baseline's runs")
    parser.add_argument("--other", nargs="+", required=True, metavar="RUN", help="the runs compared")
    parser.add_argument("--split", choices=("valid", "test"), default="test")
    parser.add_argument("--data", metavar="PATH", help="data file (default: the runs' own)")
    parser.add_argument("--bounds", default=None,
                        help="input-length group bounds, e.g. 5,8,15 (default: the quartiles)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--batch-size", type=int, default=1024, help="users per batch")
    parser.add_argument("--out", metavar="JSON", help="also write the rows here")
    args = parser.parse_args(argv)
    try:
        bounds = parse_bounds(args.bounds) if args.bounds else None
        if args.resamples < 1:
            raise RecommendError(f"--resamples must be positive, got {args.resamples}")
        with torch.no_grad():
            base, data, head = group_gains(args.base, args.split, args.data, args.batch_size)
            other, other_data, _ = group_gains(args.other, args.split, args.data, args.batch_size)
        if len(other_data) != len(data):
            raise RecommendError(f"the two groups' data differ: {len(data)} and {len(other_data)} users")
        lengths = np.array([len(s) for s in split_input(data, np.arange(len(data)), args.split)])
        if bounds is None:  # the quartiles: four groups of about equal size
            bounds = sorted({int(q) for q in np.percentile(lengths, [25, 50, 75])})
        rows = compare(base, other, length_groups(lengths, head, bounds), args.resamples)
    except (RecommendError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.split}: base = {', '.join(args.base)}; other = {', '.join(args.other)}")
    print(format_rows(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"split": args.split, "base": args.base, "other": args.other, "rows": rows}, f,
                      indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
