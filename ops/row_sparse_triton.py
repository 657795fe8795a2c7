"""Triton kernels of the row-sparse table update (the CUDA kernels of ``ops/row_sparse.py``).

One program per touched row holds the whole row (``BLOCK_D`` = D rounded up to a power of two,
as FBGEMM's row-wise kernels hold a row per warp group): it sums the row's gradient over its
recorded positions in their fixed order (bitwise deterministic, no atomics: rows are unique),
then updates the row and its optimizer state. A row outside ``[0, N)`` is masked, so a bad row
is never written. A hot row (more than ``hits_per_piece`` hits) is first summed in pieces by
parallel programs, as the lookup's value gradient does (``ops.lookup_triton.hot_row_pieces``),
then in piece order: still deterministic. A step computes the pieces once (op
``memlayer::hot_row_pieces``, :func:`hot_row_pieces` here) and both kernels read them. Warps
grow with the row (8 elements of each row vector per thread, up to 32 warps at D = 8192):
registers stay flat, nothing spills at any width, and occupancy stays at or above the lookup
kernels' (``python -m benchmarks.kernels_static`` checks both).

``row_sq_norms`` and ``update_rows`` each sum a row's gradient (from its hits, or a hot row's
from its pieces), which is cheaper on a GPU than keeping the sums for the update: the global
norm must be known before any row is updated, so keeping them means writing and reading a
``[U, D]`` fp32 buffer, 8 bytes per element, where summing again re-reads the row's hits,
``4 * hits / U`` bytes per element, and there are ~1.3 hits per touched row at the paper's
sizes (412K of 1M rows touched by 524K hits) -- and the buffer would be 6.7 GB at D = 4096.

The launchers take plain tensors of any device Triton runs on: CUDA, or CPU tensors under
``TRITON_INTERPRET=1`` (how the tests run them without a GPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ops import lookup_triton
from ops.lookup_triton import _HITS_PER_PIECE, HotRowPieces, Launch, _jit, tl, triton
from ops.table_rule import Hyper, Rule


@_jit
def _row_grad(
    grad_out_ptr, weights_ptr, row_starts_ptr, positions_ptr, piece_starts_ptr, partials_ptr,
    u, bag_size, dim, offs,
):  # fmt: skip
    """Touched row u's summed gradient: over its positions in order, or, for a hot row, over
    the partial sums of its pieces in order."""
    mask = offs < dim
    first_piece = tl.load(piece_starts_ptr + u)
    end_piece = tl.load(piece_starts_ptr + u + 1)
    first_hit = tl.load(row_starts_ptr + u)
    # Two loops, one of them empty, rather than a branch (which made ptxas spill for sm_80).
    end_hit = tl.where(first_piece == end_piece, tl.load(row_starts_ptr + u + 1), first_hit)
    g = tl.zeros(offs.shape, dtype=tl.float32)
    for i in range(first_hit, end_hit):
        p = tl.load(positions_ptr + i)
        token = grad_out_ptr + (p // bag_size) * dim
        g += tl.load(weights_ptr + p) * tl.load(token + offs, mask=mask, other=0.0)
    for piece in range(first_piece, end_piece):
        g += tl.load(partials_ptr + piece * dim + offs, mask=mask, other=0.0)
    return g


@_jit
def _row_sq_norms_kernel(
    grad_out_ptr, weights_ptr, row_starts_ptr, positions_ptr, piece_starts_ptr, partials_ptr,
    out_ptr, bag_size, dim,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    u = tl.program_id(0)
    g = _row_grad(
        grad_out_ptr, weights_ptr, row_starts_ptr, positions_ptr, piece_starts_ptr, partials_ptr,
        u, bag_size, dim, tl.arange(0, BLOCK_D),
    )  # fmt: skip
    g64 = g.to(tl.float64)
    tl.store(out_ptr + u, tl.sum(g64 * g64, axis=0))


@_jit
def _update_rows_kernel(
    table_ptr, state0_ptr, state1_ptr, grad_out_ptr, weights_ptr, rows_ptr, row_starts_ptr,
    positions_ptr, piece_starts_ptr, partials_ptr, mean_sq_ptr, num_rows, bag_size, dim,
    lr, eps, beta1, beta2, weight_decay, grad_scale, bias1, bias2_sqrt,
    RULE: tl.constexpr, HAS_MEAN_SQ: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    u = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    g = _row_grad(
        grad_out_ptr, weights_ptr, row_starts_ptr, positions_ptr, piece_starts_ptr, partials_ptr,
        u, bag_size, dim, offs,
    )  # fmt: skip
    g = g * grad_scale

    row = tl.load(rows_ptr + u)
    valid = (row >= 0) & (row < num_rows)
    row_of_lanes = offs * 0 + row  # the row test as a vector mask
    row_valid = (row_of_lanes >= 0) & (row_of_lanes < num_rows)
    mask = (offs < dim) & row_valid
    at = row.to(tl.int64) * dim + offs
    w = tl.load(table_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if RULE == 0:  # SGD (the codes of ops/table_rule.py's Rule)
        new = w - lr * (g + weight_decay * w)
    elif RULE == 1:  # FBGEMM's row-wise AdaGrad, L2 decay
        if HAS_MEAN_SQ:
            mean_sq = tl.load(mean_sq_ptr + u).to(tl.float32) * grad_scale * grad_scale
        else:
            decayed = tl.where(mask, g + weight_decay * w, 0.0)
            mean_sq = tl.sum(decayed * decayed, axis=0) / dim
        safe_row = tl.where(valid, row, 0)  # read in bounds, written only if valid
        accumulator = tl.load(state0_ptr + safe_row) + mean_sq
        lane0 = row_valid & (offs == 0)
        tl.store(state0_ptr + row + offs, accumulator + offs * 0.0, mask=lane0)
        multiplier = lr / (tl.sqrt(accumulator) + eps)
        new = (1.0 - multiplier * weight_decay) * w - multiplier * g
    else:  # lazy AdamW
        m = beta1 * tl.load(state0_ptr + at, mask=mask, other=0.0) + (1.0 - beta1) * g
        v = beta2 * tl.load(state1_ptr + at, mask=mask, other=0.0) + (1.0 - beta2) * g * g
        tl.store(state0_ptr + at, m, mask=mask)
        tl.store(state1_ptr + at, v, mask=mask)
        new = w * (1.0 - lr * weight_decay) - (lr / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
    tl.store(table_ptr + at, new.to(table_ptr.dtype.element_ty), mask=mask)


# Elements of each live row vector (gradient, weights, moments) one thread holds: warps grow with
# the row so registers do not (at 4 warps, Adam at D = 8192 needs 255 registers and spills).
_ELEMENTS_PER_THREAD = 8
_MAX_NUM_WARPS = 32  # 1024 threads, a block's limit


def _block_d(dim: int) -> int:
    return triton.next_power_of_2(max(dim, 1))


def _num_warps(block_d: int) -> int:
    return min(max(block_d // (32 * _ELEMENTS_PER_THREAD), 4), _MAX_NUM_WARPS)


# What each launcher chooses is a pure function of shapes, shared with
# ``benchmarks/kernels_static.py`` (see ``ops/lookup_triton.py``).


def row_sq_norms_launch(num_touched: int, dim: int) -> Launch:
    """``_row_sq_norms_kernel``: one program per touched row, holding the whole row."""
    block_d = _block_d(dim)
    return Launch((num_touched,), {"BLOCK_D": block_d}, _num_warps(block_d))


def update_rows_launch(num_touched: int, dim: int, rule: Rule, use_mean_sq: bool) -> Launch:
    """``_update_rows_kernel``: one program per touched row, holding the whole row."""
    block_d = _block_d(dim)
    constexprs = {"RULE": int(rule), "HAS_MEAN_SQ": use_mean_sq, "BLOCK_D": block_d}
    return Launch((num_touched,), constexprs, _num_warps(block_d))


def update_rows_scalars(hyperparameters: list[float], grad_scale: float) -> tuple[float, ...]:
    """``_update_rows_kernel``'s float arguments, in its order, from the packed rule."""
    h = hyperparameters
    return (
        h[Hyper.LR], h[Hyper.EPS], h[Hyper.BETA1], h[Hyper.BETA2], h[Hyper.WEIGHT_DECAY],
        grad_scale, h[Hyper.BIAS_CORRECTION1], h[Hyper.BIAS_CORRECTION2_SQRT],
    )  # fmt: skip


