"""A Llama-style transformer whose chosen blocks replace their feed-forward with a memory layer.

    tokens -> embedding -> [block] × n_layers -> RMSNorm -> output projection -> logits
    block:  x = x + engram(x, rows)  (Engram blocks only)
            h = x + attention(norm(x));  out = h + ffn(norm(h))
    ffn:    SwiGLU, or in memory blocks MemoryPlus / ProductKeyMemory / PEER reading the table

A model has at most one memory family (``config.memory``, ``config.engram`` or ``config.peer``)
and, whatever the family, ONE trainable table ``memory_values`` (``config.table_shape``):
product-key values, Engram's hashed rows, or PEER's down and up vectors stacked. It hands the
table, through ``memory_table`` (once per forward), to the blocks that read it (see
:mod:`memcompile.memory` for why it is an argument, not a submodule parameter). Engram's rows
are hashed once per forward for all its blocks (``hasher``, :class:`NgramHasher`).

Build large flavors on the meta device, then materialise::

    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cuda")
    model.init_weights()

``init_weights`` sets every parameter and buffer (RoPE tables, usage counters), so nothing is left
uninitialised after ``to_empty``.

``torch.compile(model, fullgraph=True)`` traces forward and backward without graph breaks. For a
variable sequence length, mark it dynamic (``torch._dynamo.mark_dynamic(tokens, 1)``) or let
automatic dynamic shapes recompile once; ``dynamic=True`` works too but compiles twice, as
Dynamo restarts to specialise float module attributes such as RMSNorm's ``eps``.

Dense initialisation follows torchtitan's llama3: embeddings N(0, 1); wq/wk/wv and w1
N(0, 0.02) truncated at ±2σ; wo, w2, w3 the same with std ``0.02 / √(2·(layer_id + 1))``
(depth-scaled); output projection N(0, 1/√dim) truncated at ±3σ; norm gains 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ops
from memcompile.config import TransformerConfig
from memcompile.engram import Engram, NgramHasher, init_engram_table_
from memcompile.memory import ValueTable, build_memory_layer
from memcompile.peer import PEER, init_expert_table_
from ops.row_sparse import GradRecorder

if TYPE_CHECKING:
    from memcompile.generate import KVCache, LayerKVCache, RecentInputs

_INIT_STD = 0.02


def _trunc_normal_(weight: Tensor, std: float, cutoff: float = 2.0) -> None:
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-cutoff * std, b=cutoff * std)


# --------------------------------------------------------------------------- RoPE


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, ``[max_seq_len, head_dim / 2]`` each, in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of ``x [B, S, heads, head_dim]`` (Llama's layout), in fp32.

    ``cos``/``sin`` are ``[S, head_dim / 2]`` or ``[B, S, head_dim / 2]``.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


# --------------------------------------------------------------------------- masks


def causal_mask(
    seq_len: int, cached: int, padding: Tensor | None = None, *, device: torch.device | None = None
) -> Tensor:
    """Which keys the queries of ``seq_len`` new tokens read, after ``cached`` positions.

    Query ``i`` sits at position ``cached + i`` and reads keys ``0 .. cached + i``: a boolean
    ``[seq_len, cached + seq_len]`` mask. With ``padding`` (``[B, cached + seq_len]``, nonzero at
    real tokens, Hugging Face's ``attention_mask``), padded keys are hidden too, giving
    ``[B, 1, seq_len, cached + seq_len]``; every query still reads itself, so a padded query's
    row is never empty (an empty row would make SDPA's output NaN, and that NaN would reach the
    real tokens through the next layer's values even though their weight on it is 0).
    """
    keys = torch.arange(cached + seq_len, device=device)
    queries = keys[cached:, None]
    mask = keys <= queries
    if padding is None:
        return mask
    return (mask & padding[:, None, None, :].bool()) | (keys == queries)


# --------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Causal grouped-query self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def init_weights(self, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            _trunc_normal_(linear.weight, _INIT_STD)
        _trunc_normal_(self.wo.weight, out_std)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv_cache: LayerKVCache | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Causal attention of ``x``, or, with ``mask`` (boolean, ``[S, K]`` or ``[B, 1, S, K]``,
        True where a query may read a key: see :func:`causal_mask`), what it allows.

        With ``kv_cache``, ``x`` continues the cached sequence: its keys and values are appended
        to the cache and its queries read the ``K`` keys cached so far, as ``mask`` says; without
        a mask every query reads every key (right for one new token; several need the mask, as
        plain causal attention would align them with the first keys)."""
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            # The training path builds no mask tensor; a single cached query needs none.
            is_causal=mask is None and kv_cache is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        # Explicit sizes: an empty batch has no -1 to infer.
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) ⊙ w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def init_weights(self, out_std: float) -> None:
        _trunc_normal_(self.w1.weight, _INIT_STD)
        _trunc_normal_(self.w2.weight, out_std)
        _trunc_normal_(self.w3.weight, out_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block; in memory blocks the feed-forward is a memory or PEER layer; Engram
    blocks start with an Engram layer."""

    def __init__(
        self, layer_id: int, config: TransformerConfig, grad_recorder: GradRecorder | None = None
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        engram, peer = config.engram, config.peer
        #: Whether the feed-forward reads the table (a product-key memory or PEER layer).
        self.is_memory_block = any(
            family is not None and layer_id in family.layers for family in (config.memory, peer)
        )
        if engram is not None and layer_id in engram.layers:
            self.engram = Engram(config.dim, engram, config.norm_eps, grad_recorder)
            #: Which of the hasher's per-layer rows this block reads.
            self.engram_index = engram.layers.index(layer_id)
        else:
            self.engram = None
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        if self.is_memory_block and peer is not None:
            self.feed_forward = PEER(config.dim, peer, grad_recorder)
        elif self.is_memory_block:
            self.feed_forward = build_memory_layer(
                config.dim, config.memory, config.norm_eps, grad_recorder
            )
        else:
            self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)

    @property
    def reads_table(self) -> bool:
        """Whether the block reads the model's table (its feed-forward, or its Engram layer)."""
        return self.is_memory_block or self.engram is not None

    def init_weights(self) -> None:
        out_std = _INIT_STD / (2 * (self.layer_id + 1)) ** 0.5
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(out_std)
        if self.engram is not None:
            self.engram.init_weights()
        if self.is_memory_block:
            self.feed_forward.init_weights()
        else:
            self.feed_forward.init_weights(out_std)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        memory_values: Tensor | None,
        kv_cache: LayerKVCache | None = None,
        mask: Tensor | None = None,
        engram_rows: Tensor | None = None,
        recent: RecentInputs | None = None,
        padding: Tensor | None = None,
    ) -> Tensor:
        """``engram_rows`` (the hasher's rows for all Engram blocks), ``recent`` (the KV
        cache's, when decoding) and ``padding`` (``[B, S]``, 0 at this call's padded tokens)
        are read by an Engram block only."""
        if self.engram is not None:
            rows = engram_rows[:, :, self.engram_index]
            name = f"engram.{self.layer_id}"
            x = x + self.engram(x, rows, memory_values, recent, name, padding)
        h = x + self.attention(self.attention_norm(x), cos, sin, kv_cache, mask)
        normed = self.ffn_norm(h)
        if self.is_memory_block:
            return h + self.feed_forward(normed, memory_values)
        return h + self.feed_forward(normed)


# --------------------------------------------------------------------------- model


class Transformer(nn.Module):
    """``forward(tokens [B, S], positions=None, kv_cache=None, *, hidden_states=None) -> logits
    [B, S, vocab_size]``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        if config.table_shape is not None:
            # The one table every memory, Engram or PEER block reads (see memcompile.memory).
            self.memory_values = nn.Parameter(torch.empty(config.table_shape))
            # Every block's reads of it share one recorder, and learn which table it is here.
            recorder = GradRecorder()
            self.memory_table = ValueTable(recorder)
        else:
            self.register_parameter("memory_values", None)
            self.memory_table = recorder = None
        # Engram's rows depend on the tokens alone: hashed once per forward for all its blocks.
        self.hasher = (
            None if config.engram is None else NgramHasher(config.engram, config.vocab_size)
        )
        # A dict keyed by layer id keeps parameter names stable if blocks are split off (PP).
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, config, recorder) for i in range(config.n_layers)}
        )
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # Derived from the config, so not checkpointed; filled by init_weights.
        table_shape = (config.max_seq_len, config.head_dim // 2)
        self.register_buffer("rope_cos", torch.empty(table_shape), persistent=False)
        self.register_buffer("rope_sin", torch.empty(table_shape), persistent=False)
        self.register_load_state_dict_post_hook(_materialise_buffers)
        self.init_weights()

    @torch.no_grad()
    def init_rope_tables(self) -> None:
        config = self.config
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer in place (a no-op on the meta device)."""
        config = self.config
        self.init_rope_tables()
        nn.init.normal_(self.tok_embeddings.weight)
        if self.hasher is not None:
            self.hasher.init_buffers()
        if config.engram is not None:
            init_engram_table_(self.memory_values)
        elif config.peer is not None:
            init_expert_table_(self.memory_values, config.peer)
        elif config.memory is not None:
            nn.init.normal_(self.memory_values, std=config.memory.value_dim**-0.5)
        for block in self.layers.values():
            block.init_weights()
        self.norm.reset_parameters()
        _trunc_normal_(self.output.weight, config.dim**-0.5, cutoff=3.0)

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        kv_cache: KVCache | None = None,
        *,
        attention_mask: Tensor | None = None,
        hidden_states: list[Tensor] | None = None,
    ) -> Tensor:
        """Logits for ``tokens [B, S]``.

        ``positions`` (``[S]`` or ``[B, S]`` ints below ``max_seq_len``, default ``0..S-1``, or
        the positions after the cached ones) selects the RoPE angles, e.g. for packed documents,
        an offset continuation or the rows of a left-padded batch.

        ``kv_cache`` (:class:`memcompile.generate.KVCache`, or anything with its ``length``,
        ``next_positions``, ``layer(i).update``, ``advance`` and ``recent``, as
        :mod:`memcompile.hf`'s view of a transformers cache) makes ``tokens`` the continuation
        of the cached sequence; the cache then holds them too (and, for Engram, the last few
        tokens and convolution inputs in ``recent``). Training never passes one (see
        :func:`memcompile.generate.generate`).

        ``attention_mask`` (``[B, cached + S]``, nonzero at real tokens, 0 at padding) hides
        padded keys from every query (see :func:`causal_mask`), and Engram reads padding as
        the space before the sequence's start; what the model computes at padded positions is
        meaningless. Without it, and without a cache, attention is plain
        causal attention with no mask tensor (the training path).

        ``hidden_states``, a list, receives the ``n_layers + 1`` hidden states ``[B, S, dim]``
        as Hugging Face models return them: the embeddings, the output of every block but the
        last, then the last block's output after the final norm (what ``output`` reads).

        Bad input raises before any compute: shapes, dtypes and devices always; token ids and
        positions outside their tables where ``memlayer::checked_indices`` reads them (on the
        CPU always; on CUDA with ``MEMCOMPILE_CHECK_INDICES=1``, as it costs a sync).
        """
        self._check_inputs(tokens, positions, kv_cache, attention_mask)
        seq_len = tokens.shape[1]
        tokens = ops.checked_indices(
            tokens, self.config.vocab_size, "Transformer: tokens", "the vocabulary"
        )
        cached = 0
        if kv_cache is not None:
            cached = kv_cache.length
            next_positions = kv_cache.next_positions(seq_len, tokens.device)  # checks the room
        if positions is not None:
            positions = ops.checked_indices(
                positions, self.config.max_seq_len, "Transformer: positions", "max_seq_len"
            )
        elif kv_cache is not None:
            positions = next_positions
        if positions is None:
            cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        mask = None  # plain causal attention, or one token reading every cached key
        if attention_mask is not None or (kv_cache is not None and seq_len > 1):
            mask = causal_mask(seq_len, cached, attention_mask, device=tokens.device)

        h = self.tok_embeddings(tokens)
        values = None if self.memory_table is None else self.memory_table(self.memory_values)
        recent = None if kv_cache is None else kv_cache.recent
        # This call's tokens' entries of the padding mask (it also covers the cached ones).
        padding = None if attention_mask is None else attention_mask[:, cached:]
        engram_rows = None
        if self.hasher is not None:
            engram_rows = self._engram_rows(tokens, recent, padding)
        for layer_id, block in self.layers.items():
            if hidden_states is not None:
                hidden_states.append(h)
            layer_cache = None if kv_cache is None else kv_cache.layer(int(layer_id))
            # Only the blocks that read the table get it.
            table = values if block.reads_table else None
            h = block(h, cos, sin, table, layer_cache, mask, engram_rows, recent, padding)
        if kv_cache is not None:
            kv_cache.advance(seq_len)
        h = self.norm(h)
        if hidden_states is not None:
            hidden_states.append(h)
        return self.output(h)

    def _engram_rows(
        self, tokens: Tensor, recent: RecentInputs | None, padding: Tensor | None
    ) -> Tensor:
        """The Engram table rows of every token (padded ones read as "before the start"); a
        continuation's first n-grams reach back into the tokens the cache kept."""
        if recent is None:
            return self.hasher(tokens, padding)
        keep = self.config.engram.max_ngram - 1
        if padding is None:
            padding = torch.ones_like(tokens)
        context = recent.extend("tokens", tokens, keep)
        context_padding = recent.extend("padding", padding.to(tokens.dtype), keep)
        return self.hasher(context, context_padding)[:, context.shape[1] - tokens.shape[1] :]

    def _check_inputs(
        self,
        tokens: Tensor,
        positions: Tensor | None,
        kv_cache: KVCache | None,
        attention_mask: Tensor | None,
    ) -> None:
        """Checks of shapes, dtypes and devices: they read no data (no device sync)."""
        if tokens.dim() != 2:
            raise ValueError(
                f"Transformer: tokens must be 2-D [batch, seq_len], got shape "
                f"{tuple(tokens.shape)} (add a batch dim: tokens.unsqueeze(0))"
            )
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"Transformer: tokens must be int64 or int32 ids, got {tokens.dtype}")
        model_device = self.tok_embeddings.weight.device
        if tokens.device != model_device or tokens.device != self.rope_cos.device:
            if model_device.type == "meta" or self.rope_cos.is_meta:
                raise ValueError(
                    f"Transformer: tokens are on {tokens.device} but the model is on the meta "
                    f"device (no data); materialise it first: model.to_empty(device=...) then "
                    f"model.init_weights(), or model.load_state_dict(state_dict, assign=True)"
                )
            raise ValueError(
                f"Transformer: tokens are on {tokens.device} but the model is on "
                f"{model_device}: move one to the other"
            )
        seq_len = tokens.shape[1]
        if positions is None and kv_cache is None and seq_len > self.config.max_seq_len:
            raise ValueError(
                f"Transformer: sequence length {seq_len} exceeds max_seq_len "
                f"{self.config.max_seq_len}"
            )
        if attention_mask is not None:
            keys = seq_len + (0 if kv_cache is None else kv_cache.length)
            if tuple(attention_mask.shape) != (tokens.shape[0], keys):
                raise ValueError(
                    f"Transformer: attention_mask must have shape [batch, cached + seq_len] = "
                    f"[{tokens.shape[0]}, {keys}] (one entry per key, 0 at padding), got "
                    f"{tuple(attention_mask.shape)}"
                )
        if positions is not None and (
            positions.dim() not in (1, 2)
            or positions.shape[-1] != seq_len
            or (positions.dim() == 2 and positions.shape[0] != tokens.shape[0])
        ):
            raise ValueError(
                f"Transformer: positions must have shape [seq_len] = [{seq_len}] or "
                f"[batch, seq_len] = {list(tokens.shape)}, got {tuple(positions.shape)}"
            )


def _materialise_buffers(model: Transformer, incompatible_keys) -> None:
    """After ``load_state_dict(..., assign=True)`` into a meta-device model, the parameters are
    real but the buffers that are derived state, not checkpointed (RoPE tables, telemetry
    counters, the Engram hasher's multipliers and table offsets), are still on meta: create them
    on the parameters' device and initialise them."""
    device = model.tok_embeddings.weight.device
    if device.type == "meta":
        return
    stale = [
        (module, name)
        for module in model.modules()
        for name, buffer in module.named_buffers(recurse=False)
        if buffer.is_meta
    ]
    for module, name in stale:  # telemetry counters start at zero
        setattr(module, name, torch.zeros_like(getattr(module, name), device=device))
    if any(module is model for module, _ in stale):
        model.init_rope_tables()
    if any(module is model.hasher for module, _ in stale):
        model.hasher.init_buffers()
