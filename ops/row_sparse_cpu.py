"""CPU kernels of the row-sparse table update (the CPU side of ``ops/row_sparse.py``):
``ops/csrc/row_sparse_cpu.cpp``, compiled on first use (``ops/_cpu_build.py``). These launchers
take arguments that ``ops/row_sparse.py`` has already checked, rows in range included. A thread
sums each of its rows serially, a hot row too: on the CPU ``memlayer::hot_row_pieces`` gives no
pieces, and these kernels read none.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ops._cpu_build import build


@functools.cache
def _kernels():
    build("row_sparse_cpu", "the row-sparse table update")
    return torch.ops.memlayer_row_sparse_cpu


def row_sq_norms(
    grad_out: Tensor, weights: Tensor, row_starts: Tensor, positions: Tensor
) -> Tensor:
    """Each touched row's squared gradient norm, fp64 ``[U]``."""
    return _kernels().row_sq_norms(grad_out, weights, row_starts, positions)


def update_rows(
    table: Tensor,
    state: list[Tensor],
    grad_out: Tensor,
    weights: Tensor,
    rows: Tensor,
    row_starts: Tensor,
    positions: Tensor,
    row_mean_sq: Tensor | None,
    rule: int,
    hyperparameters: list[float],
    grad_scale: float,
) -> None:
    """The in-place update of the touched ``rows`` of ``table`` and ``state`` by the packed
    rule (``ops/table_rule.py``: ``TableRule.packed``)."""
    _kernels().row_update(
        table, state, grad_out, weights, rows, row_starts, positions, row_mean_sq,
        rule, hyperparameters, grad_scale,
    )  # fmt: skip
