"""Row-sparse training of a value table: update only the rows a step touched.

The dense path differentiates ``lookup`` into a ``[N, D]`` value gradient and lets the optimizer
walk all ``N`` rows. A step touches few of them (each token reads ``heads * topk`` rows), so this
path never forms that gradient:

1. **Backward records, it does not scatter.** :func:`lookup_recording_grads` is ``lookup`` whose
   backward records the inputs of the value gradient, ``(grad_out [T, D], indices [T, B],
   weights [T, B])`` (op ``memlayer::record_value_grads``): ``T * (D + 2B)`` numbers per lookup
   instead of ``N * D``. They go where a gradient goes, into the table's ``.grad``, as a
   :class:`RowSparseGrad`; so ``zero_grad`` clears them, micro-batches accumulate, and only a
   backward that accumulates into the table records (``torch.autograd.grad`` of something
   else, or ``backward(inputs=...)`` without the table, leaves ``.grad`` alone). The weight
   gradient (to the scores and queries) flows as usual.
2. **The step groups and updates.** :func:`group_by_row` lists the touched rows (sorted, unique)
   with their recorded positions in a fixed order. ``memlayer::hot_row_pieces`` sums the hits
   of hot rows in parallel pieces (on CUDA; the CPU kernels split no row), once per step for
   the two ops that read them. ``memlayer::row_sq_norms`` gives each touched row's squared
   gradient norm (their sum is the dense gradient's squared norm: the other rows' gradients
   are zero), for clipping. ``memlayer::update_rows`` applies SGD, row-wise AdaGrad or lazy
   Adam to those rows of the table and of its optimizer state, in place, summing each row's
   gradient in a scratch row as it goes: the only ``[*, D]`` memory touched is the touched
   rows' (and the hot rows' pieces).

A compiled backward cannot hold a Python object, so the op finds the table through a
:class:`GradRecorder`, by its key: the recorder of a model's lookups is the model's own
(``memcompile.memory``), a copy or unpickled model gets a new one, and the key of a recorder
that is gone names nothing.

Every sum runs in a fixed order (positions grouped by a stable sort), so a step is bitwise
deterministic run to run. The optimizer over these ops is ``memcompile.sparse_optim``.

Kernels: CPU in ``ops/row_sparse_cpu.py`` (C++), CUDA in ``ops/row_sparse_triton.py`` (Triton).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge
from torch.distributed.tensor import DTensor, Placement

from ops import row_sparse_cpu, row_sparse_triton
from ops.checks import (
    INDEX_DTYPES,
    check_indices_in_range,
    check_same_device,
    check_shape,
    check_tensor,
    index_checks_enabled,
    refuse_other_devices,
)
from ops.lookup import lookup
from ops.lookup_triton import HotRowPieces, max_hot_row_pieces
from ops.table_rule import Rule, TableRule, check_packed

_TAGS = (torch.Tag.pt2_compliant_tag,)
torch.library.define(
    "memlayer::record_value_grads",
    "(Tensor grad_out, Tensor indices, Tensor weights, Tensor(a!) recorded_tokens, int recorder)"
    " -> ()",
    tags=_TAGS,
)
torch.library.define(
    "memlayer::hot_row_pieces",
    "(Tensor grad_out, Tensor weights, Tensor row_starts, Tensor positions)"
    " -> (Tensor piece_starts, Tensor partials)",
    tags=_TAGS,
)
torch.library.define(
    "memlayer::row_sq_norms",
    "(Tensor grad_out, Tensor weights, Tensor row_starts, Tensor positions,"
    " Tensor? piece_starts=None, Tensor? partials=None) -> Tensor",
    tags=_TAGS,
)
torch.library.define(
    "memlayer::update_rows",
    "(Tensor(a!) table, Tensor(b!)[] state, Tensor grad_out, Tensor weights, Tensor rows,"
    " Tensor row_starts, Tensor positions, Tensor? row_mean_sq, int rule, float[] hyperparameters,"
    " float grad_scale, Tensor? piece_starts=None, Tensor? partials=None) -> ()",
    tags=_TAGS,
)


class RowGroups(NamedTuple):
    """The recorded bag positions grouped by table row: touched row ``rows[u]`` was read at the
    flat positions ``positions[row_starts[u]:row_starts[u + 1]]`` of the ``[M, B]`` bags (in
    increasing order)."""

    rows: Tensor  # [U] int64, sorted, unique
    row_starts: Tensor  # [U + 1] int64
    positions: Tensor  # [P <= M * B] int64 (P < M * B: only some rows' reads)


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


# --------------------------------------------------------------------------- the gradient

aten = torch.ops.aten


class _Record:
    """What a :class:`RowSparseGrad` and its aliases (``detach``, views) share: the recorded
    lookups, one scale for all of them, and what was computed from the lookups (dropped when
    they change; a new scale keeps it)."""

    __slots__ = ("entries", "scale", "cache")

    def __init__(self, entries: list[tuple[Tensor, Tensor, Tensor]] | None = None, scale=1.0):
        self.entries = entries if entries is not None else []
        self.scale = scale
        self.cache: Any = None

    def changed(self) -> None:
        self.cache = None

    def copy(self) -> _Record:
        return _Record(list(self.entries), self.scale)  # the entries are never written


class RowSparseGrad(Tensor):
    """A value table's gradient as its recording lookups left it: the ``.grad`` of a table
    that a row-sparse optimizer trains.

    It holds, for every recorded lookup, ``(grad_out [T, D] fp32, indices [T, B] int64,
    weights [T, B] fp32)``; the dense gradient it stands for is ``scale`` times the sum of
    ``lookup_values_grad(grad_out, indices, weights, N)`` (:meth:`to_dense`). Its shape,
    dtype and device are the table's.

    It keeps a gradient's promises where torch code handles gradients: ``zero_()`` (and
    ``set_to_none``) clears it; ``+=`` of another one accumulates; ``mul_`` / ``div_`` by a
    number scales it (clipping, unscaling); ``torch.linalg.vector_norm`` is the dense
    gradient's 2-norm, so ``torch.nn.utils.clip_grad_norm_`` works; ``detach`` and views
    alias it, ``clone``, ``copy.deepcopy`` and pickling copy it. Any other operation raises a
    ``TypeError`` that says what to do instead; a dense optimizer (``torch.optim.AdamW``) given
    the table fails that way rather than training it wrongly.
    """

    _record: _Record

    @staticmethod
    def __new__(cls, size, dtype, device, record: _Record | None = None):
        return Tensor._make_wrapper_subclass(cls, size, dtype=dtype, device=device)

    def __init__(self, size, dtype, device, record: _Record | None = None) -> None:
        self._record = record if record is not None else _Record()

    @classmethod
    def like(cls, table: Tensor) -> RowSparseGrad:
        """An empty gradient for the plain tensor ``table``."""
        return cls(table.shape, table.dtype, table.device)

    # -- what optimizers read

    @property
    def scale(self) -> float:
        """The factor on every recorded lookup (1 unless scaled, e.g. by clipping)."""
        return self._record.scale

    @property
    def cache(self) -> Any:
        """What an optimizer computed from the recorded lookups, reset when they change (not
        when the gradient is only scaled): ``memcompile.sparse_optim`` keeps its step inputs
        here, which clipping and the step share and which go when the gradient does."""
        return self._record.cache

    @cache.setter
    def cache(self, value: Any) -> None:
        self._record.cache = value

    @property
    def num_tokens(self) -> int:
        """Tokens recorded (over all lookups)."""
        return sum(entry[0].shape[0] for entry in self._record.entries)

    def bags(self) -> tuple[Tensor, Tensor, Tensor]:
        """All recorded ``(grad_out, indices, weights)``, concatenated over lookups, unscaled."""
        entries = self._record.entries
        if not entries:
            return (
                torch.zeros(0, self.shape[1], device=self.device),
                torch.zeros(0, 0, dtype=torch.int64, device=self.device),
                torch.zeros(0, 0, device=self.device),
            )
        if len(entries) == 1:
            return entries[0]
        return tuple(torch.cat(parts) for parts in zip(*entries))

    def tensors(self) -> list[Tensor]:
        """Every tensor it holds, e.g. to count its memory."""
        return [t for entry in self._record.entries for t in entry]

    def to_dense(self) -> Tensor:
        """The ``[N, D]`` gradient it stands for, in the table's dtype."""
        grad_out, indices, weights = self.bags()
        dense = torch.ops.memlayer.lookup_values_grad(
            grad_out, indices, weights, self.shape[0], True
        )
        return (dense * self.scale).to(self.dtype)

    def record(self, grad_out: Tensor, indices: Tensor, weights: Tensor) -> None:
        """Add one lookup's value-gradient inputs (copied: a compiled backward may reuse the
        buffers of its arguments once the op returns)."""
        if grad_out.shape[1] != self.shape[1]:
            raise ValueError(
                f"RowSparseGrad: grad_out must be [T, {self.shape[1]}] (the table's columns), "
                f"got {tuple(grad_out.shape)}"
            )
        entry = (
            grad_out.to(torch.float32, copy=True),
            indices.to(torch.int64, copy=True),
            weights.to(torch.float32, copy=True),
        )
        _append(self._record, [entry], 1.0, in_place=True)

    def __repr__(self, *, tensor_contents=None) -> str:
        record = self._record
        scale = f", scale={record.scale:g}" if record.scale != 1.0 else ""
        return (
            f"RowSparseGrad(shape={list(self.shape)}, dtype={self.dtype}, "
            f"lookups={len(record.entries)}, tokens={self.num_tokens}{scale})"
        )

    def __reduce_ex__(self, protocol):
        record = self._record
        return _rebuild_row_sparse_grad, (
            tuple(self.shape), self.dtype, self.device, list(record.entries), record.scale
        )  # fmt: skip

    def __deepcopy__(self, memo) -> RowSparseGrad:
        return _clone(self)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        handler = _GRAD_OPS.get(func)
        if handler is None:
            raise TypeError(
                f"{func}: the memory table's gradient is row-sparse (RowSparseGrad: what its "
                "lookups recorded for a RowSparseOptimizer); it supports zero_grad, accumulation, "
                "scaling and its norm (clipping). Leave the table to its RowSparseOptimizer "
                "(memcompile.optim.torch_param_groups leaves it out of the others), or call "
                "grad.to_dense() for a dense tensor"
            )
        return handler(*args, **(kwargs or {}))


