"""A saved model in transformers: AutoModelForCausalLM gives memcompile's logits, and
generate() decodes through a transformers cache with memcompile's greedy tokens, left-padded
batches in one forward, beam search and sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face path needs transformers")

from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

from memcompile.flavors import get_flavor  # noqa: E402
from memcompile.generate import generate  # noqa: E402
from memcompile.model import Transformer  # noqa: E402
from memcompile.pretrained import from_pretrained, save_pretrained  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Transformer, Path]:
    torch.manual_seed(0)
    model = Transformer(get_flavor("mem_debug")).eval()
    folder = tmp_path_factory.mktemp("saved")
    save_pretrained(model, folder)
    return model, folder


def _input_lengths(model: torch.nn.Module) -> tuple[list[int], object]:
    """The sequence length of every forward of ``model`` (a list), and the hook's handle."""
    lengths: list[int] = []
    handle = model.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    return lengths, handle


def _left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    tokens = torch.stack([torch.nn.functional.pad(row, (width - len(row), 0)) for row in rows])
    mask = torch.stack([torch.arange(width) >= width - len(row) for row in rows]).long()
    return tokens, mask


def test_auto_model_gives_the_same_logits(saved):
    model, folder = saved
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(hf).__name__ == "MemcompileForCausalLM"
    tokens = torch.randint(0, 256, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(hf(tokens).logits, model(tokens))
        labels = tokens.clone()
        expected = torch.nn.functional.cross_entropy(
            model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()
        )
        torch.testing.assert_close(hf(tokens, labels=labels).loss, expected)


def test_greedy_generation_is_the_same_on_every_path(saved):
    model, folder = saved
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = generate(model, prompt, 12)
        reloaded = generate(from_pretrained(folder), prompt, 12)
        for use_cache, static in ((True, False), (True, True), (False, False)):
            lengths, handle = _input_lengths(hf.model)
            theirs = hf.generate(
                prompt,
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=False,
                use_cache=use_cache,
                cache_implementation="static" if static else None,
            )
            handle.remove()
            assert torch.equal(theirs[:, :7], prompt) and torch.equal(theirs[:, 7:], ours)
            # With the cache, each step after the prefill feeds only the newest token.
            assert lengths == ([7] + [1] * 11 if use_cache else list(range(7, 19)))
    assert torch.equal(ours, reloaded)


@pytest.mark.parametrize("flavor", ["engram_debug", "peer_debug"])
def test_engram_and_peer_models_load_and_decode_through_a_transformers_cache(tmp_path, flavor):
    """The other memory families through AutoModelForCausalLM: the same logits, and greedy
    decoding through transformers' dynamic and static caches gives memcompile's tokens
    (Engram's last tokens and convolution inputs ride along on the cache, and beam search
    reorders them with the beams)."""
    torch.manual_seed(0)
    model = Transformer(get_flavor(flavor)).eval()
    with torch.no_grad():  # Engram's convolution starts at zero: make it read the past
        for block in model.layers.values():
            if block.engram is not None:
                block.engram.conv.weight.normal_()
    save_pretrained(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(hf(prompt).logits, model(prompt))
        ours = generate(model, prompt, 10)
        for static in (False, True):
            theirs = hf.generate(
                prompt,
                max_new_tokens=10,
                min_new_tokens=10,
                do_sample=False,
                cache_implementation="static" if static else None,
            )
            assert torch.equal(theirs[:, 7:], ours)
        beams = [
            hf.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=cached)
            for cached in (False, True)
        ]
        assert torch.equal(*beams)


def test_a_cache_continues_a_sequence_as_the_whole_sequence_does(saved):
    model, folder = saved
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = model(tokens)
        cache = DynamicCache(config=hf.config)
        first = hf(tokens[:, :6], cache=cache)
        assert first.past_key_values is cache and cache.get_seq_length() == 6
        rest = hf(tokens[:, 6:], cache=cache).logits
        torch.testing.assert_close(
            torch.cat([first.logits, rest], 1), expected, rtol=1e-5, atol=1e-5
        )
        # past_key_values, transformers' old name for it, still works (with a deprecation
        # warning), and use_cache starts a DynamicCache when none is given.
        started = hf(tokens[:, :6], use_cache=True).past_key_values
        assert isinstance(started, DynamicCache) and started.get_seq_length() == 6
        with pytest.warns(Warning, match="past_key_values"):
            again = hf(tokens[:, 6:], past_key_values=started).logits
        torch.testing.assert_close(again, rest, rtol=1e-5, atol=1e-5)


def test_a_left_padded_batch_runs_in_one_forward_as_each_row_alone(saved):
    model, folder = saved
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 256, (n,), generator=generator) for n in (6, 2, 4)]
    tokens, mask = _left_padded(rows)
    lengths, handle = _input_lengths(hf.model)
    with torch.no_grad():
        logits = hf(tokens, attention_mask=mask).logits
        assert lengths == [6]  # one batched forward, not one per row
        handle.remove()
        for i, row in enumerate(rows):
            alone = model(row[None])[0]
            torch.testing.assert_close(logits[i, 6 - len(row) :], alone, rtol=1e-5, atol=1e-5)
        # generate() on the padded batch: every row's greedy tokens are its own.
        out = hf.generate(
            tokens, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False
        )
    for i, row in enumerate(rows):
        assert torch.equal(out[i, 6:], generate(model, row[None], 10)[0])


