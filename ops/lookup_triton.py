"""Triton kernels of the lookup ops (the CUDA kernels of ``ops/lookup.py``).

    forward        out[t]         = sum_b w[t, b] * values[idx[t, b]]
    value grad     grad_values[n] = sum_{(t, b): idx[t, b] == n} w[t, b] * grad_out[t]
    weight grad    grad_w[t, b]   = <grad_out[t], values[idx[t, b]]>

Every kernel accumulates in fp32 (fp64 when the values are fp64, so ``gradcheck`` works),
gathers a [rows, BLOCK_D] tile per step (many independent row loads in flight), walks D in
masked ``BLOCK_D`` tiles so any D works, computes row offsets in int64 (N * D can exceed 2**31)
and masks every index outside ``[0, N)``: such an index is never read and contributes nothing
(a zero to the forward and the value gradient, a zero weight gradient). No loop reduces through
shared memory at every step: where a step's sum would cross threads (bf16 tiles, narrow fp32
ones, the weight gradient's dot products), the accumulator is a tile summed once after the loop
(``python -m benchmarks.kernels_static`` counts the barriers in loops).

The value gradient has two modes:

- deterministic (the default): a stable sort of the flat indices (which depends only on the
  indices) and a ``searchsorted`` of every row give each row its contiguous run of hits, in CSR
  form. One program per (row, D-block) sums its run in that fixed order and stores the row once:
  bitwise identical run to run, no atomics, no host sync, and no separate zero fill (rows without
  hits store their zeros in the same pass, so the dense [N, D] gradient is written exactly once).
  A hot row would serialize its program, so runs longer than ``hits_per_piece`` are first summed
  in pieces by parallel programs (an upper-bound grid, again no sync), then in piece order.
- atomic (``deterministic=False``): one program per (token, D-block) atomically adds
  ``w * grad_out[t]`` into a zeroed buffer (fp32 for bf16/fp16 values, as low-precision atomics
  would lose the sum), with relaxed atomics (the adds need no ordering; the default acq_rel
  fences every one). Not bitwise stable; useful as a cross-check and where sorting dominates.

The ops check index ranges before launching only in debug mode on CUDA (see ``ops/checks.py``):
the masking is what keeps an unchecked bad index from ever being read.

The launchers take plain tensors of any device Triton can run on: CUDA, or CPU tensors under
``TRITON_INTERPRET=1`` (how the tests run them without a GPU).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ops._dtypes import accumulation_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS and other Triton-less installs have no CUDA either: never launched
    triton = tl = None


def _jit(kernel):
    return triton.jit(kernel) if triton is not None else kernel


# --------------------------------------------------------------------------- kernels


@_jit
def _fold_rows(terms, ACC_ROWS: tl.constexpr):
    """A step's [rows, BLOCK_D] terms as the accumulator's [ACC_ROWS, BLOCK_D] addend.

    Summing the rows at every step is free when each thread holds whole columns, but goes
    through shared memory, with barriers, when the rows of a column are spread over threads
    (bf16 tiles, narrow fp32 ones): then ACC_ROWS is the tile's row count and the rows are
    summed once, after the loop.
    """
    if ACC_ROWS == 1:
        folded = tl.sum(terms, axis=0, keep_dims=True)
    else:
        folded = terms
    return folded


@_jit
def _bag_slots(indices_ptr, weights_ptr, token, b0, num_rows, bag_size, BLOCK_B: tl.constexpr):
    """Slots ``b0 : b0 + BLOCK_B`` of a token's bag: their rows, their weights, and which are
    valid (inside the bag, index in ``[0, N)``); an invalid slot's row is never to be read."""
    slots = b0 + tl.arange(0, BLOCK_B)
    slot_mask = slots < bag_size
    rows = tl.load(indices_ptr + token * bag_size + slots, mask=slot_mask, other=0)
    weights = tl.load(weights_ptr + token * bag_size + slots, mask=slot_mask, other=0)
    valid = slot_mask & (rows >= 0) & (rows < num_rows)
    return rows, weights, valid


