"""Where the tests find the real data sets: ../shared/data beside the checkout, or $S4REC_DATA_DIR.

A missing file skips its tests on a contributor's machine, but fails them under CI (CI=true), where
the data is always laid out beside the checkout: a silent skip there would count as a pass.
"""
import os
from pathlib import Path

import pytest

DATA_DIR = Path(os.environ.get("S4REC_DATA_DIR",
                               Path(__file__).resolve().parents[2] / "shared" / "data"))


def data_path(name: str) -> str:
    path = DATA_DIR / name
    if not path.exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{path} is missing: CI expects the data sets in ../shared/data")
        pytest.skip(f"{path} not present (set S4REC_DATA_DIR to the folder holding it)")
    return str(path)
