"""Autoregressive generation with a key/value cache (gpt-fast style, eager).

    tokens = generate(model, prompt, max_new_tokens=16, stop_token=eos_id)  # [B, S] -> [B, <=16]
    new_ids = generate_batched(model, [[1, 5, 7], [1, 2]], max_new_tokens=16, stop_token=eos_id)
    for token in generate_tokens(model, prompt, 16, stop_token=eos_id):  # streaming: [B] each
        ...

The prompt is processed in one forward pass ("prefill"); each new token then costs one forward
pass over a single position, its queries attending to the cached keys and values of all the
positions before it. Product-key memory and PEER layers need no cache: their read depends on
the token alone. Engram layers look a few positions back (the n-gram's earlier tokens, the
convolution's earlier inputs): the cache keeps those last few in :class:`RecentInputs`.

Prompts in a batch share one length: :func:`generate_batched` groups prompts of any lengths by
length instead of padding, which keeps positions and masks trivial.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from memcompile.config import TransformerConfig


class RecentInputs:
    """The last few inputs of the layers that look a fixed number of positions back (Engram:
    the last ``max_ngram - 1`` token ids, each Engram layer's last ``(kernel - 1) · dilation``
    convolution inputs), by name, so that a continuation computes what the whole sequence
    would."""

    def __init__(self) -> None:
        self._kept: dict[str, Tensor] = {}

    def extend(self, name: str, new: Tensor, keep: int) -> Tensor:
        """``new [B, S, ...]`` after what ``name`` kept (up to ``keep`` positions, fewer near
        the start of the sequence), along dim 1; then keep the last ``keep`` of those."""
        previous = self._kept.get(name)
        full = new if previous is None else torch.cat((previous, new), dim=1)
        self._kept[name] = full[:, max(full.shape[1] - keep, 0) :]
        return full

    def reorder(self, rows: Tensor) -> None:
        """Keep row ``rows[i]`` of every kept input as row ``i`` (beam search's reordering)."""
        for name, kept in self._kept.items():
            self._kept[name] = kept.index_select(0, rows.to(kept.device))


class LayerKVCache:
    """One attention layer's keys and values, ``[batch, max_seq_len, n_kv_heads, head_dim]``."""

    def __init__(self, owner: KVCache, keys: Tensor, values: Tensor) -> None:
        self._owner = owner
        self.keys = keys
        self.values = values

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k``/``v [batch, S, n_kv_heads, head_dim]`` after the cached positions and
        return the keys and values of every position so far (views, no copy)."""
        start = self._owner.length
        end = start + k.shape[1]
        self.keys[:, start:end] = k
        self.values[:, start:end] = v
        return self.keys[:, :end], self.values[:, :end]


class KVCache:
    """The keys and values of every attention layer for one batch of sequences.

    ``length`` positions are cached; :meth:`memcompile.model.Transformer.forward` with
    ``kv_cache=`` appends its tokens at positions ``length, length + 1, ...`` and advances it.
    """

    def __init__(
        self,
        config: TransformerConfig,
        batch_size: int,
        max_seq_len: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        max_seq_len = config.max_seq_len if max_seq_len is None else max_seq_len
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 1 <= max_seq_len <= config.max_seq_len:
            raise ValueError(
                f"max_seq_len must be in [1, config.max_seq_len = {config.max_seq_len}] (the RoPE "
                f"tables end there), got {max_seq_len}"
            )
        shape = (batch_size, max_seq_len, config.n_kv_heads, config.head_dim)
        self.max_seq_len = max_seq_len
        self.length = 0
        self.recent = RecentInputs()
        self._layers = [
            LayerKVCache(
                self,
                torch.zeros(shape, device=device, dtype=dtype),
                torch.zeros(shape, device=device, dtype=dtype),
            )
            for _ in range(config.n_layers)
        ]

    @classmethod
    def for_model(
        cls, model: nn.Module, batch_size: int, max_seq_len: int | None = None
    ) -> KVCache:
        """A cache on the device and in the dtype of ``model``'s output projection."""
        weight = model.output.weight
        return cls(model.config, batch_size, max_seq_len, device=weight.device, dtype=weight.dtype)

    def layer(self, layer_id: int) -> LayerKVCache:
        return self._layers[layer_id]

    def next_positions(self, seq_len: int, device: torch.device) -> Tensor:
        """The positions of ``seq_len`` tokens appended to the cache, checked to fit."""
        if self.length + seq_len > self.max_seq_len:
            raise ValueError(
                f"KVCache overflow: {self.length} cached + {seq_len} new positions > "
                f"max_seq_len {self.max_seq_len}"
            )
        return torch.arange(self.length, self.length + seq_len, device=device)

    def advance(self, seq_len: int) -> None:
        self.length += seq_len


def sample_next(
    logits: Tensor, temperature: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """The next token of each row of ``logits [B, vocab]``: argmax at temperature 0, else a
    sample from ``softmax(logits / temperature)``."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _check_prompt(prompt: Tensor, max_new_tokens: int) -> None:
    if prompt.dim() != 2 or prompt.shape[1] == 0 or prompt.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"prompt must be a non-empty [batch, seq_len] integer tensor, got shape "
            f"{tuple(prompt.shape)} and dtype {prompt.dtype}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    stop_token: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Continue every row of ``prompt [B, S]`` (int64 token ids), yielding each new token
    ``[B]`` as soon as it is sampled (for streaming); stops after ``max_new_tokens`` or once
    every row has produced ``stop_token``. Greedy at ``temperature`` 0 (the default)."""
    _check_prompt(prompt, max_new_tokens)
    if max_new_tokens == 0:
        return
    batch_size, prompt_len = prompt.shape
    # The last sampled token is never fed back, so the cache needs one position less.
    cache = KVCache.for_model(model, batch_size, prompt_len + max_new_tokens - 1)
    logits = model(prompt.long(), kv_cache=cache)[:, -1]
    stopped = torch.zeros(batch_size, dtype=torch.bool, device=prompt.device)
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, generator)
        yield token
        if stop_token is not None:
            stopped |= token == stop_token
            if bool(stopped.all()):
                return
        if step + 1 < max_new_tokens:
            logits = model(token[:, None], kv_cache=cache)[:, -1]


def generate(
    model: nn.Module,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    stop_token: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue every row of ``prompt [B, S]`` (int64 token ids) by up to ``max_new_tokens``.

    Returns the new tokens ``[B, n]``, ``n <= max_new_tokens``: generation stops early once every
    row has produced ``stop_token`` (rows that stopped earlier keep generating; cut them at
    their first ``stop_token``). Greedy at ``temperature`` 0 (the default).
    """
    tokens = list(
        generate_tokens(
            model,
            prompt,
            max_new_tokens,
            temperature=temperature,
            stop_token=stop_token,
            generator=generator,
        )
    )
    if not tokens:
        return prompt.new_empty(prompt.shape[0], 0, dtype=torch.int64)
    return torch.stack(tokens, dim=1)


def generate_batched(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    stop_token: int | None = None,
    batch_size: int = 32,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """The new tokens after each prompt (token ids), cut before the first ``stop_token``.

    Prompts are batched by length, so no padding is needed; results are in prompt order.
    """
    for ids in prompts:
        if not ids or len(ids) + max_new_tokens > model.config.max_seq_len:
            raise ValueError(
                f"every prompt needs 1 to max_seq_len - max_new_tokens = "
                f"{model.config.max_seq_len - max_new_tokens} tokens, got {len(ids)}"
            )
    device = model.output.weight.device
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)
    outputs: list[list[int]] = [[] for _ in prompts]
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            prompt = torch.tensor([list(prompts[i]) for i in batch], device=device)
            new_tokens = generate(
                model,
                prompt,
                max_new_tokens,
                temperature=temperature,
                stop_token=stop_token,
                generator=generator,
            )
            for i, ids in zip(batch, new_tokens.tolist()):
                outputs[i] = ids[: ids.index(stop_token)] if stop_token in ids else ids
    return outputs
