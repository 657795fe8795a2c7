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
and CUDA; fake kernels make the meta device and ``torch.compile`` work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ops._dtypes import accumulation_dtype

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_product_key_args(query: Tensor, subkeys: Tensor, k: int) -> None:
    """Shape, dtype and device checks that need no data (so they also run on fake tensors)."""
    if query.dim() != 3:
        raise ValueError(
            f"product_key_topk: query must be 3-D [T, H, Kd], got shape {tuple(query.shape)}"
        )
    if query.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"product_key_topk: query must be float32, bfloat16, float16 or float64, "
            f"got {query.dtype}"
        )
    if subkeys.dtype != query.dtype:
        raise TypeError(
            f"product_key_topk: subkeys must have the query's dtype {query.dtype}, "
            f"got {subkeys.dtype}"
        )
    if query.device != subkeys.device:
        raise ValueError(
            f"product_key_topk: query and subkeys must be on one device, "
            f"got {query.device} and {subkeys.device}"
        )
    _, num_heads, key_dim = query.shape
    if key_dim % 2 != 0:
        raise ValueError(
            f"product_key_topk: the query's key dim Kd (its last dim) must be even, got {key_dim}"
        )
    if subkeys.dim() != 4 or subkeys.shape[0] != num_heads or subkeys.shape[1] != 2 or (
        subkeys.shape[3] != key_dim // 2
    ):
        raise ValueError(
            f"product_key_topk: subkeys must have shape [H, 2, n, Kd // 2] = "
            f"[{num_heads}, 2, n, {key_dim // 2}] for query of shape {tuple(query.shape)}, "
            f"got {tuple(subkeys.shape)}"
        )
    num_subkeys = subkeys.shape[2]
    if not 1 <= k <= num_subkeys:
        raise ValueError(
            f"product_key_topk: k must lie in [1, n] = [1, {num_subkeys}] "
            f"(n = subkeys.shape[2]), got k={k}"
        )


def _check_backward_args(grad_scores: Tensor, query: Tensor, indices: Tensor) -> None:
    expected = (query.shape[0], query.shape[1])
    if grad_scores.shape != indices.shape or grad_scores.shape[:2] != expected:
        raise ValueError(
            f"product_key_topk_backward: grad_scores and indices must both have shape "
            f"[T, H, k] with [T, H] = {list(expected)}, got {tuple(grad_scores.shape)} "
            f"and {tuple(indices.shape)}"
        )
    if indices.dtype != torch.int64:
        raise TypeError(f"product_key_topk_backward: indices must be int64, got {indices.dtype}")


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


@torch.library.custom_op("memlayer::product_key_topk", mutates_args=())
def product_key_topk(query: Tensor, subkeys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Product-key top-k: ``(scores, indices)``, both [T, H, k], best first.

    query [T, H, Kd] (Kd even) and subkeys [H, 2, n, Kd // 2] of one floating dtype, 1 <= k <= n.
    ``indices = i1 * n + i2`` (int64) are rows of an n * n memory; ``scores = s1[i1] + s2[i2]``
    are float32 (float64 for float64 inputs). Ties: the smaller index first (see module doc).
    """
    raise NotImplementedError(f"product_key_topk: no kernel for device {query.device}")


@product_key_topk.register_fake
def _product_key_topk_fake(query, subkeys, k):
    _check_product_key_args(query, subkeys, k)
    shape = (query.shape[0], query.shape[1], k)
    return (
        query.new_empty(shape, dtype=accumulation_dtype(query.dtype)),
        query.new_empty(shape, dtype=torch.int64),
    )


@product_key_topk.register_kernel(("cpu", "cuda"))
def _product_key_topk_kernel(query, subkeys, k):
    _check_product_key_args(query, subkeys, k)
    num_tokens, num_heads, key_dim = query.shape
    num_subkeys = subkeys.shape[2]
    score_dtype = accumulation_dtype(query.dtype)

    half_queries = query.reshape(num_tokens, num_heads, 2, key_dim // 2).to(score_dtype)
    half_scores = torch.einsum("thcd,hcnd->thcn", half_queries, subkeys.to(score_dtype))
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


# --------------------------------------------------------------------------- backward


@torch.library.custom_op("memlayer::product_key_topk_backward", mutates_args=())
def product_key_topk_backward(
    grad_scores: Tensor, query: Tensor, subkeys: Tensor, indices: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of ``product_key_topk``'s scores w.r.t. (query, subkeys), in their dtypes.

    Each score is ``s1[i1] + s2[i2]``, so its gradient flows to exactly one sub-key row per half:
    ``grad_query[t, h, half c] = sum_j grad_scores[t, h, j] * subkeys[h, c, i_c[j]]`` and each
    selected sub-key row gets ``grad_scores[t, h, j] * query[t, h, half c]``.
    """
    raise NotImplementedError(f"product_key_topk_backward: no kernel for device {query.device}")


@product_key_topk_backward.register_fake
def _product_key_topk_backward_fake(grad_scores, query, subkeys, indices):
    _check_backward_args(grad_scores, query, indices)
    return query.new_empty(query.shape), subkeys.new_empty(subkeys.shape)


@product_key_topk_backward.register_kernel(("cpu", "cuda"))
def _product_key_topk_backward_kernel(grad_scores, query, subkeys, indices):
    """Both gradients as weighted bags of k rows (``embedding_bag``), never a dense score grad.

    A dense [T, H, 2, n] score gradient would make each gradient a matmul as large as the
    forward's scoring; the bags cost only T * H * 2 * k rows of Kd / 2 (1/32 of it at n=1024,
    k=32). The sub-key table is [H * 2 * n, Kd / 2] (row = (h * 2 + c) * n + i_c), the query table
    [T * H * 2, Kd / 2] (row = (t * H + h) * 2 + c).
    """
    _check_backward_args(grad_scores, query, indices)
    num_tokens, num_heads, key_dim = query.shape
    num_subkeys = subkeys.shape[2]
    k = indices.shape[-1]
    accumulate_dtype = grad_scores.dtype

    half_starts = torch.arange(num_heads * 2, device=query.device).view(num_heads, 2, 1)
    subkey_rows = torch.stack((indices // num_subkeys, indices % num_subkeys), dim=2)
    # [T * H * 2, k]; int32 (the table has H * 2 * n rows) sorts twice as fast as int64 below.
    subkey_rows = (subkey_rows + half_starts * num_subkeys).reshape(-1, k).int()
    # d score / d s1[i1] = d score / d s2[i2] = 1: both halves get the score's gradient.
    weights = grad_scores.unsqueeze(2).expand(-1, -1, 2, -1).reshape(-1, k)
    subkey_table = subkeys.reshape(-1, key_dim // 2).to(accumulate_dtype)
    query_table = query.reshape(-1, key_dim // 2).to(accumulate_dtype)

    grad_query = F.embedding_bag(
        subkey_rows, subkey_table, per_sample_weights=weights, mode="sum"
    )

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


# --------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    query, subkeys, _ = inputs
    _, indices = output
    ctx.save_for_backward(query, subkeys, indices)
    ctx.mark_non_differentiable(indices)


def _backward(ctx, grad_scores, _grad_indices):
    query, subkeys, indices = ctx.saved_tensors
    grad_query, grad_subkeys = product_key_topk_backward(grad_scores, query, subkeys, indices)
    return grad_query, grad_subkeys, None


product_key_topk.register_autograd(_backward, setup_context=_setup_context)


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
