"""Parameter and FLOP counts of a configuration, computed from the config alone (no model).

Categories:

- **memory**: the model's one table (``TransformerConfig.table_shape``): product-key values
  ``num_values × value_dim``, Engram's hashed rows ``num_rows × row_dim``, or PEER's down and up
  vectors ``2 · num_experts × dim``. Each token reads only a few rows of it per layer:
  ``heads × topk`` (product keys), ``(max_ngram − 1) × heads`` (Engram), ``2 × heads × topk``
  (PEER: a down and an up row per expert).
- **dense**: everything else (embeddings, attention, feed-forwards, and in memory layers the
  query networks, sub-keys and W1/W2; in Engram layers the key/value projections, norms and
  convolution). Every token touches all of these.
- **active**: what one token uses: dense + the table rows it reads in every layer.

Training FLOPs per token follow torchtitan's convention (``get_nparams_and_flops``)::

    6 · (active − token embedding) + 12 · n_layers · n_heads · head_dim · seq_len

6 = forward (2) + backward (4) per multiply-accumulate; the token embedding is a gather, not a
matmul; the attention term counts full (non-causal) ``QKᵀ`` and ``AV`` matmuls. For the memory
this counts the query projection, the sub-key scores (2 FLOPs per key element, the keys count as
active parameters) and the weighted bag (``heads · topk · value_dim`` multiply-adds forward; its
two backward products, value and score gradients, make the 6). Norms, softmaxes, RoPE and the
``heads · topk²`` candidate sums of the product-key search are left out, as torchtitan leaves
out norms and softmax. Engram's hashing (integer multiply-XORs) and convolution (``kernel``
multiply-adds per channel) are left out likewise; PEER's ``u·x`` dots and weighted bag count as
the rows they read (one multiply-add per element forward, two backward: 6 per element).
"""

from __future__ import annotations

from dataclasses import dataclass

from memcompile.config import EngramConfig, MemoryConfig, MemoryKind, PEERConfig, TransformerConfig


@dataclass(frozen=True)
class ModelStats:
    total_params: int
    dense_params: int
    memory_params: int
    active_params: int
    #: Training (forward + backward) FLOPs per token at ``seq_len``.
    train_flops_per_token: int
    seq_len: int


def _linear(fan_in: int, fan_out: int, bias: bool = False) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def memory_layer_params(dim: int, memory: MemoryConfig) -> int:
    """Parameters of one memory layer, excluding the shared value table."""
    params = _linear(dim, memory.heads * memory.key_dim, bias=True)  # query
    params += memory.heads * 2 * memory.n_keys * (memory.key_dim // 2)  # sub-keys
    if memory.qk_norm:
        params += 2 * (memory.key_dim // 2)
    if memory.kind is MemoryKind.MEMORY_PLUS:
        params += _linear(dim, memory.value_dim, bias=True) + _linear(memory.value_dim, dim, True)
    return params


def engram_layer_params(dim: int, engram: EngramConfig) -> int:
    """Parameters of one Engram layer, excluding the table: W_k, W_v, three norms, the conv."""
    return 2 * _linear(engram.memory_dim, dim) + 3 * dim + dim * engram.conv_kernel


def peer_layer_params(dim: int, peer: PEERConfig) -> int:
    """Parameters of one PEER layer, excluding the table: the query and the sub-keys."""
    return _linear(dim, peer.heads * peer.key_dim, bias=True) + peer.heads * peer.n_keys * (
        peer.key_dim
    )


def model_stats(config: TransformerConfig, seq_len: int | None = None) -> ModelStats:
    """Parameter counts and training FLOPs per token (at ``seq_len``, default ``max_seq_len``)."""
    seq_len = config.max_seq_len if seq_len is None else seq_len
    dim, memory = config.dim, config.memory
    embedding = config.vocab_size * dim
    attention = 2 * _linear(dim, config.n_heads * config.head_dim) + 2 * _linear(
        dim, config.n_kv_heads * config.head_dim
    )
    feed_forward = 3 * _linear(dim, config.ffn_hidden_dim)
    engram, peer = config.engram, config.peer
    # Blocks whose feed-forward reads the table (Engram layers come on top of the block).
    ffn_family = memory or peer
    n_memory_blocks = 0 if ffn_family is None else len(ffn_family.layers)
    n_dense_blocks = config.n_layers - n_memory_blocks

    dense = embedding + _linear(dim, config.vocab_size) + dim  # embeddings, output, final norm
    dense += config.n_layers * (attention + 2 * dim) + n_dense_blocks * feed_forward
    values_read = 0
    if memory is not None:
        dense += n_memory_blocks * memory_layer_params(dim, memory)
        values_read = n_memory_blocks * memory.heads * memory.topk * memory.value_dim
    elif engram is not None:
        dense += len(engram.layers) * engram_layer_params(dim, engram)
        values_read = len(engram.layers) * engram.heads_per_layer * engram.row_dim
    elif peer is not None:
        dense += n_memory_blocks * peer_layer_params(dim, peer)
        values_read = n_memory_blocks * 2 * peer.heads * peer.topk * dim
    rows, width = config.table_shape or (0, 0)
    memory_params = rows * width
    active = dense + values_read
    attention_flops = 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return ModelStats(
        total_params=dense + memory_params,
        dense_params=dense,
        memory_params=memory_params,
        active_params=active,
        train_flops_per_token=6 * (active - embedding) + attention_flops,
        seq_len=seq_len,
    )
