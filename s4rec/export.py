"""A trained run as one `torch.export` program, to serve without s4rec:

    python -m s4rec.export --run RUN_DIR --out model.pt2 [--k 10]

The program holds the run's best.pt encoder and item table (built with s4rec.recommend.load_run)
and maps a batch of item-id sequences to the k best items each sequence does not contain:

    seqs (B, L) int64, oldest item first, left-padded with 0, ids in 0..n_items, any B and L >= 1
    -> (ids (B, k) int64, scores (B, k) float32), best first

Only the last max_len items are encoded (positions count from the right, as in training); every
item of the row, older ones included, is excluded, as `s4rec.recommend` excludes a user's history.
A row with fewer than k items left gets id 0 and score -inf in its last slots. Ids are the run's
item ids (for .inter data, item i is ``items[i - 1]`` in the run's mapping.json). The graph uses
plain torch operators only, so `torch.export.load(path).module()` needs nothing but torch. The file
also carries ``s4rec.json`` (k, n_items, max_len, hidden, the run), read with
``torch.export.load(path, extra_files={"s4rec.json": ""})``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import SASRec
from .recommend import RecommendError, load_run, one_line_errors

META_FILE = "s4rec.json"


class TopKItems(nn.Module):
    """An encoder and its item table -> the k best items missing from each input sequence."""

    def __init__(self, encoder: SASRec, k: int):
        super().__init__()
        self.encoder, self.k = encoder, k

    def forward(self, seqs: Tensor) -> Tuple[Tensor, Tensor]:
        n_items, max_len = self.encoder.n_items, self.encoder.max_len
        window = F.pad(seqs, (max_len, 0))[:, -max_len:]  # (B, max_len): the newest items
        z = self.encoder(window)[:, -1]  # (B, d)
        scores = z @ self.encoder.item_table().T  # (B, V)
        seen = torch.zeros(seqs.shape[0], n_items + 2, dtype=torch.bool, device=seqs.device)
        seen = seen.scatter(1, seqs, True)[:, 1:n_items + 1]  # (B, V); column 0 was padding
        top, rows = scores.masked_fill(seen, -torch.inf).topk(self.k, dim=1)  # (B, k) each
        found = ~seen.gather(1, rows)
        return torch.where(found, rows + 1, 0), top.masked_fill(~found, -torch.inf)


def export_run(run_dir, k: int) -> Tuple[torch.export.ExportedProgram, dict]:
    """(the program of ``run_dir``'s best model, its metadata); batch and length stay dynamic."""
    model, cfg = load_run(run_dir, "cpu")
    encoder = model.encoder
    if not 1 <= k <= encoder.n_items:
        raise RecommendError(f"--k must be in 1..{encoder.n_items} (the number of items), got {k}")
    example = torch.ones(2, encoder.max_len + 1, dtype=torch.int64)  # (B, L)
    dims = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("length", min=1)}
    program = torch.export.export(TopKItems(encoder, k).eval(), (example,),
                                  dynamic_shapes={"seqs": dims})
    meta = {"k": k, "n_items": encoder.n_items, "max_len": encoder.max_len, "hidden": cfg.hidden,
            "run": str(run_dir), "data": cfg.data}
    return program, meta


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m s4rec.export",
        description="A run's best model as a torch.export program: item-id sequences (B, L) -> "
        "the top-k unseen item ids and scores, loadable with plain torch.")
    parser.add_argument("--run", required=True, metavar="RUN_DIR",
                        help="run directory of s4rec.train (best.pt, config.json)")
    parser.add_argument("--out", required=True, metavar="PT2", help="file to write, e.g. model.pt2")
    parser.add_argument("--k", type=int, default=10, help="items per sequence (default: 10)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        program, meta = export_run(args.run, args.k)
        with open(args.out, "wb") as f:
            torch.export.save(program, f, extra_files={META_FILE: json.dumps(meta)})
        print(f"wrote {args.out}: sequences (B, L) int64 -> top-{args.k} of {meta['n_items']} "
              f"items (encodes the last {meta['max_len']})")

    return one_line_errors(work, args.out)


if __name__ == "__main__":
    sys.exit(main())
