"""Pictures of training runs: `python -m s4rec.report RUN_DIR [RUN_DIR ...] [--out DIR]`.

Writes three kinds of PNG (matplotlib, an optional dependency, drawn with the Agg backend):

  training.png   loss terms and validation ndcg@20 per epoch (log.jsonl), two panels; with several
                 runs one file per run, training-<run>.png
  head_rate.png  the share of head users in each cluster, one box per run (the paper's Fig. 3;
                 metrics.json "clusters")
  head_tail.png  hit@5 and ndcg@5 of head and tail users as grouped bars, runs side by side
                 (the paper's Fig. 4; metrics.json, test split unless --split valid)

Runs are labelled by their directory names. The files go to --out, by default the run directory
(several runs: their common parent directory). Every input is checked before anything is drawn; a
missing or malformed file ends with one line `error: ...` and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

GROUP_COLORS = {"head": "#d95f02", "tail": "#1b9e77"}
TERM_ORDER = ["total", "sr", "clust", "scl", "ckd", "adv"]
TERM_NAMES = {"total": "total (weighted sum)", "sr": "L_SR", "clust": "L_clust", "scl": "L_SCL",
              "ckd": "L_CKD", "adv": "L_adv"}


class ReportError(ValueError):
    """A run directory that cannot be plotted; the one-line message names the file."""


@dataclass
class Run:
    name: str  # label in the pictures
    path: Path
    log: List[Dict]  # log.jsonl, one entry per epoch
    metrics: Dict  # metrics.json


# ----------------------------------------------------------------------------------------------
# reading runs


def read_log(path: Path) -> List[Dict]:
    """The epochs of log.jsonl, in order; raises ReportError for a missing or malformed file."""
    if not path.is_file():
        raise ReportError(f"{path.parent}: no log.jsonl (the per-epoch log of s4rec.train)")
    entries = []
    for no, line in enumerate(_read(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path} line {no}: not valid JSON ({e.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("epoch"), int):
            raise ReportError(f"{path} line {no}: expected an object with an integer \"epoch\"")
        entries.append(entry)
    if not entries:
        raise ReportError(f"{path}: no epochs logged")
    return entries


def read_metrics(path: Path, split: str) -> Dict:
    """metrics.json, checked for what the pictures use: clusters and the split's head/tail."""
    if not path.is_file():
        raise ReportError(f"{path.parent}: no metrics.json (written when s4rec.train finishes)")
    try:
        metrics = json.loads(_read(path))
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(metrics, dict):
        raise ReportError(f"{path}: expected a JSON object")
    clusters = metrics.get("clusters")
    if not isinstance(clusters, dict) or not isinstance(clusters.get("head_rate"), list):
        raise ReportError(f"{path}: no \"clusters\" with a \"head_rate\" list")
    if not isinstance(clusters.get("size"), list) or \
            len(clusters["size"]) != len(clusters["head_rate"]):
        raise ReportError(f"{path}: \"clusters\" needs a \"size\" list as long as \"head_rate\"")
    for group in ("head", "tail"):
        values = metrics.get(split, {}).get(group) if isinstance(metrics.get(split), dict) else None
        if not isinstance(values, dict) or not all(m in values for m in ("hit@5", "ndcg@5")):
            raise ReportError(f"{path}: no {split} hit@5 and ndcg@5 for {group} users")
    return metrics


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def load_runs(dirs: List[str], split: str = "test") -> List[Run]:
    paths = [Path(d) for d in dirs]
    for path in paths:
        if not path.is_dir():
            raise ReportError(f"{path}: no such run directory")
    names = run_names(paths)
    return [Run(name, path, read_log(path / "log.jsonl"),
                read_metrics(path / "metrics.json", split)) for name, path in zip(names, paths)]


