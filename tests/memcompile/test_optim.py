"""The optimizer groups: the value table apart, everything else together, nothing twice."""

from __future__ import annotations

import pytest
import torch

from memcompile.flavors import get_flavor
from memcompile.model import Transformer
from memcompile.optim import MEMORY_VALUES, torch_param_groups


def _groups(name: str, model: Transformer | None = None) -> list[dict]:
    torch.manual_seed(0)
    model = model or Transformer(get_flavor(name))
    return torch_param_groups(
        model, lr=1e-3, weight_decay=0.1, memory_lr_multiplier=7.0, memory_weight_decay=0.01
    )


@pytest.mark.parametrize("name", ["mem_debug", "memplain_debug"])
def test_memory_model_puts_only_the_value_table_in_its_own_group(name):
    model = Transformer(get_flavor(name))
    memory, dense = _groups(name, model)
    assert memory["params"] == [model.memory_values]
    assert (memory["lr"], memory["weight_decay"]) == pytest.approx((7e-3, 0.01))
    assert (dense["lr"], dense["weight_decay"]) == (1e-3, 0.1)
    others = [p for n, p in model.named_parameters() if n != MEMORY_VALUES]
    assert [id(p) for p in dense["params"]] == [id(p) for p in others]


def test_dense_model_has_one_group_of_every_parameter():
    model = Transformer(get_flavor("dense_debug"))
    (group,) = _groups("dense_debug", model)
    assert len(group["params"]) == len(list(model.parameters()))


def test_frozen_parameters_are_left_out_and_groups_build_an_optimizer():
    model = Transformer(get_flavor("mem_debug"))
    model.tok_embeddings.weight.requires_grad_(False)
    groups = _groups("mem_debug", model)
    assert all(p is not model.tok_embeddings.weight for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([7e-3, 1e-3])
