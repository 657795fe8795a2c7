"""Row-sparse training of a value table: update only the rows a step touched.

The dense path differentiates ``lookup`` into a ``[N, D]`` value gradient and lets the optimizer
walk all ``N`` rows. A step touches few of them (each token reads ``heads * topk`` rows), so this
path never forms that gradient:

1. **Backward records, it does not scatter.** :func:`lookup_recording_grads` is ``lookup`` whose
   backward appends the inputs of the value gradient, ``(grad_out [T, D], indices [T, B],
   weights [T, B])``, to a :class:`ValueGradLog` (op ``memlayer::record_value_grads``):
   ``T * (D + 2B)`` numbers per lookup instead of ``N * D``. The weight gradient (to the scores
   and queries) flows as usual. Micro-batches of one step append to the same log, which is
   gradient accumulation.
2. **The step groups and updates.** :meth:`ValueGradLog.row_groups` lists the touched rows
   (sorted, unique) with their recorded positions in a fixed order. ``memlayer::row_sq_norms``
   gives each touched row's squared gradient norm (their sum is the dense gradient's squared norm:
   the other rows' gradients are zero), for clipping. ``memlayer::update_rows`` applies SGD,
   row-wise AdaGrad or lazy Adam to those rows of the table and of its optimizer state, in place,
   summing each row's gradient in a scratch row as it goes: the only ``[*, D]`` memory touched is
   the touched rows'.

Every sum runs in a fixed order (positions grouped by a stable sort), so a step is bitwise
deterministic run to run. The optimizer over these ops is ``memcompile.sparse_optim``.

Kernels: CPU in ``ops/row_sparse_cpu.py`` (C++), CUDA in ``ops/row_sparse_triton.py`` (Triton).
"""

from __future__ import annotations

import itertools
import math
import weakref
from typing import NamedTuple

import torch
from torch import Tensor

from ops import row_sparse_cpu, row_sparse_triton
from ops.checks import (
    INDEX_DTYPES,
    check_indices_in_range,
    check_same_device,
    check_shape,
    check_tensor,
    index_checks_enabled,
)
from ops.lookup import lookup

#: The update rules of ``memlayer::update_rows`` (see :func:`update_rows`).
RULES = ("sgd", "rowwise_adagrad", "adam")

_TAGS = (torch.Tag.pt2_compliant_tag,)
torch.library.define(
    "memlayer::record_value_grads",
    "(Tensor grad_out, Tensor indices, Tensor weights, Tensor(a!) recorded_tokens, int log_id)"
    " -> ()",
    tags=_TAGS,
)
torch.library.define(
    "memlayer::row_sq_norms",
    "(Tensor grad_out, Tensor weights, Tensor row_starts, Tensor positions) -> Tensor",
    tags=_TAGS,
)
torch.library.define(
    "memlayer::update_rows",
    "(Tensor(a!) table, Tensor(b!)[] state, Tensor grad_out, Tensor weights, Tensor rows,"
    " Tensor row_starts, Tensor positions, Tensor? row_mean_sq, str rule, float lr, float eps,"
    " float beta1, float beta2, float weight_decay, float grad_scale, int step) -> ()",
    tags=_TAGS,
)


# --------------------------------------------------------------------------- the log

_LOGS: weakref.WeakValueDictionary[int, ValueGradLog] = weakref.WeakValueDictionary()
_LOG_IDS = itertools.count()


class RowGroups(NamedTuple):
    """The recorded bag positions grouped by table row: touched row ``rows[u]`` was read at the
    flat positions ``positions[row_starts[u]:row_starts[u + 1]]`` of the ``[M, B]`` bags (in
    increasing order)."""

    rows: Tensor  # [U] int64, sorted, unique
    row_starts: Tensor  # [U + 1] int64
    positions: Tensor  # [P <= M * B] int64 (P < M * B: only some rows' reads)