@_jit
def _lookup_forward_kernel(
    values_ptr, indices_ptr, weights_ptr, out_ptr,
    num_rows, bag_size, dim, values_row_stride,
    ACC_DTYPE: tl.constexpr, ACC_ROWS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (token, D-block): gathers BLOCK_B rows per step, sums them in registers."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    acc = tl.zeros([ACC_ROWS, BLOCK_D], dtype=ACC_DTYPE)
    for b0 in range(0, bag_size, BLOCK_B):
        rows, weights, valid = _bag_slots(
            indices_ptr, weights_ptr, token, b0, num_rows, bag_size, BLOCK_B
        )
        row_offsets = rows.to(tl.int64) * values_row_stride
        tile = tl.load(
            values_ptr + row_offsets[:, None] + cols[None, :],
            mask=valid[:, None] & col_mask[None, :],
            other=0,
        )
        acc += _fold_rows(tile.to(ACC_DTYPE) * weights.to(ACC_DTYPE)[:, None], ACC_ROWS)
    out = tl.sum(acc, axis=0)
    tl.store(out_ptr + token * dim + cols, out.to(out_ptr.dtype.element_ty), mask=col_mask)


@_jit
def _sum_hits(
    grad_out_ptr, weights_ptr, hit_order_ptr, first_hit, end_hit, bag_size, dim, cols, col_mask,
    ACC_DTYPE: tl.constexpr, ACC_ROWS: tl.constexpr, BLOCK_HITS: tl.constexpr,
):  # fmt: skip
    """The sum of w * grad_out[token] over the hits hit_order[first_hit:end_hit], in order."""
    acc = tl.zeros([ACC_ROWS, cols.shape[0]], dtype=ACC_DTYPE)
    for h0 in range(first_hit, end_hit, BLOCK_HITS):
        hits = h0 + tl.arange(0, BLOCK_HITS)
        hit_mask = hits < end_hit
        flat_positions = tl.load(hit_order_ptr + hits, mask=hit_mask, other=0)
        weights = tl.load(weights_ptr + flat_positions, mask=hit_mask, other=0)
        tokens = flat_positions // bag_size
        tile = tl.load(
            grad_out_ptr + tokens[:, None] * dim + cols[None, :],
            mask=hit_mask[:, None] & col_mask[None, :],
            other=0,
        )
        acc += _fold_rows(tile.to(ACC_DTYPE) * weights.to(ACC_DTYPE)[:, None], ACC_ROWS)
    return tl.sum(acc, axis=0)


@_jit
def _hot_row_pieces_kernel(
    grad_out_ptr, weights_ptr, hit_order_ptr, row_starts_ptr, piece_starts_ptr, piece_rows_ptr,
    partials_ptr, num_rows, bag_size, dim, hits_per_piece,
    ACC_DTYPE: tl.constexpr, ACC_ROWS: tl.constexpr, BLOCK_HITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (piece, D-block): the partial sum of one piece of a hot row's run.

    Row n owns the pieces ``piece_starts[n]:piece_starts[n + 1]``, each of ``hits_per_piece``
    consecutive hits of its run (the last one shorter). The grid is an upper bound on the
    number of pieces (no host sync): spare programs, whose row is ``num_rows``, exit.
    """
    piece = tl.program_id(0).to(tl.int64)
    row = tl.load(piece_rows_ptr + piece)
    if row < num_rows:
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_mask = cols < dim
        piece_in_row = piece - tl.load(piece_starts_ptr + row)
        first_hit = tl.load(row_starts_ptr + row) + piece_in_row * hits_per_piece
        end_hit = tl.minimum(first_hit + hits_per_piece, tl.load(row_starts_ptr + row + 1))
        acc = _sum_hits(
            grad_out_ptr, weights_ptr, hit_order_ptr, first_hit, end_hit,
            bag_size, dim, cols, col_mask, ACC_DTYPE, ACC_ROWS, BLOCK_HITS,
        )  # fmt: skip
        tl.store(partials_ptr + piece * dim + cols, acc, mask=col_mask)


@_jit
def _values_grad_sorted_kernel(
    grad_out_ptr, weights_ptr, hit_order_ptr, row_starts_ptr, piece_starts_ptr, partials_ptr,
    grad_values_ptr, bag_size, dim,
    ACC_DTYPE: tl.constexpr, ACC_ROWS: tl.constexpr, BLOCK_HITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (row, D-block): sums the row's hits in sorted order, stores the row once.

    ``hit_order`` lists the flat positions ``t * bag_size + b`` sorted (stably) by index, and
    the hits of row n are ``hit_order[row_starts[n]:row_starts[n + 1]]``. A hot row, one with
    pieces, adds up its pieces' partial sums instead, in piece order. Rows without hits store
    zeros, which is the gradient's zero fill.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    first_piece = tl.load(piece_starts_ptr + row)
    end_piece = tl.load(piece_starts_ptr + row + 1)
    if first_piece == end_piece:
        acc = _sum_hits(
            grad_out_ptr, weights_ptr, hit_order_ptr,
            tl.load(row_starts_ptr + row), tl.load(row_starts_ptr + row + 1),
            bag_size, dim, cols, col_mask, ACC_DTYPE, ACC_ROWS, BLOCK_HITS,
        )  # fmt: skip
    else:
        acc = tl.zeros([BLOCK_D], dtype=ACC_DTYPE)
        for piece in range(first_piece, end_piece):
            acc += tl.load(partials_ptr + piece * dim + cols, mask=col_mask, other=0)
    out = acc.to(grad_values_ptr.dtype.element_ty)
    tl.store(grad_values_ptr + row * dim + cols, out, mask=col_mask)


@_jit
def _values_grad_atomic_kernel(
    grad_out_ptr, indices_ptr, weights_ptr, grad_values_ptr,
    num_rows, bag_size, dim,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (token, D-block): atomically adds w * grad_out[t] into each of its rows."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    acc_dtype = grad_values_ptr.dtype.element_ty
    grad = tl.load(grad_out_ptr + token * dim + cols, mask=col_mask, other=0).to(acc_dtype)
    for b0 in range(0, bag_size, BLOCK_B):
        rows, weights, valid = _bag_slots(
            indices_ptr, weights_ptr, token, b0, num_rows, bag_size, BLOCK_B
        )
        tl.atomic_add(
            grad_values_ptr + rows.to(tl.int64)[:, None] * dim + cols[None, :],
            weights.to(acc_dtype)[:, None] * grad[None, :],
            mask=valid[:, None] & col_mask[None, :],
            sem="relaxed",  # no ordering needed between the adds; acq_rel fences every one
        )


@_jit
def _weights_grad_kernel(
    grad_out_ptr, values_ptr, indices_ptr, grad_weights_ptr,
    num_rows, bag_size, dim, values_row_stride,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (token, B-block): BLOCK_B dot products <grad_out[t], values[row]>."""
    acc_dtype = grad_weights_ptr.dtype.element_ty
    token = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    slot_mask = slots < bag_size
    rows = tl.load(indices_ptr + token * bag_size + slots, mask=slot_mask, other=0)
    valid = slot_mask & (rows >= 0) & (rows < num_rows)
    row_offsets = rows.to(tl.int64) * values_row_stride
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=acc_dtype)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < dim
        grad = tl.load(grad_out_ptr + token * dim + cols, mask=col_mask, other=0)
        tile = tl.load(
            values_ptr + row_offsets[:, None] + cols[None, :],
            mask=valid[:, None] & col_mask[None, :],
            other=0,
        )
        acc += tile.to(acc_dtype) * grad.to(acc_dtype)[None, :]
    dots = tl.sum(acc, axis=1)  # once, after the loop: no per-step shared-memory reduction
    tl.store(grad_weights_ptr + token * bag_size + slots, dots, mask=slot_mask)


# --------------------------------------------------------------------------- launch choices
#
# What each launcher chooses (grid, compile-time constants, warps) is a pure function of shapes
# and dtypes: the launchers call it, and so does ``benchmarks/kernels_static.py``, which compiles
# every kernel for sm_80/sm_90 with exactly these choices.

# Elements of one [rows, BLOCK_D] tile in flight per program: enough independent row loads to
# hide gather latency, few enough registers (32 fp32 per thread at 4 warps).
_TILE_ELEMENTS = 4096
_MAX_BLOCK_D = 512
# Deterministic value gradient: hits one program sums serially before a hot row is split.
_HITS_PER_PIECE = 1024
_NUM_WARPS = 4


class Launch(NamedTuple):
    """One kernel launch's choices: grid, compile-time constants and warps per program."""

    grid: tuple[int, ...]
    constexprs: dict[str, Any]
    num_warps: int = _NUM_WARPS

    def __call__(self, kernel, *args) -> None:
        kernel[self.grid](*args, **self.constexprs, num_warps=self.num_warps)


def _tile_shape(dim: int, num_rows_per_step: int) -> tuple[int, int]:
    """(rows per step, BLOCK_D): BLOCK_D covers D up to 512 wide; rows fill the tile budget."""
    block_d = min(triton.next_power_of_2(max(dim, 1)), _MAX_BLOCK_D)
    block_rows = min(triton.next_power_of_2(max(num_rows_per_step, 1)), _TILE_ELEMENTS // block_d)
    return block_rows, block_d


def _accumulator_rows(dtype: torch.dtype, block_rows: int, block_d: int) -> int:
    """The rows of a gather kernel's accumulator: 1 when each thread holds whole columns of the
    [block_rows, block_d] tile, so a step's rows sum in registers; else block_rows (see
    ``_fold_rows``). Triton's default layout gives a thread 16 bytes of a row and spreads the
    threads along the row first: they cover the row when ``block_d`` is that wide.
    """
    columns_covered = _NUM_WARPS * 32 * (16 // dtype.itemsize)
    return 1 if block_d >= columns_covered else block_rows


def _triton_dtype(dtype: torch.dtype):
    return getattr(tl, str(dtype).removeprefix("torch."))


def _acc_dtype(dtype: torch.dtype):
    return _triton_dtype(accumulation_dtype(dtype))


def bag_launch(
    num_tokens: int, bag_size: int, dim: int, dtype: torch.dtype, **constexprs
) -> Launch:
    """A forward kernel summing bags (this module's, ``ops.lookup_quantized_triton``'s): one
    program per (token, D-block) gathering BLOCK_B rows of ``dtype`` per step; ``constexprs`` are
    the kernel's own."""
    block_b, block_d = _tile_shape(dim, bag_size)
    constexprs |= {
        "ACC_ROWS": _accumulator_rows(dtype, block_b, block_d),
        "BLOCK_B": block_b,
        "BLOCK_D": block_d,
    }
    return Launch((num_tokens, triton.cdiv(dim, block_d)), constexprs)


def forward_launch(num_tokens: int, bag_size: int, dim: int, dtype: torch.dtype) -> Launch:
    """``_lookup_forward_kernel``: one program per (token, D-block); ``dtype`` of the values."""
    return bag_launch(num_tokens, bag_size, dim, dtype, ACC_DTYPE=_acc_dtype(dtype))


def hits_launch(num_programs: int, bag_size: int, dim: int, dtype: torch.dtype) -> Launch:
    """``_hot_row_pieces_kernel`` (one program per piece) or ``_values_grad_sorted_kernel`` (one
    per row), per D-block: both sum hits of sorted runs; ``dtype`` of ``grad_out``."""
    block_hits, block_d = _tile_shape(dim, bag_size)
    constexprs = {
        "ACC_DTYPE": _acc_dtype(dtype),
        "ACC_ROWS": _accumulator_rows(dtype, block_hits, block_d),
        "BLOCK_HITS": block_hits,
        "BLOCK_D": block_d,
    }
    return Launch((num_programs, triton.cdiv(dim, block_d)), constexprs)


def values_grad_atomic_launch(num_tokens: int, bag_size: int, dim: int) -> Launch:
    """``_values_grad_atomic_kernel``: one program per (token, D-block)."""
    block_b, block_d = _tile_shape(dim, bag_size)
    return Launch((num_tokens, triton.cdiv(dim, block_d)), {"BLOCK_B": block_b, "BLOCK_D": block_d})


def weights_grad_launch(num_tokens: int, bag_size: int, dim: int) -> Launch:
    """``_weights_grad_kernel``: one program per (token, B-block)."""
    block_b, block_d = _tile_shape(dim, bag_size)
    return Launch(
        (num_tokens, triton.cdiv(bag_size, block_b)), {"BLOCK_B": block_b, "BLOCK_D": block_d}
    )


# --------------------------------------------------------------------------- launchers


def _unit_stride_rows(values: Tensor) -> Tensor:
    """The table itself when its rows are contiguous (a column slice is fine), else a copy."""
    return values if values.stride(1) == 1 else values.contiguous()


def lookup_forward(values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """``out[t] = sum_b weights[t, b] * values[indices[t, b]]``, [T, D] in the values' dtype."""
    (num_tokens, bag_size), dim = indices.shape, values.shape[1]
    out = values.new_empty((num_tokens, dim))
    if out.numel() == 0:
        return out
    values = _unit_stride_rows(values)
    forward_launch(num_tokens, bag_size, dim, values.dtype)(
        _lookup_forward_kernel,
        values, indices.contiguous(), weights.contiguous(), out,
        values.shape[0], bag_size, dim, values.stride(0),
    )  # fmt: skip
    return out


def lookup_values_grad(
    grad_out: Tensor,
    indices: Tensor,
    weights: Tensor,
    num_rows: int,
    deterministic: bool,
    *,
    hits_per_piece: int = _HITS_PER_PIECE,
) -> Tensor:
    """``grad_values[n] = sum_{(t, b): indices[t, b] == n} weights[t, b] * grad_out[t]``, [N, D].

    Deterministic mode is bitwise reproducible; ``deterministic=False`` uses atomics. In
    deterministic mode a row with more than ``hits_per_piece`` hits is summed in pieces of that
    many hits in parallel (then in piece order), so one hot row does not serialize the kernel.
    """
    dim = grad_out.shape[1]
    if num_rows == 0 or dim == 0:
        return grad_out.new_empty((num_rows, dim))
    grad_out, weights = grad_out.contiguous(), weights.contiguous()
    if deterministic:
        return _values_grad_sorted(grad_out, indices, weights, num_rows, hits_per_piece)
    return _values_grad_atomic(grad_out, indices, weights, num_rows)


class HotRowPieces(NamedTuple):
    """Runs of more than ``hits_per_piece`` hits, cut into pieces summed in parallel."""

    starts: Tensor
    """[R + 1]: row r's pieces are ``partials[starts[r]:starts[r + 1]]`` (none for most rows)."""
    partials: Tensor
    """[max pieces, D] fp32 (fp64): each piece's sum, in order within its row."""


def max_hot_row_pieces(num_hits: int, hits_per_piece: int = _HITS_PER_PIECE) -> int:
    """The rows of :func:`hot_row_pieces`'s partials (its grid) for ``num_hits`` hits."""
    return 2 * num_hits // hits_per_piece


def hot_row_pieces(
    grad_out: Tensor, weights: Tensor, hit_order: Tensor, row_starts: Tensor, hits_per_piece: int
) -> HotRowPieces:
    """The pieces of the hot rows of runs in CSR form (row r's hits, flat positions ``t * B + b``,
    are ``hit_order[row_starts[r]:row_starts[r + 1]]``), and their sums of
    ``weights.flatten()[p] * grad_out[p // B]``.

    Each piece holds ``hits_per_piece`` consecutive hits of its run (the last one fewer), so one
    hot row does not serialize the kernel that sums it. Each hot row has more than
    ``hits_per_piece`` hits, so there are fewer than 2 * hits / hits_per_piece pieces: the grid
    is that upper bound (no host sync), and its spare programs exit.
    """
    num_rows, device = row_starts.shape[0] - 1, grad_out.device
    run_lengths = row_starts.diff()
    pieces_per_row = torch.where(
        run_lengths > hits_per_piece, (run_lengths + hits_per_piece - 1) // hits_per_piece, 0
    )
    starts = F.pad(pieces_per_row.cumsum(0), (1, 0))  # CSR over pieces, like row_starts
    max_pieces = max_hot_row_pieces(hit_order.numel(), hits_per_piece)
    piece_rows = torch.searchsorted(starts[1:], torch.arange(max_pieces, device=device), right=True)
    dim = grad_out.shape[1]
    partials = grad_out.new_empty((max_pieces, dim), dtype=accumulation_dtype(grad_out.dtype))
    if max_pieces > 0 and dim > 0:
        hits_launch(max_pieces, weights.shape[1], dim, grad_out.dtype)(
            _hot_row_pieces_kernel,
            grad_out, weights, hit_order, row_starts, starts, piece_rows, partials,
            num_rows, weights.shape[1], dim, hits_per_piece,
        )  # fmt: skip
    return HotRowPieces(starts, partials)


def _values_grad_sorted(
    grad_out: Tensor, indices: Tensor, weights: Tensor, num_rows: int, hits_per_piece: int
) -> Tensor:
    bag_size, dim, device = indices.shape[1], grad_out.shape[1], grad_out.device
    # A stable sort orders the hits of a row by flat position: the summation order depends
    # only on the indices. Out-of-range indices sort outside every row's [start, end).
    sorted_rows, hit_order = torch.sort(indices.reshape(-1), stable=True)
    row_starts = torch.searchsorted(sorted_rows, torch.arange(num_rows + 1, device=device))
    # A hot row's program adds up its pieces' partial sums, in piece order.
    pieces = hot_row_pieces(grad_out, weights, hit_order, row_starts, hits_per_piece)
    grad_values = grad_out.new_empty((num_rows, dim))
    hits_launch(num_rows, bag_size, dim, grad_out.dtype)(
        _values_grad_sorted_kernel,
        grad_out, weights, hit_order, row_starts, pieces.starts, pieces.partials, grad_values,
        bag_size, dim,
    )  # fmt: skip
    return grad_values


def _values_grad_atomic(
    grad_out: Tensor, indices: Tensor, weights: Tensor, num_rows: int
) -> Tensor:
    (num_tokens, bag_size), dim = indices.shape, grad_out.shape[1]
    # bf16/fp16 atomics would round every partial sum: accumulate in an fp32 buffer instead.
    buffer_dtype = accumulation_dtype(grad_out.dtype)
    grad_values = torch.zeros((num_rows, dim), dtype=buffer_dtype, device=grad_out.device)
    if num_tokens > 0:
        values_grad_atomic_launch(num_tokens, bag_size, dim)(
            _values_grad_atomic_kernel,
            grad_out, indices.contiguous(), weights, grad_values,
            num_rows, bag_size, dim,
        )  # fmt: skip
    return grad_values.to(grad_out.dtype)


def lookup_weights_grad(grad_out: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """``grad_weights[t, b] = <grad_out[t], values[indices[t, b]]>``, [T, B] fp32 (fp64)."""
    (num_tokens, bag_size), dim = indices.shape, values.shape[1]
    acc_dtype = accumulation_dtype(values.dtype)
    grad_weights = torch.empty(indices.shape, dtype=acc_dtype, device=values.device)
    if grad_weights.numel() == 0:
        return grad_weights
    values = _unit_stride_rows(values)
    weights_grad_launch(num_tokens, bag_size, dim)(
        _weights_grad_kernel,
        grad_out.contiguous(), values, indices.contiguous(), grad_weights,
        values.shape[0], bag_size, dim, values.stride(0),
    )  # fmt: skip
    return grad_weights