def _rebuild_row_sparse_grad(size, dtype, device, entries, scale) -> RowSparseGrad:
    return RowSparseGrad(size, dtype, device, _Record(entries, scale))


def _alias(grad: RowSparseGrad, *_: Any, **__: Any) -> RowSparseGrad:
    return RowSparseGrad(grad.shape, grad.dtype, grad.device, grad._record)


def _view(grad: RowSparseGrad, size) -> RowSparseGrad:
    if tuple(size) != tuple(grad.shape):
        raise TypeError(f"RowSparseGrad: only views of its own shape, got {tuple(size)}")
    return _alias(grad)


def _clone(grad: RowSparseGrad, **_: Any) -> RowSparseGrad:
    return RowSparseGrad(grad.shape, grad.dtype, grad.device, grad._record.copy())


def _to_copy(grad: RowSparseGrad, *, dtype=None, device=None, **_: Any) -> RowSparseGrad:
    """``grad.to(dtype, device)`` (``model.to(...)`` converts gradients too): the entries move to
    the device and stay fp32; the gradient takes the new dtype, as its table does."""
    device = grad.device if device is None else torch.device(device)
    record = grad._record.copy()
    record.entries = [tuple(t.to(device) for t in entry) for entry in record.entries]
    return RowSparseGrad(grad.shape, grad.dtype if dtype is None else dtype, device, record)


