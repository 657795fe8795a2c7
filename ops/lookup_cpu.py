"""CPU kernels of the lookup ops (the CPU side of ``ops/lookup.py``): ``ops/csrc/lookup_cpu.cpp``.

The C++ source is compiled on first use by ``torch.utils.cpp_extension`` (about 30 s, once per
machine, cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and
registers ``torch.ops.memlayer_cpu.*``. These launchers take arguments that ``ops/lookup.py``
has already checked, indices in range included.
"""

from __future__ import annotations

import functools
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("csrc") / "lookup_cpu.cpp"
_BUILD_NOTICE = (
    "memcompile: compiling the CPU kernels of the memory lookup (once per machine, about 30 s; "
    "cached in ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR)..."
)


@functools.cache
def _kernels():
    from torch.utils.cpp_extension import load

    # A cached build loads in well under a second: only a real compile is announced.
    notice = threading.Timer(2.0, lambda: print(_BUILD_NOTICE, file=sys.stderr, flush=True))
    notice.start()
    try:
        load(
            name="memcompile_lookup_cpu",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    finally:
        notice.cancel()
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
