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
        self.kernel[self.grid](*args, **self.meta, num_warps=self.num_warps,
                               num_stages=self.num_stages)


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
