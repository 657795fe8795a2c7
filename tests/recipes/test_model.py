"""The torchtitan adapter of the memcompile Transformer: build, init, checkpoint names, float8
conversion and activation checkpointing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

pytest.importorskip("torchtitan", reason="the recipes need the 'recipes' extra")
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (  # noqa: E402
    CheckpointWrapper,
)
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

from memcompile.flavors import FLAVORS  # noqa: E402
from memcompile.model import Transformer  # noqa: E402
from recipes.model import Float8Config, TitanTransformer  # noqa: E402
from recipes.parallelize import FullAC, SelectiveAC  # noqa: E402


def _build(**float8) -> TitanTransformer:
    config = TitanTransformer.Config(
        transformer=replace(FLAVORS["mem_debug"], vocab_size=112), float8=Float8Config(**float8)
    )
    model = config.build()
    torch.manual_seed(0)
    model.init_states()
    return model


def test_meta_build_then_init_states_initialises_everything():
    config = TitanTransformer.Config(transformer=replace(FLAVORS["mem_debug"], vocab_size=112))
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_states()
    reference = _build()
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("include_memory_layers", [False, True])
def test_float8_emulation_converts_dense_linears_only_by_default(include_memory_layers):
    model = _build(enable=True, emulate=True, include_memory_layers=include_memory_layers)
    memory_blocks = [i for i, block in model.layers.items() if block.is_memory_block]
    assert memory_blocks
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        in_memory_layer = any(name.startswith(f"layers.{i}.feed_forward.") for i in memory_blocks)
        assert isinstance(module, Float8Linear) == (include_memory_layers or not in_memory_layer), (
            name
        )

    tokens = torch.randint(0, 112, (2, 16))
    loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.memory_values.grad is not None


def test_checkpoints_load_into_a_plain_memcompile_model():
    titan = _build()
    plain = Transformer(titan.config)
    plain.load_state_dict(titan.state_dict())  # strict: the same parameter names
    tokens = torch.randint(0, 112, (2, 9))
    torch.testing.assert_close(plain(tokens), titan(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("policy", [SelectiveAC.Config(), FullAC.Config()])
def test_activation_checkpointing_wraps_the_dense_blocks_only(policy):
    model = _build()
    expected = _build()
    policy.build().apply(model)
    for layer_id, block in model.layers.items():
        assert isinstance(block, CheckpointWrapper) == (not block.is_memory_block), layer_id
    tokens = torch.randint(0, 112, (2, 9))
    model(tokens).sum().backward()
    expected(tokens).sum().backward()
    for (name, param), reference in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(param.grad, reference.grad, msg=name)
