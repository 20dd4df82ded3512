"""Training and evaluation precision: `--precision auto|bf16|tf32|fp32`.

  fp32  float32 everywhere; the kernels' fp32 products as torch's matmul precision says (true
        fp32 by default; InfoNCE takes 3xTF32).
  bf16  autocast to bfloat16 around the forward passes: the dense layers take bf16 operands
        (torch.autocast's rules), and the fused ops get their operands in bf16 (``op_inputs``),
        where they compute in fp32 and return fp32 (the ops' dtype rule); fp32 accumulation,
        fp32 master weights (the parameters, Adam's state, and every loss stay fp32). No loss
        scaling: bf16 has fp32's range.
  tf32  fp32 values, TF32 tensor-core products: torch's CUDA matmuls and convolutions
        (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``) and the
        kernels' fp32 products (``s4rec_kernels._dispatch.float32_dots("tf32")``). A CPU has no
        TF32 units: there it runs fp32.
  auto  bf16 on CUDA, fp32 on a CPU.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Tuple

import torch
from torch import Tensor

from s4rec_kernels._dispatch import float32_dots

PRECISIONS = ("auto", "bf16", "tf32", "fp32")

# What each resolved precision means, for the metrics' protocol block
DESCRIPTIONS = {
    "fp32": "fp32: float32 weights, activations and products",
    "bf16": "bf16: autocast to bfloat16 (bf16 operands, fp32 accumulation, fp32 master weights "
            "and losses)",
    "tf32": "tf32: float32 values, TF32 tensor-core products in the dense layers and the kernels",
}


def check(name: object) -> str:
    """``name`` if it is a precision, else ValueError naming the flag and the choices."""
    if not isinstance(name, str) or name not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return name


def resolve(name: str, device: torch.device) -> Tuple[str, str]:
    """(the precision a run on ``device`` uses for ``name``, a note to print or ""): "auto" is
    bf16 on CUDA and fp32 elsewhere; "tf32" is fp32 off CUDA."""
    check(name)
    if name == "auto":
        return ("bf16" if device.type == "cuda" else "fp32"), ""
    if name == "tf32" and device.type != "cuda":
        return "fp32", f"note: --precision tf32 on {device.type}: no TF32 units, computing in fp32"
    return name, ""


def describe(precision: str, asked: str) -> str:
    """The protocol block's line: what ran, and what was asked when it differs."""
    text = DESCRIPTIONS[precision]
    return text if asked == precision else f"{text} (--precision {asked})"


@contextlib.contextmanager
def settings(precision: str, device: torch.device) -> Iterator[None]:
    """The run-wide switches of ``precision`` (a resolved one) for the block: for "tf32", TF32
    in torch's CUDA matmuls and convolutions and in the kernels' fp32 products; restored after."""
    if precision != "tf32" or device.type != "cuda":
        yield
        return
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with float32_dots("tf32"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def autocast(precision: str, device: torch.device):
    """The region a forward pass runs in: autocast to bf16 for "bf16", nothing otherwise."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def op_inputs(*tensors: Tensor) -> Tuple[Tensor, ...]:
    """The floating-point operands of a fused op, as it should get them: inside an autocast
    region in autocast's dtype (torch.autocast does not reach custom ops, and an op wants its
    operands in one dtype; it computes in fp32 and returns fp32), elsewhere unchanged."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)
