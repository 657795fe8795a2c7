"""``torch.ops.memlayer.lookup``: the weighted bag over a memory value table.

    out[t] = sum_b weights[t, b] * values[indices[t, b]]        (accumulated in fp32)

the same as ``F.embedding_bag(indices, values, per_sample_weights=weights, mode="sum")``, as a
custom op that ``torch.compile(fullgraph=True)`` traces without graph breaks.

Three ops, so that a backward never computes a gradient nobody asked for:

- ``memlayer::lookup(values, indices, weights, deterministic=True) -> out``
- ``memlayer::lookup_values_grad(grad_out, indices, weights, num_rows, deterministic) -> [N, D]``
- ``memlayer::lookup_weights_grad(grad_out, values, indices) -> [T, B]`` (fp32, fp64 for fp64)

``deterministic`` only affects the value gradient on CUDA: True (default) gives bitwise
identical gradients run to run; False allows the faster atomic-add kernel.

Kernels: CPU in ``ops/csrc/lookup_cpu.cpp`` (loaded by ``ops/_native.py``), CUDA in
``ops/lookup_triton.py``. Fake kernels below make the meta device and torch.compile work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ops import _native, lookup_triton
from ops._dtypes import accumulation_dtype

_FLOAT_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32)


def _check_lookup_args(values: Tensor, indices: Tensor, weights: Tensor) -> None:
    """Shape, dtype and device checks that need no data (so they also run on fake tensors)."""
    if values.dim() != 2:
        raise ValueError(f"lookup: values must be 2-D [N, D], got shape {tuple(values.shape)}")
    if values.dtype not in _FLOAT_VALUE_DTYPES:
        raise TypeError(
            f"lookup: values must be float32, bfloat16, float16 or float64, got {values.dtype}"
        )
    if indices.dim() != 2:
        raise ValueError(f"lookup: indices must be 2-D [T, B], got shape {tuple(indices.shape)}")
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"lookup: indices must be int64 or int32, got {indices.dtype}")
    if weights.shape != indices.shape:
        raise ValueError(
            f"lookup: weights must have the shape of indices {tuple(indices.shape)}, "
            f"got {tuple(weights.shape)}"
        )
    if not weights.dtype.is_floating_point:
        raise TypeError(f"lookup: weights must be floating point, got {weights.dtype}")
    if not (values.device == indices.device == weights.device):
        raise ValueError(
            "lookup: values, indices and weights must be on one device, got "
            f"{values.device}, {indices.device} and {weights.device}"
        )


def check_indices_in_range(indices: Tensor, num_rows: int) -> None:
    """Raise if any index is outside ``[0, num_rows)`` (reads the data: syncs on CUDA)."""
    if indices.numel() == 0:
        return
    low, high = torch.aminmax(indices)
    low, high = int(low), int(high)
    if low < 0 or high >= num_rows:
        bad = low if low < 0 else high
        raise IndexError(
            f"lookup: indices must lie in [0, {num_rows}) (the rows of values), found {bad}"
        )


# --------------------------------------------------------------------------- forward


@torch.library.custom_op("memlayer::lookup", mutates_args=())
def lookup(values: Tensor, indices: Tensor, weights: Tensor, deterministic: bool = True) -> Tensor:
    """Weighted bag: ``out[t] = sum_b weights[t, b] * values[indices[t, b]]``, shape [T, D].

    values [N, D] float32/bfloat16/float16 (float64 for gradcheck); indices [T, B] int64/int32 in
    [0, N); weights [T, B] floating. The output has the values' dtype, accumulated in fp32.
    ``deterministic=False`` lets the CUDA value gradient use atomics (faster, not bitwise stable).
    """
    raise NotImplementedError(f"lookup: no kernel for device {values.device}")


@lookup.register_fake
def _lookup_fake(values, indices, weights, deterministic=True):
    _check_lookup_args(values, indices, weights)
    return values.new_empty((indices.shape[0], values.shape[1]))


@lookup.register_kernel("cpu")
def _lookup_cpu(values, indices, weights, deterministic=True):
    _check_lookup_args(values, indices, weights)
    check_indices_in_range(indices, values.shape[0])
    return _native.lookup_forward(values, indices, weights)


@lookup.register_kernel("cuda")
def _lookup_cuda(values, indices, weights, deterministic=True):
    _check_lookup_args(values, indices, weights)
    if lookup_triton.index_checks_enabled():  # debug mode: MEMCOMPILE_CHECK_INDICES=1
        check_indices_in_range(indices, values.shape[0])
    return lookup_triton.lookup_forward(values, indices, weights)


# --------------------------------------------------------------------------- backward


@torch.library.custom_op("memlayer::lookup_values_grad", mutates_args=())
def lookup_values_grad(
    grad_out: Tensor, indices: Tensor, weights: Tensor, num_rows: int, deterministic: bool
) -> Tensor:
    """``grad_values[n] = sum_{(t, b): indices[t, b] == n} weights[t, b] * grad_out[t]``, [N, D]."""
    raise NotImplementedError(f"lookup_values_grad: no kernel for device {grad_out.device}")


@lookup_values_grad.register_fake
def _lookup_values_grad_fake(grad_out, indices, weights, num_rows, deterministic):
    return grad_out.new_empty((num_rows, grad_out.shape[1]))


@lookup_values_grad.register_kernel("cpu")
def _lookup_values_grad_cpu(grad_out, indices, weights, num_rows, deterministic):
    return _native.lookup_values_grad(grad_out, indices, weights, num_rows)


@lookup_values_grad.register_kernel("cuda")
def _lookup_values_grad_cuda(grad_out, indices, weights, num_rows, deterministic):
    return lookup_triton.lookup_values_grad(grad_out, indices, weights, num_rows, deterministic)


@torch.library.custom_op("memlayer::lookup_weights_grad", mutates_args=())
def lookup_weights_grad(grad_out: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """``grad_weights[t, b] = <grad_out[t], values[indices[t, b]]>``, [T, B] in fp32 (fp64)."""
    raise NotImplementedError(f"lookup_weights_grad: no kernel for device {grad_out.device}")


@lookup_weights_grad.register_fake
def _lookup_weights_grad_fake(grad_out, values, indices):
    return grad_out.new_empty(indices.shape, dtype=accumulation_dtype(values.dtype))


@lookup_weights_grad.register_kernel("cpu")
def _lookup_weights_grad_cpu(grad_out, values, indices):
    return _native.lookup_weights_grad(grad_out, values, indices)


@lookup_weights_grad.register_kernel("cuda")
def _lookup_weights_grad_cuda(grad_out, values, indices):
    return lookup_triton.lookup_weights_grad(grad_out, values, indices)


# --------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    values, indices, weights, deterministic = inputs
    # Save only what each gradient needs: dV needs weights, dw needs values.
    ctx.save_for_backward(
        indices,
        weights if ctx.needs_input_grad[0] else None,
        values if ctx.needs_input_grad[2] else None,
    )
    ctx.num_rows = values.shape[0]
    ctx.weights_dtype = weights.dtype
    ctx.deterministic = deterministic
    # DTensor inputs: the backward runs in the forward's layout, whatever layout grad_out comes
    # in (a Replicate grad_out would pick the Replicate rule: the whole [N, D] value grad on
    # every rank of a column-sharded table).
    ctx.out_placements = getattr(output, "placements", None)


def _backward(ctx, grad_out):
    indices, weights, values = ctx.saved_tensors
    if ctx.out_placements is not None:
        grad_out = grad_out.redistribute(placements=ctx.out_placements)
    grad_values = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_values = lookup_values_grad(
            grad_out, indices, weights, ctx.num_rows, ctx.deterministic
        )
    if ctx.needs_input_grad[2]:
        grad_weights = lookup_weights_grad(grad_out, values, indices).to(ctx.weights_dtype)
    return grad_values, None, grad_weights, None


lookup.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- reference


def reference_lookup(values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """The plain float64 PyTorch definition the kernels are tested against."""
    gathered = values.double()[indices.long()]  # [T, B, D]
    return (weights.double().unsqueeze(-1) * gathered).sum(dim=1)


# --------------------------------------------------------------------------- DTensor sharding
#
# Rules that let the three ops run on DTensors. Each rule lists, for one mesh dimension, the
# acceptable (output placements, input placements) pairs, with one input entry per op argument
# and None for the non-tensor ones; register_sharding expands them to every mesh dimension and
# DTensor picks the pair that needs the cheapest redistribution of the actual inputs (the first
# on a tie, so all-Replicate comes first: replicated inputs then stay replicated).
#
# - Replicate: every rank computes the whole op.
# - Column-sharded table (values Shard(1), the memory-parallel layout): every rank holds all N
#   rows but only a slice of the D columns, so the bag of its columns, and the value gradient of
#   those columns, are local. ``num_rows`` stays the global N. The weight gradient is a dot
#   product over D, so each rank holds a partial sum over its column slice: Partial().
#
# Token-sharded indices and weights are all-gathered to fit the column rule. There is
# deliberately no token-sharded rule (replicated table, indices Shard(0)): the value-gradient op
# would pick it from the token-sharded indices autograd saved, and give every rank a Partial
# gradient the size of the whole table. For the same reason the autograd backward first moves
# grad_out to the output's layout: a Replicate grad_out would select the Replicate rule.

if torch.distributed.is_available():
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    @register_sharding(torch.ops.memlayer.lookup.default)
    def _lookup_sharding(values, indices, weights, deterministic=True):
        # ([out], [values, indices, weights, deterministic])
        return [
            ([Replicate()], [Replicate(), Replicate(), Replicate(), None]),
            ([Shard(1)], [Shard(1), Replicate(), Replicate(), None]),
        ]

    @register_sharding(torch.ops.memlayer.lookup_values_grad.default)
    def _lookup_values_grad_sharding(grad_out, indices, weights, num_rows, deterministic):
        # ([grad_values], [grad_out, indices, weights, num_rows, deterministic])
        return [
            ([Replicate()], [Replicate(), Replicate(), Replicate(), None, None]),
            ([Shard(1)], [Shard(1), Replicate(), Replicate(), None, None]),
        ]

    @register_sharding(torch.ops.memlayer.lookup_weights_grad.default)
    def _lookup_weights_grad_sharding(grad_out, values, indices):
        # ([grad_weights], [grad_out, values, indices])
        return [
            ([Replicate()], [Replicate(), Replicate(), Replicate()]),
            ([Partial()], [Shard(1), Shard(1), Replicate()]),
        ]
