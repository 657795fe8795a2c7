"""CPU kernels of the lookup ops (the CPU side of ``ops/lookup.py``): ``ops/csrc/lookup_cpu.cpp``.

The C++ source is compiled on first use (``ops/_cpu_build.py``) and registers
``torch.ops.memlayer_cpu.*``. These launchers take arguments that ``ops/lookup.py``
has already checked, indices in range included.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ops._cpu_build import build


@functools.cache
def _kernels():
    build("lookup_cpu", "the memory lookup")
    return torch.ops.memlayer_cpu


def lookup_forward(values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """``out[t] = sum_b weights[t, b] * values[indices[t, b]]``; bf16/fp16 tables (weights stay
    fp32, sums in fp32)."""
    return _kernels().lookup_forward(values, indices, weights)


def lookup_values_grad(grad_out: Tensor, indices: Tensor, weights: Tensor, num_rows: int) -> Tensor:
    """The dense ``[num_rows, D]`` value gradient, bitwise deterministic."""
    return _kernels().lookup_values_grad(grad_out, indices, weights, num_rows)


def lookup_weights_grad(grad_out: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """``<grad_out[t], values[indices[t, b]]>`` in the accumulation dtype."""
    # The kernel reads both as the table's element type.
    return _kernels().lookup_weights_grad(grad_out.to(values.dtype), values, indices)
