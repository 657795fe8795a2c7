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
``[T, D]``-per-read gradient as a lookup's, so the row-sparse optimizer can record it the same
way (not yet: today the up table's reads record like any ``ValueLookup``'s, while the down
table gets an ordinary dense gradient). A dedicated ``gathered_dot`` op would duplicate those
kernels, vmap and DTensor rules; the name is all it would add.
The output is ``lookup(V, idx, g·σ(u·x))``.

Like the memory layers, the expert tables are not parameters of this module: the model owns
them (``down [N, dim]``, ``up [N, out_dim]``, shareable by all PEER layers as Memory's value
table is) and passes them to ``forward``; the reads are modules (:class:`ExpertDot`,
:class:`memcompile.memory.ValueLookup`) so that parallel styles can wrap them.

Initialisation (ours; the paper's reference code uses PyTorch defaults): sub-keys U(±1/√key_dim)
and the query Xavier-uniform as in ``ProductKeyMemory``; the tables (:func:`init_expert_tables_`)
``u`` N(0, 1/√dim), so that ``u·x`` of a normalised token is about N(0, 1), and ``v``
N(0, 1/√(heads·topk)), so the sum of ``heads·topk`` expert outputs starts near unit scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ops  # noqa: F401  (registers torch.ops.memlayer.*)
from memcompile.memory import ValueLookup
from ops.row_sparse import GradRecorder


@dataclass(frozen=True)
class PEERConfig:
    """PEER layers in the blocks ``layers``, reading two expert tables of ``num_experts`` rows."""

    #: Experts (rows of the down and up tables); a square: product keys index an n × n grid.
    num_experts: int
    #: Blocks whose feed-forward is replaced by a PEER layer (0-based, distinct).
    layers: tuple[int, ...]
    #: Query heads per layer; each picks its own experts, all heads' outputs are summed.
    heads: int = 8
    #: Experts per head and token.
    topk: int = 16
    #: Dimension of a full product key (both halves); ``None`` means ``dim // 2``.
    key_dim: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.num_experts <= 0 or math.isqrt(self.num_experts) ** 2 != self.num_experts:
            raise ValueError(
                f"peer.num_experts must be a positive perfect square (product keys index an "
                f"n_keys x n_keys grid), got {self.num_experts}"
            )
        if not self.layers:
            raise ValueError("peer.layers must name at least one block")
        if len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise ValueError(f"peer.layers must be distinct block indices >= 0, got {self.layers}")
        for name in ("heads", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"peer.{name} must be >= 1, got {getattr(self, name)}")
        if self.topk > self.n_keys:
            raise ValueError(
                f"peer.topk ({self.topk}) must be <= n_keys = sqrt(num_experts) = {self.n_keys}: "
                f"each half of a query keeps its top-k sub-keys"
            )

    def for_model_dim(self, dim: int) -> PEERConfig:
        """This config with ``key_dim`` resolved for model dim ``dim``, checked."""
        key_dim = dim // 2 if self.key_dim is None else self.key_dim
        if key_dim < 2 or key_dim % 2:
            raise ValueError(
                f"peer.key_dim must be even and >= 2 (a query splits into two halves), "
                f"got {key_dim}"
            )
        return replace(self, key_dim=key_dim)

    @property
    def n_keys(self) -> int:
        """Sub-keys per half and head: the side of the product-key grid."""
        return math.isqrt(self.num_experts)


class ExpertDot(nn.Module):
    """``forward(x [T, D], table [N, D], indices [T, B]) -> [T, B]``: ``<x[t], table[indices[t,
    b]]>`` (fp32; fp64 for fp64), through ``memlayer::lookup_weights_grad`` (see module doc).
    A module, like :class:`ValueLookup`, so that a parallel style can wrap the read."""

    def forward(self, x: Tensor, table: Tensor, indices: Tensor) -> Tensor:
        return torch.ops.memlayer.lookup_weights_grad(x, table, indices)


class PEER(nn.Module):
    """A PEER layer: ``forward(x [..., dim], down [N, dim], up [N, out_dim]) -> [..., out_dim]``."""

    def __init__(
        self,
        dim: int,
        config: PEERConfig,
        grad_recorder: GradRecorder | None = None,
    ) -> None:
        super().__init__()
        config = config.for_model_dim(dim)
        self.dim = dim
        self.heads = config.heads
        self.topk = config.topk
        self.key_dim = config.key_dim
        self.num_experts = config.num_experts
        self.query = nn.Linear(dim, self.heads * self.key_dim, bias=True)
        # [heads, 2 halves, n_keys, key_dim / 2]: the layout product_key_topk expects.
        self.keys = nn.Parameter(torch.empty(self.heads, 2, config.n_keys, self.key_dim // 2))
        self.down_dot = ExpertDot()
        self.up_lookup = ValueLookup(grad_recorder)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.xavier_uniform_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        bound = 1 / math.sqrt(self.key_dim)
        nn.init.uniform_(self.keys, -bound, bound)

    def forward(self, x: Tensor, down: Tensor, up: Tensor) -> Tensor:
        self._check_inputs(x, down, up)
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
        hidden = F.gelu(self.down_dot(tokens, down, experts))  # σ(u_i · x), [T, heads·topk]
        out = self.up_lookup(up, experts, gates * hidden)
        return out.view(*leading, up.shape[1])

    def _check_inputs(self, x: Tensor, down: Tensor, up: Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(
                f"PEER: x must be [..., dim] with dim = {self.dim}, got shape {tuple(x.shape)}"
            )
        if down.dim() != 2 or tuple(down.shape) != (self.num_experts, self.dim):
            raise ValueError(
                f"PEER: down must have shape ({self.num_experts}, {self.dim}) (num_experts, dim), "
                f"got {tuple(down.shape)}"
            )
        if up.dim() != 2 or up.shape[0] != self.num_experts:
            raise ValueError(
                f"PEER: up must have shape ({self.num_experts}, out_dim) (one row per expert), "
                f"got {tuple(up.shape)}"
            )


@torch.no_grad()
def init_expert_tables_(down: Tensor, up: Tensor, config: PEERConfig) -> None:
    """``down`` N(0, 1/√dim) and ``up`` N(0, 1/√(heads·topk)) in place (see module doc)."""
    nn.init.normal_(down, std=down.shape[1] ** -0.5)
    nn.init.normal_(up, std=(config.heads * config.topk) ** -0.5)
