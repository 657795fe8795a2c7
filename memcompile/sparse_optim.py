"""Row-sparse training of the shared value table: :class:`RowSparseOptimizer`.

A step reads a few hundred thousand of the table's ``N`` rows, yet the dense path writes a
``[N, D]`` gradient and runs AdamW over all ``N`` rows (two ``[N, D]`` states). This optimizer
owns the table instead: the model's lookups record what the value gradient is made of (``[T, D]``
per lookup, see ``ops/row_sparse.py``), and :meth:`step` updates only the touched rows, of the
table and of the optimizer state::

    model = Transformer(config)
    values_optimizer = RowSparseOptimizer(model, "rowwise_adagrad", lr=0.1)
    optimizer = torch.optim.AdamW(torch_param_groups(model, lr=3e-3, weight_decay=0.1))
    for tokens, labels in batches:
        loss = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten())
        loss.backward()
        values_optimizer.clip_grad_norm_(1.0)   # optional: the table's own norm
        values_optimizer.step()
        optimizer.step()
        values_optimizer.zero_grad()
        optimizer.zero_grad()

The table stays a parameter (checkpoints, ``state_dict``, DCP) but no longer requires grad, so
``torch_param_groups`` and every other optimizer leave it alone. It is a ``torch.optim.Optimizer``:
LR schedulers, ``state_dict`` / ``load_state_dict`` and torchtitan's optimizer container work.

Rules (hyperparameters per param group, as in ``torch.optim``):

- ``"sgd"``: ``w -= lr * (g + weight_decay * w)`` on touched rows. No state.
- ``"rowwise_adagrad"``: FBGEMM's row-wise AdaGrad (one fp32 accumulator per row, the mean of
  the row's squared gradient; L2 weight decay as its ``weight_decay_mode=1``). State: ``sum [N]``.
- ``"adam"``: AdamW applied lazily. A touched row gets exactly ``torch.optim.AdamW``'s update, with
  the bias corrections of the global step count (steps taken by this optimizer, touched or not,
  as ``torch.optim.SparseAdam``); its moments are those of the steps that touched it. A row not
  touched is not read or written: its moments do not decay and weight decay does not shrink it.
  State: ``exp_avg``, ``exp_avg_sq`` ``[N, D]`` fp32.

Optimizer state is fp32 whatever the table's dtype (a bf16 table is updated in fp32 and rounded
once). Every step is bitwise deterministic run to run.

Sparse memory finetuning (Lin et al., 2025) trains only some rows: set
:attr:`RowSparseOptimizer.trainable_rows` to those rows, or to a function that picks them from
each step's reads (``memcompile.slot_ranking.TfidfSlotSelector``: the top slots by TF-IDF), and
the step updates, and clips by, those rows alone. The recorded backward reaches the lookups even
when no other parameter trains.

Sharded tables (DTensors): column-sharded (``Shard(1)``, memory parallelism) and replicated
placements. Each rank updates its columns of the touched rows; row norms (clipping, row-wise
AdaGrad) are all-reduced over the column shards, and replicas all-gather what their lookups
recorded (``[T, D/G]`` per lookup), so every replica applies the same update. The state is
sharded like the table (AdaGrad's per-row sums replicated), so DCP saves and reshards it. A
row-sharded table (FSDP over several ranks) is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.optim import Optimizer

from memcompile.memory import ValueLookup
from memcompile.optim import MEMORY_VALUES
from ops.row_sparse import (
    RULES,
    RowGroups,
    ValueGradLog,
    group_by_row,
    row_sq_norms,
    update_rows,
)

#: Rows a step may train: fixed row ids, or a function of the step's reads returning them.
RowChoice = Tensor | Callable[[Tensor], Tensor]

#: Optimizer names that train a table densely (from an autograd gradient), not row-sparsely.
DENSE_OPTIMIZERS = ("adamw", "adagrad", "sparseadam")


class RowSparseOptimizer(Optimizer):
    """Trains ``model.memory_values`` by updating only the rows each step touched.

    Args:
        model: a ``memcompile.model.Transformer`` (or any module with a ``memory_values``
            parameter read through ``ValueLookup`` modules). Its lookups are switched to
            recording and the table stops requiring grad.
        rule: ``"sgd"``, ``"rowwise_adagrad"`` or ``"adam"`` (see the module doc).
        lr, eps, betas, weight_decay: as in ``torch.optim`` (``betas`` only for ``"adam"``).
    """

    def __init__(
        self,
        model: nn.Module,
        rule: str = "rowwise_adagrad",
        *,
        lr: float = 1e-2,
        eps: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
    ) -> None:
        if rule not in RULES:
            dense = " (a dense optimizer: leave the table to it instead)"
            hint = dense if rule.lower() in DENSE_OPTIMIZERS else ""
            raise ValueError(
                f"RowSparseOptimizer: rule must be one of {', '.join(RULES)}, got {rule!r}{hint}"
            )
        table = getattr(model, MEMORY_VALUES, None)
        if not isinstance(table, nn.Parameter):
            raise ValueError(
                f"RowSparseOptimizer: model has no {MEMORY_VALUES} parameter (a model with "
                "memory layers has one)"
            )
        eps = {"sgd": 0.0, "rowwise_adagrad": 1e-10, "adam": 1e-8}[rule] if eps is None else eps
        _check_hyperparameters(lr, eps, betas, weight_decay)
        self.layout = _TableLayout.of(table)
        if self.layout.column_groups and rule == "rowwise_adagrad" and weight_decay:
            raise NotImplementedError(
                "RowSparseOptimizer: rowwise_adagrad with weight_decay on a column-sharded table "
                "is not supported (its row norm would need the other ranks' columns)"
            )
        self.rule = rule
        local = _local(table)
        self.log = ValueGradLog(local.shape[0], local.shape[1], local.device)
        lookups = [m for m in model.modules() if isinstance(m, ValueLookup)]
        for lookup in lookups:
            lookup.grad_log = self.log
        table.requires_grad_(False)
        defaults = {"lr": lr, "eps": eps, "betas": betas, "weight_decay": weight_decay}
        group = {"params": [table], "param_names": [MEMORY_VALUES]}
        super().__init__([group], defaults)
        self.table = table
        self.state[table] = self._fresh_state(table)
        self._grad_scale = 1.0
        self._step_inputs: _StepInputs | None = None
        self._trainable_rows: RowChoice | None = None

    @property
    def trainable_rows(self) -> RowChoice | None:
        """The only rows :meth:`step` may update: sorted int64 row ids, or a function of the
        step's reads (all recorded indices, gathered over replicas) that returns them; ``None``
        for every row the step touched. The gradient norm then counts only these rows'
        gradients. Sparse memory finetuning picks them per step
        (``memcompile.slot_ranking.TfidfSlotSelector``)."""
        return self._trainable_rows

    @trainable_rows.setter
    def trainable_rows(self, rows: RowChoice | None) -> None:
        if isinstance(rows, Tensor):
            self._check_rows(rows)
        self._trainable_rows = rows
        self._step_inputs = None

    def _check_rows(self, rows: Tensor) -> None:
        num_rows = self.table.shape[0]
        if rows.dtype != torch.int64 or rows.dim() != 1:
            raise TypeError(
                f"RowSparseOptimizer: trainable_rows must be a 1-D int64 tensor, got "
                f"{rows.dtype} of shape {tuple(rows.shape)}"
            )
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_rows):
            raise IndexError(
                f"RowSparseOptimizer: trainable_rows must lie in [0, {num_rows}) (the table's rows)"
            )

    def _fresh_state(self, table: Tensor) -> dict[str, Tensor]:
        """Created up front (not on the first step), so checkpoints always hold it. A sharded
        table's state is sharded alike (its per-row AdaGrad sums replicated), as DTensors that
        DCP saves and reshards."""
        local = _local(table)
        fp32 = {"dtype": torch.float32, "device": local.device}
        state = {"step": torch.zeros((), dtype=torch.float32)}
        if self.rule == "rowwise_adagrad":
            state["sum"] = self.layout.replicated(torch.zeros(local.shape[0], **fp32))
        elif self.rule == "adam":
            state["exp_avg"] = self.layout.like_table(torch.zeros(local.shape, **fp32))
            state["exp_avg_sq"] = self.layout.like_table(torch.zeros(local.shape, **fp32))
        return state

    def _state_tensors(self) -> list[Tensor]:
        names = {"sgd": [], "rowwise_adagrad": ["sum"], "adam": ["exp_avg", "exp_avg_sq"]}
        return [_local(self.state[self.table][name]) for name in names[self.rule]]

    def _inputs(self) -> _StepInputs:
        """This step's recorded gradient (gathered over replicas), its rows and their squared
        norms (summed over column shards), computed once per recorded state of the log (clipping
        and the step share them)."""
        inputs = self._step_inputs
        if inputs is None or inputs.log_version != self.log.version:
            grad_out, indices, weights = self.log.bags()
            for group in self.layout.replica_groups:
                grad_out, indices, weights = (
                    _all_gather_rows(t, group) for t in (grad_out, indices, weights)
                )
            rows = self._trainable_rows
            if rows is not None and not isinstance(rows, Tensor):
                rows = rows(indices)
                self._check_rows(rows)
            groups = group_by_row(indices, only_rows=rows)
            norms = row_sq_norms(grad_out, weights, groups)
            for group in self.layout.column_groups:
                dist.all_reduce(norms, group=group)
            inputs = _StepInputs(grad_out, weights, groups, norms, self.log.version)
            self._step_inputs = inputs
        return inputs

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """The 2-norm of the table's gradient since the last ``zero_grad`` (that of the dense
        gradient: untouched rows contribute nothing)."""
        return self._inputs().row_sq_norms.sum().sqrt().float()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale the next :meth:`step`'s gradient as ``torch.nn.utils.clip_grad_norm_`` would
        (by ``max_norm / (norm + 1e-6)`` when that is below 1); returns the norm before."""
        norm = self.grad_norm()
        self._grad_scale = min(1.0, max_norm / (norm.item() + 1e-6))
        return norm

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        inputs = self._inputs()
        if inputs.groups.rows.numel() == 0:
            return loss
        group = self.param_groups[0]
        state = self.state[self.table]
        state["step"] += 1
        update_rows(
            _local(self.table),
            self._state_tensors(),
            inputs.grad_out,
            inputs.weights,
            inputs.groups,
            row_mean_sq=inputs.row_sq_norms / self.table.shape[1],
            rule=self.rule,
            lr=_as_float(group["lr"]),
            eps=group["eps"],
            betas=group["betas"],
            weight_decay=group["weight_decay"],
            grad_scale=self._grad_scale,
            step=int(state["step"].item()),
        )
        self._grad_scale = 1.0
        self._step_inputs = None  # not kept alive until zero_grad
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget what the lookups recorded (the table's gradient) since the last call."""
        self.log.clear()
        self._grad_scale = 1.0
        self._step_inputs = None

    def load_state_dict(self, state_dict: dict) -> None:
        # Optimizer.load_state_dict casts floating state to the parameter's dtype; this state
        # stays fp32 (a bf16 table keeps fp32 state), so it is copied over afterwards.
        saved = dict(next(iter(state_dict["state"].values()), {}))
        super().load_state_dict(state_dict)
        state = self.state[self.table]
        for name, value in saved.items():
            state[name] = value.to(torch.float32, copy=True).contiguous()
            if name != "step":
                state[name] = state[name].to(self.table.device)


class _StepInputs(NamedTuple):
    grad_out: Tensor
    weights: Tensor
    groups: RowGroups
    row_sq_norms: Tensor
    log_version: int  # the log's version they were computed from


@dataclass
class _TableLayout:
    """How the table is spread over ranks: the process groups its columns are sharded over
    (``Shard(1)``, memory parallelism: row norms are summed over them) and those that hold
    replicas (``Replicate()``: each saw other tokens, so their recorded gradients are gathered
    and every replica applies the same update). A plain tensor has neither."""

    table: Tensor
    column_groups: list[dist.ProcessGroup]
    replica_groups: list[dist.ProcessGroup]

    @classmethod
    def of(cls, table: Tensor) -> _TableLayout:
        if not isinstance(table, DTensor):
            return cls(table, [], [])
        mesh, columns, replicas = table.device_mesh, [], []
        for dim, placement in enumerate(table.placements):
            if mesh.size(dim) == 1:
                continue  # e.g. FSDP on one rank: all rows are local
            if placement == Shard(1):
                columns.append(mesh.get_group(dim))
            elif placement.is_replicate():
                replicas.append(mesh.get_group(dim))
            else:
                raise NotImplementedError(
                    f"RowSparseOptimizer: the table is placed {table.placements} on "
                    f"{mesh}; it supports replicated and column-sharded (Shard(1)) tables. "
                    "FSDP shards its rows: use memory parallelism "
                    "(--parallelism.memory_parallel_degree) to keep it out of FSDP"
                )
        return cls(table, columns, replicas)

    def like_table(self, local: Tensor) -> Tensor:
        """``local`` (this rank's ``[N, D_local]``) placed as the table."""
        if not isinstance(self.table, DTensor):
            return local
        table = self.table
        return DTensor.from_local(local, table.device_mesh, table.placements, run_check=False)

    def replicated(self, local: Tensor) -> Tensor:
        """``local``, the same on every rank, as a replicated DTensor on the table's mesh."""
        if not isinstance(self.table, DTensor):
            return local
        mesh = self.table.device_mesh
        return DTensor.from_local(local, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _all_gather_rows(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The ``tensor``s of every rank of ``group`` concatenated on dim 0, in rank order (so
    every rank gets the same result, whatever each rank's row count)."""
    world = dist.get_world_size(group)
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded.contiguous(), group=group)
    return torch.cat([piece[:c] for piece, c in zip(pieces, counts)])


def _local(tensor: Tensor) -> Tensor:
    """This rank's part of a table or of its state (a plain tensor is all of it)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor.data


def _as_float(value: float | Tensor) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _check_hyperparameters(
    lr: float, eps: float, betas: tuple[float, float], weight_decay: float
) -> None:
    if not (isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr)):
        raise ValueError(f"RowSparseOptimizer: lr must be a finite number >= 0, got {lr!r}")
    if not eps >= 0:
        raise ValueError(f"RowSparseOptimizer: eps must be >= 0, got {eps!r}")
    if not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"RowSparseOptimizer: betas must lie in [0, 1), got {betas!r}")
    if not weight_decay >= 0:
        raise ValueError(f"RowSparseOptimizer: weight_decay must be >= 0, got {weight_decay!r}")
