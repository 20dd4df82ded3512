"""Accuracy results: collect finished runs into benchmarks/results/accuracy-<data set>.json, and
print the README's table from those files.

  python -m benchmarks.accuracy add RUN_DIR --model "w/o GR" --command "python -m s4rec.train ..."
  python -m benchmarks.accuracy table [--dataset Beauty]
  python -m benchmarks.accuracy bar --dataset Beauty --model "S4Rec" [--base "SR-only"]

`add` reads RUN_DIR/metrics.json (written by `python -m s4rec.train` at the end of a run) and
stores one object per run: dataset, model, seed, epochs, best epoch, device, date, command, wall
time, and the valid / test metrics overall and for head and tail users, with the head-rate
quartiles. A run already stored under the same model and seed is replaced. `table` prints one row
per model: the test metrics (mean +- std when there are several seeds) and the validation ndcg@20.
`bar` holds a model to the base on test hit@20 and ndcg@20: the relative gain of the seed means
(at least +3%), the mean of the seed-paired gaps against twice their standard deviation, and the
tail users' gain against the head users'; it prints a table and a verdict line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from benchmarks._harness import RESULTS, device_label

REPORTED = ("hit@5", "hit@10", "hit@20", "ndcg@5", "ndcg@10", "ndcg@20")
TABLE = ("hit@5", "hit@20", "ndcg@5", "ndcg@20")


def describe_device(name: str, threads: int) -> str:
    """The run's device; for a CPU, its model and the run's own thread count (--threads)."""
    if name.startswith("cuda"):
        return f"{device_label(torch.device(name))}, torch {torch.__version__}"
    cpu = device_label(torch.device("cpu")).rsplit(" (", 1)[0]
    used = f"{threads} thread{'s' if threads > 1 else ''}" if threads else "torch's default threads"
    return f"CPU: {os.cpu_count()}-core {cpu}, {used}, torch {torch.__version__}"


def _round(metrics: Dict[str, float]) -> Dict[str, float]:
    return {k: round(float(metrics[k]), 4) for k in REPORTED if k in metrics}


def entry(run_dir: Path, model: str, command: str, device: Optional[str] = None) -> Dict:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (is the run finished?)")
    m = json.loads(path.read_text())
    out = {
        "dataset": m["dataset"], "model": model, "seed": m["seed"],
        "epochs": m["epochs_run"], "best_epoch": m["best_epoch"],
        "device": device or describe_device(m["device"], m["config"].get("threads", 0)),
        "date": time.strftime("%Y-%m-%d", time.localtime(path.stat().st_mtime)),
        "command": command, "train_seconds": m["train_seconds"],
        "test": _round(m["test"]["overall"]), "valid": _round(m["valid"]["overall"]),
        "test_head": _round(m["test"]["head"]), "test_tail": _round(m["test"]["tail"]),
        "head_rate_quartiles": [round(q, 3) for q in (m.get("clusters", {}).get("head_rate_quartiles") or [])],
        "protocol": m["protocol"],
    }
    return out


def results_path(dataset: str) -> Path:
    return RESULTS / f"accuracy-{dataset}.json"


def add(run_dir: Path, model: str, command: str, device: Optional[str] = None) -> Path:
    new = entry(run_dir, model, command, device)
    path = results_path(new["dataset"])
    rows = json.loads(path.read_text()) if path.exists() else []
    same = [i for i, r in enumerate(rows) if (r["model"], r["seed"]) == (model, new["seed"])]
    if same:  # the row keeps its place, so re-adding a finished run leaves the file as it was
        rows[same[0]] = new
        rows = [r for i, r in enumerate(rows) if i not in same[1:]]
    else:
        rows.append(new)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path


def summarize(rows: List[Dict]) -> List[Dict]:
    """One line per model, in the order models first appear: mean and std over seeds."""
    models: Dict[str, List[Dict]] = {}
    for r in rows:
        models.setdefault(r["model"], []).append(r)
    out = []
    for model, runs in models.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        line = {"model": model, "seeds": [r["seed"] for r in runs], "n": len(runs),
                "epochs": [r["epochs"] for r in runs], "best": [r["best_epoch"] for r in runs],
                "minutes": [r.get("train_seconds", 0) / 60 for r in runs],
                "devices": sorted({r["device"].split(" (")[0] for r in runs})}
        for split in ("test", "valid"):
            for k in TABLE:
                values = [r[split][k] for r in runs]
                line[f"{split} {k}"] = (statistics.mean(values),
                                        statistics.stdev(values) if len(values) > 1 else None)
        out.append(line)
    return out


def _cell(mean_std) -> str:
    mean, std = mean_std
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def table(dataset: str) -> str:
    path = results_path(dataset)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    lines = ["| model | seeds | hit@5 | hit@20 | ndcg@5 | ndcg@20 | valid ndcg@20 | epochs (best) "
             "| minutes | device |", "| --- " * 10 + "|"]
    for s in summarize(json.loads(path.read_text())):
        epochs = ", ".join(f"{e} ({b})" for e, b in zip(s["epochs"], s["best"]))
        cells = [_cell(s[f"test {k}"]) for k in TABLE]
        lines.append(f"| {s['model']} | {','.join(map(str, s['seeds']))} | " + " | ".join(cells)
                     + f" | {_cell(s['valid ndcg@20'])} | {epochs} | "
                     + ", ".join(f"{m:.0f}" for m in s["minutes"]) + f" | {'; '.join(s['devices'])} |")
    return "\n".join(lines)


BAR_GAIN = 0.03  # the relative gain of the seed means a model must reach on both metrics
BAR_METRICS = ("hit@20", "ndcg@20")


def _mean(rows: List[Dict], key: str, metric: str) -> float:
    return statistics.mean(r[key][metric] for r in rows)


def bar(dataset: str, model: str, base: str = "SR-only") -> Tuple[str, bool]:
    """(markdown table and verdict line, whether `model` clears the bar over `base`)."""
    path = results_path(dataset)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    rows = json.loads(path.read_text())
    ours = {r["seed"]: r for r in rows if r["model"] == model}
    theirs = {r["seed"]: r for r in rows if r["model"] == base}
    for name, runs in ((model, ours), (base, theirs)):
        if not runs:
            raise ValueError(f"{path}: no rows for model {name!r}")
    paired = sorted(set(ours) & set(theirs))
    lines = [f"| test metric | {base} | {model} | gain | paired gap / 2 std (seeds) |",
             "| --- " * 5 + "|"]
    failures = []
    gains = {}
    for key, label in (("test", ""), ("test_head", "head "), ("test_tail", "tail ")):
        for metric in BAR_METRICS:
            b = _mean(list(theirs.values()), key, metric)
            m = _mean(list(ours.values()), key, metric)
            gain = (m - b) / b
            gains[(key, metric)] = gain
            gaps = [ours[s][key][metric] - theirs[s][key][metric] for s in paired]
            if len(gaps) > 1:
                spread = 2 * statistics.stdev(gaps)
                paired_cell = (f"{statistics.mean(gaps):+.4f} / {spread:.4f} "
                               f"({','.join(map(str, paired))})")
            else:
                spread, paired_cell = None, f"needs 2 paired seeds, has {len(paired)}"
            lines.append(f"| {label}{metric} | {b:.4f} | {m:.4f} | {gain:+.1%} | {paired_cell} |")
            if key != "test":
                continue
            if gain < BAR_GAIN:
                failures.append(f"{metric} gain {gain:+.1%} < +{BAR_GAIN:.0%}")
            if spread is None:
                failures.append(f"{metric}: {len(paired)} paired seed{'' if len(paired) == 1 else 's'}"
                                f", needs 2")
            elif statistics.mean(gaps) <= spread:
                failures.append(f"{metric} gap {statistics.mean(gaps):+.4f} <= 2 std {spread:.4f}")
    if gains[("test_tail", "ndcg@20")] < gains[("test_head", "ndcg@20")]:
        failures.append(f"tail gain {gains[('test_tail', 'ndcg@20')]:+.1%} < head gain "
                        f"{gains[('test_head', 'ndcg@20')]:+.1%} (ndcg@20)")
    seeds = f"{model} seeds {','.join(map(str, sorted(ours)))}; {base} seeds " \
            f"{','.join(map(str, sorted(theirs)))}"
    verdict = ("clears the bar" if not failures else "does not clear the bar: " + "; ".join(failures))
    return "\n".join(lines) + f"\n\n{dataset}, {seeds}: {model} {verdict}", not failures


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p_add = sub.add_parser("add", help="store a finished run")
    p_add.add_argument("run_dir", type=Path)
    p_add.add_argument("--model", required=True, help='row label, e.g. "S4Rec", "SR-only", "K=64"')
    p_add.add_argument("--command", required=True, help="the command that produced the run")
    p_add.add_argument("--device", default=None, help="device description (default: this machine)")
    p_table = sub.add_parser("table", help="print the README table")
    p_table.add_argument("--dataset", default="Beauty")
    p_bar = sub.add_parser("bar", help="hold a model to the base: +3%%, 2 std, tail >= head")
    p_bar.add_argument("--dataset", default="Beauty")
    p_bar.add_argument("--model", required=True)
    p_bar.add_argument("--base", default="SR-only")
    args = parser.parse_args(argv)
    try:
        if args.what == "add":
            print(f"wrote {add(args.run_dir, args.model, args.command, args.device)}")
        elif args.what == "bar":
            print(bar(args.dataset, args.model, args.base)[0])
        else:
            print(table(args.dataset))
    except (ValueError, KeyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
