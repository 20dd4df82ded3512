"""The torchrun benchmark at a tiny size: two ranks, data parallel and --shard-items, each point
its own launch, every rank's figures in the table."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_dist  # noqa: E402


def test_two_ranks_with_and_without_sharded_items(tmp_path):
    assert bench_dist.main(["--quick", "--worlds", "2", "--out", str(tmp_path)]) == 0
    (table,) = tmp_path.glob("*-dist.json")
    rows = json.loads(table.read_text())["rows"]
    assert [(r["W"], r["V"], r["mode"]) for r in rows] == [(2, 2000, "dp"), (2, 2000, "shard")]
    for row in rows:
        assert row["status"] == "ok" and row["median_s"] > 0 and row["backend"] == "gloo"
        assert len(row["peak_mb_per_rank"].split(" / ")) == 2
    assert rows[0]["rows_per_rank"] == "2000 / 2000" and rows[1]["rows_per_rank"] == "1000 / 1000"
    assert list(tmp_path.glob("*-dist.md"))


def test_unknown_mode_is_one_line(capsys):
    assert bench_dist.main(["--modes", "dp,fsdp"]) == 2
    assert "unknown mode 'fsdp'" in capsys.readouterr().err
