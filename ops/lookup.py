"""``torch.ops.memlayer.lookup``: the weighted bag over a memory value table.

    out[t] = sum_b weights[t, b] * values[indices[t, b]]        (accumulated in fp32)

the same as ``F.embedding_bag(indices, values, per_sample_weights=weights, mode="sum")``, as a
custom op that ``torch.compile(fullgraph=True)`` traces without graph breaks.

Three ops, so that a backward never computes a gradient nobody asked for:

- ``memlayer::lookup(values, indices, weights, deterministic=True) -> out [T, D]``
- ``memlayer::lookup_values_grad(grad_out, indices, weights, num_rows, deterministic) -> [N, D]``
- ``memlayer::lookup_weights_grad(grad_out, values, indices) -> [T, B]`` (fp32, fp64 for fp64)

Each is linear in each of its float arguments, and each one's derivatives are the other two, so
all three are differentiable to any order, in reverse and forward mode, and under ``torch.func``
(``ops/_autograd.py``). ``deterministic`` only affects the value gradient on CUDA: True (default)
gives bitwise identical gradients run to run; False allows the faster atomic-add kernel.

This file holds the policy: argument checks (``ops/checks.py``), each device type's kernel
(``torch.library.impl(op, "CPU")``, ``"CUDA"``), the fake kernels (meta device,
torch.compile), vmap batching rules, autograd, the float64 reference and the DTensor rules.
Kernels: CPU in ``ops/lookup_cpu.py`` (C++), CUDA in ``ops/lookup_triton.py`` (Triton).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ops import lookup_cpu, lookup_triton
from ops._autograd import OpFunction, below_autograd, register_autograd
from ops._dtypes import accumulation_dtype
from ops.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_indices_in_range,
    check_same_device,
    check_shape,
    check_tensor,
    refuse_other_devices,
)

_TAGS = (torch.Tag.pt2_compliant_tag,)
torch.library.define(
    "memlayer::lookup",
    "(Tensor values, Tensor indices, Tensor weights, bool deterministic=True) -> Tensor",
    tags=_TAGS,
)
torch.library.define(
    "memlayer::lookup_values_grad",
    "(Tensor grad_out, Tensor indices, Tensor weights, SymInt num_rows, bool deterministic)"
    " -> Tensor",
    tags=_TAGS,
)
torch.library.define(
    "memlayer::lookup_weights_grad",
    "(Tensor grad_out, Tensor values, Tensor indices) -> Tensor",
    tags=_TAGS,
)

lookup = torch.ops.memlayer.lookup
"""``lookup(values [N, D], indices [T, B], weights [T, B], deterministic=True) -> [T, D]``:
``out[t] = sum_b weights[t, b] * values[indices[t, b]]`` in the values' dtype, summed in fp32.
values float32/bfloat16/float16 (float64 for gradcheck); indices int64/int32 in [0, N);
weights floating."""

lookup_values_grad = torch.ops.memlayer.lookup_values_grad
"""``grad_values[n] = sum_{(t, b): indices[t, b] == n} weights[t, b] * grad_out[t]``, [N, D]."""

lookup_weights_grad = torch.ops.memlayer.lookup_weights_grad
"""``grad_weights[t, b] = <grad_out[t], values[indices[t, b]]>``, [T, B] in fp32 (fp64)."""


# --------------------------------------------------------------------------- checks


def _check_bags(op: str, indices: Tensor, weights: Tensor) -> None:
    check_tensor(op, "indices", indices, "[T, B]", INDEX_DTYPES)
    check_tensor(op, "weights", weights, "[T, B]")
    check_shape(op, "weights", weights, indices.shape, "the shape of indices")


def _check_lookup(values: Tensor, indices: Tensor, weights: Tensor) -> None:
    check_tensor("lookup", "values", values, "[N, D]", FLOAT_DTYPES)
    _check_bags("lookup", indices, weights)
    check_same_device("lookup", values=values, indices=indices, weights=weights)


def _check_values_grad(grad_out: Tensor, indices: Tensor, weights: Tensor, num_rows: int) -> None:
    op = "lookup_values_grad"
    _check_bags(op, indices, weights)
    check_tensor(op, "grad_out", grad_out, "[T, D]", FLOAT_DTYPES)
    if grad_out.shape[0] != indices.shape[0]:
        raise ValueError(
            f"{op}: grad_out must have T = indices.shape[0] = {indices.shape[0]} rows, "
            f"got shape {tuple(grad_out.shape)}"
        )
    if num_rows < 0:
        raise ValueError(f"{op}: num_rows must be >= 0, got {num_rows}")
    check_same_device(op, grad_out=grad_out, indices=indices, weights=weights)


def _check_weights_grad(grad_out: Tensor, values: Tensor, indices: Tensor) -> None:
    op = "lookup_weights_grad"
    check_tensor(op, "values", values, "[N, D]", FLOAT_DTYPES)
    check_tensor(op, "indices", indices, "[T, B]", INDEX_DTYPES)
    check_tensor(op, "grad_out", grad_out, "[T, D]", FLOAT_DTYPES)
    expected = (indices.shape[0], values.shape[1])
    check_shape(op, "grad_out", grad_out, expected, "T of indices, D of values")
    check_same_device(op, grad_out=grad_out, values=values, indices=indices)


def _check_rows(op: str, indices: Tensor, num_rows: int) -> None:
    check_indices_in_range(indices, num_rows, f"{op}: indices", "the rows of values")


# --------------------------------------------------------------------------- kernels
#
# One kernel per op and device type, each checking its arguments first; any other device gets
# the checks and a NotImplementedError naming it (refuse_other_devices, after the fakes).


@torch.library.impl("memlayer::lookup", "CPU")
def _lookup_cpu(values, indices, weights, deterministic=True):
    _check_lookup(values, indices, weights)
    _check_rows("lookup", indices, values.shape[0])
    if indices.numel() == 0 or values.shape[1] == 0:
        return values.new_zeros((indices.shape[0], values.shape[1]))
    if values.dtype in (torch.float32, torch.float64):
        # ATen's FBGEMM kernel is already bandwidth bound for full-precision tables.
        return F.embedding_bag(
            indices, values, per_sample_weights=weights.to(values.dtype), mode="sum"
        )
    # For bf16/fp16 tables ATen would round the weights to the table's dtype; ours keeps them
    # in fp32 and accumulates in fp32.
    return lookup_cpu.lookup_forward(values, indices, weights)


@torch.library.impl("memlayer::lookup", "CUDA")
def _lookup_cuda(values, indices, weights, deterministic=True):
    _check_lookup(values, indices, weights)
    _check_rows("lookup", indices, values.shape[0])
    return lookup_triton.lookup_forward(values, indices, weights)


@torch.library.impl("memlayer::lookup_values_grad", "CPU")
def _lookup_values_grad_cpu(grad_out, indices, weights, num_rows, deterministic):
    _check_values_grad(grad_out, indices, weights, num_rows)
    _check_rows("lookup_values_grad", indices, num_rows)
    return lookup_cpu.lookup_values_grad(grad_out, indices, weights, num_rows)


@torch.library.impl("memlayer::lookup_values_grad", "CUDA")
def _lookup_values_grad_cuda(grad_out, indices, weights, num_rows, deterministic):
    _check_values_grad(grad_out, indices, weights, num_rows)
    _check_rows("lookup_values_grad", indices, num_rows)
    return lookup_triton.lookup_values_grad(grad_out, indices, weights, num_rows, deterministic)


@torch.library.impl("memlayer::lookup_weights_grad", "CPU")
def _lookup_weights_grad_cpu(grad_out, values, indices):
    _check_weights_grad(grad_out, values, indices)
    _check_rows("lookup_weights_grad", indices, values.shape[0])
    return lookup_cpu.lookup_weights_grad(grad_out, values, indices)


@torch.library.impl("memlayer::lookup_weights_grad", "CUDA")
def _lookup_weights_grad_cuda(grad_out, values, indices):
    _check_weights_grad(grad_out, values, indices)
    _check_rows("lookup_weights_grad", indices, values.shape[0])
    return lookup_triton.lookup_weights_grad(grad_out, values, indices)


@torch.library.register_fake("memlayer::lookup")
def _lookup_fake(values, indices, weights, deterministic=True):
    _check_lookup(values, indices, weights)
    return values.new_empty((indices.shape[0], values.shape[1]))


@torch.library.register_fake("memlayer::lookup_values_grad")
def _lookup_values_grad_fake(grad_out, indices, weights, num_rows, deterministic):
    _check_values_grad(grad_out, indices, weights, num_rows)
    return grad_out.new_empty((num_rows, grad_out.shape[1]))


@torch.library.register_fake("memlayer::lookup_weights_grad")
def _lookup_weights_grad_fake(grad_out, values, indices):
    _check_weights_grad(grad_out, values, indices)
    return grad_out.new_empty(indices.shape, dtype=accumulation_dtype(values.dtype))


refuse_other_devices("memlayer::lookup", _lookup_fake)
refuse_other_devices("memlayer::lookup_values_grad", _lookup_values_grad_fake)
refuse_other_devices("memlayer::lookup_weights_grad", _lookup_weights_grad_fake)


# --------------------------------------------------------------------------- vmap
#
# A batch of lookups is one lookup: batch b's tokens become more tokens, and a batched table
# is one tall table whose batch b starts at row b * N (its indices offset by that, after they
# are checked against N). One kernel call instead of torch.vmap's one call per batch element.


def _batch_first(tensor: Tensor, dim: int | None, batch_size: int) -> Tensor:
    """``tensor`` with its batch dimension first (broadcast to ``batch_size`` if it has none)."""
    if dim is None:
        return tensor.expand(batch_size, *tensor.shape)
    return tensor.movedim(dim, 0)


def _rows_of_tall_table(op: str, indices: Tensor, num_rows: int) -> Tensor:
    """Batched ``indices [B, T, K]`` into per-batch tables of ``num_rows`` rows, as rows of
    the ``[B * num_rows, D]`` table that stacks them (checked against ``num_rows`` first)."""
    _check_rows(op, indices, num_rows)
    offsets = torch.arange(indices.shape[0], device=indices.device, dtype=indices.dtype)
    return indices + (offsets * num_rows).view(-1, 1, 1)


def _one_table(op: str, values: Tensor, values_dim: int | None, indices: Tensor):
    """``values`` (batched on ``values_dim``, or shared) as one table, and batch-first
    ``indices`` as its rows."""
    if values_dim is None:
        return values, indices
    values = values.movedim(values_dim, 0)
    return values.flatten(0, 1), _rows_of_tall_table(op, indices, values.shape[1])


@torch.library.register_vmap("memlayer::lookup")
def _lookup_vmap(info, in_dims, values, indices, weights, deterministic=True):
    size = info.batch_size
    values_dim, indices_dim, weights_dim = in_dims[:3]
    indices = _batch_first(indices, indices_dim, size)
    weights = _batch_first(weights, weights_dim, size)
    values, indices = _one_table("lookup", values, values_dim, indices)
    out = lookup(values, indices.flatten(0, 1), weights.flatten(0, 1), deterministic)
    return out.unflatten(0, (size, -1)), 0


@torch.library.register_vmap("memlayer::lookup_values_grad")
def _lookup_values_grad_vmap(info, in_dims, grad_out, indices, weights, num_rows, deterministic):
    size = info.batch_size
    grad_out, indices, weights = (
        _batch_first(t, d, size) for t, d in zip((grad_out, indices, weights), in_dims[:3])
    )
    rows = _rows_of_tall_table("lookup_values_grad", indices, num_rows)
    grad = lookup_values_grad(
        grad_out.flatten(0, 1),
        rows.flatten(0, 1),
        weights.flatten(0, 1),
        size * num_rows,
        deterministic,
    )
    return grad.unflatten(0, (size, num_rows)), 0


@torch.library.register_vmap("memlayer::lookup_weights_grad")
def _lookup_weights_grad_vmap(info, in_dims, grad_out, values, indices):
    size = info.batch_size
    grad_out_dim, values_dim, indices_dim = in_dims
    grad_out = _batch_first(grad_out, grad_out_dim, size)
    indices = _batch_first(indices, indices_dim, size)
    values, indices = _one_table("lookup_weights_grad", values, values_dim, indices)
    grad = lookup_weights_grad(grad_out.flatten(0, 1), values, indices.flatten(0, 1))
    return grad.unflatten(0, (size, -1)), 0


# --------------------------------------------------------------------------- autograd
#
# lookup(V, idx, w), lookup_values_grad(g, idx, w) and lookup_weights_grad(g, V, idx) are the
# three contractions of V[idx], w and g; the derivative of each w.r.t. one argument is another
# of them. jvp: the ops are linear in each argument, so a tangent is the op with one argument
# replaced by its tangent, summed over arguments.


def _sum_of_terms(*terms: Tensor | None) -> Tensor | None:
    present = [term for term in terms if term is not None]
    return sum(present[1:], present[0]) if present else None


class _Lookup(OpFunction):
    @staticmethod
    def forward(values, indices, weights, deterministic):
        return below_autograd(lookup.default, values, indices, weights, deterministic)

    @staticmethod
    def setup_context(ctx, inputs, output):
        values, indices, weights, deterministic = inputs
        # Save only what each gradient needs: dV needs weights, dw needs values.
        ctx.save_for_backward(
            indices,
            weights if ctx.needs_input_grad[0] else None,
            values if ctx.needs_input_grad[2] else None,
        )
        ctx.save_for_forward(values, indices, weights)
        ctx.num_rows = values.shape[0]
        ctx.dtypes = values.dtype, weights.dtype
        ctx.deterministic = deterministic
        # DTensor inputs: the backward runs in the forward's layout, whatever layout grad_out
        # comes in (a Replicate grad_out would pick the Replicate rule: the whole [N, D] value
        # grad on every rank of a column-sharded table).
        ctx.out_placements = getattr(output, "placements", None)

    @staticmethod
    def backward(ctx, grad_out):
        indices, weights, values = ctx.saved_tensors
        if ctx.out_placements is not None:
            grad_out = grad_out.redistribute(placements=ctx.out_placements)
        grad_values = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_values = lookup_values_grad(
                grad_out, indices, weights, ctx.num_rows, ctx.deterministic
            ).to(ctx.dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_weights = lookup_weights_grad(grad_out, values, indices).to(ctx.dtypes[1])
        return grad_values, None, grad_weights, None

    @staticmethod
    def jvp(ctx, values_tangent, _indices_tangent, weights_tangent, _deterministic_tangent):
        values, indices, weights = ctx.saved_tensors
        return _sum_of_terms(
            None if values_tangent is None else lookup(values_tangent, indices, weights),
            None if weights_tangent is None else lookup(values, indices, weights_tangent),
        )


class _LookupValuesGrad(OpFunction):
    @staticmethod
    def forward(grad_out, indices, weights, num_rows, deterministic):
        return below_autograd(
            lookup_values_grad.default, grad_out, indices, weights, num_rows, deterministic
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, indices, weights, num_rows, ctx.deterministic = inputs
        ctx.save_for_backward(grad_out, indices, weights)
        ctx.save_for_forward(grad_out, indices, weights)
        ctx.num_rows = num_rows

    @staticmethod
    def backward(ctx, grad_grad_values):
        grad_out, indices, weights = ctx.saved_tensors
        grad_grad_out = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_grad_out = lookup(grad_grad_values, indices, weights).to(grad_out.dtype)
        if ctx.needs_input_grad[2]:
            grad_weights = lookup_weights_grad(grad_out, grad_grad_values, indices)
            grad_weights = grad_weights.to(weights.dtype)
        return grad_grad_out, None, grad_weights, None, None

    @staticmethod
    def jvp(ctx, grad_out_tangent, _indices_tangent, weights_tangent, _rows, _deterministic):
        grad_out, indices, weights = ctx.saved_tensors

        def values_grad(grad_out, weights):
            return lookup_values_grad(grad_out, indices, weights, ctx.num_rows, ctx.deterministic)

        return _sum_of_terms(
            None if grad_out_tangent is None else values_grad(grad_out_tangent, weights),
            None if weights_tangent is None else values_grad(grad_out, weights_tangent),
        )


class _LookupWeightsGrad(OpFunction):
    @staticmethod
    def forward(grad_out, values, indices):
        return below_autograd(lookup_weights_grad.default, grad_out, values, indices)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad_grad_weights):
        grad_out, values, indices = ctx.saved_tensors
        grad_grad_out = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_grad_out = lookup(values, indices, grad_grad_weights).to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            grad_values = lookup_values_grad(
                grad_out, indices, grad_grad_weights, values.shape[0], True
            ).to(values.dtype)
        return grad_grad_out, grad_values, None

    @staticmethod
    def jvp(ctx, grad_out_tangent, values_tangent, _indices_tangent):
        grad_out, values, indices = ctx.saved_tensors
        return _sum_of_terms(
            None
            if grad_out_tangent is None
            else lookup_weights_grad(grad_out_tangent, values, indices),
            None
            if values_tangent is None
            else lookup_weights_grad(grad_out, values_tangent, indices),
        )


register_autograd(lookup.default, _Lookup)
register_autograd(lookup_values_grad.default, _LookupValuesGrad)
register_autograd(lookup_weights_grad.default, _LookupWeightsGrad)


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
