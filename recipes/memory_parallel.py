"""Memory parallelism: the shared value table column-sharded over a group of ranks.

With ``memory_parallel_degree = G`` the world is laid out as a ``[R, G]`` mesh (``R = world / G``
replicas, rank ``r * G + g``): each group of ``G`` consecutive ranks holds one copy of the table
``[N, D]`` as a ``DTensor`` placed ``(Replicate(), Shard(1))``, so rank ``g`` of a group stores the
columns ``[g * D/G, (g+1) * D/G)`` of every row. The table is never all-gathered; per memory layer:

1. all-gather the layer's indices and weights over the group (each rank then knows the reads
   of all ``G * T`` tokens of its group),
2. ``memlayer.lookup`` on the local column slice: ``[G*T, D/G]``,
3. all-to-all: rank ``g`` sends the rows of rank ``j``'s tokens to rank ``j`` and receives its
   own tokens' column slices from everyone; concatenated, they are the ``[T, D]`` output.

The collectives are torch's functional collectives with autograd, so backward is their adjoint
(all-to-all back, reduce-scatter of the weight gradients) and the table's gradient lands on the
local slice. Replicas of the table (``R > 1``) see different tokens: their gradients are summed
over the replica dimension after backward (nothing else would do it: the table is kept out of
FSDP). The loss is already normalised by the global token count, so a sum is the right reduction.

The routing happens where memcompile calls ``torch.ops.memlayer.lookup(values, indices, weights)``:
inside each memory layer's forward a ``TorchFunctionMode`` sends lookups whose table is a DTensor
to ``column_sharded_lookup`` (memcompile's layer code stays unchanged and single-device).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.overrides import TorchFunctionMode

from memcompile.memory import ProductKeyMemory

MEMORY_DIM, REPLICA_DIM = "memory", "memory_replicate"


def build_memory_mesh(device_type: str, degree: int) -> DeviceMesh:
    """The ``[replicas, degree]`` mesh; ``degree`` must divide the world size."""
    world_size = dist.get_world_size()
    return init_device_mesh(device_type, (world_size // degree, degree), mesh_dim_names=(REPLICA_DIM, MEMORY_DIM))


def column_sharded_lookup(values: DTensor, indices: Tensor, weights: Tensor, deterministic: bool = True,
                          *, compute_dtype: torch.dtype | None = None) -> Tensor:
    """``memlayer.lookup`` for a table placed ``(Replicate(), Shard(1))``; token-local in and out."""
    group = values.device_mesh.get_group(MEMORY_DIM)
    degree = values.device_mesh.size(values.device_mesh.mesh_dim_names.index(MEMORY_DIM))
    num_tokens, value_dim = indices.shape[0], values.shape[1]
    local_values = values.to_local()
    if compute_dtype is not None:  # the table is outside FSDP, so no mixed-precision cast
        local_values = local_values.to(compute_dtype)
    group_indices = funcol.wait_tensor(funcol.all_gather_tensor(indices, 0, group))
    group_weights = funcol.wait_tensor(funcol.all_gather_tensor_autograd(weights, 0, group))
    columns = torch.ops.memlayer.lookup(local_values, group_indices, group_weights, deterministic)
    # Row block j of `columns` holds rank j's tokens: send it there, receive ours from each rank.
    received = funcol.wait_tensor(funcol.all_to_all_single_autograd(columns, None, None, group))
    return received.view(degree, num_tokens, value_dim // degree).transpose(0, 1).reshape(num_tokens, value_dim)


class _RouteShardedLookups(TorchFunctionMode):
    def __init__(self, compute_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        is_lookup = func is torch.ops.memlayer.lookup or func is torch.ops.memlayer.lookup.default
        if is_lookup and isinstance(args[0], DTensor):
            return column_sharded_lookup(*args, **kwargs, compute_dtype=self.compute_dtype)
        return func(*args, **kwargs)


def _routing_sharded_lookups(forward, compute_dtype: torch.dtype | None):
    @functools.wraps(forward)
    def forward_with_sharded_lookups(*args, **kwargs):
        with _RouteShardedLookups(compute_dtype):
            return forward(*args, **kwargs)

    return forward_with_sharded_lookups


def shard_memory_values(model: nn.Module, mesh: DeviceMesh, compute_dtype: torch.dtype | None) -> None:
    """Column-shard ``model.memory_values`` over ``mesh`` and route every memory layer's lookup
    through ``column_sharded_lookup``. Call before FSDP (which must then ignore the table)."""
    sharded = distribute_tensor(model.memory_values.data, mesh, [Replicate(), Shard(1)])
    model.memory_values = nn.Parameter(sharded)
    for module in model.modules():
        if isinstance(module, ProductKeyMemory):
            module.forward = _routing_sharded_lookups(module.forward, compute_dtype)
    if mesh.size(0) > 1:
        model.memory_values.register_post_accumulate_grad_hook(_sum_over_replicas)


def _sum_over_replicas(values: DTensor) -> None:
    """Each replica of the table saw other tokens: sum their gradients (placements claim
    Replicate over the replica dim, which only holds after this)."""
    dist.all_reduce(values.grad.to_local(), group=values.device_mesh.get_group(REPLICA_DIM))
