"""Every command's --help prints and exits 0 (argparse expands each help string only then: a bare
"%" in one, say, is an error that nothing else shows)."""

import importlib

import pytest

COMMANDS = {
    "s4rec.train": [], "s4rec.evaluate": [], "s4rec.export": [], "s4rec.recommend": [],
    "s4rec.report": [], "benchmarks.__main__": [], "benchmarks.bench_dist": [],
    "benchmarks.bench_info_nce": [], "benchmarks.bench_item_softmax": [],
    "benchmarks.bench_scale": [], "benchmarks.compare_runs": [], "benchmarks.compile_report": [],
    "benchmarks.gpu_check": [],
    "benchmarks.accuracy": [[], ["add"], ["table"], ["bar"]],
}
CASES = [(module, sub) for module, subs in COMMANDS.items() for sub in (subs or [[]])]


@pytest.mark.parametrize("module,sub", CASES, ids=[" ".join([m] + s) for m, s in CASES])
def test_help_prints_and_exits_0(module, sub, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(sub + ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out
