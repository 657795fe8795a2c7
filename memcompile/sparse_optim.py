"""Row-sparse training of the shared value table: :class:`RowSparseOptimizer`.

A step reads a few hundred thousand of the table's ``N`` rows, yet the dense path writes a
``[N, D]`` gradient and runs AdamW over all ``N`` rows (two ``[N, D]`` states). This optimizer
trains the table instead: while it lives, the model's lookups record what the value gradient is
made of (``[T, D]`` per lookup, see ``ops/row_sparse.py``) as the table's ``.grad``, and
:meth:`step` updates only the touched rows, of the table and of the optimizer state::

    model = Transformer(config)
    values_optimizer = RowSparseOptimizer(model, "rowwise_adagrad", lr=0.1)
    optimizer = torch.optim.AdamW(torch_param_groups(model, lr=3e-3, weight_decay=0.1))
    for tokens, labels in batches:
        loss = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten())
        loss.backward()
        values_optimizer.clip_grad_norm_(1.0)   # optional: the table's own norm
        values_optimizer.step()
        optimizer.step()
        model.zero_grad()

The recorded gradient is a gradient: it lives in ``model.memory_values.grad`` (an
``ops.row_sparse.RowSparseGrad``), micro-batches accumulate into it, ``model.zero_grad()`` and
either optimizer's ``zero_grad`` clear it, and a backward that does not accumulate into the
table (``torch.autograd.grad`` of something else) leaves it alone. The table keeps requiring
grad; ``memcompile.optim.torch_param_groups`` leaves it to this optimizer. It is a
``torch.optim.Optimizer``: LR schedulers, ``step(closure)``, ``state_dict`` /
``load_state_dict`` (checked against the rule and the table) and torchtitan's optimizer
container work. One table has one row-sparse optimizer: a second is refused while the first
lives, and once an optimizer is gone the lookups stop recording (the table gets dense
gradients again). The model holds no link to it: ``copy.deepcopy(model)`` or a pickled model
trains densely until an optimizer of its own takes it (deep-copying a model and its optimizer
together gives a copy that trains the copied table).

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
the step updates, and clips by, those rows alone.

Sharded tables (DTensors): column-sharded (``Shard(1)``, memory parallelism) and replicated
placements. Each rank updates its columns of the touched rows; row norms (clipping, row-wise
AdaGrad) are all-reduced over the column shards, and replicas all-gather what their lookups
recorded (``[T, D/G]`` per lookup) once per recorded gradient, so every replica applies the same
update. The state is sharded like the table (AdaGrad's per-row sums replicated), so DCP saves
and reshards it. A row-sharded table (FSDP over several ranks) is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.optim import Optimizer

from memcompile.memory import ValueLookup
from memcompile.optim import MEMORY_VALUES
from ops.row_sparse import (
    GradRecorder,
    HotRowPieces,
    RowGroups,
    RowSparseGrad,
    group_by_row,
    hot_row_pieces,
    row_sparse_grad,
    row_sq_norms,
    update_rows,
)
from ops.table_rule import RULES, Rule, TableRule

#: Rows a step may train: fixed row ids, or a function of the step's reads returning them.
RowChoice = Tensor | Callable[[Tensor], Tensor]

#: Optimizer names that train a table densely (from an autograd gradient), not row-sparsely.
DENSE_OPTIMIZERS = ("adamw", "adagrad", "sparseadam")


class RowSparseOptimizer(Optimizer):
    """Trains ``model.memory_values`` by updating only the rows each step touched.

    Args:
        model: a ``memcompile.model.Transformer`` (or any module with a ``memory_values``
            parameter read through ``ValueLookup`` modules). Its lookups record the table's
            gradient while this optimizer lives; nothing else about the model changes.
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
        if not table.requires_grad:
            raise ValueError(
                f"RowSparseOptimizer: model.{MEMORY_VALUES} does not require grad, so its lookups "
                "would record no gradient to train it by: call "
                f"model.{MEMORY_VALUES}.requires_grad_(True) (to train the table alone, freeze "
                "the other parameters)"
            )
        recorders = _recorders_of(model)
        if not recorders:
            raise ValueError(
                f"RowSparseOptimizer: model reads {MEMORY_VALUES} through no "
                "memcompile.memory.ValueLookup, so no lookup would record its gradient"
            )
        eps = Rule.of(rule).default_eps if eps is None else eps
        _check_hyperparameters(lr, eps, betas, weight_decay)
        layout = _TableLayout.of(table)
        if layout.column_groups and rule == "rowwise_adagrad" and weight_decay:
            raise NotImplementedError(
                "RowSparseOptimizer: rowwise_adagrad with weight_decay on a column-sharded table "
                "is not supported (its row norm would need the other ranks' columns)"
            )
        defaults = {"lr": lr, "eps": eps, "betas": betas, "weight_decay": weight_decay}
        group = {"params": [table], "param_names": [MEMORY_VALUES]}
        super().__init__([group], defaults)
        self.rule = rule
        self.recorders = recorders
        self._trainable_rows: RowChoice | None = None
        self._attach()
        self.state[table] = self._fresh_state()

    def _attach(self) -> None:
        """What the constructor and ``__setstate__`` (a copy, an unpickled optimizer) share:
        the table, how it is laid out over ranks, and the claim on its lookups' recorders."""
        self.table = self.param_groups[0]["params"][0]
        self.layout = _TableLayout.of(self.table)
        claimed = []
        try:
            for recorder in self.recorders:
                recorder.claim(self)
                claimed.append(recorder)
        except ValueError as error:
            for recorder in claimed:
                recorder.release()
            raise ValueError(f"RowSparseOptimizer: {error}") from None

    def __repr__(self) -> str:
        return f"RowSparseOptimizer(rule={self.rule!r}, table {tuple(self.table.shape)})"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(rule=self.rule, recorders=self.recorders, trainable_rows=self._trainable_rows)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy or an unpickled optimizer; load_state_dict also comes here, with only the
        # state and the param groups.
        copied = "rule" in state
        if copied:
            self.rule = state.pop("rule")
            self.recorders = state.pop("recorders")
            self._trainable_rows = state.pop("trainable_rows")
        super().__setstate__(state)
        if copied:
            self._attach()

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
        elif rows is not None and not callable(rows):
            raise TypeError(
                "RowSparseOptimizer: trainable_rows must be a 1-D int64 tensor of row ids, a "
                f"function of the step's reads returning one, or None; got {type(rows).__name__}"
            )
        self._trainable_rows = rows

    def _check_rows(self, rows: Any) -> None:
        num_rows = self.table.shape[0]
        if not isinstance(rows, Tensor):
            raise TypeError(
                "RowSparseOptimizer: trainable_rows must be a 1-D int64 tensor, got "
                f"{type(rows).__name__}"
            )
        if rows.dtype != torch.int64 or rows.dim() != 1:
            raise TypeError(
                f"RowSparseOptimizer: trainable_rows must be a 1-D int64 tensor, got "
                f"{rows.dtype} of shape {tuple(rows.shape)}"
            )
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_rows):
            raise IndexError(
                f"RowSparseOptimizer: trainable_rows must lie in [0, {num_rows}) (the table's rows)"
            )

    def _fresh_state(self) -> dict[str, Tensor]:
        """Created up front (not on the first step), so checkpoints always hold it. A sharded
        table's state is sharded alike (its per-row AdaGrad sums replicated), as DTensors that
        DCP saves and reshards."""
        local = _local(self.table)
        fp32 = {"dtype": torch.float32, "device": local.device}
        state = {"step": torch.zeros((), dtype=torch.float32)}
        if self.rule == "rowwise_adagrad":
            state["sum"] = self.layout.replicated(torch.zeros(local.shape[0], **fp32))
        elif self.rule == "adam":
            state["exp_avg"] = self.layout.like_table(torch.zeros(local.shape, **fp32))
            state["exp_avg_sq"] = self.layout.like_table(torch.zeros(local.shape, **fp32))
        return state

    def _state_tensors(self) -> list[Tensor]:
        return [_local(self.state[self.table][name]) for name in Rule.of(self.rule).state_names]

    def _grad(self) -> RowSparseGrad | None:
        """The table's recorded gradient (its local part), ``None`` if nothing was recorded."""
        for recorder in self.recorders:
            if recorder.table is not None and recorder.table is not self.table:
                raise RuntimeError(
                    f"RowSparseOptimizer: the model's {MEMORY_VALUES} is no longer the parameter "
                    "this optimizer was built for (it was replaced, e.g. by "
                    "load_state_dict(assign=True)): build the optimizer after the model is final"
                )
        try:
            return row_sparse_grad(self.table)
        except RuntimeError as error:
            raise RuntimeError(f"RowSparseOptimizer: {error}") from None

    def _inputs(self, grad: RowSparseGrad) -> _StepInputs:
        """The recorded gradient (gathered over replicas), its rows, their hot rows' pieces and
        their squared norms (summed over column shards, unscaled), computed once per version of
        the gradient (clipping and the step share them)."""
        cache = grad.cache
        if isinstance(cache, _StepInputs) and cache.trainable_rows is self._trainable_rows:
            return cache
        grad_out, indices, weights = grad.bags()
        for group in self.layout.replica_groups:
            grad_out, indices, weights = (
                _all_gather_rows(t, group) for t in (grad_out, indices, weights)
            )
        rows = self._trainable_rows
        if rows is not None and not isinstance(rows, Tensor):
            rows = rows(indices)
            self._check_rows(rows)
        groups = group_by_row(indices, only_rows=rows)
        pieces = hot_row_pieces(grad_out, weights, groups)
        norms = row_sq_norms(grad_out, weights, groups, pieces)
        for group in self.layout.column_groups:
            dist.all_reduce(norms, group=group)
        inputs = _StepInputs(grad_out, weights, groups, pieces, norms, self._trainable_rows)
        grad.cache = inputs
        return inputs

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """The 2-norm of the table's gradient (that of the dense gradient: untouched rows
        contribute nothing), scaled as the gradient is (e.g. by clipping)."""
        grad = self._grad()
        return torch.zeros(()) if grad is None else self._norm(grad)

    def _norm(self, grad: RowSparseGrad) -> Tensor:
        return self._inputs(grad).row_sq_norms.sum().sqrt().float() * abs(grad.scale)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale the table's gradient as ``torch.nn.utils.clip_grad_norm_`` would (by
        ``max_norm / (norm + 1e-6)`` when that is below 1); returns the norm before."""
        grad = self._grad()
        if grad is None:
            return torch.zeros(())
        norm = self._norm(grad)
        coefficient = max_norm / (norm.item() + 1e-6)
        if coefficient < 1.0:
            grad.mul_(coefficient)  # the gradient's own scale: nothing is kept here
        return norm

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._update()
        return loss

    def _update(self) -> None:
        grad = self._grad()
        if grad is None:
            return
        inputs = self._inputs(grad)
        group = self.param_groups[0]
        state = self.state[self.table]
        state["step"] += 1
        update_rows(
            _local(self.table),
            self._state_tensors(),
            inputs.grad_out,
            inputs.weights,
            inputs.groups,
            TableRule(
                self.rule,
                lr=_as_float(group["lr"]),
                eps=group["eps"],
                betas=group["betas"],
                weight_decay=group["weight_decay"],
                step=int(state["step"].item()),
            ),
            grad_scale=grad.scale,
            row_mean_sq=inputs.row_sq_norms / self.table.shape[1],
            pieces=inputs.pieces,
        )
        grad.cache = None  # not kept alive until zero_grad

    def load_state_dict(self, state_dict: dict) -> None:
        saved = dict(next(iter(state_dict["state"].values()), {}))
        self._check_saved_state(saved)
        super().load_state_dict(state_dict)
        # Optimizer.load_state_dict casts floating state to the parameter's dtype; this state
        # stays fp32 (a bf16 table keeps fp32 state), so it is copied over afterwards.
        state = self.state[self.table]
        for name, value in saved.items():
            state[name] = value.to(torch.float32, copy=True).contiguous()
            if name != "step":
                state[name] = state[name].to(self.table.device)

    def _check_saved_state(self, saved: dict[str, Any]) -> None:
        """The saved state must be this rule's, for a table of this shape."""
        names = set(saved) - {"step"}
        saved_rule = next((r.name.lower() for r in Rule if set(r.state_names) == names), None)
        if "step" not in saved or saved_rule is None:
            raise ValueError(
                f"RowSparseOptimizer.load_state_dict: the state holds {sorted(saved)}, which is "
                "no row-sparse rule's state (step, and sum for rowwise_adagrad or exp_avg and "
                "exp_avg_sq for adam)"
            )
        if saved_rule != self.rule:
            raise ValueError(
                f"RowSparseOptimizer.load_state_dict: the state is of rule {saved_rule!r}, this "
                f"optimizer's rule is {self.rule!r}"
            )
        for name, current in self.state[self.table].items():
            value = saved[name]
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise ValueError(
                    f"RowSparseOptimizer.load_state_dict: state {name!r} must be a floating "
                    f"point tensor, got {type(value).__name__}"
                    + (f" of {value.dtype}" if isinstance(value, Tensor) else "")
                )
            if value.shape != current.shape:
                raise ValueError(
                    f"RowSparseOptimizer.load_state_dict: state {name!r} has shape "
                    f"{tuple(value.shape)}, expected {tuple(current.shape)} for a table of shape "
                    f"{tuple(self.table.shape)} (saved for another table?)"
                )


