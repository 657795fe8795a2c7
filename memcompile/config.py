"""Model configuration: a Llama-style transformer whose chosen blocks read a product-key memory.

Two dataclasses, validated at construction so a bad configuration fails before any tensor exists:

- :class:`MemoryConfig`: the shared value table and the memory layers that read it.
- :class:`TransformerConfig`: the dense transformer, with ``memory=None`` for a dense model.

The named configurations of the paper live in :mod:`memcompile.flavors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum


class MemoryKind(str, Enum):
    """What replaces the feed-forward of a memory block."""

    #: ``W2(memory(x) * silu(W1 x))``: a SwiGLU whose up-projection is the memory read (Eq. 2).
    MEMORY_PLUS = "memory_plus"
    #: The memory read alone (Lample et al. 2019); needs ``value_dim == dim``.
    MEMORY = "memory"


@dataclass(frozen=True)
class MemoryConfig:
    """Product-key memory layers sharing one value table of ``num_values`` rows.

    Every memory layer has its own query network and sub-keys; all of them read the same
    ``[num_values, value_dim]`` table. ``key_dim`` and ``value_dim`` default to half the model
    dim and the model dim (the paper's choice); they are resolved by :class:`TransformerConfig`.
    """

    #: Rows of the shared value table; must be a square: product keys index an n × n grid.
    num_values: int
    #: Blocks whose feed-forward is replaced by a memory layer (0-based, distinct).
    layers: tuple[int, ...]
    kind: MemoryKind = MemoryKind.MEMORY_PLUS
    #: Query heads per layer; each has its own sub-keys, all read the same table.
    heads: int = 4
    #: Values read per head and token (the ``k`` of top-k).
    topk: int = 32
    #: Dimension of a full key (both halves); ``None`` means ``dim // 2``.
    key_dim: int | None = None
    #: Width of a value row; ``None`` means ``dim``.
    value_dim: int | None = None
    #: RMSNorm on query halves and sub-keys (Chameleon-style qk-norm, for large memories).
    qk_norm: bool = False
    #: Count which rows each layer reads (see :mod:`memcompile.telemetry`).
    telemetry: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", MemoryKind(self.kind))
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.num_values <= 0 or math.isqrt(self.num_values) ** 2 != self.num_values:
            root = math.isqrt(max(self.num_values, 0))
            raise ValueError(
                f"memory.num_values must be a positive perfect square (product keys index an "
                f"n_keys x n_keys grid), got {self.num_values}; nearest squares: "
                f"{root}^2 = {root * root} and {root + 1}^2 = {(root + 1) ** 2}"
            )
        if not self.layers:
            raise ValueError("memory.layers must name at least one block")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"memory.layers must be distinct, got {self.layers}")
        for name in ("heads", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"memory.{name} must be >= 1, got {getattr(self, name)}")
        if self.topk > self.n_keys:
            raise ValueError(
                f"memory.topk ({self.topk}) must be <= n_keys = sqrt(num_values) = {self.n_keys}: "
                f"each half of a query keeps its top-k sub-keys"
            )

    def for_model_dim(self, dim: int) -> MemoryConfig:
        """This config with ``key_dim``/``value_dim`` resolved for model dim ``dim``, checked."""
        key_dim = dim // 2 if self.key_dim is None else self.key_dim
        value_dim = dim if self.value_dim is None else self.value_dim
        if key_dim < 2 or key_dim % 2:
            raise ValueError(
                f"memory.key_dim must be even and >= 2 (a query splits into two halves), "
                f"got {key_dim}"
            )
        if value_dim < 1:
            raise ValueError(f"memory.value_dim must be >= 1, got {value_dim}")
        if self.kind is MemoryKind.MEMORY and value_dim != dim:
            raise ValueError(
                f"a plain memory layer outputs its values directly, so memory.value_dim "
                f"({value_dim}) must equal dim ({dim}); use kind='memory_plus' otherwise"
            )
        return replace(self, key_dim=key_dim, value_dim=value_dim)

    @property
    def n_keys(self) -> int:
        """Sub-keys per half and head: the side of the product-key grid."""
        return math.isqrt(self.num_values)


@dataclass(frozen=True)
class TransformerConfig:
    """A Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU feed-forward."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    #: Key/value heads for grouped-query attention; ``None`` means ``n_heads`` (plain MHA).
    n_kv_heads: int | None = None
    #: Hidden width of the SwiGLU feed-forward (see :func:`llama_ffn_hidden_dim`).
    ffn_hidden_dim: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    #: Longest sequence (size of the RoPE tables); shorter sequences need no recompilation.
    max_seq_len: int = 4096
    memory: MemoryConfig | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_hidden_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.dim % self.n_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must divide dim ({self.dim}): heads split the model dim"
            )
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}) for "
                f"grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = dim / n_heads = {self.head_dim} must be even: RoPE rotates pairs"
            )
        if self.memory is not None:
            self._resolve_and_check_memory(self.memory)

    def _resolve_and_check_memory(self, memory: MemoryConfig) -> None:
        bad = [layer for layer in memory.layers if not 0 <= layer < self.n_layers]
        if bad:
            raise ValueError(
                f"memory.layers {bad} out of range: the model has blocks 0..{self.n_layers - 1}"
            )
        object.__setattr__(self, "memory", memory.for_model_dim(self.dim))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def llama_ffn_hidden_dim(dim: int, multiple_of: int = 256, multiplier: float | None = None) -> int:
    """Llama's SwiGLU width: 2/3 of 4·dim, optionally scaled, rounded up to ``multiple_of``."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def centred_layers(n_layers: int, count: int, stride: int) -> tuple[int, ...]:
    """``count`` block indices ``stride`` apart, centred on block ``n_layers // 2``.

    The paper's Memory+ placement: 3 layers with stride 4 (134M: 2, 6, 10) or 8 (373M: 4, 12, 20).
    """
    first = n_layers // 2 - stride * (count - 1) // 2
    return tuple(first + stride * i for i in range(count))
