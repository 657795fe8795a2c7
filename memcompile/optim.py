"""The optimizer groups of a memory-layer model: the shared value table apart from the rest.

The reference code trains the value table with a larger learning rate (10x) and no weight
decay: each value row is read by few tokens per step, so its gradient is sparse and small, and
decaying rows that a step did not read would shrink them for nothing. Every training loop of
the project (``recipes.pretrain``, ``benchmarks.knowledge``) takes its groups from here::

    optimizer = torch.optim.AdamW(torch_param_groups(model, lr=3e-3, weight_decay=0.1))
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from memcompile.memory import ValueLookup

#: The fully qualified name of the shared value table in a ``memcompile.model.Transformer``.
MEMORY_VALUES = "memory_values"


def param_groups(
    parameter_names: Iterable[str],
    *,
    lr: float,
    weight_decay: float,
    memory_lr_multiplier: float = 10.0,
    memory_weight_decay: float = 0.0,
) -> list[tuple[str, dict[str, float]]]:
    """``(name regex, {"lr", "weight_decay"})`` per group, first match wins: the value table
    (only if ``parameter_names`` has it), then every other parameter."""
    groups = []
    if MEMORY_VALUES in set(parameter_names):
        memory = {"lr": lr * memory_lr_multiplier, "weight_decay": memory_weight_decay}
        groups.append((rf"^{MEMORY_VALUES}$", memory))
    groups.append((r".*", {"lr": lr, "weight_decay": weight_decay}))
    return groups


def torch_param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    memory_lr_multiplier: float = 10.0,
    memory_weight_decay: float = 0.0,
) -> list[dict]:
    """:func:`param_groups` as ``torch.optim`` parameter groups of ``model``'s trainable
    parameters (each group also has ``"name"``: its regex), but the value table while a
    ``memcompile.sparse_optim.RowSparseOptimizer`` trains it."""
    named = dense_trainable_parameters(model)
    groups = param_groups(
        (name for name, _ in named),
        lr=lr,
        weight_decay=weight_decay,
        memory_lr_multiplier=memory_lr_multiplier,
        memory_weight_decay=memory_weight_decay,
    )
    claimed: set[str] = set()
    torch_groups = []
    for pattern, options in groups:
        params = []
        for name, p in named:
            if name not in claimed and re.search(pattern, name):
                claimed.add(name)
                params.append(p)
        torch_groups.append({"name": pattern, "params": params, **options})
    return torch_groups


def dense_trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter a dense optimizer should train: those that
    require grad, but the value table while a row-sparse optimizer trains it."""
    row_sparse = trained_row_sparsely(model)
    return [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and not (row_sparse and name == MEMORY_VALUES)
    ]


def trained_row_sparsely(model: nn.Module) -> bool:
    """Whether a row-sparse optimizer trains ``model``'s value table (its lookups record the
    table's gradient for it), so that no other optimizer may."""
    return any(m.grad_recorder.recording for m in model.modules() if isinstance(m, ValueLookup))
