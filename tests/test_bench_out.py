"""Where benchmark tables go: runs/benchmarks/ by default, DIR with --out, and the committed
benchmarks/results/ only with --save (or --out benchmarks/results)."""

import hashlib
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import __main__ as bench_all  # noqa: E402
from benchmarks import _harness, bench_train  # noqa: E402


def snapshot(folder: Path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture
def fake_bench(monkeypatch):
    """`python -m benchmarks` with every benchmark replaced by one that writes a one-row table."""
    def run(quick, out_dir):
        _harness.write_table("fake", [{"a": 1.5}], ["a"], torch.device("cpu"), out_dir)

    monkeypatch.setattr(bench_all.importlib, "import_module",
                        lambda name: types.SimpleNamespace(run=run))


def test_default_leaves_the_committed_tables_alone(tmp_path, monkeypatch, fake_bench, capsys):
    committed = snapshot(_harness.RESULTS)
    monkeypatch.chdir(tmp_path)
    assert bench_all.main(["--quick", "--only", "sinkhorn"]) == 0
    assert "| 1.5 |" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "runs" / "benchmarks").iterdir()) == \
        ["cpu-fake.json", "cpu-fake.md"]
    assert snapshot(_harness.RESULTS) == committed


def test_out_and_save_choose_the_folder(tmp_path, monkeypatch, fake_bench):
    monkeypatch.setattr(_harness, "RESULTS", tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    assert bench_all.main(["--only", "train", "--out", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "cpu-fake.md").is_file()
    assert bench_all.main(["--only", "train", "--save"]) == 0
    assert (tmp_path / "results" / "cpu-fake.md").is_file()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, out", [
    ([], None), (["--out", "x"], Path("x")), (["--save"], _harness.RESULTS),
])
def test_every_parser_takes_out_or_save(argv, out, monkeypatch):
    op_args = _harness.op_parser("op", "shapes").parse_args(argv)
    assert op_args.out == out
    monkeypatch.setattr(sys, "argv", ["bench_train", "--quick", *argv])
    seen = {}
    monkeypatch.setattr(bench_train, "run", lambda quick, out_dir, *rest: seen.update(out=out_dir))
    bench_train.main()
    assert seen["out"] == out


def test_out_and_save_together_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        _harness.op_parser("op", "shapes").parse_args(["--save", "--out", "x"])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err
