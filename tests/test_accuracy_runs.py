"""benchmarks/accuracy_runs.sh: every group it lists exists, and every run it would start is a
command line the trainer accepts (checked with DRY_RUN=1, which prints the runs and starts none)."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from s4rec.config import ConfigError, resolve

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_runs.sh"


def _listed_groups():
    text = SCRIPT.read_text()
    header = re.search(r"^#\s+groups: (.*)$", text, re.M).group(1).split()
    unknown = re.search(r"unknown group: \$group \(([^)]*)\)", text).group(1).split()
    labels = []
    for case in re.findall(r"^\s{8}([a-z0-9 |-]+)\)", text, re.M):
        labels += [g.strip() for g in case.split("|")]
    return header, unknown, labels


def _dry_run(*groups, env=None):
    return subprocess.run(["bash", str(SCRIPT), *groups], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", **(env or {})},
                          timeout=60)


def test_every_listed_group_has_a_case_and_the_lists_agree():
    header, unknown, labels = _listed_groups()
    assert header == unknown
    assert sorted(header) == sorted(labels)


GROUPS = _listed_groups()[0]


@pytest.mark.parametrize("group", GROUPS)
def test_every_run_of_a_group_is_a_command_the_trainer_accepts(group):
    done = _dry_run(group, env={"EXTRA": "--threads 1"})
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert rows, f"group {group} has no runs"
    for name, label, command in rows:
        argv = shlex.split(command)
        assert argv[:3] == ["python", "-m", "s4rec.train"], command
        assert argv[-2:] == ["--run-dir", f"runs/acc/{name}"] and "--threads" in argv
        assert label
        try:
            resolve(argv[3:])
        except (ConfigError, SystemExit) as err:  # argparse exits on an unknown flag
            pytest.fail(f"{group} {name}: {command}: {err}")


def test_an_unknown_group_is_refused():
    done = _dry_run("no-such-group")
    assert done.returncode == 2 and "unknown group: no-such-group" in done.stderr
