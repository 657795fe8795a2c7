"""KV-cached generation matches recomputing the whole sequence at every step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memcompile.flavors import FLAVORS
from memcompile.generate import KVCache, generate, generate_batched, generate_tokens, sample_next
from memcompile.model import Transformer

#: Engram's cache keeps its last tokens and convolution inputs; PEER's read needs none.
FLAVOR_NAMES = ("dense_debug", "mem_debug", "memplain_debug", "engram_debug", "peer_debug")


def _model(name: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(FLAVORS[name]).eval()
    with torch.no_grad():  # Engram's convolution starts at zero: make it read the past
        for block in model.layers.values():
            if block.engram is not None:
                block.engram.conv.weight.normal_()
    return model


_MODELS = {name: _model(name) for name in FLAVOR_NAMES}


def _uncached_greedy(model: Transformer, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    tokens = prompt
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_token = model(tokens)[:, -1].argmax(-1)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    return tokens[:, prompt.shape[1] :]


@pytest.mark.parametrize("name", FLAVOR_NAMES)
def test_cached_greedy_equals_uncached_argmax(name):
    model = _MODELS[name]
    prompt = torch.randint(
        0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(generate(model, prompt, 9), _uncached_greedy(model, prompt, 9))


def test_streamed_tokens_come_one_forward_at_a_time_and_equal_generate():
    model = _MODELS["mem_debug"]
    prompt = torch.randint(
        0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2)
    )
    forwards = []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        stream = generate_tokens(model, prompt, 6)
        first = next(stream)
        assert len(forwards) == 1  # the prefill only: the first token is out before the rest
        streamed = [first, *stream]
    finally:
        handle.remove()
    assert len(forwards) == 6  # prefill + one per token, the last token never fed back
    assert torch.equal(torch.stack(streamed, dim=1), generate(model, prompt, 6))


@settings(max_examples=10)
@given(
    name=st.sampled_from(FLAVOR_NAMES),
    chunks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    batch=st.integers(1, 3),
)
def test_chunked_cached_logits_match_full_forward(name, chunks, batch):
    """Feeding a sequence in chunks of any size through the cache gives the full-sequence
    logits (prefill of several tokens after a cached prefix needs the offset causal mask)."""
    model = _MODELS[name]
    tokens = torch.randint(0, model.config.vocab_size, (batch, sum(chunks)))
    cache = KVCache.for_model(model, batch, max_seq_len=sum(chunks) + 1)
    with torch.no_grad():
        expected = model(tokens)
        pieces, start = [], 0
        for size in chunks:
            pieces.append(model(tokens[:, start : start + size], kv_cache=cache))
            start += size
    assert cache.length == sum(chunks)
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mem_debug", "engram_debug"])
def test_a_left_padded_batch_decodes_through_the_cache_like_each_row_alone(name):
    """Prefill of a left-padded batch then single-token steps, with the padding mask and each
    row's own positions (what transformers' generate() passes): every row's logits are those
    of the row run alone without a cache (Engram: padding hashes and convolves as the space
    before a sequence's start)."""
    model = _MODELS[name]
    generator = torch.Generator().manual_seed(6)
    rows = [torch.randint(1, 256, (n,), generator=generator) for n in (6, 2, 4)]
    steps = torch.randint(1, 256, (3, 3), generator=generator)
    tokens = torch.stack([torch.nn.functional.pad(row, (6 - len(row), 0)) for row in rows])
    mask = tokens != 0
    cache = KVCache.for_model(model, 3, max_seq_len=9)
    with torch.no_grad():
        pieces = [model(tokens, (mask.cumsum(-1) - 1).clamp(min=0), cache, attention_mask=mask)]
        for step in steps.T:
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
            pieces.append(model(step[:, None], positions, cache, attention_mask=mask))
        logits = torch.cat(pieces, dim=1)
        for i, row in enumerate(rows):
            alone = model(torch.cat([row, steps[i]])[None])[0]
            torch.testing.assert_close(logits[i, 6 - len(row) :], alone, rtol=1e-5, atol=1e-5)


def test_stop_token_ends_generation_once_every_row_produced_it():
    model = _MODELS["dense_debug"]
    prompt = torch.randint(
        0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2)
    )
    free_run = generate(model, prompt, 12)
    stop = int(free_run[0, 3])
    stopped = generate(model, prompt, 12, stop_token=stop)
    first_stop = [
        (row == stop).nonzero()[0].item() if (row == stop).any() else 11 for row in free_run
    ]
    assert stopped.shape[1] == max(first_stop) + 1
    assert torch.equal(stopped, free_run[:, : stopped.shape[1]])


def test_generate_batched_equals_one_prompt_at_a_time_cut_at_the_stop_token():
    """Prompts of mixed lengths, batched by length (several batches per length), give what
    generating each prompt alone gives, cut before its first stop token, in prompt order."""
    model = _MODELS["mem_debug"]
    generator = torch.Generator().manual_seed(4)
    lengths = [3, 5, 3, 1, 5, 3, 3]
    prompts = [
        torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist()
        for n in lengths
    ]
    alone = [generate(model, torch.tensor([p]), 8)[0].tolist() for p in prompts]
    stop = alone[0][2]
    expected = [ids[: ids.index(stop)] if stop in ids else ids for ids in alone]
    assert generate_batched(model, prompts, 8, stop_token=stop, batch_size=2) == expected
    assert generate_batched(model, prompts, 8, batch_size=3) == alone
    with pytest.raises(ValueError, match="every prompt needs 1 to max_seq_len"):
        generate_batched(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="every prompt needs 1 to max_seq_len"):
        generate_batched(model, [[1] * (model.config.max_seq_len - 3)], 4)


def test_sampling_is_reproducible_and_temperature_zero_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits), logits.argmax(-1))
    draw = lambda: sample_next(logits, 1.0, torch.Generator().manual_seed(3))  # noqa: E731
    assert torch.equal(draw(), draw())
    # A very low temperature concentrates all mass on the argmax.
    assert torch.equal(
        sample_next(logits, 1e-4, torch.Generator().manual_seed(0)), logits.argmax(-1)
    )
    model = _MODELS["mem_debug"]
    prompt = torch.zeros(2, 3, dtype=torch.long)
    sampled = [
        generate(model, prompt, 6, temperature=0.8, generator=torch.Generator().manual_seed(5))
        for _ in range(2)
    ]
    assert torch.equal(*sampled)


def test_bad_arguments_are_rejected():
    model = _MODELS["dense_debug"]
    with pytest.raises(ValueError, match="prompt must be"):
        generate(model, torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="prompt must be"):
        generate(model, torch.zeros(1, 3), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(torch.zeros(1, 4), -1.0)
    cache = KVCache.for_model(model, 1, max_seq_len=4)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match=r"attention_mask must have shape .* = \[1, 2\]"):
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache(model.config, 1, model.config.max_seq_len + 1)
    assert generate(model, torch.zeros(1, 3, dtype=torch.long), 0).shape == (1, 0)
