"""Counting the times code waits for the device (shared by test_sync_free and
test_distributed_train).

Waits are counted two ways. A TorchDispatchMode sees the aten ops that copy a value to the host
(_local_scalar_dense, item, is_nonzero, nonzero, and indexing by a boolean mask, which runs a
nonzero inside); a dispatch mode is off while a torch.library custom op's own body runs, so the
Python calls that wait (Tensor.item, .tolist, .nonzero, bool(), int(), float()) are counted as
well, wherever they are made.
"""
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

WAITING_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
               torch.ops.aten.is_nonzero.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default}
WAITING_METHODS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__")


class _Waits(TorchDispatchMode):
    def __init__(self, seen):
        super().__init__()
        self.seen = seen
        self.python_depth = [0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.python_depth[0]:
            masked = func is torch.ops.aten.index.Tensor and any(
                i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
            if func in WAITING_OPS or masked:
                self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_waits():
    """Yields the list of waits seen, one entry per wait."""
    seen = []
    mode = _Waits(seen)
    originals = {name: getattr(torch.Tensor, name) for name in WAITING_METHODS}

    def counting(name, method):
        def wrapper(self, *args, **kwargs):
            if not mode.python_depth[0]:
                seen.append(f"Tensor.{name}")
            mode.python_depth[0] += 1
            try:
                return method(self, *args, **kwargs)
            finally:
                mode.python_depth[0] -= 1
        return wrapper

    for name, method in originals.items():
        setattr(torch.Tensor, name, counting(name, method))
    try:
        with mode:
            yield seen
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
