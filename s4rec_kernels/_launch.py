"""Launch helpers shared by the kernel files: the current device, the device's SM count and
architecture, and ``Launch``, the settings of one kernel launch.

Every launcher gets its settings from a pure function of shapes, dtypes and the device's
architecture (``*_launch`` / ``*_launches`` in the op files), so that what a launch picks can be
enumerated without a device: the compile tests compile exactly those specialisations for sm_80
and sm_90.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import os
import types
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch


@dataclass(frozen=True)
class Launch:
    """One kernel launch apart from its tensors and sizes: the jit function, the grid, the
    kernel's ``tl.constexpr`` arguments (``meta``), num_warps and num_stages."""
    kernel: object
    grid: Tuple[int, ...]
    meta: Dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3

    def __call__(self, *args) -> None:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            interpreter_index_fix()
        self.kernel[self.grid](*args, **self.meta, num_warps=self.num_warps,
                               num_stages=self.num_stages)


def _index_of_scalar(self) -> int:
    return int(self.handle.data.reshape(()))


@functools.lru_cache(maxsize=None)
def interpreter_index_fix() -> bool:
    """Make the Triton interpreter's scalars usable as ``range`` bounds; True if it was needed.

    The interpreter holds a kernel's scalars (arguments, ``tl.program_id``, anything computed
    from them) as numpy arrays of shape (1,), and a loop ``for i in range(a, b, BLOCK)`` turns
    ``a`` and ``b`` into Python ints through ``int(array)``. NumPy 2.4 refuses ``int()`` of an
    array with a dimension, so under Triton 3.6's interpreter (later ones squeeze the array
    first) every loop with run-time bounds raises TypeError. When the installed interpreter
    fails that way on a probe, its per-launch patch of ``tl.tensor`` is wrapped so that
    ``__index__`` reads the one element instead. Only the interpreter is touched: compiled
    kernels are the same either way.
    """
    try:
        import numpy as np
        from triton.runtime import interpreter

        patch = interpreter._patch_lang_tensor
        scope = interpreter._LangPatchScope()
    except (ImportError, AttributeError):  # no Triton, or an interpreter laid out otherwise
        return False

    class _Probe:
        pass

    probe = _Probe()
    probe.handle = types.SimpleNamespace(data=np.ones(1, dtype=np.int32))
    try:
        patch(_Probe, scope)
    except Exception:  # a patch that needs more than this probe: leave the interpreter as is
        scope.restore()
        return False
    try:
        operator.index(probe)
        return False  # the interpreter converts (1,) arrays itself
    except TypeError:
        pass
    finally:
        scope.restore()

    def patch_with_index(tensor, scope) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", _index_of_scalar)

    interpreter._patch_lang_tensor = patch_with_index
    return True


def on_device(device: torch.device):
    """Make ``device`` current while launching (Triton launches on the current CUDA device)."""
    if device.type == "cuda" and device.index not in (None, torch.cuda.current_device()):
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index``."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def device_arch(device: torch.device) -> Optional[int]:
    """Compute capability of a CUDA device as one number (90 for sm_90); None off CUDA (the
    Triton interpreter)."""
    if device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def programs_per_device(device: torch.device, per_sm: int) -> int:
    """``per_sm`` programs for every SM of ``device`` (a CUDA device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return per_sm * sm_count(index)
