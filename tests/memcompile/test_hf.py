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
