"""The trainer's components on their own: the optimizer groups torchtitan builds."""

from __future__ import annotations

import pytest
import torch

from memcompile.flavors import get_flavor
from memcompile.model import Transformer
from memcompile.optim import torch_param_groups
from recipes.trainer import MemoryOptimizers


@pytest.mark.parametrize("name", ["mem_debug", "dense_debug"])
def test_memory_optimizers_group_as_memcompile_optim(name):
    model = Transformer(get_flavor(name))
    config = MemoryOptimizers.Config(
        lr=2e-3, weight_decay=0.05, memory_lr_multiplier=4.0, memory_weight_decay=0.02
    )
    (optimizer,) = MemoryOptimizers(config, model_parts=[model])
    expected = torch_param_groups(
        model, lr=2e-3, weight_decay=0.05, memory_lr_multiplier=4.0, memory_weight_decay=0.02
    )
    built = sorted(optimizer.param_groups, key=lambda g: -g["lr"])
    assert len(built) == len(expected)
    for got, want in zip(built, expected):
        assert [id(p) for p in got["params"]] == [id(p) for p in want["params"]]
        assert (got["lr"], got["weight_decay"]) == pytest.approx((want["lr"], want["weight_decay"]))
        assert got["betas"] == (0.9, 0.95)
    assert sum(len(g["params"]) for g in built) == len(list(model.parameters()))
    assert isinstance(optimizer, torch.optim.AdamW)
