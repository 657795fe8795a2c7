"""Memory parallelism: the shared value table column-sharded over a group of ranks.

With ``--parallelism.memory_parallel_degree G`` the world is laid out as a ``[R, G]`` mesh
(``R = world / G`` replicas, rank ``r * G + g``): each group of ``G`` consecutive ranks holds one
copy of the table ``[N, D]`` as a ``DTensor`` placed ``(Replicate(), Shard(1))``, so rank ``g`` of a
group stores the columns ``[g * D/G, (g+1) * D/G)`` of every row. The table is never gathered.

Two parallel styles, applied with ``parallelize_module`` and visible in ``print(model)`` as the
modules they wrap:

- :class:`ColumnShardedTable` on the model's ``memory_table``: once per forward, the table
  becomes this rank's column shard in the compute dtype, a ``DTensor`` ``Shard(1)`` on the
  memory mesh, which every memory layer then reads (the table is outside FSDP, so nothing
  else would cast it).
- :class:`ColumnShardedLookup` on every memory layer's ``lookup``: the layer's indices and
  weights are all-gathered over the group, ``memlayer.lookup`` reads the local columns for
  all ``G * T`` tokens of the group (the op's own DTensor rule for a ``Shard(1)`` table), and an
  all-to-all sends each rank the full rows of its own ``T`` tokens.

Autograd runs the adjoints (all-to-all back, reduce-scatter of the weight gradients), and the
table's gradient lands on the local columns. Replicas (``R > 1``) see different tokens: their
gradients are summed over the replica dimension after backward. The loss is normalised by the
global token count, so a sum is the right reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
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

from memcompile.memory import ProductKeyMemory

MEMORY_DIM, REPLICA_DIM = "memory", "memory_replicate"


@dataclass(kw_only=True, slots=True)
class MemoryParallelismConfig(ParallelismConfig):
    memory_parallel_degree: int = 1
    """Ranks that share one column-sharded copy of the memory value table (Shard(1));
    must divide the world size and the value dim. 1: the table is handled by FSDP like any
    other parameter."""


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


class ColumnShardedLookup(ParallelStyle):
    """For a ``ValueLookup`` reading a ``Shard(1)`` table on the memory mesh: token-local
    indices and weights in, token-local ``[T, D]`` rows out (see the module doc)."""

    @staticmethod
    def _gather_group_reads(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        values, indices, weights = inputs

        def gather(local: torch.Tensor) -> DTensor:
            tokens = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
            return tokens.redistribute(mesh, [Replicate()])

        return values, gather(indices), gather(weights)

    @staticmethod
    def _rows_of_own_tokens(module: nn.Module, columns: DTensor, mesh: DeviceMesh) -> torch.Tensor:
        # Row block g of the group's columns holds rank g's tokens: Shard(1) -> Shard(0) is the
        # all-to-all that sends it there.
        return columns.redistribute(mesh, [Shard(0)]).to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module,
            device_mesh,
            input_fn=self._gather_group_reads,
            output_fn=self._rows_of_own_tokens,
        )


def apply_memory_parallel(model: nn.Module, mesh: DeviceMesh, compute_dtype: torch.dtype) -> None:
    """Column-shard ``model.memory_values`` over ``mesh`` (a ``[replica, memory]`` mesh) and
    apply the two styles. Call before FSDP, which must then ignore the table."""
    sharded = distribute_tensor(model.memory_values.data, mesh, [Replicate(), Shard(1)])
    model.memory_values = nn.Parameter(sharded)
    if mesh.size(0) > 1:
        model.memory_values.register_post_accumulate_grad_hook(_sum_over_replicas)
    memory_mesh = mesh[MEMORY_DIM]
    plan = {"memory_table": ColumnShardedTable(compute_dtype)}
    plan.update(
        {
            f"{name}.lookup": ColumnShardedLookup()
            for name, module in model.named_modules()
            if isinstance(module, ProductKeyMemory)
        }
    )
    parallelize_module(model, memory_mesh, plan)


def _sum_over_replicas(values: DTensor) -> None:
    """Each replica of the table saw other tokens: sum their gradients (placements claim
    Replicate over the replica dim, which only holds after this)."""
    dist.all_reduce(values.grad.to_local(), group=values.device_mesh.get_group(REPLICA_DIM))
