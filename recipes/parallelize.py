"""Parallelism for memcompile models on torchtitan: memory parallel, activation checkpointing,
per-block compile and FSDP2, in that order (as torchtitan's ``models/llama3/parallelize.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import tyro
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torchtitan.config import TORCH_DTYPE_MAP, CompileConfig, TrainingConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed import activation_checkpoint as titan_ac
from torchtitan.distributed.compile import apply_compile
from torchtitan.distributed.fsdp import (
    disable_fsdp_gradient_division,
    get_fsdp_reshard_after_forward_policy,
)
from torchtitan.tools import utils as titan_utils
from torchtitan.tools.logging import logger

from recipes import shims
from recipes.memory_parallel import (
    MemoryParallelismConfig,
    apply_memory_parallel,
    build_memory_mesh,
)

# --------------------------------------------------------------------------- activation checkpoints


class _DenseBlocksOnly:
    """Checkpoints the dense blocks and keeps every memory block's activations: they are small
    (``[tokens, dim]``; the table is a parameter, not an activation), and on torch 2.13 compile +
    checkpointing of a block that reads a DTensor table fails in AOTAutograd ("expected all
    tensors_saved_with_vc_check to be Tensors ... DeviceMesh")."""

    def _wrap_block(self, module: nn.Module, *, base_fqn: str | None = None) -> nn.Module:
        if getattr(module, "is_memory_block", False):
            return module
        return super()._wrap_block(module, base_fqn=base_fqn)


class SelectiveAC(_DenseBlocksOnly, titan_ac.SelectiveAC):
    """torchtitan's per-op selective checkpointing, of the dense blocks."""

    @dataclass(kw_only=True, slots=True)
    class Config(titan_ac.SelectiveAC.Config):
        pass


class FullAC(_DenseBlocksOnly, titan_ac.FullAC):
    """torchtitan's full checkpointing, of the dense blocks."""

    @dataclass(kw_only=True, slots=True)
    class Config(titan_ac.FullAC.Config):
        pass


# The Trainer config field, as torchtitan's ActivationCheckpointingConfig (same subcommands).
ActivationCheckpointingConfig = (
    Annotated[SelectiveAC.Config, tyro.conf.subcommand("selective")]
    | Annotated[FullAC.Config, tyro.conf.subcommand("full")]
    | Annotated[titan_ac.MemoryBudgetAC.Config, tyro.conf.subcommand("memory-budget")]
    | Annotated[None, tyro.conf.subcommand("none")]
)


# --------------------------------------------------------------------------- FSDP


def apply_fsdp(
    model: nn.Module,
    parallel_dims: ParallelDims,
    training: TrainingConfig,
    parallelism: MemoryParallelismConfig,
) -> None:
    """FSDP2 as torchtitan's ``apply_fsdp_to_decoder`` lays it out: the embedding, each block,
    ``[norm, output]`` (not resharded after forward: backward needs them first), the root.

    Not that function itself: a column-sharded table, or one trained row-sparsely (on one rank:
    on several, it is column-sharded), must be ignored by every ``fully_shard`` (all-gathering
    it would defeat the sharding; FSDP would reduce a gradient such a table does not have),
    which it cannot express, and memcompile's output projection is ``output``, not ``lm_head``.
    """
    names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
    fsdp_config = {
        "mesh": parallel_dims.get_mesh(names),
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
            cast_forward_inputs=False,
        ),
    }
    if training.enable_cpu_offload:
        fsdp_config["offload_policy"] = CPUOffloadPolicy()
    if parallelism.memory_parallel_degree > 1 or parallelism.row_sparse_table:
        fsdp_config["ignored_params"] = {model.memory_values}
    policy = parallelism.fsdp_reshard_after_forward
    reshard_after_forward = get_fsdp_reshard_after_forward_policy(policy, pp_enabled=False)

    fully_shard(model.tok_embeddings, **fsdp_config, reshard_after_forward=reshard_after_forward)
    for block in model.layers.values():
        fully_shard(block, **fsdp_config, reshard_after_forward=reshard_after_forward)
    fully_shard([model.norm, model.output], **fsdp_config, reshard_after_forward=policy == "always")
    fully_shard(model, **fsdp_config)
    disable_fsdp_gradient_division(model)
    shims.allow_fsdp_on_gloo(model)


# --------------------------------------------------------------------------- parallelize_fn


def parallelize_memory_transformer(
    model: nn.Module,
    *,
    parallel_dims: ParallelDims,
    training: TrainingConfig,
    parallelism: MemoryParallelismConfig,
    compile_config: CompileConfig,
    ac_config: ActivationCheckpointingConfig,
    dump_folder: str,
) -> nn.Module:
    """Memory parallelism, activation checkpointing, per-block compile and FSDP2."""
    degree = parallelism.memory_parallel_degree
    if degree > 1:
        # First, so that checkpoint wrappers and compiled blocks see the sharded reads.
        mesh = build_memory_mesh(titan_utils.device_type, degree)
        compute_dtype = TORCH_DTYPE_MAP[training.mixed_precision_param]
        apply_memory_parallel(model, mesh, compute_dtype)
        logger.info(f"Column-sharded the memory values over {degree} ranks (mesh {mesh})")
    if ac_config is not None:
        ac_config.build(dump_folder=dump_folder).apply(model)
    if compile_config.enable and "model" in compile_config.components:
        apply_compile(model, compile_config=compile_config, parallel_dims=parallel_dims)
    apply_fsdp(model, parallel_dims, training, parallelism)
    return model
