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
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(ours, reloaded)
    assert torch.equal(theirs[:, :7], prompt) and torch.equal(theirs[:, 7:], ours)


def test_left_padding_is_refused(saved):
    _, folder = saved
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokens = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="left-padded batches are not supported"):
        hf(tokens, attention_mask=mask)
