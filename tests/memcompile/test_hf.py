"""A saved model in transformers: AutoModelForCausalLM gives memcompile's logits and greedy
generations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face path needs transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

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
        for use_cache in (False, True):  # lm-eval asks for a cache; the model keeps none
            theirs = hf.generate(
                prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=use_cache
            )
            assert torch.equal(theirs[:, :7], prompt) and torch.equal(theirs[:, 7:], ours)
    assert torch.equal(ours, reloaded)


def test_a_left_padded_row_gets_its_unpadded_logits(saved):
    model, folder = saved
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokens = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        logits = hf(tokens, attention_mask=mask).logits
        assert torch.equal(logits[0, 2:], model(tokens[:1, 2:])[0])
        assert torch.equal(logits[1], model(tokens[1:])[0])
        assert not logits[0, :2].any()


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
        assert torch.equal(padded[0, 3:], row[0]) and not padded[0, :3].any()
        assert torch.equal(padded[1], other[0])


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


def test_what_the_model_cannot_return_is_refused(saved):
    _, folder = saved
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokens = torch.randint(1, 256, (1, 5), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="output_attentions=True is not available"):
        hf(tokens, output_attentions=True)
    with pytest.raises(ValueError, match="keeps no KV cache"):
        hf(tokens, past_key_values=((tokens, tokens),))
    with pytest.raises(TypeError, match="position_ids"):
        hf(tokens, position_ids=torch.arange(5)[None])
    assert hf(tokens, use_cache=True).logits.shape == (1, 5, 256)  # exact, just without a cache
