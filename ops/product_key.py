"""``torch.ops.memlayer.product_key_topk``: the product-key search of a memory layer.

For each token t and head h, the query ``q = query[t, h]`` (length Kd) is split into two halves;
each half scores the n sub-keys of its half and keeps its top k:

    s1 = subkeys[h, 0] @ q[:Kd // 2]        s2 = subkeys[h, 1] @ q[Kd // 2:]        (each [n])

and the k x k candidate sums ``s1[i1] + s2[i2]`` are reduced to the best k, giving
``scores = s1[i1] + s2[i2]`` and the flat memory row ``indices = i1 * n + i2`` (both [T, H, k]).
The n * n full keys are never materialised, and of the k x k candidates only the ~k ln k pairs
that can make the top k are summed (see ``_candidate_ranks``).

Ordering (both stages): scores descending; among equal scores the smaller index first (the
sub-key position for the per-half stage, the flat index ``i1 * n + i2`` for the final one). The
result is the first k of all n * n sums under that order whenever the sums are exact (e.g.
integer-valued inputs); otherwise it can differ from that only where two sums tie after rounding.
Resolving ties reads how many rows have one, which is a host sync on CUDA.

Two ops, so that autograd never differentiates through ``expand + add + topk``:

- ``memlayer::product_key_topk(query, subkeys, k) -> (scores, indices)``
- ``memlayer::product_key_topk_backward(grad_scores, query, subkeys, indices)
  -> (grad_query, grad_subkeys)``

Scores are float32 for float32/bfloat16/float16 inputs (the search runs in fp32) and float64 for
float64 inputs. The kernels are device generic (matmul, topk, embedding_bag), registered for CPU
and CUDA; fake kernels make the meta device and ``torch.compile`` work. Both ops are
differentiable to any order, in reverse and forward mode and under ``torch.func``
(``ops/_autograd.py``). Arguments are checked as every memlayer op's (``ops/checks.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ops._autograd import OpFunction, below_autograd, register_autograd
from ops._dtypes import accumulation_dtype
from ops.checks import FLOAT_DTYPES, check_indices_in_range, check_same_device, check_tensor

_TAGS = (torch.Tag.pt2_compliant_tag,)
torch.library.define(
    "memlayer::product_key_topk",
    "(Tensor query, Tensor subkeys, SymInt k) -> (Tensor, Tensor)",
    tags=_TAGS,
)
torch.library.define(
    "memlayer::product_key_topk_backward",
    "(Tensor grad_scores, Tensor query, Tensor subkeys, Tensor indices) -> (Tensor, Tensor)",
    tags=_TAGS,
)

product_key_topk = torch.ops.memlayer.product_key_topk
"""``product_key_topk(query [T, H, Kd], subkeys [H, 2, n, Kd // 2], k) -> (scores, indices)``,
both [T, H, k], best first. query and subkeys of one floating dtype, Kd even, 1 <= k <= n.
``indices = i1 * n + i2`` (int64) are rows of an n * n memory; ``scores = s1[i1] + s2[i2]`` are
float32 (float64 for float64 inputs). Ties: the smaller index first (see the module doc)."""

product_key_topk_backward = torch.ops.memlayer.product_key_topk_backward
"""Gradients of ``product_key_topk``'s scores w.r.t. (query, subkeys), in their dtypes.

Each score is ``s1[i1] + s2[i2]``, so its gradient flows to exactly one sub-key row per half:
``grad_query[t, h, half c] = sum_j grad_scores[t, h, j] * subkeys[h, c, i_c[j]]`` and each
selected sub-key row gets ``grad_scores[t, h, j] * query[t, h, half c]``."""


# --------------------------------------------------------------------------- checks


def _check_product_key_args(op: str, query: Tensor, subkeys: Tensor, k: int) -> None:
    """Shape, dtype, layout and device checks that need no data (so fakes run them too)."""
    check_tensor(op, "query", query, "[T, H, Kd]", FLOAT_DTYPES)
    check_tensor(op, "subkeys", subkeys, "[H, 2, n, Kd // 2]", FLOAT_DTYPES)
    if subkeys.dtype != query.dtype:
        raise TypeError(
            f"{op}: subkeys must have the query's dtype {query.dtype}, got {subkeys.dtype}"
        )
    check_same_device(op, query=query, subkeys=subkeys)
    _, num_heads, key_dim = query.shape
    if key_dim % 2 != 0:
        raise ValueError(f"{op}: the query's key dim Kd (its last dim) must be even, got {key_dim}")
    expected = (num_heads, 2, subkeys.shape[2], key_dim // 2)
    if subkeys.shape != expected:
        raise ValueError(
            f"{op}: subkeys must have shape [H, 2, n, Kd // 2] = [{num_heads}, 2, n, "
            f"{key_dim // 2}] for query of shape {tuple(query.shape)}, got {tuple(subkeys.shape)}"
        )
    num_subkeys = subkeys.shape[2]
    if not 1 <= k <= num_subkeys:
        raise ValueError(
            f"{op}: k must lie in [1, n] = [1, {num_subkeys}] (n = subkeys.shape[2]), got k={k}"
        )


def _check_backward_args(
    grad_scores: Tensor, query: Tensor, subkeys: Tensor, indices: Tensor
) -> None:
    op = "product_key_topk_backward"
    check_tensor(op, "grad_scores", grad_scores, "[T, H, k]")
    check_tensor(op, "indices", indices, "[T, H, k]", (torch.int64,))
    _check_product_key_args(op, query, subkeys, indices.shape[-1])
    expected = (query.shape[0], query.shape[1], indices.shape[-1])
    if grad_scores.shape != indices.shape or tuple(indices.shape) != expected:
        raise ValueError(
            f"{op}: grad_scores and indices must both have shape [T, H, k] with [T, H] = "
            f"{list(expected[:2])} (from query), got {tuple(grad_scores.shape)} and "
            f"{tuple(indices.shape)}"
        )
    check_same_device(op, grad_scores=grad_scores, query=query, indices=indices)


# --------------------------------------------------------------------------- top-k with ties


def _sort_best_first(scores: Tensor, index: Tensor) -> Tensor:
    """Positions along the last dim ordered by score descending, then by index ascending."""
    by_index = index.argsort(dim=-1)
    by_score = scores.gather(-1, by_index).argsort(dim=-1, descending=True, stable=True)
    return by_index.gather(-1, by_score)


def _best_k(scores: Tensor, index: Tensor, k: int) -> Tensor:
    """Positions (along the last dim) of the k best entries, best first: the larger score, and
    among equal scores the smaller index.

    ``torch.topk`` does the work, but how it selects and orders entries with equal scores is
    unspecified. So rows where any two of the k + 1 best scores are equal, rare in real data, are
    redone with a full stable sort; k + 1 catches a tie across the boundary of the top k.
    """
    top_scores, positions = scores.topk(min(k + 1, scores.shape[-1]), dim=-1)
    positions = positions[..., :k]
    tied = (top_scores[..., 1:] == top_scores[..., :-1]).any(dim=-1).nonzero(as_tuple=True)
    if tied[0].numel() > 0:
        positions[tied] = _sort_best_first(scores[tied], index[tied])[..., :k]
    return positions


def _candidate_ranks(k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The rank pairs (a, b) with (a + 1) * (b + 1) <= k: about k ln k of the k * k (119 of 1024
    for k = 32).

    With both halves sorted best first, pair (a, b) is preceded by every other pair (a', b') with
    a' <= a and b' <= b (a sum at least as large and, if equal, a smaller index), so a pair with
    (a + 1) * (b + 1) > k always has k pairs before it and never makes the top k.
    """
    ranks = torch.arange(1, k + 1, device=device)
    return ((ranks[:, None] * ranks[None, :]) <= k).nonzero(as_tuple=True)


# --------------------------------------------------------------------------- forward


def _half_scores(query: Tensor, subkeys: Tensor) -> Tensor:
    """Each query half's scores of all n sub-keys of its half, [T, H, 2, n], in fp32 (fp64)."""
    num_tokens, num_heads, key_dim = query.shape
    score_dtype = accumulation_dtype(query.dtype)
    half_queries = query.reshape(num_tokens, num_heads, 2, key_dim // 2).to(score_dtype)
    return torch.einsum("thcd,hcnd->thcn", half_queries, subkeys.to(score_dtype))


@torch.library.impl("memlayer::product_key_topk", "default")
def _product_key_topk_kernel(query, subkeys, k):
    """Device generic (matmul, topk, gather)."""
    _check_product_key_args("product_key_topk", query, subkeys, k)
    num_tokens, num_heads, _ = query.shape
    num_subkeys = subkeys.shape[2]
    half_scores = _half_scores(query, subkeys)
    subkey_index = torch.arange(num_subkeys, device=query.device).expand_as(half_scores)
    best_half = _best_k(half_scores, subkey_index, k)  # [T, H, 2, k]
    s1, s2 = half_scores.gather(-1, best_half).unbind(dim=2)
    i1, i2 = best_half.unbind(dim=2)

    rank1, rank2 = (
        ranks.expand(num_tokens, num_heads, -1) for ranks in _candidate_ranks(k, query.device)
    )
    candidate_scores = s1.gather(-1, rank1) + s2.gather(-1, rank2)
    candidate_indices = i1.gather(-1, rank1) * num_subkeys + i2.gather(-1, rank2)
    best = _best_k(candidate_scores, candidate_indices, k)
    return candidate_scores.gather(-1, best), candidate_indices.gather(-1, best)


@torch.library.register_fake("memlayer::product_key_topk")
def _product_key_topk_fake(query, subkeys, k):
    _check_product_key_args("product_key_topk", query, subkeys, k)
    shape = (query.shape[0], query.shape[1], k)
    return (
        query.new_empty(shape, dtype=accumulation_dtype(query.dtype)),
        query.new_empty(shape, dtype=torch.int64),
    )


# --------------------------------------------------------------------------- backward


@torch.library.impl("memlayer::product_key_topk_backward", "default")
def _product_key_topk_backward_kernel(grad_scores, query, subkeys, indices):
    """Both gradients as weighted bags of k rows (``embedding_bag``), never a dense score grad.

    A dense [T, H, 2, n] score gradient would make each gradient a matmul as large as the
    forward's scoring; the bags cost only T * H * 2 * k rows of Kd / 2 (1/32 of it at n=1024,
    k=32). The sub-key table is [H * 2 * n, Kd / 2] (row = (h * 2 + c) * n + i_c), the query table
    [T * H * 2, Kd / 2] (row = (t * H + h) * 2 + c).
    """
    _check_backward_args(grad_scores, query, subkeys, indices)
    num_tokens, num_heads, key_dim = query.shape
    num_subkeys = subkeys.shape[2]
    k = indices.shape[-1]
    memory_size = num_subkeys * num_subkeys
    check_indices_in_range(
        indices, memory_size, "product_key_topk_backward: indices", "rows of the n * n memory"
    )
    if indices.device.type != "cpu":
        # Unchecked indices (CUDA without the debug check): one outside the memory contributes
        # nothing and is never read, as in the lookup kernels.
        in_memory = (indices >= 0) & (indices < memory_size)
        grad_scores = grad_scores.masked_fill(~in_memory, 0)
        indices = indices.masked_fill(~in_memory, 0)
    accumulate_dtype = grad_scores.dtype

    half_starts = torch.arange(num_heads * 2, device=query.device).view(num_heads, 2, 1)
    subkey_rows = torch.stack((indices // num_subkeys, indices % num_subkeys), dim=2)
    # [T * H * 2, k]; int32 (the table has H * 2 * n rows) sorts twice as fast as int64 below.
    subkey_rows = (subkey_rows + half_starts * num_subkeys).reshape(-1, k).int()
    # d score / d s1[i1] = d score / d s2[i2] = 1: both halves get the score's gradient.
    weights = grad_scores.unsqueeze(2).expand(-1, -1, 2, -1).reshape(-1, k)
    subkey_table = subkeys.reshape(-1, key_dim // 2).to(accumulate_dtype)
    query_table = query.reshape(-1, key_dim // 2).to(accumulate_dtype)

    grad_query = F.embedding_bag(subkey_rows, subkey_table, per_sample_weights=weights, mode="sum")

    # The transposed bags: one per sub-key row, holding the query rows that selected it. A stable
    # sort keeps the summation order fixed, so the gradient is bitwise reproducible.
    flat_rows = subkey_rows.flatten()
    order = flat_rows.argsort(stable=True)
    bag_sizes = torch.bincount(flat_rows, minlength=subkey_table.shape[0])
    bag_starts = bag_sizes.cumsum(0) - bag_sizes
    grad_subkeys = F.embedding_bag(
        order // k,
        query_table,
        bag_starts,
        per_sample_weights=weights.flatten()[order],
        mode="sum",
    )
    return (
        grad_query.view(query.shape).to(query.dtype),
        grad_subkeys.view(subkeys.shape).to(subkeys.dtype),
    )


@torch.library.register_fake("memlayer::product_key_topk_backward")
def _product_key_topk_backward_fake(grad_scores, query, subkeys, indices):
    _check_backward_args(grad_scores, query, subkeys, indices)
    return query.new_empty(query.shape), subkeys.new_empty(subkeys.shape)


# --------------------------------------------------------------------------- autograd
#
# scores[t, h, j] = sum_c <query[t, h, c], subkeys[h, c, i_c[j]]> is linear in query and in
# subkeys; product_key_topk_backward is linear in grad_scores, query and subkeys. So every
# derivative is one of: the backward op itself, or the selected scores of other arguments
# (_selected_scores). Tangents are sums of the op with one argument replaced by its tangent.


def _selected_scores(query: Tensor, subkeys: Tensor, indices: Tensor) -> Tensor:
    """``sum_c <query[t, h, c], subkeys[h, c, i_c]>`` for the rows ``indices = i1 * n + i2``,
    [T, H, k] in the accumulation dtype. Scores all n sub-keys of each half, as the forward does
    (only forward-mode AD and double backward need it)."""
    num_subkeys = subkeys.shape[2]
    halves = torch.stack((indices // num_subkeys, indices % num_subkeys), dim=2)  # [T, H, 2, k]
    return _half_scores(query, subkeys).gather(-1, halves).sum(dim=2)


def _or_zeros(tangent: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if tangent is None else tangent


class _ProductKeyTopk(OpFunction):
    @staticmethod
    def forward(query, subkeys, k):
        return below_autograd(product_key_topk.default, query, subkeys, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        query, subkeys, _ = inputs
        _, indices = output
        ctx.save_for_backward(query, subkeys, indices)
        ctx.save_for_forward(query, subkeys, indices)
        ctx.mark_non_differentiable(indices)

    @staticmethod
    def backward(ctx, grad_scores, _grad_indices):
        query, subkeys, indices = ctx.saved_tensors
        grad_query, grad_subkeys = product_key_topk_backward(grad_scores, query, subkeys, indices)
        return grad_query, grad_subkeys, None

    @staticmethod
    def jvp(ctx, query_tangent, subkeys_tangent, _k_tangent):
        query, subkeys, indices = ctx.saved_tensors
        scores_tangent = _selected_scores(
            _or_zeros(query_tangent, query), subkeys, indices
        ) + _selected_scores(query, _or_zeros(subkeys_tangent, subkeys), indices)
        return scores_tangent, None


class _ProductKeyTopkBackward(OpFunction):
    @staticmethod
    def forward(grad_scores, query, subkeys, indices):
        return below_autograd(
            product_key_topk_backward.default, grad_scores, query, subkeys, indices
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad_grad_query, grad_grad_subkeys):
        grad_scores, query, subkeys, indices = ctx.saved_tensors
        grad_grad_query = _or_zeros(grad_grad_query, query)
        grad_grad_subkeys = _or_zeros(grad_grad_subkeys, subkeys)
        # grad_query reads subkeys and grad_subkeys reads query: one call gives both.
        grad_query, grad_subkeys = product_key_topk_backward(
            grad_scores, grad_grad_query, grad_grad_subkeys, indices
        )
        grad_grad_scores = _selected_scores(grad_grad_query, subkeys, indices) + _selected_scores(
            query, grad_grad_subkeys, indices
        )
        return grad_grad_scores.to(grad_scores.dtype), grad_query, grad_subkeys, None

    @staticmethod
    def jvp(ctx, grad_scores_tangent, query_tangent, subkeys_tangent, _indices_tangent):
        grad_scores, query, subkeys, indices = ctx.saved_tensors
        from_grad_scores = product_key_topk_backward(
            _or_zeros(grad_scores_tangent, grad_scores), query, subkeys, indices
        )
        from_inputs = product_key_topk_backward(
            grad_scores,
            _or_zeros(query_tangent, query),
            _or_zeros(subkeys_tangent, subkeys),
            indices,
        )
        return tuple(a + b for a, b in zip(from_grad_scores, from_inputs))


register_autograd(product_key_topk.default, _ProductKeyTopk)
register_autograd(product_key_topk_backward.default, _ProductKeyTopkBackward)


# --------------------------------------------------------------------------- reference


def reference_product_key_topk(query: Tensor, subkeys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Brute force in float64 over all n * n sums (for tests: [T, H, n * n] memory).

    Differentiable with plain autograd. Returns float64 scores and int64 indices, [T, H, k].
    """
    num_tokens, num_heads, key_dim = query.shape
    half_queries = query.double().reshape(num_tokens, num_heads, 2, key_dim // 2)
    half_scores = torch.einsum("thcd,hcnd->thcn", half_queries, subkeys.double())
    s1, s2 = half_scores.unbind(dim=2)
    all_scores = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # flat position = i1 * n + i2
    # A stable sort keeps the smaller flat index first among equal scores.
    indices = all_scores.argsort(dim=-1, descending=True, stable=True)[..., :k]
    return all_scores.gather(-1, indices), indices