def hot_row_pieces(
    grad_out: Tensor,
    weights: Tensor,
    row_starts: Tensor,
    positions: Tensor,
    *,
    hits_per_piece: int = _HITS_PER_PIECE,
) -> HotRowPieces:
    """The partial sums of the touched rows with more than ``hits_per_piece`` hits, in pieces of
    that many hits summed in parallel: what both kernels read instead of a hot row's hits."""
    return lookup_triton.hot_row_pieces(grad_out, weights, positions, row_starts, hits_per_piece)


def row_sq_norms(
    grad_out: Tensor,
    weights: Tensor,
    row_starts: Tensor,
    positions: Tensor,
    pieces: HotRowPieces | None = None,
) -> Tensor:
    """Each touched row's squared gradient norm, fp64 ``[U]``; a hot row is summed from its
    ``pieces`` (:func:`hot_row_pieces`, computed here if not given)."""
    num_touched = row_starts.shape[0] - 1
    out = grad_out.new_empty(num_touched, dtype=torch.float64)
    if num_touched:
        if pieces is None:
            pieces = hot_row_pieces(grad_out, weights, row_starts, positions)
        row_sq_norms_launch(num_touched, grad_out.shape[1])(
            _row_sq_norms_kernel,
            grad_out, weights, row_starts, positions, pieces.starts, pieces.partials, out,
            weights.shape[1], grad_out.shape[1],
        )  # fmt: skip
    return out


def update_rows(
    table: Tensor,
    state: list[Tensor],
    grad_out: Tensor,
    weights: Tensor,
    rows: Tensor,
    row_starts: Tensor,
    positions: Tensor,
    row_mean_sq: Tensor | None,
    rule: int,
    hyperparameters: list[float],
    grad_scale: float,
    pieces: HotRowPieces | None = None,
) -> None:
    """The in-place update of the touched ``rows`` of ``table`` and ``state`` by the packed
    rule (``ops/table_rule.py``: ``TableRule.packed``); a hot row's gradient is summed from its
    ``pieces`` (:func:`hot_row_pieces`, computed here if not given)."""
    state0, state1 = (list(state) + [table, table])[:2]  # unused pointers for stateless rules
    use_mean_sq = row_mean_sq is not None and hyperparameters[Hyper.WEIGHT_DECAY] == 0.0
    if pieces is None:
        pieces = hot_row_pieces(grad_out, weights, row_starts, positions)
    update_rows_launch(rows.shape[0], table.shape[1], Rule(rule), use_mean_sq)(
        _update_rows_kernel,
        table, state0, state1, grad_out, weights, rows, row_starts, positions,
        pieces.starts, pieces.partials, row_mean_sq if use_mean_sq else rows,
        table.shape[0], weights.shape[1], table.shape[1],
        *update_rows_scalars(hyperparameters, grad_scale),
    )  # fmt: skip