def test_beam_search_and_sampling_run_through_the_cache(saved):
    _, folder = saved
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    rows = [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 3)]
    tokens, mask = _left_padded(rows)
    settings = {"attention_mask": mask, "max_new_tokens": 8, "min_new_tokens": 8}
    with torch.no_grad():
        # Beam search reorders the cache's rows every step: with and without a cache alike.
        lengths, handle = _input_lengths(hf.model)
        beams = {
            use_cache: hf.generate(
                tokens, num_beams=3, do_sample=False, use_cache=use_cache, **settings
            )
            for use_cache in (False, True)
        }
        handle.remove()
        assert lengths[8:] == [5] + [1] * 7  # the cached run, after the 8 uncached forwards
        assert beams[True].shape == (2, 13) and torch.equal(beams[True], beams[False])
        lengths, handle = _input_lengths(hf.model)
        sampled = []
        for _ in range(2):
            torch.manual_seed(11)
            sampled.append(hf.generate(tokens, do_sample=True, top_k=20, **settings))
        handle.remove()
    assert torch.equal(*sampled)
    assert lengths == 2 * ([5] + [1] * 7)  # through the cache
    torch.manual_seed(12)
    with torch.no_grad():
        other = hf.generate(tokens, do_sample=True, top_k=20, temperature=5.0, **settings)
    assert not torch.equal(other, sampled[0])


def test_forward_honours_return_dict_and_output_hidden_states(saved):
    model, folder = saved
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokens = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(tokens)
        states = hf(tokens, output_hidden_states=True).hidden_states
        # As LlamaForCausalLM: the embeddings, every block's output, the last one normed.
        assert len(states) == model.config.n_layers + 1
        assert torch.equal(states[0], model.tok_embeddings(tokens))
        assert torch.equal(model.output(states[-1]), logits)
        block_0 = model.layers["0"]
        cos, sin = model.rope_cos[:6], model.rope_sin[:6]
        values = None if not block_0.is_memory_block else model.memory_values
        assert torch.equal(states[1], block_0(states[0], cos, sin, values, None))
        assert hf(tokens).hidden_states is None

        (only_logits,) = hf(tokens, return_dict=False)
        assert torch.equal(only_logits, logits)
        loss, with_labels, tuple_states = hf(
            tokens, labels=tokens, output_hidden_states=True, return_dict=False
        )
        assert torch.equal(with_labels, logits) and loss.dim() == 0
        assert all(torch.equal(a, b) for a, b in zip(tuple_states, states, strict=True))


def test_hidden_states_of_a_left_padded_row_are_its_unpadded_ones(saved):
    model, folder = saved
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokens = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        states = hf(tokens, attention_mask=mask, output_hidden_states=True).hidden_states
        alone = hf(tokens[:1, 3:], output_hidden_states=True).hidden_states
        full = hf(tokens[1:], output_hidden_states=True).hidden_states
    assert len(states) == len(alone) == model.config.n_layers + 1
    for padded, row, other in zip(states, alone, full, strict=True):
        torch.testing.assert_close(padded[0, 3:], row[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded[1], other[0], rtol=1e-5, atol=1e-5)


def test_the_config_sets_the_defaults_and_generate_returns_hidden_states(saved):
    _, folder = saved
    hf = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, output_hidden_states=True, return_dict=False
    ).eval()
    tokens = torch.randint(1, 256, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits, states = hf(tokens)
        assert len(states) == hf.config.num_hidden_layers + 1
        out = hf.generate(
            tokens,
            max_new_tokens=2,
            do_sample=False,
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
    assert len(out.hidden_states) == 2  # one tuple per generated token
    assert torch.equal(out.hidden_states[0][-1], states[-1])


def test_what_the_model_cannot_take_or_return_is_refused(saved):
    _, folder = saved
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokens = torch.randint(1, 256, (1, 5), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="output_attentions=True is not available"):
        hf(tokens, output_attentions=True)
    with pytest.raises(TypeError, match="must be a transformers Cache .* got tuple"):
        hf(tokens, cache=((tokens, tokens),))
    with pytest.raises(ValueError, match=r"attention_mask must have shape .* = \[1, 5\]"):
        hf(tokens, attention_mask=torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="inputs_embeds"):
        hf(tokens, inputs_embeds=torch.zeros(1, 5, 64))
    assert hf(tokens, use_cache=False).past_key_values is None


def test_the_generation_benchmark_times_every_engine_on_the_same_tokens(saved, tmp_path):
    from benchmarks import hf_generate
    from memcompile.cli import UsageError

    _, folder = saved
    hf = hf_generate.load_hf_model(folder, torch.device("cpu"))
    prompt = torch.randint(1, 256, (1, 250), generator=torch.Generator().manual_seed(9))
    row = hf_generate.hf_generate_speed(hf, prompt, 8, repeats=1)
    assert row["rope_extended"] and hf.model.config.max_seq_len == 258  # past mem_debug's 256
    for engine in hf_generate.ENGINES:
        assert row[f"{engine}_same_tokens"] and row[f"{engine}_ms"] > 0
    assert row["hf_over_memcompile"] == row["hf_ms"] / row["memcompile_ms"]
    assert row["hf_over_memcompile_cpu"] == row["hf_cpu_ms"] / row["memcompile_cpu_ms"]
    out = tmp_path / "hf.json"
    args = ["--folder", str(folder), "--new-tokens", "2", "--repeats", "1", "--out", str(out)]
    payload = hf_generate.main(args)
    assert out.exists() and payload["results"][0]["hf_same_tokens"]
    with pytest.raises(UsageError, match="--new-tokens must be >= 1, got 0"):
        hf_generate.main(["--new-tokens", "0"])
