"""Model configuration: a Llama-style transformer whose chosen blocks read a product-key memory.

Dataclasses, validated at construction so a bad configuration fails before any tensor exists:

- :class:`MemoryConfig`: the shared value table and the product-key memory layers that read it.
- :class:`EngramConfig`: hashed n-gram memory layers (:mod:`memcompile.engram`).
- :class:`PEERConfig`: PEER layers, a million single-neuron experts (:mod:`memcompile.peer`).
- :class:`TransformerConfig`: the dense transformer with at most one of the three memory families
  (``memory``, ``engram``, ``peer``; all ``None`` for a dense model). A model has ONE trainable
  table whatever the family (:attr:`TransformerConfig.table_shape`), so the row-sparse
  optimizer, checkpoints, export and memory parallelism have one code path; two families in one
  model would need several tables (not supported yet).

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
class EngramConfig:
    """Hashed n-gram memory in the blocks ``layers``, all reading one table (see
    :mod:`memcompile.engram`)."""

    #: Blocks that get an Engram layer at their start (0-based, distinct).
    layers: tuple[int, ...]
    #: Largest n-gram order N; orders 2 .. N are hashed. Also the convolution's dilation.
    max_ngram: int = 3
    #: Hash heads K per order, each with its own table.
    heads: int = 4
    #: Rows of each (layer, order, head) table before rounding up to distinct primes.
    table_rows: int = 1 << 16
    #: Width of a row; a token's memory vector e has ``(max_ngram - 1) * heads * row_dim``.
    row_dim: int = 64
    #: Taps of the depthwise causal convolution.
    conv_kernel: int = 4
    #: Seed of the hash multipliers (a fixed generator: the same hashes on every machine).
    hash_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("engram.layers must name at least one block")
        if len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise ValueError(
                f"engram.layers must be distinct block indices >= 0, got {self.layers}"
            )
        minimums = {"max_ngram": 2, "heads": 1, "table_rows": 2, "row_dim": 1, "conv_kernel": 1}
        for name, minimum in minimums.items():
            if getattr(self, name) < minimum:
                raise ValueError(f"engram.{name} must be >= {minimum}, got {getattr(self, name)}")
        if not 0 <= self.hash_seed < 2**64:
            raise ValueError(f"engram.hash_seed must lie in [0, 2^64), got {self.hash_seed}")

    @property
    def orders(self) -> int:
        """Hashed n-gram orders: 2 .. max_ngram."""
        return self.max_ngram - 1

    @property
    def heads_per_layer(self) -> int:
        """Rows each Engram layer reads per token: one per (order, head)."""
        return self.orders * self.heads

    @property
    def memory_dim(self) -> int:
        """Width of the concatenated memory vector e."""
        return self.heads_per_layer * self.row_dim

    @property
    def num_rows(self) -> int:
        """Rows of the model's one Engram table: the sum of all (layer, order, head) primes."""
        # Imported here: memcompile.engram imports this module (through memcompile.memory).
        from memcompile.engram import engram_table_sizes

        return sum(sum(sum(order) for order in layer) for layer in engram_table_sizes(self))

    @property
    def conv_padding(self) -> int:
        """Past inputs the causal convolution reads: ``(conv_kernel - 1) · max_ngram``."""
        return (self.conv_kernel - 1) * self.max_ngram


@dataclass(frozen=True)
class PEERConfig:
    """PEER layers in the blocks ``layers``, reading one table of ``2 · num_experts`` rows: the
    down vectors, then the up vectors (see :mod:`memcompile.peer`)."""

    #: Experts; a square: product keys index an n × n grid.
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
    #: Product-key memory layers (Memory / Memory+).
    memory: MemoryConfig | None = None
    #: Engram layers (hashed n-gram memory); excludes ``memory`` and ``peer``.
    engram: EngramConfig | None = None
    #: PEER layers (single-neuron experts); excludes ``memory`` and ``engram``.
    peer: PEERConfig | None = None

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
        families = [name for name in ("memory", "engram", "peer") if getattr(self, name)]
        if len(families) > 1:
            raise ValueError(
                f"a model has one memory family, got {' and '.join(families)}: each family "
                f"reads the model's one table (mixing them would need several tables)"
            )
        for name in families:
            family = getattr(self, name)
            bad = [layer for layer in family.layers if not 0 <= layer < self.n_layers]
            if bad:
                raise ValueError(
                    f"{name}.layers {bad} out of range: the model has blocks 0..{self.n_layers - 1}"
                )
            if name != "engram":  # Engram's layers need nothing of the model dim
                object.__setattr__(self, name, family.for_model_dim(self.dim))

    @property
    def family(self) -> MemoryConfig | EngramConfig | PEERConfig | None:
        """The memory family's config (``memory``, ``engram`` or ``peer``), ``None`` if dense."""
        return self.memory or self.engram or self.peer

    @property
    def table_shape(self) -> tuple[int, int] | None:
        """``(rows, width)`` of the model's one trainable table (``memory_values``), or ``None``
        for a dense model: product-key values, Engram's hashed rows, or PEER's down vectors
        stacked on its up vectors."""
        if self.memory is not None:
            return self.memory.num_values, self.memory.value_dim
        if self.engram is not None:
            return self.engram.num_rows, self.engram.row_dim
        if self.peer is not None:
            return 2 * self.peer.num_experts, self.dim
        return None

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
