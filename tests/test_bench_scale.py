"""The cost-curve benchmark at tiny sizes: every point in its own process, the table, the plot,
and an out-of-memory point recorded as a result, the larger sizes after it not run."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_scale  # noqa: E402


def rows_of(out: Path):
    (table,) = out.glob("*-scale.json")
    return json.loads(table.read_text())["rows"]


def test_points_table_and_plot(tmp_path):
    code = bench_scale.main(["--sizes", "300", "--workloads", "eval,SR loss", "--providers",
                             "ours,torch-lce", "--reps", "1", "--out", str(tmp_path)])
    assert code == 0
    rows = rows_of(tmp_path)
    assert [(r["workload"], r["provider"]) for r in rows] == [
        ("eval", "ours"), ("SR loss", "ours"), ("SR loss", "torch-lce")]
    for row in rows:
        assert row["status"] == "ok" and row["V"] == 300
        assert row["median_s"] > 0 and row["peak_mb"] >= row["base_mb"] > 0
    assert list(tmp_path.glob("*-scale.png")) and list(tmp_path.glob("*-scale.md"))


def test_out_of_memory_is_a_result(tmp_path):
    # 4096 x 2M fp32 logits (32 GB) cannot fit in 6 GB of address space
    code = bench_scale.main(["--sizes", "2000000,4000000", "--workloads", "SR loss",
                             "--providers", "eager", "--reps", "1", "--mem-limit-gb", "6",
                             "--out", str(tmp_path)])
    assert code == 0
    first, second = rows_of(tmp_path)
    assert first["status"] == "OOM" and "median_s" not in first
    assert second["status"].startswith("OOM (not run")


def test_unknown_provider_is_one_line(capsys):
    assert bench_scale.main(["--providers", "ours,fast"]) == 2
    assert "unknown provider 'fast'" in capsys.readouterr().err
