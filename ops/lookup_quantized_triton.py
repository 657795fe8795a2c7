"""Triton kernel of ``memlayer::lookup_quantized`` (the CUDA kernel of ``ops/lookup_quantized.py``).

    out[t] = sum_b w[t, b] * scale[i] * rows[i],   i = idx[t, b]

The lookup forward of ``ops/lookup_triton.py`` with the dequantization inside: each step gathers
a ``[rows, BLOCK_D]`` tile of int8 (or fp8 e4m3) rows, converts it to fp32 in registers and
multiplies it by ``w * scale`` of its rows; the table is never dequantized in memory. A quarter
of the bytes of an fp32 table per row read (half of bf16's), plus 4 bytes of scale per row.
Indices outside ``[0, N)`` are masked (never read, contribute nothing), row offsets are int64,
any D works (masked ``BLOCK_D`` tiles); the tile and accumulator choices are the lookup's
(``ops.lookup_triton``), so ``benchmarks/kernels_static.py`` can compile it the same way.

The launcher takes plain tensors of any device Triton can run on: CUDA, or CPU tensors under
``TRITON_INTERPRET=1`` (how the tests run it without a GPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ops.lookup_triton import (
    Launch,
    _bag_slots,
    _fold_rows,
    _jit,
    _unit_stride_rows,
    bag_launch,
    tl,
)


@_jit
def _lookup_quantized_kernel(
    rows_ptr, scale_ptr, indices_ptr, weights_ptr, out_ptr,
    num_rows, bag_size, dim, rows_row_stride,
    ACC_ROWS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (token, D-block): gathers BLOCK_B quantized rows per step, dequantizes
    and sums them in fp32 registers."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    acc = tl.zeros([ACC_ROWS, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, bag_size, BLOCK_B):
        rows, weights, valid = _bag_slots(
            indices_ptr, weights_ptr, token, b0, num_rows, bag_size, BLOCK_B
        )
        scales = tl.load(scale_ptr + rows, mask=valid, other=0)
        row_weights = weights.to(tl.float32) * scales.to(tl.float32)  # the scale, once per row
        row_offsets = rows.to(tl.int64) * rows_row_stride
        tile_mask = valid[:, None] & col_mask[None, :]
        # No ``other=``: a constant does not cast to fp8. Masked lanes are zeroed after the
        # conversion instead (whatever a masked load holds, it never reaches the sum).
        tile = tl.load(rows_ptr + row_offsets[:, None] + cols[None, :], mask=tile_mask)
        tile = tl.where(tile_mask, tile.to(tl.float32), 0.0)
        acc += _fold_rows(tile * row_weights[:, None], ACC_ROWS)
    out = tl.sum(acc, axis=0)
    tl.store(out_ptr + token * dim + cols, out.to(out_ptr.dtype.element_ty), mask=col_mask)


def lookup_quantized_launch(num_tokens: int, bag_size: int, dim: int, dtype: torch.dtype) -> Launch:
    """``_lookup_quantized_kernel``: one program per (token, D-block); ``dtype`` of the rows."""
    return bag_launch(num_tokens, bag_size, dim, dtype)


def lookup_forward(
    rows: Tensor, scale: Tensor, indices: Tensor, weights: Tensor, out_dtype: torch.dtype
) -> Tensor:
    """``out[t] = sum_b weights[t, b] * scale[i] * rows[i]``, ``[T, D]`` in ``out_dtype``."""
    (num_tokens, bag_size), dim = indices.shape, rows.shape[1]
    out = torch.empty((num_tokens, dim), dtype=out_dtype, device=rows.device)
    if out.numel() == 0:
        return out
    rows = _unit_stride_rows(rows)
    lookup_quantized_launch(num_tokens, bag_size, dim, rows.dtype)(
        _lookup_quantized_kernel,
        rows, scale.contiguous(), indices.contiguous(), weights.contiguous(), out,
        rows.shape[0], bag_size, dim, rows.stride(0),
    )  # fmt: skip
    return out