def _recorders_of(model: nn.Module) -> list[GradRecorder]:
    """The distinct recorders of the model's lookups (one, shared, in a Transformer)."""
    recorders: dict[int, GradRecorder] = {}
    for module in model.modules():
        if isinstance(module, ValueLookup):
            recorders.setdefault(id(module.grad_recorder), module.grad_recorder)
    return list(recorders.values())


class _StepInputs(NamedTuple):
    grad_out: Tensor
    weights: Tensor
    groups: RowGroups
    pieces: HotRowPieces  # the hot rows' partial sums, read by both the norms and the update
    row_sq_norms: Tensor
    trainable_rows: RowChoice | None  # the choice they were computed for


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
    """This rank's part of a table or of its state (a plain tensor is all of it), sharing its
    version counter: the update is seen by autograd as an in-place write."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor.detach()


def _as_float(value: float | Tensor) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _check_hyperparameters(
    lr: float, eps: float, betas: tuple[float, float], weight_decay: float
) -> None:
    def finite_non_negative(value: Any) -> bool:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and 0 <= value < math.inf

    if not finite_non_negative(lr):
        raise ValueError(f"RowSparseOptimizer: lr must be a finite number >= 0, got {lr!r}")
    if not finite_non_negative(eps):
        raise ValueError(f"RowSparseOptimizer: eps must be a finite number >= 0, got {eps!r}")
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"RowSparseOptimizer: betas must be two numbers in [0, 1), got {betas!r}")
    if not finite_non_negative(weight_decay):
        raise ValueError(
            f"RowSparseOptimizer: weight_decay must be a finite number >= 0, got {weight_decay!r}"
        )
