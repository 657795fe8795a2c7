"""Engram: a hashed n-gram memory ("Conditional Memory via Scalable Lookup", DeepSeek 2026).

Where a product-key memory *searches* its table with a learnt query, Engram *addresses* it with
the text itself: at each position t, the trailing n-gram of token ids (n = 2 .. N) is hashed by
K independent hash heads into K tables per order, and the K·(N−1) rows read are one memory
vector per token::

    c_t          = compress(token_t)                        (optional surjective vocabulary map)
    mix_{n,k}(t) = XOR_{j < n} (c_{t−j} · m_{n,k,j})        (multiplicative-XOR hash, int64)
    row_{n,k}(t) = offset_{n,k} + mix_{n,k}(t) mod p_{n,k}  (p_{n,k} a prime: that table's size)
    e_t          = concat_{n,k} E[row_{n,k}(t)]             ([K·(N−1)·row_dim])

and a context-aware gate decides how much of it the hidden state ``h_t`` lets in::

    α_t = σ( RMSNorm(h_t) · RMSNorm(W_k e_t) / √dim )       (one scalar gate per token)
    ṽ_t = α_t · W_v e_t
    y   = ṽ + SiLU(DepthwiseCausalConv(RMSNorm(ṽ)))        (kernel 4, dilation N)

``y`` is added to the residual stream of the block (the paper places Engram in a few early and
middle blocks). Positions before the start of the sequence read a reserved "before start" id,
so the first tokens hash their short n-grams too.

Hashing (:class:`NgramHasher`) reads nothing but token ids, so the model computes it **once per
forward for all Engram blocks** (``[B, T, layers, N−1 · K]`` rows) and hands each block its
slice; it is vectorised over positions (a Python loop runs only over the ≤ N offsets of an
n-gram). The multipliers are random odd integers from a fixed, self-contained generator
(splitmix64 seeded by ``hash_seed``), drawn per Engram layer, order, head and offset (the heads
of an order are independent hashes, not one hash modulo several primes; layers collide
differently), and bounded so that no product or XOR leaves ``[0, 2^62)``: int64 arithmetic is
exact and identical on every device, and the hashes never change with torch's RNG. They are
derived from the config, like RoPE tables: not checkpointed, rebuilt by ``init_buffers``.
Collisions are by design: two n-grams share a row of table (n, k) exactly when their mixes are
congruent modulo ``p_{n,k}``; with distinct primes, sharing a row in one head says little about
another head, so the concatenation ``e_t`` of all heads tells n-grams apart far better than one
row could.

**Table layout: one table per model.** Every (Engram layer, order, head) table is a row range
of ONE parameter ``[num_rows, row_dim]``; ``row_offsets`` say where each starts
(:func:`engram_table_sizes`). The trade-off:

- one table (chosen): the row-sparse optimizer, memory parallelism (column sharding, ``Shard(1)``
  on ``row_dim``), checkpoints and export see one ``[rows, dim]`` parameter, exactly the shape
  they already handle for product-key memory; a block reads all its heads in ONE ``lookup``
  call. Cost: every head's row has the same width, the offsets must be added to the hashes (one
  int64 add, folded into the hashing), and a table can only be resized as a whole.
- a table per (layer, order, head): per-table widths and sizes, but K·(N−1)·layers parameters
  (16 or more), as many lookups, optimizer states and sharding plans per step.

The model (:class:`memcompile.model.Transformer` with ``TransformerConfig.engram``, an
:class:`EngramConfig` from :mod:`memcompile.config`, re-exported here) owns the hasher and the
table and calls each Engram layer at the start of its block. Decoding with a KV cache, the
cache keeps the last ``max_ngram − 1`` token ids and each layer's last ``(conv_kernel − 1) ·
max_ngram`` convolution inputs (:class:`memcompile.generate.RecentInputs`), so a continuation
computes what the whole sequence would.

So the layers here, like :class:`memcompile.memory.ProductKeyMemory`, take the table as a
``forward`` argument and read it through :class:`memcompile.memory.ValueLookup` (one row per
head, weights of one): the model owns it and shares one ``GradRecorder`` among its readers.

Beside DeepSeek's demo (``engram_demo_v1.py``, which mocks the rest of the model): its heads of
one order share one mix and differ only by their prime modulus, and its multipliers come from
numpy's RNG; its gate takes a signed square root of the logit before the sigmoid, which the
paper's equation (above, used here) does not have; its projections have biases; and it runs
Engram at the start of the block, ``h + Engram(h)`` before attention, on the un-normalised
stream (the gate's RMSNorm normalises it), which is where a model should call this layer.

Initialisation (the paper gives none; ours): W_k and W_v N(0, 0.02) truncated at ±2σ as the
model's other projections, norm gains 1, the convolution zero (so ``y = ṽ`` at the start: the
convolution learns from there, SiLU'(0) = 1/2). The table itself is N(0, 1/√row_dim)
(:func:`init_engram_table_`), as the product-key value table.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ops
from memcompile.config import EngramConfig
from memcompile.memory import ValueLookup
from ops.row_sparse import GradRecorder

if TYPE_CHECKING:
    from memcompile.generate import RecentInputs

#: Products ``id · multiplier`` and their XORs stay below this: exact, non-negative int64.
_HASH_BOUND = 2**62


# --------------------------------------------------------------------------- table sizes


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for every n < 3.3·10^24."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in bases:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@functools.cache
def engram_table_sizes(config: EngramConfig) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """The prime size of every table, ``[layer][order][head]``: the successive primes
    ``>= table_rows``, all distinct (distinct moduli make the heads collide independently)."""
    sizes, candidate = [], config.table_rows
    for _ in config.layers:
        layer = []
        for _ in range(config.orders):
            order = []
            for _ in range(config.heads):
                while not _is_prime(candidate):
                    candidate += 1
                order.append(candidate)
                candidate += 1
            layer.append(tuple(order))
        sizes.append(tuple(layer))
    return tuple(sizes)


def _splitmix64(seed: int):
    """An endless stream of 64-bit integers (Steele et al.'s SplitMix64): fixed forever."""
    mask = (1 << 64) - 1
    state = seed
    while True:
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        yield z ^ (z >> 31)


def hash_multipliers(config: EngramConfig, num_ids: int) -> Tensor:
    """Odd multipliers ``[layers, orders, heads, max_ngram]`` (int64) for ids in ``[0, num_ids)``.

    ``[l, o, k, j]`` multiplies the id ``j`` positions back in order ``o + 2``'s n-gram; it is 0
    for ``j >= o + 2`` (those ids are not in the n-gram: XOR with 0 leaves the mix alone). Each
    is below ``2^62 / num_ids``, so products and their XOR stay exact in int64.
    """
    limit = _HASH_BOUND // num_ids
    stream = _splitmix64(config.hash_seed)
    shape = (len(config.layers), config.orders, config.heads, config.max_ngram)
    multipliers = torch.zeros(shape, dtype=torch.int64)
    for layer in range(shape[0]):
        for order in range(shape[1]):
            for head in range(shape[2]):
                for back in range(order + 2):
                    multipliers[layer, order, head, back] = (next(stream) % (limit // 2)) * 2 + 1
    return multipliers


# --------------------------------------------------------------------------- tokenizer compression


def tokenizer_compression(pieces: Sequence[str]) -> Tensor:
    """A surjective vocabulary map (the paper's tokenizer compression): ``[len(pieces)]`` int64.

    ``pieces[i]`` is token i's text. Tokens whose text is the same after NFKC, dropping accents,
    lowercasing and collapsing whitespace (``"Hello"``, ``" hello"``, ``"héllo"``) get one id;
    ids are numbered by first appearance, so the map is ``0 .. M−1`` onto, ``M <= len(pieces)``.
    """
    canonical: dict[str, int] = {}
    token_map = []
    for piece in pieces:
        if not isinstance(piece, str):
            raise TypeError(
                f"tokenizer_compression: pieces must be strings, got {type(piece).__name__}"
            )
        text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", piece))
        text = "".join(char for char in text if not unicodedata.combining(char)).lower()
        key = " ".join(text.split()) or (" " if text else "")
        token_map.append(canonical.setdefault(key, len(canonical)))
    return torch.tensor(token_map, dtype=torch.int64)


# --------------------------------------------------------------------------- hashing


def ngram_rows(ids: Tensor, multipliers: Tensor, sizes: Tensor, offsets: Tensor, start_id: int):
    """Rows of the Engram table for every position: ``[B, T] -> [B, T, layers, orders·heads]``.

    ``ids`` are (compressed) token ids below ``start_id``, the id read before the sequence's
    start; ``multipliers`` ``[L, O, K, N]``, ``sizes``/``offsets`` ``[L, O, K]`` (int64).
    """
    batch, seq_len = ids.shape
    layers, orders, heads, max_ngram = multipliers.shape
    padded = F.pad(ids, (max_ngram - 1, 0), value=start_id)
    mix = torch.zeros(batch, seq_len, layers, orders, heads, dtype=torch.int64, device=ids.device)
    for back in range(max_ngram):  # the few offsets of an n-gram, not positions
        earlier = padded[:, max_ngram - 1 - back : max_ngram - 1 - back + seq_len]
        mix = mix ^ (earlier[:, :, None, None, None] * multipliers[..., back])
    rows = torch.remainder(mix, sizes) + offsets
    return rows.flatten(-2)


class NgramHasher(nn.Module):
    """Token ids ``[B, T]`` -> Engram table rows ``[B, T, layers, orders·heads]``, once per forward.

    Buffers: ``token_map`` ``[vocab_size]`` (the tokenizer compression, checkpointed; identity by
    default), and, derived from the config (not checkpointed), ``multipliers``, ``table_sizes``
    and ``row_offsets``. Block ``config.layers[i]`` reads ``rows[:, :, i]``.
    """

    def __init__(self, config: EngramConfig, vocab_size: int, token_map: Tensor | None = None):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"NgramHasher: vocab_size must be >= 1, got {vocab_size}")
        self.config = config
        self.vocab_size = vocab_size
        self.num_rows = config.num_rows
        if token_map is None:
            token_map = torch.arange(vocab_size)
        _check_token_map(token_map, vocab_size)
        self.register_buffer("token_map", token_map.to(torch.int64).clone())
        shape = (len(config.layers), config.orders, config.heads)
        self.register_buffer(
            "multipliers",
            torch.empty(*shape, config.max_ngram, dtype=torch.int64),
            persistent=False,
        )
        self.register_buffer("table_sizes", torch.empty(shape, dtype=torch.int64), persistent=False)
        self.register_buffer("row_offsets", torch.empty(shape, dtype=torch.int64), persistent=False)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)build the derived buffers in place (also after ``to_empty``)."""
        sizes = torch.tensor(engram_table_sizes(self.config), dtype=torch.int64)
        starts = sizes.flatten().cumsum(0) - sizes.flatten()
        # Compressed ids lie below vocab_size; vocab_size itself is the "before start" id.
        self.multipliers.copy_(hash_multipliers(self.config, self.vocab_size + 1))
        self.table_sizes.copy_(sizes)
        self.row_offsets.copy_(starts.view_as(sizes))

    def forward(self, tokens: Tensor, padding: Tensor | None = None) -> Tensor:
        """Rows for ``tokens [B, T]``; ``padding`` (``[B, T]``, nonzero at real tokens, 0 at
        padding: Hugging Face's ``attention_mask``) makes padded positions read as "before the
        start", so a left-padded row hashes the n-grams it would alone."""
        if tokens.dim() != 2:
            raise ValueError(
                f"NgramHasher: tokens must be 2-D [batch, seq_len], got shape {tuple(tokens.shape)}"
            )
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"NgramHasher: tokens must be int64 or int32 ids, got {tokens.dtype}")
        tokens = ops.checked_indices(tokens, self.vocab_size, "NgramHasher: tokens", "vocab_size")
        ids = self.token_map[tokens]
        if padding is not None:
            ids = ids.masked_fill(padding == 0, self.vocab_size)
        return ngram_rows(
            ids, self.multipliers, self.table_sizes, self.row_offsets, self.vocab_size
        )


def _check_token_map(token_map: Tensor, vocab_size: int) -> None:
    if not isinstance(token_map, Tensor) or token_map.dtype not in (torch.int64, torch.int32):
        raise TypeError("NgramHasher: token_map must be an int64 or int32 tensor [vocab_size]")
    if tuple(token_map.shape) != (vocab_size,):
        raise ValueError(
            f"NgramHasher: token_map must have shape ({vocab_size},) (one id per token), got "
            f"{tuple(token_map.shape)}"
        )
    if token_map.is_meta:
        return  # no data to check
    if token_map.numel() and int(token_map.min()) < 0:
        raise ValueError("NgramHasher: token_map ids must be >= 0")
    if token_map.numel() and int(token_map.max()) >= vocab_size:
        raise ValueError(
            f"NgramHasher: token_map must map onto fewer ids than vocab_size = {vocab_size} "
            f"(a compression), found id {int(token_map.max())}"
        )


# --------------------------------------------------------------------------- the layer


class Engram(nn.Module):
    """One Engram layer: ``forward(h [B, T, dim], rows [B, T, orders·heads], table) -> y [B, T,
    dim]``, the update the block adds to its residual stream (see the module doc).

    ``rows`` is this layer's slice of :class:`NgramHasher`'s output; ``table`` the model's one
    Engram table ``[num_rows, row_dim]``, read through a :class:`ValueLookup`.
    """

    def __init__(
        self,
        dim: int,
        config: EngramConfig,
        norm_eps: float = 1e-5,
        grad_recorder: GradRecorder | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.heads_per_layer = config.heads_per_layer
        self.row_dim = config.row_dim
        self.num_rows = config.num_rows
        self.lookup = ValueLookup(grad_recorder)
        self.key = nn.Linear(config.memory_dim, dim, bias=False)
        self.value = nn.Linear(config.memory_dim, dim, bias=False)
        self.hidden_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.key_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.conv_norm = nn.RMSNorm(dim, eps=norm_eps)
        # Depthwise (one filter per channel); causal by padding only on the left.
        self.conv = nn.Conv1d(dim, dim, config.conv_kernel, groups=dim, bias=False)
        self.conv_dilation = config.max_ngram
        self.conv_padding = config.conv_padding
        self.init_weights()

    def init_weights(self) -> None:
        for linear in (self.key, self.value):
            nn.init.trunc_normal_(linear.weight, std=0.02, a=-0.04, b=0.04)
        for norm in (self.hidden_norm, self.key_norm, self.conv_norm):
            norm.reset_parameters()
        nn.init.zeros_(self.conv.weight)

    def forward(
        self,
        h: Tensor,
        rows: Tensor,
        table: Tensor,
        recent: RecentInputs | None = None,
        name: str = "engram",
        padding: Tensor | None = None,
    ) -> Tensor:
        """With ``recent`` (a KV cache's :class:`memcompile.generate.RecentInputs`), ``h``
        continues a cached sequence: the convolution also reads the inputs that earlier calls
        kept there under ``name`` (zeros before the sequence's start, as without a cache).
        ``padding`` (``[B, T]``, 0 at padded positions) zeroes the convolution's inputs there,
        as before a sequence's start."""
        self._check_inputs(h, rows, table)
        batch, seq_len, _ = h.shape
        flat_rows = rows.reshape(-1, 1)
        ones = torch.ones(flat_rows.shape, dtype=table.dtype, device=table.device)
        memory = self.lookup(table, flat_rows, ones)  # one row per head, concatenated:
        memory = memory.view(batch, seq_len, self.heads_per_layer * self.row_dim).to(h.dtype)

        key = self.key_norm(self.key(memory))
        gate = torch.sigmoid((self.hidden_norm(h) * key).sum(-1, keepdim=True) / self.dim**0.5)
        gated = gate * self.value(memory)  # [B, T, dim]

        conv_input = self.conv_norm(gated)
        if padding is not None:
            conv_input = conv_input * (padding != 0).unsqueeze(-1).to(conv_input.dtype)
        if recent is not None:
            conv_input = recent.extend(name, conv_input, self.conv_padding)
        left = self.conv_padding + seq_len - conv_input.shape[1]  # zeros before the start
        channels_first = F.pad(conv_input.transpose(1, 2), (left, 0))
        mixed = F.conv1d(
            channels_first, self.conv.weight, dilation=self.conv_dilation, groups=self.dim
        )
        return gated + F.silu(mixed.transpose(1, 2))

    def _check_inputs(self, h: Tensor, rows: Tensor, table: Tensor) -> None:
        if h.dim() != 3 or h.shape[-1] != self.dim:
            raise ValueError(
                f"Engram: h must be [batch, seq_len, dim] with dim = {self.dim}, got shape "
                f"{tuple(h.shape)}"
            )
        if rows.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"Engram: rows must be int64 or int32 table rows, got {rows.dtype}")
        expected = (*h.shape[:2], self.heads_per_layer)
        if tuple(rows.shape) != expected:
            raise ValueError(
                f"Engram: rows must have shape {expected} ([batch, seq_len] of h, orders·heads), "
                f"got {tuple(rows.shape)}"
            )
        if tuple(table.shape) != (self.num_rows, self.row_dim):
            raise ValueError(
                f"Engram: table must have shape ({self.num_rows}, {self.row_dim}) (num_rows, "
                f"row_dim of the config), got {tuple(table.shape)}"
            )


@torch.no_grad()
def init_engram_table_(table: Tensor) -> Tensor:
    """N(0, 1/√row_dim) in place, as the product-key value table."""
    return nn.init.normal_(table, std=table.shape[1] ** -0.5)
