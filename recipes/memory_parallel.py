"""Memory parallelism: the model's one table column-sharded over a group of ranks.

With ``--parallelism.memory_parallel_degree G`` the world is laid out as a ``[R, G]`` mesh
(``R = world / G`` replicas, rank ``r * G + g``): each group of ``G`` consecutive ranks holds one
copy of the table ``[N, D]`` as a ``DTensor`` placed ``(Replicate(), Shard(1))``, so rank ``g`` of a
group stores the columns ``[g * D/G, (g+1) * D/G)`` of every row. The table is never gathered.

The same styles serve every family (product-key values, Engram's hashed rows, PEER's down and
up vectors), applied with ``parallelize_module`` and visible in ``print(model)`` as the modules
they wrap:

- :class:`ColumnShardedTable` on the model's ``memory_table``: once per forward, the table
  becomes this rank's column shard in the compute dtype, a ``DTensor`` ``Shard(1)`` on the
  memory mesh, which every layer then reads (the table is outside FSDP, so nothing else would
  cast it).
- :class:`ColumnShardedLookup` on every read of the table (``ValueLookup``: a memory layer's
  ``lookup``, Engram's, PEER's ``up_lookup``): the layer's indices and weights are all-gathered
  over the group, ``memlayer.lookup`` reads the local columns for all ``G * T`` tokens of the
  group (the op's own DTensor rule for a ``Shard(1)`` table), and an all-to-all sends each rank
  the full rows of its own ``T`` tokens.
- :class:`ColumnShardedDot` on PEER's ``down_dot`` (``u_i · x`` of each token with the experts
  it selected): the tokens and indices are all-gathered, each rank dots its columns of ``x``
  with its columns of the rows (``memlayer.lookup_weights_grad``'s rule: a ``Partial`` sum over
  the columns), and a reduce-scatter sums the partial dots over the group and hands each rank
  those of its own tokens, whole, before PEER's GELU.

Autograd runs the adjoints (all-to-all back, reduce-scatter of the weight gradients), and the
table's gradient lands on the local columns; a table trained row-sparsely records it there instead,
from both kinds of read (each rank its columns of the rows the group read). Replicas (``R > 1``) see
different tokens: their gradients must be summed over the replica dimension once per optimizer step,
after the last micro-batch's backward and before clipping (:func:`sum_table_grad_over_replicas`; the
recipe's trainer calls it there, as DDP and FSDP sync only then); a row-sparse table's optimizer
gathers what the replicas recorded instead. The loss is normalised by the global token count, so a
sum is the right reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import tyro
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import (
    DTensor,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module
from torchtitan.config import ParallelismConfig

from memcompile.memory import ValueLookup
from memcompile.peer import ExpertDot
from ops.row_sparse import RowSparseGrad

MEMORY_DIM, REPLICA_DIM = "memory", "memory_replicate"


@dataclass(kw_only=True, slots=True)
class MemoryParallelismConfig(ParallelismConfig):
    memory_parallel_degree: int = 1
    """Ranks that share one column-sharded copy of the memory value table (Shard(1));
    must divide the world size and the value dim. 1: the table is handled by FSDP like any
    other parameter."""

    row_sparse_table: tyro.conf.Suppress[bool] = False
    """Whether the table is trained row-sparsely (set from --optimizer.memory_optimizer by the
    trainer's config): such a table stays out of FSDP, as its optimizer updates it in place
    from what its lookups record, and FSDP would reduce a gradient it does not have."""


def build_memory_mesh(device_type: str, degree: int) -> DeviceMesh:
    """The ``[replicas, degree]`` mesh; ``degree`` must divide the world size."""
    world_size = dist.get_world_size()
    return init_device_mesh(
        device_type, (world_size // degree, degree), mesh_dim_names=(REPLICA_DIM, MEMORY_DIM)
    )


class ColumnShardedTable(ParallelStyle):
    """For ``Transformer.memory_table``: its output, the table placed ``(Replicate(), Shard(1))``
    on the ``[replica, memory]`` mesh, becomes the local column shard as a ``Shard(1)`` DTensor
    on the memory mesh, cast to ``compute_dtype`` (once per forward, for every layer)."""

    def __init__(self, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype

    def _local_columns(self, module: nn.Module, table: DTensor, mesh: DeviceMesh) -> DTensor:
        local = table.to_local().to(self.compute_dtype)
        return DTensor.from_local(local, mesh, [Shard(1)], run_check=False)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, output_fn=self._local_columns)


def _gather_tokens(local: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """This rank's ``[T, ...]`` token rows all-gathered over the group: ``[G * T, ...]``
    replicated, rank ``g``'s tokens in row block ``g``."""
    tokens = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    return tokens.redistribute(mesh, [Replicate()])


def _own_tokens(group_tokens: DTensor, mesh: DeviceMesh) -> torch.Tensor:
    """Row block ``g`` of an op's ``[G * T, ...]`` output on the group, whole: from column
    shards (``Shard(1)``) an all-to-all, from partial sums (``Partial``) a reduce-scatter."""
    return group_tokens.redistribute(mesh, [Shard(0)]).to_local()


class ColumnShardedLookup(ParallelStyle):
    """For a ``ValueLookup`` reading a ``Shard(1)`` table on the memory mesh: token-local
    indices and weights in, token-local ``[T, D]`` rows out (see the module doc)."""

    @staticmethod
    def _gather_group_reads(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        values, indices, weights = inputs
        return values, _gather_tokens(indices, mesh), _gather_tokens(weights, mesh)

    @staticmethod
    def _rows_of_own_tokens(module: nn.Module, columns: DTensor, mesh: DeviceMesh) -> torch.Tensor:
        return _own_tokens(columns, mesh)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module,
            device_mesh,
            input_fn=self._gather_group_reads,
            output_fn=self._rows_of_own_tokens,
        )


class ColumnShardedDot(ParallelStyle):
    """For PEER's ``ExpertDot`` reading a ``Shard(1)`` table: token-local ``x [T, D]`` and
    indices in, token-local dots ``[T, B]`` out, each summed over all ``D`` columns."""

    @staticmethod
    def _gather_group_tokens(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x, table, indices = inputs
        # This rank's columns of every token of the group (a local slice of the gathered x).
        x_columns = _gather_tokens(x, mesh).redistribute(mesh, [Shard(1)])
        return x_columns, table, _gather_tokens(indices, mesh)

    @staticmethod
    def _dots_of_own_tokens(module: nn.Module, dots: DTensor, mesh: DeviceMesh) -> torch.Tensor:
        # Each rank dotted its columns only (Partial): the sum over the group must come before
        # the GELU.
        return _own_tokens(dots, mesh)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module,
            device_mesh,
            input_fn=self._gather_group_tokens,
            output_fn=self._dots_of_own_tokens,
        )


def apply_memory_parallel(model: nn.Module, mesh: DeviceMesh, compute_dtype: torch.dtype) -> None:
    """Column-shard ``model.memory_values`` over ``mesh`` (a ``[replica, memory]`` mesh) and
    apply the styles to every read of it. Call before FSDP, which must then ignore the table."""
    sharded = distribute_tensor(model.memory_values.data, mesh, [Replicate(), Shard(1)])
    model.memory_values = nn.Parameter(sharded)
    memory_mesh = mesh[MEMORY_DIM]
    plan = {"memory_table": ColumnShardedTable(compute_dtype)}
    for name, module in model.named_modules():
        if isinstance(module, ValueLookup):
            plan[name] = ColumnShardedLookup()
        elif isinstance(module, ExpertDot):
            plan[name] = ColumnShardedDot()
    parallelize_module(model, memory_mesh, plan)


def sum_table_grad_over_replicas(model: nn.Module) -> None:
    """Sum the dense gradient of ``model.memory_values`` over the table's replicas: each saw
    other tokens (its placements claim ``Replicate`` over the replica dim, which only holds
    after this). Call it once per optimizer step, after the last micro-batch's backward: the
    gradient has accumulated every micro-batch by then, and a second call would count them again.
    Nothing to do for a table without replicas, or one trained row-sparsely (its optimizer
    gathers what the replicas recorded)."""
    values = getattr(model, "memory_values", None)
    group = _replica_group(values)
    if group is None or values.grad is None:
        return
    local = values.grad.to_local()
    if isinstance(local, RowSparseGrad):
        return
    dist.all_reduce(local, group=group)


def table_replicas_agree(model: nn.Module) -> bool | None:
    """Whether every replica of this rank's column shard of ``model.memory_values`` holds the same
    bits (``None`` for a table without replicas): a replica that missed an update would train,
    and be checkpointed, apart from the others. Compares checksums, not the shards."""
    values = getattr(model, "memory_values", None)
    group = _replica_group(values)
    if group is None:
        return None
    checksum = _bitwise_checksum(values.to_local())
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(low, high))


def _replica_group(values: torch.Tensor | None) -> dist.ProcessGroup | None:
    """The process group of the table's replicas (memory parallelism with R > 1), or None."""
    if not isinstance(values, DTensor):
        return None
    mesh = values.device_mesh
    if REPLICA_DIM not in (mesh.mesh_dim_names or ()) or mesh[REPLICA_DIM].size() == 1:
        return None
    return mesh.get_group(REPLICA_DIM)


def _bitwise_checksum(table: torch.Tensor, rows_per_chunk: int = 1 << 16) -> torch.Tensor:
    """Two sums of ``table``'s bits read as integers (plain, and weighted by row), int64: any
    changed bit changes them but for a vanishing chance. In chunks of rows: no table-sized
    temporary."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[table.element_size()]
    sums = torch.zeros(2, dtype=torch.int64, device=table.device)
    for start in range(0, table.shape[0], rows_per_chunk):
        chunk = table[start : start + rows_per_chunk].contiguous().view(bits).long()
        weights = torch.arange(start + 1, start + 1 + chunk.shape[0], device=table.device)
        sums[0] += chunk.sum()
        sums[1] += (chunk.sum(dim=1) * weights).sum()
    return sums
