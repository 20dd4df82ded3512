"""Test-session setup shared by every test file.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors, so every kernel test runs
here too (at small shapes) instead of being skipped. The variable must be set before any kernel is
defined, hence here, before the test modules import the package.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # property tests: fixed examples under CI (a red CI must be reproducible), fresh ones elsewhere
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        settings.load_profile("ci")
except ImportError:
    pass