class ValueGradLog:
    """The inputs of a value table's gradient, recorded by the backward of every
    :func:`lookup_recording_grads` since the last :meth:`clear`.

    ``bags()`` are the recorded ``(grad_out [M, D] fp32, indices [M, B] int64, weights [M, B]
    fp32)`` of all ``M`` recorded tokens, in the order the backward recorded them; the value
    gradient they stand for is ``lookup_values_grad(grad_out, indices, weights, num_rows)``.
    """

    def __init__(self, num_rows: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.num_rows, self.dim = num_rows, dim
        self.id = next(_LOG_IDS)
        #: Tokens recorded since the last clear (``memlayer::record_value_grads`` mutates it,
        #: which is also what keeps the op in a compiled backward graph).
        self.recorded_tokens = torch.zeros(1, dtype=torch.int64, device=device)
        #: An input of every recording lookup that requires grad, so that backward reaches the
        #: lookups even when nothing before them trains (sparse memory finetuning: only the
        #: table does). It never gets a gradient.
        self.anchor = torch.zeros((), device=device, requires_grad=True)
        self._entries: list[tuple[Tensor, Tensor, Tensor]] = []
        #: Bumped by every append and clear: what was computed from the log is stale after.
        self.version = 0
        _LOGS[self.id] = self

    def __len__(self) -> int:
        """The number of recorded tokens."""
        return sum(entry[0].shape[0] for entry in self._entries)

    def append(self, grad_out: Tensor, indices: Tensor, weights: Tensor) -> None:
        if grad_out.shape[1] != self.dim:
            raise ValueError(
                f"ValueGradLog: grad_out must be [T, {self.dim}] (the table's columns), "
                f"got {tuple(grad_out.shape)}"
            )
        if self._entries and indices.shape[1] != self._entries[0][1].shape[1]:
            raise ValueError(
                "ValueGradLog: every lookup of one table must read the same number of rows per "
                f"token, got {indices.shape[1]} after {self._entries[0][1].shape[1]}"
            )
        # Copies: a compiled backward may reuse the buffers of its arguments once the op returns.
        entry = (
            grad_out.to(torch.float32, copy=True),
            indices.to(torch.int64, copy=True),
            weights.to(torch.float32, copy=True),
        )
        self._entries.append(entry)
        self.version += 1

    def clear(self) -> None:
        self._entries.clear()
        self.recorded_tokens.zero_()
        self.version += 1

    def bags(self) -> tuple[Tensor, Tensor, Tensor]:
        """All recorded ``(grad_out, indices, weights)``, concatenated over lookups."""
        if not self._entries:
            device = self.recorded_tokens.device
            return (
                torch.zeros(0, self.dim, device=device),
                torch.zeros(0, 0, dtype=torch.int64, device=device),
                torch.zeros(0, 0, device=device),
            )
        if len(self._entries) == 1:
            return self._entries[0]
        return tuple(torch.cat(parts) for parts in zip(*self._entries))

    def tensors(self) -> list[Tensor]:
        """Every tensor the log holds, e.g. to count its memory."""
        return [t for entry in self._entries for t in entry]

    def row_groups(self) -> RowGroups:
        """The touched rows and their positions."""
        return group_by_row(self.bags()[1])


def group_by_row(indices: Tensor, only_rows: Tensor | None = None) -> RowGroups:
    """Group the flat positions of ``indices [M, B]`` by the row they read (only the reads of
    ``only_rows``, if given). A stable sort keeps each row's positions in increasing order, so
    every sum over them has one fixed order."""
    flat = indices.reshape(-1).long()
    if only_rows is not None:
        kept = torch.isin(flat, only_rows.to(flat.device)).nonzero().squeeze(1)
        sorted_rows, order = torch.sort(flat[kept], stable=True)
        positions = kept[order]
        return _groups_of_sorted(sorted_rows, positions)
    sorted_rows, positions = torch.sort(flat, stable=True)
    return _groups_of_sorted(sorted_rows, positions)


def _groups_of_sorted(sorted_rows: Tensor, positions: Tensor) -> RowGroups:
    first_of_row = torch.ones_like(sorted_rows, dtype=torch.bool)
    torch.ne(sorted_rows[1:], sorted_rows[:-1], out=first_of_row[1:])
    starts = first_of_row.nonzero().squeeze(1)
    end = torch.tensor([sorted_rows.numel()], dtype=torch.int64, device=sorted_rows.device)
    return RowGroups(sorted_rows[starts], torch.cat([starts, end]), positions)


# --------------------------------------------------------------------------- recording lookup


class _RecordValueGrads(torch.autograd.Function):
    """Identity on the lookup's output whose backward records the value gradient's inputs."""

    @staticmethod
    def forward(ctx, out, indices, weights, recorded_tokens, log_id, anchor):
        ctx.save_for_backward(indices, weights)
        # Not saved for backward: every recording backward bumps its version counter.
        ctx.recorded_tokens, ctx.log_id = recorded_tokens, log_id
        ctx.out_placements = getattr(out, "placements", None)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        indices, weights = ctx.saved_tensors
        recorded = grad_out
        if ctx.out_placements is not None:
            # A column-sharded table (DTensor Shard(1) reads, replicated indices and weights):
            # each rank records its own columns of every token's output gradient.
            recorded = grad_out.redistribute(placements=ctx.out_placements).to_local()
            indices, weights = indices.to_local(), weights.to_local()
        torch.ops.memlayer.record_value_grads(
            recorded, indices, weights.detach(), ctx.recorded_tokens, ctx.log_id
        )
        return grad_out, None, None, None, None, None


def lookup_recording_grads(
    values: Tensor, indices: Tensor, weights: Tensor, log: ValueGradLog
) -> Tensor:
    """``lookup(values, indices, weights)`` whose backward records the value gradient's inputs in
    ``log`` instead of computing a value gradient (``values`` gets none; ``weights`` does)."""
    out = lookup(values.detach(), indices, weights)
    return _RecordValueGrads.apply(out, indices, weights, log.recorded_tokens, log.id, log.anchor)


@torch.library.impl("memlayer::record_value_grads", "default")
def _record_value_grads_kernel(grad_out, indices, weights, recorded_tokens, log_id):
    _check_recorded(grad_out, indices, weights, recorded_tokens)
    log = _LOGS.get(log_id)
    if log is None:
        raise ValueError(
            f"record_value_grads: log_id {log_id} names no live ValueGradLog (was it "
            "garbage-collected while a backward still recorded into it?)"
        )
    if grad_out.shape[1] != log.dim:
        raise ValueError(
            f"record_value_grads: grad_out must be [T, {log.dim}] (the log's columns), got "
            f"{tuple(grad_out.shape)}"
        )
    log.append(grad_out, indices, weights)
    recorded_tokens.add_(indices.shape[0])


@torch.library.register_fake("memlayer::record_value_grads")
def _record_value_grads_fake(grad_out, indices, weights, recorded_tokens, log_id):
    _check_recorded(grad_out, indices, weights, recorded_tokens)


def _check_recorded(
    grad_out: Tensor, indices: Tensor, weights: Tensor, recorded_tokens: Tensor
) -> None:
    op = "record_value_grads"
    check_tensor(op, "recorded_tokens", recorded_tokens, "[1]", (torch.int64,))
    check_shape(op, "recorded_tokens", recorded_tokens, (1,), "a counter")
    check_tensor(op, "grad_out", grad_out, "[T, D]")
    check_tensor(op, "indices", indices, "[T, B]", INDEX_DTYPES)
    check_tensor(op, "weights", weights, "[T, B]")
    check_shape(op, "weights", weights, indices.shape, "the shape of indices")
    if grad_out.shape[0] != indices.shape[0]:
        raise ValueError(
            f"{op}: grad_out must have T = indices.shape[0] = {indices.shape[0]} rows, "
            f"got shape {tuple(grad_out.shape)}"
        )
    check_same_device(
        op, grad_out=grad_out, indices=indices, weights=weights, recorded_tokens=recorded_tokens
    )


# --------------------------------------------------------------------------- the step ops


def row_sq_norms(grad_out: Tensor, weights: Tensor, groups: RowGroups) -> Tensor:
    """``||g_u||²`` (fp64 ``[U]``) of each touched row's gradient
    ``g_u = sum over its positions p of weights[p] * grad_out[p // B]``."""
    return torch.ops.memlayer.row_sq_norms(grad_out, weights, groups.row_starts, groups.positions)


def update_rows(
    table: Tensor,
    state: list[Tensor],
    grad_out: Tensor,
    weights: Tensor,
    groups: RowGroups,
    *,
    rule: str,
    lr: float,
    eps: float = 1e-8,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    grad_scale: float = 1.0,
    step: int = 1,
    row_mean_sq: Tensor | None = None,
) -> None:
    """Apply ``rule`` in place to the touched rows of ``table`` and its ``state``, with each
    row's gradient ``grad_scale * g_u`` (``g_u`` as in :func:`row_sq_norms`):

    - ``"sgd"`` (no state): ``w -= lr * (g + weight_decay * w)``.
    - ``"rowwise_adagrad"`` (state ``[sum [N] fp32]``), FBGEMM's row-wise AdaGrad with L2 decay:
      ``g' = g + weight_decay * w``; ``sum += mean(g'²)``; ``m = lr / (sqrt(sum) + eps)``;
      ``w = (1 - m * weight_decay) * w - m * g``. ``row_mean_sq`` (fp64 ``[U]``, each row's
      mean squared unscaled ``g`` over its full width: a column-sharded table's ranks hold a
      slice of the row) replaces the local ``mean(g²)`` when ``weight_decay`` is 0.
    - ``"adam"`` (state ``[exp_avg, exp_avg_sq]``, ``[N, D]`` fp32): ``torch.optim.AdamW``'s
      update of the row at global step ``step`` (its bias corrections), with decoupled decay.

    Rows not touched are not read or written.
    """
    torch.ops.memlayer.update_rows(
        table, state, grad_out, weights, groups.rows, groups.row_starts, groups.positions,
        row_mean_sq, rule, lr, eps, betas[0], betas[1], weight_decay, grad_scale, step,
    )  # fmt: skip


def _check_groups(
    op: str, grad_out: Tensor, weights: Tensor, row_starts: Tensor, positions: Tensor
):
    check_tensor(op, "grad_out", grad_out, "[M, D]", (torch.float32,))
    check_tensor(op, "weights", weights, "[M, B]", (torch.float32,))
    check_tensor(op, "row_starts", row_starts, "[U + 1]", (torch.int64,))
    check_tensor(op, "positions", positions, "[P]", (torch.int64,))
    if weights.shape[0] != grad_out.shape[0]:
        raise ValueError(
            f"{op}: weights must have M = grad_out.shape[0] = {grad_out.shape[0]} rows, "
            f"got shape {tuple(weights.shape)}"
        )
    if positions.numel() > weights.numel():
        raise ValueError(
            f"{op}: positions must have at most M * B = {weights.numel()} entries (one per bag "
            f"entry), got {positions.numel()}"
        )
    if row_starts.shape[0] < 1:
        raise ValueError(f"{op}: row_starts must have at least one entry, got none")
    check_same_device(
        op, grad_out=grad_out, weights=weights, row_starts=row_starts, positions=positions
    )


def _check_group_data(op: str, weights: Tensor, row_starts: Tensor, positions: Tensor) -> None:
    """What a kernel reads through: positions in ``[0, M * B)`` and row starts non-decreasing
    within ``[0, len(positions)]`` (real kernels only: reads the data)."""
    check_indices_in_range(positions, weights.numel(), f"{op}: positions", "the bag entries")
    bound = positions.numel() + 1
    check_indices_in_range(row_starts, bound, f"{op}: row_starts", "offsets into positions")
    if index_checks_enabled(row_starts.device) and bool((row_starts.diff() < 0).any()):
        raise ValueError(f"{op}: row_starts must be non-decreasing")


@torch.library.impl("memlayer::row_sq_norms", "default")
def _row_sq_norms_kernel(grad_out, weights, row_starts, positions):
    _check_groups("row_sq_norms", grad_out, weights, row_starts, positions)
    _check_group_data("row_sq_norms", weights, row_starts, positions)
    kernels = row_sparse_triton if grad_out.device.type == "cuda" else row_sparse_cpu
    inputs = (t.contiguous() for t in (grad_out, weights, row_starts, positions))
    return kernels.row_sq_norms(*inputs)


@torch.library.register_fake("memlayer::row_sq_norms")
def _row_sq_norms_fake(grad_out, weights, row_starts, positions):
    _check_groups("row_sq_norms", grad_out, weights, row_starts, positions)
    return grad_out.new_empty((row_starts.shape[0] - 1,), dtype=torch.float64)


def _expected_state(rule: str, table: Tensor) -> list[tuple[tuple[int, ...], str]]:
    num_rows, dim = table.shape
    return {
        "sgd": [],
        "rowwise_adagrad": [((num_rows,), "sum [N]")],
        "adam": [((num_rows, dim), "exp_avg [N, D]"), ((num_rows, dim), "exp_avg_sq [N, D]")],
    }[rule]


def _check_update(
    table, state, grad_out, weights, rows, row_starts, positions, row_mean_sq, rule, lr, eps, step
):
    op = "update_rows"
    check_tensor(op, "table", table, "[N, D]", (torch.float32, torch.bfloat16, torch.float16))
    if rule not in RULES:
        raise ValueError(f"{op}: rule must be one of {', '.join(RULES)}, got {rule!r}")
    if not 0 <= lr < math.inf:  # 0 is allowed: LR schedules may decay to it, as torch.optim's
        raise ValueError(f"{op}: lr must be a finite number >= 0, got {lr}")
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    if step < 1:
        raise ValueError(
            f"{op}: step must be >= 1 (the steps taken, this one included), got {step}"
        )
    _check_groups(op, grad_out, weights, row_starts, positions)
    check_shape(op, "grad_out", grad_out, (grad_out.shape[0], table.shape[1]), "D of table")
    check_tensor(op, "rows", rows, "[U]", (torch.int64,))
    check_shape(op, "rows", rows, (row_starts.shape[0] - 1,), "one per row_starts interval")
    expected = _expected_state(rule, table)
    if len(state) != len(expected):
        names = ", ".join(name for _, name in expected) or "none"
        raise ValueError(f"{op}: rule {rule!r} takes state [{names}], got {len(state)} tensors")
    for tensor, (shape, name) in zip(state, expected):
        check_tensor(op, f"state {name}", tensor, name.split(" ", 1)[1], (torch.float32,))
        check_shape(
            op, f"state {name}", tensor, shape, f"for a table of shape {tuple(table.shape)}"
        )
        if not tensor.is_contiguous():
            raise ValueError(f"{op}: state {name} must be contiguous")
    if not table.is_contiguous():
        raise ValueError(f"{op}: table must be contiguous, got strides {table.stride()}")
    if row_mean_sq is not None:
        check_tensor(op, "row_mean_sq", row_mean_sq, "[U]", (torch.float64,))
        check_shape(op, "row_mean_sq", row_mean_sq, rows.shape, "one per touched row")
    others = {f"state_{i}": tensor for i, tensor in enumerate(state)}
    if row_mean_sq is not None:
        others["row_mean_sq"] = row_mean_sq
    check_same_device(op, table=table, grad_out=grad_out, rows=rows, **others)


@torch.library.impl("memlayer::update_rows", "default")
def _update_rows_kernel(
    table, state, grad_out, weights, rows, row_starts, positions, row_mean_sq,
    rule, lr, eps, beta1, beta2, weight_decay, grad_scale, step,
):  # fmt: skip
    _check_update(
        table, state, grad_out, weights, rows, row_starts, positions, row_mean_sq, rule, lr, eps,
        step,
    )  # fmt: skip
    _check_group_data("update_rows", weights, row_starts, positions)
    check_indices_in_range(rows, table.shape[0], "update_rows: rows", "the rows of table")
    if rows.numel() == 0 or table.shape[1] == 0:
        return
    kernels = row_sparse_triton if table.device.type == "cuda" else row_sparse_cpu
    grad_out, weights, rows, row_starts, positions = (
        t.contiguous() for t in (grad_out, weights, rows, row_starts, positions)
    )
    row_mean_sq = None if row_mean_sq is None else row_mean_sq.contiguous()
    kernels.update_rows(
        table, list(state), grad_out, weights, rows, row_starts, positions, row_mean_sq,
        rule, lr, eps, beta1, beta2, weight_decay, grad_scale, step,
    )  # fmt: skip


@torch.library.register_fake("memlayer::update_rows")
def _update_rows_fake(
    table, state, grad_out, weights, rows, row_starts, positions, row_mean_sq,
    rule, lr, eps, beta1, beta2, weight_decay, grad_scale, step,
):  # fmt: skip
    _check_update(
        table, state, grad_out, weights, rows, row_starts, positions, row_mean_sq, rule, lr, eps,
        step,
    )  # fmt: skip


# --------------------------------------------------------------------------- reference


def reference_update_rows(
    table: Tensor,
    state: list[Tensor],
    grad_out: Tensor,
    indices: Tensor,
    weights: Tensor,
    *,
    rule: str,
    lr: float,
    eps: float = 1e-8,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    grad_scale: float = 1.0,
    step: int = 1,
) -> tuple[Tensor, list[Tensor]]:
    """The textbook float64 update (dense gradient, then the rule on the rows it touched):
    returns the new ``(table, state)``, both float64."""
    w = table.double().clone()
    state = [s.double().clone() for s in state]
    grad = torch.zeros_like(w)
    flat = indices.reshape(-1).long()
    rows_of_tokens = grad_out.double().repeat_interleave(indices.shape[1], dim=0)
    grad.index_add_(0, flat, weights.double().reshape(-1, 1) * rows_of_tokens)
    grad *= grad_scale
    touched = torch.unique(flat)
    g, wt = grad[touched], w[touched]
    if rule == "sgd":
        w[touched] = wt - lr * (g + weight_decay * wt)
    elif rule == "rowwise_adagrad":
        state[0][touched] += (g + weight_decay * wt).square().mean(dim=1)
        multiplier = (lr / (state[0][touched].sqrt() + eps)).unsqueeze(1)
        w[touched] = (1 - multiplier * weight_decay) * wt - multiplier * g
    else:
        beta1, beta2 = betas
        exp_avg, exp_avg_sq = state
        exp_avg[touched] = beta1 * exp_avg[touched] + (1 - beta1) * g
        exp_avg_sq[touched] = beta2 * exp_avg_sq[touched] + (1 - beta2) * g.square()
        denom = exp_avg_sq[touched].sqrt() / (1 - beta2**step) ** 0.5 + eps
        w[touched] = (
            wt * (1 - lr * weight_decay) - lr / (1 - beta1**step) * exp_avg[touched] / denom
        )
    return w, state
