"""The CPU kernels of the lookup ops: ``ops/csrc/lookup_cpu.cpp``, built on first use.

The C++ source is compiled once per machine by ``torch.utils.cpp_extension`` (cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and registers
``torch.ops.memlayer_cpu.*``. Arguments are validated by ``ops/lookup.py`` before they get here.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

_SOURCE = Path(__file__).with_name("csrc") / "lookup_cpu.cpp"


@functools.cache
def _kernels():
    from torch.utils.cpp_extension import load

    load(
        name="memcompile_lookup_cpu",
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )
    return torch.ops.memlayer_cpu


def lookup_forward(values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    if values.dtype in (torch.float32, torch.float64):
        # ATen's FBGEMM kernel is already bandwidth bound for full-precision tables.
        if indices.numel() == 0:
            return values.new_zeros((indices.shape[0], values.shape[1]))
        return F.embedding_bag(
            indices, values, per_sample_weights=weights.to(values.dtype), mode="sum"
        )
    # For bf16/fp16 tables ATen would round the weights to the table's dtype; ours keeps them
    # in fp32 and accumulates in fp32.
    return _kernels().lookup_forward(values, indices, weights)


def lookup_values_grad(grad_out: Tensor, indices: Tensor, weights: Tensor, num_rows: int) -> Tensor:
    return _kernels().lookup_values_grad(grad_out, indices, weights, num_rows)


def lookup_weights_grad(grad_out: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    # The kernel reads both as the table's element type.
    return _kernels().lookup_weights_grad(grad_out.to(values.dtype), values, indices)
