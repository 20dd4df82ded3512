"""Launch helpers shared by the kernel files: the current device, and the device's SM count."""
from __future__ import annotations

import contextlib
import functools

import torch


def on_device(device: torch.device):
    """Make ``device`` current while launching (Triton launches on the current CUDA device)."""
    if device.type == "cuda" and device.index not in (None, torch.cuda.current_device()):
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index``."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def programs_per_device(device: torch.device, per_sm: int) -> int:
    """``per_sm`` programs for every SM of ``device`` (a CUDA device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return per_sm * sm_count(index)