def _zero_(grad: RowSparseGrad) -> RowSparseGrad:
    grad._record.entries = []
    grad._record.scale = 1.0
    grad._record.changed()
    return grad


def _factor(value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1 or isinstance(value, RowSparseGrad):
            raise TypeError(
                "RowSparseGrad: only scaling by a number (or a one-element tensor) is supported"
            )
        value = value.item()
    return float(value)


def _mul_(grad: RowSparseGrad, factor: Any) -> RowSparseGrad:
    # The entries are unchanged, and so is what was computed from them (clipping scales the
    # gradient between computing its norm and the step, which reuses the grouping).
    grad._record.scale *= _factor(factor)
    return grad


def _div_(grad: RowSparseGrad, divisor: Any) -> RowSparseGrad:
    return _mul_(grad, 1.0 / _factor(divisor))


def _mul(a: Any, b: Any) -> RowSparseGrad:
    grad, factor = (a, b) if isinstance(a, RowSparseGrad) else (b, a)
    return _mul_(_clone(grad), factor)


def _append(record: _Record, entries: list, scale: float, in_place: bool = False) -> None:
    """Add ``entries`` worth ``scale`` times their ``grad_out`` to ``record`` (whose own entries
    share its scale: the new ones are rescaled to it)."""
    held = record.entries[0][1].shape[1] if record.entries else None
    for _, indices, _ in entries:
        if held is not None and indices.shape[1] != held:
            raise ValueError(
                "RowSparseGrad: every lookup of one table must read the same number of rows per "
                f"token, got {indices.shape[1]} after {held}"
            )
    if record.scale == 0.0:  # what it holds is worth nothing
        record.entries, record.scale = [], 1.0
    factor = scale / record.scale
    if factor != 1.0:
        entries = [(g.mul_(factor) if in_place else g * factor, i, w) for g, i, w in entries]
    record.entries += entries
    record.changed()


def _dense_added() -> TypeError:
    return TypeError(
        "RowSparseGrad: a dense gradient was added to the table's row-sparse one: the table "
        "was also read without recording (e.g. by torch.ops.memlayer.lookup directly, not "
        "through memcompile.memory.ValueLookup), which its RowSparseOptimizer cannot train"
    )


def _add_(grad: RowSparseGrad, other: Any, *, alpha: Any = 1) -> RowSparseGrad:
    if not isinstance(grad, RowSparseGrad) or not isinstance(other, RowSparseGrad):
        raise _dense_added()
    _append(grad._record, list(other._record.entries), other.scale * _factor(alpha))
    return grad


def _add(a: Any, b: Any, *, alpha: Any = 1) -> RowSparseGrad:
    if not isinstance(a, RowSparseGrad):
        raise _dense_added()
    return _add_(_clone(a), b, alpha=alpha)


def _norm(grad: RowSparseGrad, ord: Any = 2, dim: Any = None, keepdim=False, *, dtype=None):
    if ord != 2 or dim is not None:
        raise TypeError("RowSparseGrad: only the 2-norm of the whole gradient is supported")
    grad_out, indices, weights = grad.bags()
    norms = row_sq_norms(grad_out, weights, group_by_row(indices))
    norm = norms.sum().sqrt() * abs(grad.scale)
    return norm.to(dtype or torch.float32)


def _per_tensor(single: Callable, func: Callable) -> Callable:
    """A ``_foreach_*`` op over a list mixing row-sparse and dense gradients (torch's
    clipping with ``foreach=True``): each of ours alone, the others together."""

    def apply(tensors, *args, **kwargs):
        ours = [isinstance(t, RowSparseGrad) for t in tensors]
        dense = [t for t, mine in zip(tensors, ours) if not mine]
        dense_results = iter(func(dense, *args, **kwargs) or () if dense else ())
        results = [
            single(t, *args, **kwargs) if mine else next(dense_results, None)
            for t, mine in zip(tensors, ours)
        ]
        return None if func._schema.returns == [] else results

    return apply


_GRAD_OPS: dict[Any, Callable] = {
    aten.detach.default: _alias,
    aten.alias.default: _alias,
    aten.view.default: _view,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.zero_.default: _zero_,
    aten.mul_.Tensor: _mul_,
    aten.mul_.Scalar: _mul_,
    aten.div_.Tensor: _div_,
    aten.div_.Scalar: _div_,
    aten.mul.Tensor: _mul,
    aten.mul.Scalar: _mul,
    aten.add_.Tensor: _add_,
    aten.add.Tensor: _add,
    aten.linalg_vector_norm.default: _norm,
    aten._foreach_zero_.default: _per_tensor(_zero_, aten._foreach_zero_.default),
    aten._foreach_mul_.Scalar: _per_tensor(_mul_, aten._foreach_mul_.Scalar),
    aten._foreach_mul_.Tensor: _per_tensor(_mul_, aten._foreach_mul_.Tensor),
    aten._foreach_norm.Scalar: _per_tensor(_norm, aten._foreach_norm.Scalar),
}


def _local_grad(table: Tensor) -> Tensor | None:
    """``table.grad``, its local part for a DTensor table."""
    grad = table.grad
    return grad.to_local() if isinstance(grad, DTensor) else grad


def row_sparse_grad(table: Tensor) -> RowSparseGrad | None:
    """``table.grad`` as a :class:`RowSparseGrad` (its local part for a DTensor table), or
    ``None`` when there is none. A dense ``.grad`` raises: the table was read without
    recording."""
    local = _local_grad(table)
    if local is None:
        return None
    if not isinstance(local, RowSparseGrad):
        raise RuntimeError(
            "the memory table has a dense gradient where its RowSparseOptimizer expects the "
            "row-sparse one its lookups record: it was read without recording (e.g. by "
            "torch.ops.memlayer.lookup directly, not through memcompile.memory.ValueLookup), or "
            "a dense gradient from before the optimizer was left (zero the gradients first)"
        )
    return local


def _grad_to_record_into(table: Tensor) -> RowSparseGrad:
    """``table``'s row-sparse gradient, created (empty) if it has none."""
    grad = row_sparse_grad(table)
    if grad is not None:
        return grad
    if isinstance(table, DTensor):
        local = table.to_local()
        grad = RowSparseGrad.like(local)
        table.grad = DTensor.from_local(
            grad, table.device_mesh, table.placements, shape=table.shape, stride=table.stride()
        )
        return grad
    grad = RowSparseGrad.like(table)
    table.grad = grad
    return grad


# --------------------------------------------------------------------------- the recorder

_RECORDERS: weakref.WeakValueDictionary[int, GradRecorder] = weakref.WeakValueDictionary()
_RECORDER_KEYS = itertools.count()


class GradRecorder:
    """How the recording lookups of one value table find it when their backward runs.

    A compiled backward holds no Python objects, only numbers: ``memlayer::record_value_grads``
    gets this recorder's :attr:`key`, and the recorder gives it :attr:`table`, the table the
    last forward read (set by the module that passes the table to the lookups, every forward).
    The model owns its recorder; ``copy.deepcopy`` and pickling give a new one (a new key, no
    table, not recording), so a copy never records into the original's gradient.

    :attr:`owner` is the optimizer that trains the table row-sparsely
    (``memcompile.sparse_optim.RowSparseOptimizer``), if any: lookups record while it lives.
    """

    def __init__(self) -> None:
        self.key = next(_RECORDER_KEYS)
        #: The table the lookups read (a parameter), set by :meth:`reads` every forward.
        self.table: Tensor | None = None
        #: Tokens recorded so far, on the table's device. ``record_value_grads`` mutates it,
        #: which is what keeps the op in a compiled backward graph (it returns nothing).
        self.recorded_tokens = torch.zeros(1, dtype=torch.int64)
        self._owner: weakref.ref | None = None
        #: Whether the lookups record (a plain flag: compiled code guards on it).
        self.recording = False
        _RECORDERS[self.key] = self

    def reads(self, table: Tensor) -> None:
        """The lookups are about to read ``table`` (the parameter itself)."""
        self.table = table
        if self.recorded_tokens.device != table.device:
            self.recorded_tokens = torch.zeros(1, dtype=torch.int64, device=table.device)

    @property
    def owner(self) -> Any:
        return self._owner() if self._owner is not None else None

    def claim(self, owner: Any) -> None:
        """Make ``owner`` the one that trains the table row-sparsely: the lookups record until
        it is gone (or :meth:`release`). Another live owner is refused."""
        current = self.owner
        if current is not None and current is not owner:
            raise ValueError(
                f"the memory table is already trained by {current!r}: one table has one "
                "row-sparse optimizer (delete the other one first)"
            )
        self._owner = weakref.ref(owner, self._owner_gone)
        self.recording = True

    def release(self) -> None:
        """Stop recording; a row-sparse gradient the table holds is dropped with it."""
        self._owner, self.recording = None, False
        table = self.table
        if table is not None and isinstance(_local_grad(table), RowSparseGrad):
            table.grad = None

    def _owner_gone(self, ref: weakref.ref) -> None:
        if self._owner is ref:
            self.release()

    def __deepcopy__(self, memo) -> GradRecorder:
        return GradRecorder()

    def __reduce__(self):
        return GradRecorder, ()

    def __repr__(self) -> str:
        owner = f", trained by {type(self.owner).__name__}" if self.recording else ""
        return f"GradRecorder(key={self.key}{owner})"


# --------------------------------------------------------------------------- recording lookup


class _RecordValueGrads(torch.autograd.Function):
    """Identity on the lookup's output whose backward records the value gradient's inputs into
    the table's gradient. The table is an input (it gets no gradient from here) so that the
    backward sees whether it accumulates into the table."""

    @staticmethod
    def forward(ctx, out, indices, weights, table, recorded_tokens, recorder):
        ctx.save_for_backward(indices, weights)
        # Not saved for backward: every recording backward bumps its version counter.
        ctx.recorded_tokens, ctx.recorder = recorded_tokens, recorder
        ctx.out_placements = getattr(out, "placements", None)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        indices, weights = ctx.saved_tensors
        record_read_grads(
            grad_out, indices, weights, ctx.recorded_tokens, ctx.recorder, ctx.out_placements
        )
        return grad_out, None, None, None, None, None


def record_read_grads(
    grad_out: Tensor,
    indices: Tensor,
    weights: Tensor,
    recorded_tokens: Tensor,
    recorder: int,
    columns: Sequence[Placement] | None = None,
) -> None:
    """``memlayer::record_value_grads`` of one read of the table, in a recording backward (of a
    lookup, or of PEER's ``memcompile.peer.ExpertDot``).

    A read of a column-sharded table (memory parallelism) passes DTensors: ``grad_out`` of every
    token of the group, placed as ``columns`` (the read's ``Shard(1)``; by default as it is),
    and the indices and weights of every token. Each rank records its own columns of
    ``grad_out`` with the full indices and weights: the op takes plain tensors, and its table
    is this rank's shard."""
    if isinstance(grad_out, DTensor):
        grad_out = grad_out.redistribute(placements=columns or grad_out.placements).to_local()
        indices, weights = (
            t.full_tensor() if isinstance(t, DTensor) else t for t in (indices, weights)
        )
    torch.ops.memlayer.record_value_grads(
        grad_out, indices, weights.detach(), recorded_tokens, recorder
    )


def lookup_recording_grads(
    values: Tensor, indices: Tensor, weights: Tensor, recorder: GradRecorder
) -> Tensor:
    """``lookup(values, indices, weights)`` whose backward records the value gradient's inputs
    into the ``.grad`` of ``recorder.table`` (a :class:`RowSparseGrad`) instead of computing a
    value gradient. ``values`` is that table or what was made of it for the read (a cast, a
    column shard); ``weights`` gets its gradient as usual."""
    table = recorder.table
    if table is None:
        raise ValueError(
            "lookup_recording_grads: the recorder knows no table: pass the table parameter "
            "itself as values, or pass it through the module that shares this recorder "
            "(memcompile.memory.ValueTable) first"
        )
    out = lookup(values.detach(), indices, weights)
    return _RecordValueGrads.apply(
        out, indices, weights, table, recorder.recorded_tokens, recorder.key
    )


def _accumulates_into(table: Tensor) -> bool:
    """Whether the running backward accumulates into ``table``'s gradient: ``backward()`` does;
    ``torch.autograd.grad`` of other tensors and ``backward(inputs=...)`` without the table
    leave it alone, as they leave any parameter's. A direct call (no backward) records."""
    if torch._C._current_graph_task_id() == -1:
        return True
    try:
        return torch._C._will_engine_execute_node(get_gradient_edge(table).node)
    except RuntimeError as error:  # the engine captures the table's gradient: autograd.grad
        if "autograd.grad()" not in str(error):
            raise
    raise RuntimeError(
        "record_value_grads: torch.autograd.grad with the memory table as an input is not "
        "supported while a row-sparse optimizer trains it: its lookups record its gradient "
        "where backward() puts gradients, in table.grad (a RowSparseGrad)"
    )


@torch.library.impl("memlayer::record_value_grads", "default")
def _record_value_grads_kernel(grad_out, indices, weights, recorded_tokens, recorder):
    _check_recorded(grad_out, indices, weights, recorded_tokens)
    owner = _RECORDERS.get(recorder)
    table = None if owner is None else owner.table
    if table is None:
        raise ValueError(
            f"record_value_grads: recorder {recorder} names no live GradRecorder with a table "
            "(was the model freed while a backward still recorded into it?)"
        )
    local = table.to_local() if isinstance(table, DTensor) else table
    if grad_out.shape[1] != local.shape[1]:
        raise ValueError(
            f"record_value_grads: grad_out must be [T, {local.shape[1]}] (the table's columns), "
            f"got {tuple(grad_out.shape)}"
        )
    check_indices_in_range(indices, local.shape[0], "record_value_grads: indices", "table rows")
    if not _accumulates_into(table):
        return
    _grad_to_record_into(table).record(grad_out, indices, weights)
    recorded_tokens.add_(indices.shape[0])


@torch.library.register_fake("memlayer::record_value_grads")
def _record_value_grads_fake(grad_out, indices, weights, recorded_tokens, recorder):
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


def hot_row_pieces(grad_out: Tensor, weights: Tensor, groups: RowGroups) -> HotRowPieces:
    """The partial sums of the hot rows' gradients, for :func:`row_sq_norms` and
    :func:`update_rows` to share (a step computes them once): on CUDA, a touched row of more than
    ``ops.lookup_triton._HITS_PER_PIECE`` (1024) hits is summed in pieces of that many hits in
    parallel, so that it does not serialize the kernels; on CPU no row is split (the C++
    kernels sum each row serially) and there are no pieces."""
    return HotRowPieces(
        *torch.ops.memlayer.hot_row_pieces(grad_out, weights, groups.row_starts, groups.positions)
    )


def row_sq_norms(
    grad_out: Tensor, weights: Tensor, groups: RowGroups, pieces: HotRowPieces | None = None
) -> Tensor:
    """``||g_u||²`` (fp64 ``[U]``) of each touched row's gradient
    ``g_u = sum over its positions p of weights[p] * grad_out[p // B]``; ``pieces`` are
    :func:`hot_row_pieces` of the same arguments (computed by the op if not given)."""
    return torch.ops.memlayer.row_sq_norms(
        grad_out, weights, groups.row_starts, groups.positions, *_piece_args(pieces)
    )


def update_rows(
    table: Tensor,
    state: list[Tensor],
    grad_out: Tensor,
    weights: Tensor,
    groups: RowGroups,
    rule: TableRule,
    *,
    grad_scale: float = 1.0,
    row_mean_sq: Tensor | None = None,
    pieces: HotRowPieces | None = None,
) -> None:
    """Apply ``rule`` (``ops/table_rule.py``: SGD, row-wise AdaGrad or lazy AdamW, and its
    hyperparameters) in place to the touched rows of ``table`` and its ``state`` (the tensors
    of ``rule.rule.state_names``: ``sum [N]`` fp32 for row-wise AdaGrad, ``exp_avg,
    exp_avg_sq [N, D]`` fp32 for Adam), with each row's gradient ``grad_scale * g_u`` (``g_u``
    as in :func:`row_sq_norms`).

    ``row_mean_sq`` (fp64 ``[U]``, each row's mean squared unscaled ``g`` over its full width:
    a column-sharded table's ranks hold a slice of the row) replaces row-wise AdaGrad's local
    ``mean(g²)`` when ``weight_decay`` is 0. ``pieces`` are :func:`hot_row_pieces` of the same
    gradient (computed by the op if not given). Rows not touched are not read or written.
    """
    code, hyperparameters = rule.packed()
    torch.ops.memlayer.update_rows(
        table, state, grad_out, weights, groups.rows, groups.row_starts, groups.positions,
        row_mean_sq, code, hyperparameters, grad_scale, *_piece_args(pieces),
    )  # fmt: skip


def _piece_args(pieces: HotRowPieces | None) -> tuple[Tensor | None, Tensor | None]:
    """The ops' ``piece_starts, partials`` arguments."""
    return (None, None) if pieces is None else (pieces.starts, pieces.partials)


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


def _check_pieces(
    op: str, grad_out: Tensor, row_starts: Tensor, piece_starts: Tensor | None,
    partials: Tensor | None,
) -> None:  # fmt: skip
    if (piece_starts is None) != (partials is None):
        given, missing = ("piece_starts", "partials")
        if piece_starts is None:
            given, missing = missing, given
        raise ValueError(
            f"{op}: {given} was given without {missing}: pass both (hot_row_pieces returns "
            "them together) or neither"
        )
    if piece_starts is None:
        return
    check_tensor(op, "piece_starts", piece_starts, "[U + 1]", (torch.int64,))
    check_shape(op, "piece_starts", piece_starts, row_starts.shape, "the shape of row_starts")
    check_tensor(op, "partials", partials, "[pieces, D]", (torch.float32,))
    check_shape(op, "partials", partials, (partials.shape[0], grad_out.shape[1]), "D of grad_out")
    check_same_device(op, grad_out=grad_out, piece_starts=piece_starts, partials=partials)


def _check_piece_data(op: str, piece_starts: Tensor | None, partials: Tensor | None) -> None:
    """Piece starts non-decreasing within ``[0, len(partials)]`` (real kernels only)."""
    if piece_starts is None:
        return
    bound = partials.shape[0] + 1
    check_indices_in_range(piece_starts, bound, f"{op}: piece_starts", "offsets into partials")
    if index_checks_enabled(piece_starts.device) and bool((piece_starts.diff() < 0).any()):
        raise ValueError(f"{op}: piece_starts must be non-decreasing")


def _checked_pieces(
    op: str, grad_out: Tensor, row_starts: Tensor, piece_starts: Tensor | None,
    partials: Tensor | None,
) -> HotRowPieces | None:  # fmt: skip
    """The given pieces, checked and contiguous, or ``None``."""
    _check_pieces(op, grad_out, row_starts, piece_starts, partials)
    _check_piece_data(op, piece_starts, partials)
    if piece_starts is None:
        return None
    return HotRowPieces(piece_starts.contiguous(), partials.contiguous())


def _group_inputs(op: str, grad_out, weights, row_starts, positions) -> tuple[Tensor, ...]:
    _check_groups(op, grad_out, weights, row_starts, positions)
    _check_group_data(op, weights, row_starts, positions)
    return tuple(t.contiguous() for t in (grad_out, weights, row_starts, positions))


def _no_pieces(grad_out: Tensor, row_starts: Tensor) -> tuple[Tensor, Tensor]:
    """The CPU's pieces: none (the C++ kernels sum each row serially)."""
    starts = torch.zeros(row_starts.shape[0], dtype=torch.int64, device=row_starts.device)
    return starts, grad_out.new_empty((0, grad_out.shape[1]), dtype=torch.float32)


@torch.library.impl("memlayer::hot_row_pieces", "CPU")
def _hot_row_pieces_cpu(grad_out, weights, row_starts, positions):
    _check_groups("hot_row_pieces", grad_out, weights, row_starts, positions)
    _check_group_data("hot_row_pieces", weights, row_starts, positions)
    return _no_pieces(grad_out, row_starts)


@torch.library.impl("memlayer::hot_row_pieces", "CUDA")
def _hot_row_pieces_cuda(grad_out, weights, row_starts, positions):
    inputs = _group_inputs("hot_row_pieces", grad_out, weights, row_starts, positions)
    return tuple(row_sparse_triton.hot_row_pieces(*inputs))


@torch.library.register_fake("memlayer::hot_row_pieces")
def _hot_row_pieces_fake(grad_out, weights, row_starts, positions):
    _check_groups("hot_row_pieces", grad_out, weights, row_starts, positions)
    if grad_out.device.type == "cpu":
        return _no_pieces(grad_out, row_starts)
    return (
        row_starts.new_empty(row_starts.shape),
        grad_out.new_empty((max_hot_row_pieces(positions.numel()), grad_out.shape[1])),
    )


refuse_other_devices("memlayer::hot_row_pieces", _hot_row_pieces_fake)


@torch.library.impl("memlayer::row_sq_norms", "CPU")
def _row_sq_norms_cpu(grad_out, weights, row_starts, positions, piece_starts=None, partials=None):
    inputs = _group_inputs("row_sq_norms", grad_out, weights, row_starts, positions)
    _checked_pieces("row_sq_norms", grad_out, row_starts, piece_starts, partials)  # none on CPU
    return row_sparse_cpu.row_sq_norms(*inputs)


@torch.library.impl("memlayer::row_sq_norms", "CUDA")
def _row_sq_norms_cuda(grad_out, weights, row_starts, positions, piece_starts=None, partials=None):
    inputs = _group_inputs("row_sq_norms", grad_out, weights, row_starts, positions)
    pieces = _checked_pieces("row_sq_norms", grad_out, row_starts, piece_starts, partials)
    return row_sparse_triton.row_sq_norms(*inputs, pieces)


@torch.library.register_fake("memlayer::row_sq_norms")
def _row_sq_norms_fake(grad_out, weights, row_starts, positions, piece_starts=None, partials=None):
    _check_groups("row_sq_norms", grad_out, weights, row_starts, positions)
    _check_pieces("row_sq_norms", grad_out, row_starts, piece_starts, partials)
    return grad_out.new_empty((row_starts.shape[0] - 1,), dtype=torch.float64)


refuse_other_devices("memlayer::row_sq_norms", _row_sq_norms_fake)


def _expected_state(rule: Rule, table: Tensor) -> list[tuple[tuple[int, ...], str]]:
    """Each state tensor's shape and its name with its shape, as messages spell it."""
    shapes = {"sum": ((table.shape[0],), "[N]"), "exp_avg": (tuple(table.shape), "[N, D]")}
    shapes["exp_avg_sq"] = shapes["exp_avg"]
    return [(shapes[name][0], f"{name} {shapes[name][1]}") for name in rule.state_names]


def _check_update(
    table, state, grad_out, weights, rows, row_starts, positions, row_mean_sq,
    rule, hyperparameters, grad_scale, piece_starts=None, partials=None,
):  # fmt: skip
    op = "update_rows"
    check_tensor(op, "table", table, "[N, D]", (torch.float32, torch.bfloat16, torch.float16))
    check_packed(op, rule, hyperparameters)
    if not math.isfinite(grad_scale):
        raise ValueError(f"{op}: grad_scale must be finite, got {grad_scale}")
    rule = Rule(rule)
    _check_groups(op, grad_out, weights, row_starts, positions)
    check_shape(op, "grad_out", grad_out, (grad_out.shape[0], table.shape[1]), "D of table")
    check_tensor(op, "rows", rows, "[U]", (torch.int64,))
    check_shape(op, "rows", rows, (row_starts.shape[0] - 1,), "one per row_starts interval")
    expected = _expected_state(rule, table)
    if len(state) != len(expected):
        names = ", ".join(name for _, name in expected) or "none"
        raise ValueError(
            f"{op}: rule {rule.name.lower()!r} takes state [{names}], got {len(state)} tensors"
        )
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
    _check_pieces(op, grad_out, row_starts, piece_starts, partials)


def _check_update_data(table: Tensor, state: list[Tensor], rows: Tensor) -> None:
    """What the kernel relies on and only real tensors show: ``rows`` in range, sorted and
    unique (each row is written by one program: a repeated row would race), and state tensors
    that share memory with neither the table nor each other."""
    check_indices_in_range(rows, table.shape[0], "update_rows: rows", "the rows of table")
    if index_checks_enabled(rows.device) and bool((rows.diff() <= 0).any()):
        raise ValueError(
            "update_rows: rows must be sorted and unique (one entry per touched row, as "
            "group_by_row gives them)"
        )
    storages = {"table": table.untyped_storage().data_ptr()}
    for i, tensor in enumerate(state):
        pointer = tensor.untyped_storage().data_ptr()
        shared = [name for name, other in storages.items() if other == pointer and tensor.numel()]
        if shared:
            raise ValueError(
                f"update_rows: state {i} shares memory with {shared[0]}: every state tensor "
                "must be its own"
            )
        storages[f"state {i}"] = pointer


def _update_rows_inputs(
    table, state, grad_out, weights, rows, row_starts, positions, row_mean_sq,
    rule, hyperparameters, grad_scale, piece_starts=None, partials=None,
):  # fmt: skip
    """The checked arguments of the kernels, contiguous, and the given pieces (or ``None``);
    ``None`` if no row is to be updated."""
    _check_update(
        table, state, grad_out, weights, rows, row_starts, positions, row_mean_sq,
        rule, hyperparameters, grad_scale, piece_starts, partials,
    )  # fmt: skip
    _check_group_data("update_rows", weights, row_starts, positions)
    _check_update_data(table, state, rows)
    pieces = _checked_pieces("update_rows", grad_out, row_starts, piece_starts, partials)
    if rows.numel() == 0 or table.shape[1] == 0:
        return None
    grad_out, weights, rows, row_starts, positions = (
        t.contiguous() for t in (grad_out, weights, rows, row_starts, positions)
    )
    row_mean_sq = None if row_mean_sq is None else row_mean_sq.contiguous()
    arguments = (
        table, list(state), grad_out, weights, rows, row_starts, positions, row_mean_sq,
        rule, hyperparameters, grad_scale,
    )  # fmt: skip
    return arguments, pieces


def _written_in_place(table: Tensor, state: list[Tensor]) -> None:
    """The kernels write through raw pointers: tell autograd, as an in-place op would, so that
    a backward that saved the table before this update refuses to use it."""
    for tensor in (table, *state):
        torch.autograd.graph.increment_version(tensor)


@torch.library.impl("memlayer::update_rows", "CPU")
def _update_rows_cpu(table, state, *args):
    inputs = _update_rows_inputs(table, state, *args)
    if inputs is not None:
        arguments, _ = inputs  # no pieces on CPU: the C++ kernel sums each row serially
        row_sparse_cpu.update_rows(*arguments)
    _written_in_place(table, state)


@torch.library.impl("memlayer::update_rows", "CUDA")
def _update_rows_cuda(table, state, *args):
    inputs = _update_rows_inputs(table, state, *args)
    if inputs is not None:
        arguments, pieces = inputs
        row_sparse_triton.update_rows(*arguments, pieces)
    _written_in_place(table, state)


@torch.library.register_fake("memlayer::update_rows")
def _update_rows_fake(table, state, *args):
    _check_update(table, state, *args)


refuse_other_devices("memlayer::update_rows", _update_rows_fake)


# --------------------------------------------------------------------------- reference


def reference_update_rows(
    table: Tensor,
    state: list[Tensor],
    grad_out: Tensor,
    indices: Tensor,
    weights: Tensor,
    rule: TableRule,
    *,
    grad_scale: float = 1.0,
) -> tuple[Tensor, list[Tensor]]:
    """The textbook float64 update (dense gradient, then the rule on the rows it touched):
    returns the new ``(table, state)``, both float64."""
    lr, eps, weight_decay, step = rule.lr, rule.eps, rule.weight_decay, rule.step
    w = table.double().clone()
    state = [s.double().clone() for s in state]
    grad = torch.zeros_like(w)
    flat = indices.reshape(-1).long()
    rows_of_tokens = grad_out.double().repeat_interleave(indices.shape[1], dim=0)
    grad.index_add_(0, flat, weights.double().reshape(-1, 1) * rows_of_tokens)
    grad *= grad_scale
    touched = torch.unique(flat)
    g, wt = grad[touched], w[touched]
    if rule.rule == Rule.SGD:
        w[touched] = wt - lr * (g + weight_decay * wt)
    elif rule.rule == Rule.ROWWISE_ADAGRAD:
        state[0][touched] += (g + weight_decay * wt).square().mean(dim=1)
        multiplier = (lr / (state[0][touched].sqrt() + eps)).unsqueeze(1)
        w[touched] = (1 - multiplier * weight_decay) * wt - multiplier * g
    else:
        beta1, beta2 = rule.betas
        exp_avg, exp_avg_sq = state
        exp_avg[touched] = beta1 * exp_avg[touched] + (1 - beta1) * g
        exp_avg_sq[touched] = beta2 * exp_avg_sq[touched] + (1 - beta2) * g.square()
        denom = exp_avg_sq[touched].sqrt() / (1 - beta2**step) ** 0.5 + eps
        w[touched] = (
            wt * (1 - lr * weight_decay) - lr / (1 - beta1**step) * exp_avg[touched] / denom
        )
    return w, state
