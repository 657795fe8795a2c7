"""Parameter and FLOP counts of a configuration, computed from the config alone (no model).

Categories:

- **memory**: the shared value table, ``num_values × value_dim``. Each token reads only
  ``heads × topk`` rows of it per memory layer.
- **dense**: everything else (embeddings, attention, feed-forwards, and in memory layers the
  query networks, sub-keys and W1/W2). Every token touches all of these.
- **active**: what one token uses: dense + the value rows it reads in every memory layer.

Training FLOPs per token follow torchtitan's convention (``get_nparams_and_flops``)::

    6 · (active − token embedding) + 12 · n_layers · n_heads · head_dim · seq_len

6 = forward (2) + backward (4) per multiply-accumulate; the token embedding is a gather, not a
matmul; the attention term counts full (non-causal) ``QKᵀ`` and ``AV`` matmuls. For the memory
this counts the query projection, the sub-key scores (2 FLOPs per key element, the keys count as
active parameters) and the weighted bag (``heads · topk · value_dim`` multiply-adds forward; its
two backward products, value and score gradients, make the 6). Norms, softmaxes, RoPE and the
``heads · topk²`` candidate sums of the product-key search are left out, as torchtitan leaves
out norms and softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

from memcompile.config import MemoryConfig, MemoryKind, TransformerConfig


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


def model_stats(config: TransformerConfig, seq_len: int | None = None) -> ModelStats:
    """Parameter counts and training FLOPs per token (at ``seq_len``, default ``max_seq_len``)."""
    seq_len = config.max_seq_len if seq_len is None else seq_len
    dim, memory = config.dim, config.memory
    embedding = config.vocab_size * dim
    attention = 2 * _linear(dim, config.n_heads * config.head_dim) + 2 * _linear(
        dim, config.n_kv_heads * config.head_dim
    )
    feed_forward = 3 * _linear(dim, config.ffn_hidden_dim)
    n_memory_blocks = 0 if memory is None else len(memory.layers)
    n_dense_blocks = config.n_layers - n_memory_blocks

    dense = embedding + _linear(dim, config.vocab_size) + dim  # embeddings, output, final norm
    dense += config.n_layers * (attention + 2 * dim) + n_dense_blocks * feed_forward
    memory_params = values_read = 0
    if memory is not None:
        dense += n_memory_blocks * memory_layer_params(dim, memory)
        memory_params = memory.num_values * memory.value_dim
        values_read = n_memory_blocks * memory.heads * memory.topk * memory.value_dim
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