def run_names(paths: List[Path]) -> List[str]:
    """Directory names; where two are equal, as many parent folders as tell them apart."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    depth = 1
    while True:
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth >= max(len(p) for p in parts):
            return names
        depth += 1


# ----------------------------------------------------------------------------------------------
# pictures


def pyplot():
    """matplotlib.pyplot on the Agg backend; ReportError when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError("matplotlib is not installed; `pip install matplotlib` to draw the "
                          "plots") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(plt, run: Run, path: Path) -> None:
    """Loss terms (log scale when all positive) and validation ndcg@20 per epoch, two panels."""
    epochs = [e["epoch"] for e in run.log]
    terms = sorted({k[5:] for e in run.log for k in e if k.startswith("loss_")},
                   key=lambda t: (TERM_ORDER.index(t) if t in TERM_ORDER else len(TERM_ORDER), t))
    fig, (ax_loss, ax_ndcg) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    marker = "o" if len(epochs) <= 30 else None
    positive = True
    colors = iter(plt.get_cmap("tab10").colors)
    for term in terms:
        xs = [e["epoch"] for e in run.log if _finite(e.get(f"loss_{term}"))]
        ys = [e[f"loss_{term}"] for e in run.log if _finite(e.get(f"loss_{term}"))]
        positive = positive and all(y > 0 for y in ys)
        style = dict(color="black", linewidth=2.2) if term == "total" else \
            dict(color=next(colors), linewidth=1.4)
        ax_loss.plot(xs, ys, marker=marker, markersize=4, label=TERM_NAMES.get(term, term), **style)
    if terms and positive:
        _log_axis(ax_loss)
    ax_loss.set_title("training loss terms (unweighted; total is weighted)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("mean loss per batch" + (" (log scale)" if terms and positive else ""))
    if terms:
        ax_loss.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        _note(ax_loss, "no loss terms in log.jsonl")
    ax_loss.grid(True, which="major", alpha=0.3)

    valid = [(e["epoch"], e["valid"]["ndcg@20"]) for e in run.log
             if isinstance(e.get("valid"), dict) and _finite(e["valid"].get("ndcg@20"))]
    if valid:
        xs, ys = zip(*valid)
        ax_ndcg.plot(xs, ys, marker=marker, markersize=4, color="#1f77b4", linewidth=1.6)
        best = max(range(len(ys)), key=lambda i: ys[i])
        ax_ndcg.plot([xs[best]], [ys[best]], marker="*", markersize=14, color="#d62728",
                     linestyle="none", label=f"best: {ys[best]:.4f} at epoch {xs[best]}")
        ax_ndcg.legend(fontsize=9, loc="lower right")
        lo, hi = min(ys), max(ys)
        pad = (hi - lo) * 0.15 or max(hi * 0.1, 1e-3)
        ax_ndcg.set_ylim(max(0.0, lo - pad), hi + pad)
    else:
        _note(ax_ndcg, "no evaluated epochs in log.jsonl")
    ax_ndcg.set_title("validation ndcg@20 (full ranking)")
    ax_ndcg.set_xlabel("epoch")
    ax_ndcg.set_ylabel("ndcg@20")
    ax_ndcg.grid(True, alpha=0.3)
    ax_loss.xaxis.get_major_locator().set_params(integer=True)
    if len(epochs) == 1:
        ax_loss.set_xlim(epochs[0] - 1, epochs[0] + 1)
        ax_loss.set_xticks(epochs)
    ax_ndcg.tick_params(labelbottom=True)
    dataset = run.metrics.get("dataset")
    title = f"{run.name}: " + (f"{dataset}, " if dataset else "") + \
        f"{len(epochs)} epoch{'s' if len(epochs) != 1 else ''}"
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_head_rate(plt, runs: List[Run], path: Path) -> None:
    """Box plot of the per-cluster head rate for each run, with every cluster as a dot."""
    fig, ax = plt.subplots(figsize=(max(6.5, 2.2 * len(runs) + 3.5), 5.0))
    rates, labels, shares = [], [], []
    for run in runs:
        c = run.metrics["clusters"]
        rates.append([r for r in c["head_rate"] if _finite(r)])
        empty = sum(1 for r in c["head_rate"] if r is None)
        labels.append(f"{run.name}\nK={len(c['head_rate'])}, {empty} empty")
        shares.append(_head_share(c))
    positions = list(range(1, len(runs) + 1))
    filled = [(p, r) for p, r in zip(positions, rates) if r]
    if filled:
        ax.boxplot([r for _, r in filled], positions=[p for p, _ in filled], widths=0.5,
                   showfliers=False, medianprops=dict(color="black", linewidth=1.8, zorder=5),
                   boxprops=dict(facecolor="#c6dbef", edgecolor="#08519c"), patch_artist=True)
    for pos, run, r in zip(positions, runs, rates):
        if not r:
            ax.text(pos, 0.5, "no clusters\nwith users", ha="center", va="center", fontsize=9)
            continue
        sizes = [s for s, h in zip(run.metrics["clusters"]["size"],
                                   run.metrics["clusters"]["head_rate"]) if _finite(h)]
        jitter = [((i * 0.618034) % 1.0 - 0.5) * 0.3 for i in range(len(r))]  # even spread
        biggest = max(max(sizes), 1)
        ax.scatter([pos + j for j in jitter], r, s=[8 + 60 * s / biggest for s in sizes],
                   color="#08306b", alpha=0.45, linewidths=0, zorder=3)
    for pos, share in zip(positions, shares):
        if share is not None:
            ax.hlines(share, pos - 0.4, pos + 0.4, colors="#d95f02", linestyles="--", linewidth=1.5,
                      zorder=4)
    ax.plot([], [], color="#d95f02", linestyle="--", label="share of head\nusers overall")
    ax.scatter([], [], color="#08306b", alpha=0.45, s=30, label="one cluster\n(area ~ users)")
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.set_xticks(positions)
    ax.set_xticklabels(labels, fontsize=9)
    ax.set_xlim(0.4, len(runs) + 0.6)
    seen = [v for r in rates for v in r] + [v for v in shares if v is not None]
    if seen:  # zoom on the data: the spread is the point, not the distance from 0 and 1
        lo, hi = min(seen), max(seen)
        pad = 0.1 * (hi - lo) + 0.03
        ax.set_ylim(max(0.0, lo - pad) - 0.01, min(1.0, hi + pad) + 0.01)
    else:
        ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("head rate: share of head users in the cluster")
    ax.set_title("Head rate per cluster (cf. the paper's Fig. 3)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_head_tail(plt, runs: List[Run], path: Path, split: str = "test") -> None:
    """hit@5 and ndcg@5 for head and tail users, two bars per run, one panel per metric."""
    metric_names = ("hit@5", "ndcg@5")
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 2.4 * len(runs) + 4.0), 4.8))
    width = 0.38
    for ax, metric in zip(axes, metric_names):
        top = 0.0
        for g, group in enumerate(("head", "tail")):
            xs = [i + (g - 0.5) * width for i in range(len(runs))]
            ys = [float(run.metrics[split][group][metric]) for run in runs]
            bars = ax.bar(xs, ys, width, color=GROUP_COLORS[group], label=f"{group} users")
            ax.bar_label(bars, labels=[f"{y:.4f}" for y in ys], fontsize=8, padding=2)
            top = max([top] + [y for y in ys if _finite(y)])
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([run.name for run in runs], fontsize=9)
        ax.set_title(f"{metric}, {split} split")
        ax.set_ylabel(metric)
        ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
        ax.grid(True, axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.suptitle("Head vs tail users (cf. the paper's Fig. 4)", fontsize=12)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log_axis(ax) -> None:
    """Log scale with plain numbers (0.5, 2, 10) instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    few_decades = math.log10(hi / lo) < 1.5

    def minor(y, _):
        mantissa = round(y / 10 ** math.floor(math.log10(y) + 1e-9), 6)
        return f"{y:g}" if few_decades and mantissa in (2, 3, 5) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _head_share(clusters: Dict) -> Optional[float]:
    if _finite(clusters.get("head_share")):
        return float(clusters["head_share"])
    pairs = [(s, h) for s, h in zip(clusters["size"], clusters["head_rate"]) if _finite(h)]
    total = sum(s for s, _ in pairs)
    return sum(s * h for s, h in pairs) / total if total else None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


# ----------------------------------------------------------------------------------------------
# command line


def report(dirs: List[str], out: Optional[str] = None, split: str = "test") -> List[Path]:
    """Draw the pictures of the runs in ``dirs``; returns the paths written."""
    runs = load_runs(dirs, split)
    plt = pyplot()
    if out is None:
        out = runs[0].path if len(runs) == 1 else \
            Path(os.path.commonpath([os.path.abspath(r.path) for r in runs]))
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    written = []
    for run in runs:
        name = "training.png" if len(runs) == 1 else \
            f"training-{re.sub(r'[^A-Za-z0-9._-]+', '_', run.name)}.png"
        plot_training(plt, run, out / name)
        written.append(out / name)
    plot_head_rate(plt, runs, out / "head_rate.png")
    plot_head_tail(plt, runs, out / "head_tail.png", split)
    return written + [out / "head_rate.png", out / "head_tail.png"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m s4rec.report",
        description="PNG plots of s4rec.train runs: loss terms and validation ndcg@20 per epoch, "
        "head rate per cluster (box plot), head vs tail hit@5 / ndcg@5 (grouped bars).")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories of s4rec.train; several are drawn side by side")
    parser.add_argument("--out", metavar="DIR", help="where the PNGs go (default: the run "
                        "directory; several runs: their common parent)")
    parser.add_argument("--split", choices=("test", "valid"), default="test",
                        help="split of the head vs tail bars (default: test)")
    args = parser.parse_args(argv)
    try:
        for path in report(args.runs, args.out, args.split):
            print(path)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
