"""``torch.ops.memlayer.lookup_quantized``: the weighted bag over a quantized value table.

    out[t] = sum_b weights[t, b] * scale[i] * rows[i],   i = indices[t, b]    (summed in fp32)

``rows [N, D]`` are int8 or fp8 e4m3 (``torch.float8_e4m3fn``) with one scale per row
(``scale [N]``, fp32, bf16 or fp16): the table of ``memlayer::lookup`` stored in a quarter of
fp32's bytes (half of bf16's). The kernels dequantize each gathered row in registers, inside
the sum: the table is never dequantized in memory, not even a row block of it.

- ``memlayer::lookup_quantized(rows, scale, indices, weights, out_dtype=None) -> out [T, D]``,
  in ``out_dtype`` (default: the weights' dtype).

Inference only: differentiating it raises (quantized tables are for inference: train in full
precision, quantize at export, ``recipes.export --quantize-table int8``). :func:`quantize_rows`
makes ``(rows, scale)`` from a full-precision table with torchao's quantization primitives
(per-row symmetric: the row's largest magnitude maps to 127, or to fp8's 448).

This file holds the op: argument checks (``ops/checks.py``), each device type's kernel
(``torch.library.impl(op, "CPU")``, ``"CUDA"``), the fake kernel (meta device,
torch.compile), the autograd refusal and the float64 reference. Kernels: CPU in
``ops/lookup_quantized_cpu.py`` (C++), CUDA in ``ops/lookup_quantized_triton.py`` (Triton).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ops import lookup_quantized_cpu, lookup_quantized_triton
from ops._autograd import OpFunction, below_autograd, register_autograd
from ops.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_indices_in_range,
    check_same_device,
    check_shape,
    check_tensor,
    refuse_other_devices,
)

#: The element types of a quantized table, by the names ``recipes.export --quantize-table``
#: and ``config.json`` use.
QUANTIZED_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

TRAINING_ERROR = (
    "lookup_quantized: quantized tables are for inference: train in full precision, quantize "
    "at export (python -m recipes.export --quantize-table int8)"
)

torch.library.define(
    "memlayer::lookup_quantized",
    "(Tensor rows, Tensor scale, Tensor indices, Tensor weights, ScalarType? out_dtype=None)"
    " -> Tensor",
    tags=(torch.Tag.pt2_compliant_tag,),
)

lookup_quantized = torch.ops.memlayer.lookup_quantized
"""``lookup_quantized(rows [N, D], scale [N], indices [T, B], weights [T, B], out_dtype=None)
-> [T, D]``: ``out[t] = sum_b weights[t, b] * scale[i] * rows[i]`` (``i = indices[t, b]``),
summed in fp32, in ``out_dtype`` (default the weights' dtype). rows int8 or float8_e4m3fn;
scale float32/bfloat16/float16; indices int64/int32 in [0, N); weights floating."""


# --------------------------------------------------------------------------- checks


def _check(rows: Tensor, scale: Tensor, indices: Tensor, weights: Tensor) -> None:
    op = "lookup_quantized"
    check_tensor(op, "rows", rows, "[N, D]", tuple(QUANTIZED_DTYPES.values()))
    check_tensor(op, "scale", scale, "[N]", SCALE_DTYPES)
    check_shape(op, "scale", scale, rows.shape[:1], "one scale per row of rows")
    check_tensor(op, "indices", indices, "[T, B]", INDEX_DTYPES)
    check_tensor(op, "weights", weights, "[T, B]")
    check_shape(op, "weights", weights, indices.shape, "the shape of indices")
    check_same_device(op, rows=rows, scale=scale, indices=indices, weights=weights)


def _out_dtype(weights: Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    dtype = weights.dtype if out_dtype is None else out_dtype
    if dtype not in FLOAT_DTYPES:
        names = "float32, bfloat16, float16 or float64"
        raise TypeError(f"lookup_quantized: out_dtype must be {names}, got {dtype}")
    return dtype


def _checked(rows, scale, indices, weights, out_dtype) -> torch.dtype:
    """Check everything (index ranges too) and return the output dtype."""
    _check(rows, scale, indices, weights)
    check_indices_in_range(indices, rows.shape[0], "lookup_quantized: indices", "the rows")
    return _out_dtype(weights, out_dtype)


# --------------------------------------------------------------------------- kernels


@torch.library.impl("memlayer::lookup_quantized", "CPU")
def _lookup_quantized_cpu(rows, scale, indices, weights, out_dtype=None):
    dtype = _checked(rows, scale, indices, weights, out_dtype)
    if indices.numel() == 0 or rows.shape[1] == 0:
        return torch.zeros((indices.shape[0], rows.shape[1]), dtype=dtype)
    return lookup_quantized_cpu.lookup_forward(rows, scale, indices, weights, dtype)


@torch.library.impl("memlayer::lookup_quantized", "CUDA")
def _lookup_quantized_cuda(rows, scale, indices, weights, out_dtype=None):
    dtype = _checked(rows, scale, indices, weights, out_dtype)
    return lookup_quantized_triton.lookup_forward(rows, scale, indices, weights, dtype)


@torch.library.register_fake("memlayer::lookup_quantized")
def _lookup_quantized_fake(rows, scale, indices, weights, out_dtype=None):
    _check(rows, scale, indices, weights)
    return rows.new_empty((indices.shape[0], rows.shape[1]), dtype=_out_dtype(weights, out_dtype))


refuse_other_devices("memlayer::lookup_quantized", _lookup_quantized_fake)


# --------------------------------------------------------------------------- autograd


class _LookupQuantized(OpFunction):
    """Runs the lookup; any gradient through it (reverse or forward mode) is refused."""

    @staticmethod
    def forward(rows, scale, indices, weights, out_dtype):
        return below_autograd(lookup_quantized.default, rows, scale, indices, weights, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_out):
        raise RuntimeError(TRAINING_ERROR)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(TRAINING_ERROR)


register_autograd(lookup_quantized.default, _LookupQuantized)


# --------------------------------------------------------------------------- quantizing


def quantize_rows(values: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(rows [N, D] in dtype, scale [N] fp32)`` with ``values ≈ scale[:, None] * rows``:
    per-row symmetric quantization by torchao's primitives (a row's largest magnitude becomes
    127 for int8, 448 for fp8 e4m3; an all-zero row gets a tiny scale and zero rows). Needs
    ``torchao`` (the ``recipes`` extra); loading and reading a quantized table does not."""
    from torchao.quantization.quant_primitives import (
        MappingType,
        _choose_scale_float8,
        _quantize_affine_float8,
        choose_qparams_affine,
        quantize_affine,
    )

    check_tensor("quantize_rows", "values", values, "[N, D]")
    if dtype not in QUANTIZED_DTYPES.values():
        raise TypeError(f"quantize_rows: dtype must be int8 or float8_e4m3fn, got {dtype}")
    values = values.detach().float()
    width = values.shape[1]
    if width == 1:
        # torchao reduces a one-element block over every dim: a zero column makes the blocks
        # two wide and changes no row's peak; it is dropped again below.
        values = torch.nn.functional.pad(values, (0, 1))
    block_size = (1, values.shape[1])  # one scale per row
    tiny = torch.finfo(torch.float32).tiny
    if dtype == torch.int8:
        scale, zero_point = choose_qparams_affine(
            values, MappingType.SYMMETRIC, block_size, torch.int8, -127, 127, eps=tiny,
            scale_dtype=torch.float32,
        )  # fmt: skip
        rows = quantize_affine(values, block_size, scale, zero_point, torch.int8, -127, 127)
    else:
        scale = _choose_scale_float8(values, list(block_size), dtype, hp_value_lb=tiny)
        rows = _quantize_affine_float8(values, scale, dtype)
    return rows[:, :width], scale.reshape(-1).float()


def dequantize_rows(rows: Tensor, scale: Tensor) -> Tensor:
    """``scale[:, None] * rows`` in float64: the table the quantized one stands for (tests and
    measurements only; the lookup never forms it)."""
    return scale.double()[:, None] * rows.double()


def reference_lookup_quantized(
    rows: Tensor, scale: Tensor, indices: Tensor, weights: Tensor
) -> Tensor:
    """Dequantize, then look up, in float64: what the kernels are tested against."""
    gathered = dequantize_rows(rows, scale)[indices.long()]  # [T, B, D]
    return (weights.double().unsqueeze(-1) * gathered).sum(dim=1)
