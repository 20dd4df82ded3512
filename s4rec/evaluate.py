"""Re-evaluate a run's best checkpoint, possibly under another protocol:

    python -m s4rec.evaluate --run RUN_DIR [--data PATH] [--split valid|test]
                             [--exclude-history all|none] [--batch-size 1024] [--device auto]
                             [--precision auto|bf16|tf32|fp32] [--out metrics.json]

Prints the trainer's table (overall, head and tail users) for the split. The data defaults to the
run's own (config.json's --data, or the embedded synthetic set); head users are the run's
--head-frac longest training sequences. `--exclude-history none` ranks the user's history like
any other item (RecBole's default protocol), `all` excludes it (the trainer's). Problems end with
one line `error: ...` on stderr and exit status 2. `--precision` (default: the run's own) is the
trainer's: bf16 autocast, tf32 or fp32; the protocol block of `--out` records it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import torch

from s4rec_kernels._dispatch import logits_budget

from .checkpoint import save_json
from .data import head_users
from .metrics import evaluate, format_table, protocol, sr_loss_name
from .precision import PRECISIONS, describe, settings
from .recommend import RecommendError, load_run, one_line_errors, run_data, run_precision


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m s4rec.evaluate",
        description="Full-ranking hit@k / ndcg@k of a run's best checkpoint under a chosen protocol.")
    parser.add_argument("--run", required=True, metavar="RUN_DIR",
                        help="run directory of s4rec.train (best.pt, config.json)")
    parser.add_argument("--data", metavar="PATH",
                        help="data file to evaluate on (default: the run's own data)")
    parser.add_argument("--split", choices=("valid", "test"), default="test",
                        help="which held-out item to rank (default: test)")
    parser.add_argument("--exclude-history", choices=("all", "none"), default=None,
                        help="exclude the user's history from the ranking (all) or rank it "
                        "(none); default: the run's own setting")
    parser.add_argument("--batch-size", type=int, default=1024, help="users per batch (default: 1024)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run the model (default: auto, cuda when present)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="auto (bf16 on CUDA, fp32 on a CPU), bf16, tf32 or fp32; default: "
                        "the run's own setting")
    parser.add_argument("--out", metavar="JSON", help="also write the metrics and protocol here")
    return parser


def run(args: argparse.Namespace) -> dict:
    """The metrics of args.run's best checkpoint: {"overall": {...}, "head": ..., "tail": ...}."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RecommendError("--device cuda was asked for, but no CUDA device is available")
    if args.batch_size < 1:
        raise RecommendError(f"--batch-size must be positive, got {args.batch_size}")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_run(args.run, device)
    data, name = run_data(model, cfg, args.run, args.data)
    exclude = args.exclude_history or cfg.exclude_history
    head = head_users(data, cfg.head_frac)
    asked = args.precision or cfg.precision
    prec = run_precision(asked, device, args.run)
    with logits_budget(cfg.logits_budget_mb), settings(prec, torch.device(device)):
        results = evaluate(model, data, args.split, head, args.batch_size, exclude, cfg.max_pad,
                           prec)
    print(format_table(results, f"{args.split} ({name}, {args.run})"))
    if args.out:
        save_json({"run": str(args.run), "data": name, "split": args.split, args.split: results,
                   "protocol": protocol(exclude, sr_loss_name(cfg), describe(prec, asked))},
                  args.out)
        print(f"wrote {args.out}")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return one_line_errors(lambda: run(args), args.out)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
