"""PEER: a mixture of a million single-neuron experts (He, "Mixture of A Million Experts", 2024).

Expert i is one hidden neuron: a down vector ``u_i`` and an up vector ``v_i``. Each of ``heads``
queries picks its ``topk`` experts out of ``N = n_keys²`` by product keys (as a memory layer
picks its values), and the output sums what those experts make of the token::

    scores, idx = top-k over (i1, i2) of  q1·K1[i1] + q2·K2[i2]      (per head, never all N keys)
    g           = softmax(scores)                                      (per head)
    out         = Σ_heads Σ_{i in idx} g_i · σ(u_i · x) · v_i          (σ = GELU)

Three ops, no new one: the search is ``memlayer::product_key_topk``; the ``u_i · x`` of every
selected expert is ``memlayer::lookup_weights_grad(x, U, idx)``, which computes exactly
``<x[t], U[idx[t, b]]>`` row by row without gathering the rows into a copy (its CPU and Triton
kernels read each selected row once, in place) and is differentiable to any order: its gradient
w.r.t. x is ``lookup(U, idx, grad)`` and w.r.t. U ``lookup_values_grad(x, idx, grad)``, the same
``[T, D]``-per-read gradient as a lookup's, so the row-sparse optimizer records it the same
way (:class:`ExpertDot`, with ``x`` as the recorded "output gradient" and the dots' gradient as
the "weights"). A dedicated ``gathered_dot`` op would duplicate those kernels, vmap and DTensor
rules; the name is all it would add. The output is ``lookup(V, idx, g·σ(u·x))``.

**One table.** Like the memory layers, the experts are not parameters of this module: the model
owns ONE table ``[2N, dim]`` (shared by all its PEER layers, as Memory's value table is), the
down vectors ``u_i`` in rows ``[0, N)`` and the up vectors ``v_i`` in rows ``[N, 2N)`` (both have
width dim, as PEER replaces a feed-forward), and passes it to ``forward``: ``u·x`` reads rows
``idx``, the output rows ``idx + N``. So every family's model has one trainable table,
``memory_values``, and the row-sparse optimizer, checkpoints, export, quantized tables and
memory parallelism keep one code path; the cost is one width for both halves. Mixing two
families in one model would need several tables (left for later). The reads are modules
(:class:`ExpertDot`, :class:`memcompile.memory.ValueLookup`, sharing the table's
``GradRecorder``) so that parallel styles can wrap them.

Initialisation (ours; the paper's reference code uses PyTorch defaults): sub-keys U(±1/√key_dim)
and the query Xavier-uniform as in ``ProductKeyMemory``; the table (:func:`init_expert_table_`)
``u`` N(0, 1/√dim), so that ``u·x`` of a normalised token is about N(0, 1), and ``v``
N(0, 1/√(heads·topk)), so the sum of ``heads·topk`` expert outputs starts near unit scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ops  # noqa: F401  (registers torch.ops.memlayer.*)
from memcompile.config import PEERConfig
from memcompile.memory import ValueLookup
from ops.row_sparse import GradRecorder, record_read_grads


class ExpertDot(nn.Module):
    """``forward(x [T, D], table [N, D], indices [T, B]) -> [T, B]``: ``<x[t], table[indices[t,
    b]]>`` (fp32; fp64 for fp64), through ``memlayer::lookup_weights_grad`` (see module doc).
    A module, like :class:`ValueLookup`, so that a parallel style can wrap the read.

    While a row-sparse optimizer trains the table (``grad_recorder.recording``), the backward
    records the rows' gradient instead of forming a dense one: row ``indices[t, b]`` gets
    ``grad[t, b] · x[t]``, which is a lookup's value gradient with ``x`` in place of the output
    gradient and ``grad`` in place of the weights, so it is recorded as one
    (:func:`dot_recording_grads`, through the lookup's ``ops.row_sparse.record_read_grads``) and
    stepped by the same kernels. On a column-sharded table (``recipes.memory_parallel``) ``x``
    is this rank's columns of the group's tokens, so each rank records its columns of the rows,
    as a lookup does."""

    def __init__(self, grad_recorder: GradRecorder | None = None) -> None:
        super().__init__()
        self.grad_recorder = GradRecorder() if grad_recorder is None else grad_recorder

    def forward(self, x: Tensor, table: Tensor, indices: Tensor) -> Tensor:
        recorder = self.grad_recorder
        if recorder.recording and torch.is_grad_enabled():
            if table.is_leaf and table.requires_grad:  # the table itself, read directly
                recorder.reads(table)
            if recorder.table is not None and recorder.table.requires_grad:
                return dot_recording_grads(x, table, indices, recorder)
        return torch.ops.memlayer.lookup_weights_grad(x, table, indices)


class _RecordDotGrads(torch.autograd.Function):
    """Identity on the dot products whose backward records the table rows' gradient
    (``x``, ``indices``, the dots' gradient) into the table's ``.grad``, as
    ``ops.row_sparse``'s recording lookup records ``(grad_out, indices, weights)``."""

    @staticmethod
    def forward(ctx, dots, x, indices, table, recorded_tokens, recorder):
        ctx.save_for_backward(x, indices)
        # Not saved for backward: every recording backward bumps its version counter.
        ctx.recorded_tokens, ctx.recorder = recorded_tokens, recorder
        return dots.view_as(dots)

    @staticmethod
    def backward(ctx, grad_dots):
        x, indices = ctx.saved_tensors
        record_read_grads(
            x.detach().to(grad_dots.dtype), indices, grad_dots, ctx.recorded_tokens, ctx.recorder
        )
        return grad_dots, None, None, None, None, None


def dot_recording_grads(
    x: Tensor, table: Tensor, indices: Tensor, recorder: GradRecorder
) -> Tensor:
    """``lookup_weights_grad(x, table, indices)`` whose backward records the table's gradient
    into ``recorder.table.grad`` (a ``RowSparseGrad``); ``x`` gets its gradient as usual."""
    dots = torch.ops.memlayer.lookup_weights_grad(x, table.detach(), indices)
    return _RecordDotGrads.apply(
        dots, x, indices, recorder.table, recorder.recorded_tokens, recorder.key
    )


class PEER(nn.Module):
    """A PEER layer: ``forward(x [..., dim], table [2 · num_experts, dim]) -> [..., dim]``;
    ``table`` holds the down vectors (rows ``[0, N)``) then the up vectors (``[N, 2N)``)."""

    def __init__(
        self,
        dim: int,
        config: PEERConfig,
        grad_recorder: GradRecorder | None = None,
    ) -> None:
        super().__init__()
        config = config.for_model_dim(dim)
        grad_recorder = GradRecorder() if grad_recorder is None else grad_recorder
        self.dim = dim
        self.heads = config.heads
        self.topk = config.topk
        self.key_dim = config.key_dim
        self.num_experts = config.num_experts
        self.query = nn.Linear(dim, self.heads * self.key_dim, bias=True)
        # [heads, 2 halves, n_keys, key_dim / 2]: the layout product_key_topk expects.
        self.keys = nn.Parameter(torch.empty(self.heads, 2, config.n_keys, self.key_dim // 2))
        # Both reads of the one table share its recorder: the whole table trains row-sparsely.
        self.down_dot = ExpertDot(grad_recorder)
        self.up_lookup = ValueLookup(grad_recorder)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.xavier_uniform_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        bound = 1 / math.sqrt(self.key_dim)
        nn.init.uniform_(self.keys, -bound, bound)

    def forward(self, x: Tensor, table: Tensor) -> Tensor:
        self._check_inputs(x, table)
        leading = x.shape[:-1]
        tokens = x.reshape(-1, self.dim)
        num_tokens = tokens.shape[0]  # explicit, not -1: an empty batch must keep its shape
        query = self.query(tokens).view(num_tokens, self.heads, self.key_dim)
        scores, experts = torch.ops.memlayer.product_key_topk(
            query, self.keys.to(query.dtype), self.topk
        )
        # One bag of heads·topk experts per token; fp32 gates (the op scores in fp32).
        bag = self.heads * self.topk
        gates = torch.softmax(scores, dim=-1).view(num_tokens, bag)
        experts = experts.view(num_tokens, bag)
        hidden = F.gelu(self.down_dot(tokens, table, experts))  # σ(u_i · x), [T, heads·topk]
        out = self.up_lookup(table, experts + self.num_experts, gates * hidden)  # the v rows
        return out.view(*leading, self.dim)

    def _check_inputs(self, x: Tensor, table: Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(
                f"PEER: x must be [..., dim] with dim = {self.dim}, got shape {tuple(x.shape)}"
            )
        if tuple(table.shape) != (2 * self.num_experts, self.dim):
            raise ValueError(
                f"PEER: table must have shape ({2 * self.num_experts}, {self.dim}) (the down "
                f"vectors of num_experts = {self.num_experts} experts, then their up vectors; "
                f"width dim), got {tuple(table.shape)}"
            )


@torch.no_grad()
def init_expert_table_(table: Tensor, config: PEERConfig) -> Tensor:
    """The down rows ``[0, N)`` N(0, 1/√dim) and the up rows ``[N, 2N)`` N(0, 1/√(heads·topk))
    in place (see module doc)."""
    down, up = table.split(config.num_experts)
    nn.init.normal_(down, std=table.shape[1] ** -0.5)
    nn.init.normal_(up, std=(config.heads * config.topk) ** -0.5)
    return table
