"""CPU kernel of ``memlayer::lookup_quantized`` (the CPU side of ``ops/lookup_quantized.py``):
``ops/csrc/lookup_quantized_cpu.cpp``.

The C++ source is compiled on first use (``ops/_cpu_build.py``) and registers
``torch.ops.memlayer_quantized_cpu.lookup_forward``. The launcher takes arguments that
``ops/lookup_quantized.py`` has already checked, indices in range included.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ops._cpu_build import build


@functools.cache
def _kernels():
    build("lookup_quantized_cpu", "the quantized-table lookup")
    return torch.ops.memlayer_quantized_cpu


def lookup_forward(
    rows: Tensor, scale: Tensor, indices: Tensor, weights: Tensor, out_dtype: torch.dtype
) -> Tensor:
    """``out[t] = sum_b weights[t, b] * scale[i] * rows[i]`` (``i = indices[t, b]``), rows int8
    or fp8 e4m3 dequantized in the kernel, sums in fp32, ``[T, D]`` in ``out_dtype``."""
    return _kernels().lookup_forward(rows, scale, indices, weights, out_dtype)
