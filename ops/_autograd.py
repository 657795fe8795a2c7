"""Autograd for the memlayer ops, with ``torch.func`` and forward-mode AD.

``torch.library.register_autograd`` wraps the formula in an ``autograd.Function`` without
``setup_context``, so every ``torch.func`` transform (grad, vjp, jacrev, vmap of grad) refuses
the op, and it has no ``jvp``, so forward-mode AD returns a zero tangent. Instead, each op's
Autograd kernel applies a single-level ``autograd.Function`` (forward, setup_context, backward,
jvp), as functorch does for its own transform-local nodes.

TODO: use ``torch.library.register_autograd`` once it supports ``torch.func``
(https://github.com/pytorch/pytorch/issues/170834) and forward-mode AD.
"""

from __future__ import annotations

import torch
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd.function import _SingleLevelFunction

# An Autograd kernel runs below functorch's transform layers, where a plain autograd.Function
# would re-enter them; a single-level one records its node at the current level.
OpFunction = _SingleLevelFunction


def below_autograd(op: torch._ops.OpOverload, *args):
    """Call ``op``'s device kernel directly (from an OpFunction's forward)."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def register_autograd(op: torch._ops.OpOverload, function: type[OpFunction]) -> None:
    """Make ``function`` (whose forward takes the op's arguments) the Autograd kernel of ``op``."""
    schema_arguments = op._schema.arguments

    def autograd_kernel(*args):
        # The dispatcher drops trailing arguments equal to their defaults: put them back.
        defaults = (argument.default_value for argument in schema_arguments[len(args) :])
        with enable_single_level_autograd_function():
            return function.apply(*args, *defaults)

    torch.library.impl(op._name, "Autograd", autograd_kernel)
