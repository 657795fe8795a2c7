"""The memcompile Transformer as a torchtitan model: model config, model spec and parallelize_fn.

``TitanTransformer`` *is* a ``memcompile.model.Transformer`` (same modules, same parameter names,
so checkpoints load into plain memcompile models) that also satisfies torchtitan's ``BaseModel``
protocol: a nested ``Config`` whose ``build()`` constructs it, ``init_states`` for meta-device
initialisation, and parameter/FLOP counts for the metrics.

Parallelism (``parallelize_memory_transformer``): activation checkpointing of the dense blocks,
``torch.compile`` of every block, then FSDP2 per block, on ``[norm, output]`` and on the root.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from memcompile.config import TransformerConfig
from memcompile.flavors import FLAVORS
from memcompile.model import Transformer
from memcompile.stats import model_stats
from recipes import shims
from recipes.memory_parallel import build_memory_mesh, shard_memory_values
from torchtitan.config import TORCH_DTYPE_MAP, CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import ActivationCheckpointingConfig
from torchtitan.distributed.fsdp import disable_fsdp_gradient_division, get_fsdp_reshard_after_forward_policy
from torchtitan.protocols.model import BaseModel
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.tools import utils as titan_utils
from torchtitan.tools.utils import has_cuda_capability, has_rocm_capability
from torchtitan.tools.logging import logger


@dataclass(kw_only=True, slots=True)
class Float8Config:
    """float8 training of the dense linears through torchao (the same recipes as torchtitan's
    ``Float8LinearConverter``, applied to memcompile's ``nn.Linear`` modules)."""

    enable: bool = False
    """Train the dense linears in float8 (NVIDIA SM89+ / AMD MI300+, or emulate)"""

    recipe_name: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] = "rowwise"
    """torchao float8 recipe"""

    filter_fqns: list[str] = field(default_factory=list)
    """Modules whose name contains any of these stay in high precision"""

    include_memory_layers: bool = False
    """Also convert the memory layers' linears (query, W1, W2). Off by default: their
    outputs feed the top-k key search and the value gate, which are precision-sensitive"""

    emulate: bool = False
    """Emulate float8 with fp32 matmuls (any device, eager only; for tests)"""

    def check_supported(self, compile_enabled: bool) -> None:
        if not self.enable:
            return
        if self.emulate:
            if compile_enabled:
                raise ValueError("--float8.emulate is eager only: add --compile.no-enable")
        elif not (has_cuda_capability(8, 9) or has_rocm_capability(9, 4)):
            raise ValueError("--float8.enable needs an NVIDIA SM89+ or AMD MI300+ GPU "
                             "(or --float8.emulate for testing)")

    def convert(self, model: nn.Module, memory_modules: set[str]) -> None:
        """Swap eligible ``nn.Linear`` modules for torchao ``Float8Linear`` in place."""
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = (Float8LinearConfig(emulate=True) if self.emulate
                  else Float8LinearConfig.from_recipe_name(self.recipe_name))

        def eligible(module: nn.Module, fqn: str) -> bool:
            if not isinstance(module, nn.Linear):
                return False
            # float8 GEMMs need every dim divisible by 16.
            if module.in_features % 16 or module.out_features % 16:
                return False
            if not self.include_memory_layers and any(fqn.startswith(m + ".") for m in memory_modules):
                return False
            return not any(f in fqn for f in self.filter_fqns)

        convert_to_float8_training(model, module_filter_fn=eligible, config=config)
        logger.info(f"float8 ({'emulated' if self.emulate else self.recipe_name}) for the dense linears")


class TitanTransformer(Transformer, BaseModel):
    """A ``memcompile.model.Transformer`` that torchtitan's Trainer can build and initialise."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseModel.Config):
        transformer: TransformerConfig
        """The memcompile architecture (a flavor from ``memcompile.flavors``)"""

        float8: Float8Config = field(default_factory=Float8Config)

        def update_from_config(self, *, config: Any, **kwargs) -> None:
            """Fit the architecture to the run: the tokenizer's vocabulary (the flavors assume
            the Llama tokenizers; the built-in corpus uses a 2K BPE) and RoPE tables long enough
            for ``training.seq_len``."""
            from torchtitan.components.tokenizer import HuggingFaceTokenizer

            self.float8 = config.float8
            vocab_size = HuggingFaceTokenizer(tokenizer_path=config.hf_assets_path).get_vocab_size()
            self.transformer = replace(
                self.transformer,
                vocab_size=vocab_size,
                max_seq_len=max(self.transformer.max_seq_len, config.training.seq_len),
            )

        def get_nparams_and_flops(self, model: torch.nn.Module, seq_len: int) -> tuple[int, int]:
            stats = model_stats(self.transformer, seq_len)
            return stats.total_params, stats.train_flops_per_token

    def __init__(self, config: Config) -> None:
        Transformer.__init__(self, config.transformer)
        if config.float8.enable:
            memory_modules = {f"layers.{i}.feed_forward" for i, block in self.layers.items() if block.is_memory_block}
            config.float8.convert(self, memory_modules)

    def init_states(self, *, buffer_device: torch.device | None = None) -> None:
        # memcompile initialises every parameter and buffer in one place (paper/reference init).
        Transformer.init_weights(self)

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        Transformer.init_weights(self)

    def verify_module_protocol(self) -> None:
        """memcompile layers are plain ``nn.Module``s by design (readable outside torchtitan);
        torchtitan's per-module protocol (param_init dicts, sharding configs) is not used here:
        ``init_states`` and ``parallelize_memory_transformer`` cover the whole model."""


def parallelize_memory_transformer(
    model: TitanTransformer,
    *,
    parallel_dims: ParallelDims,
    training: TrainingConfig,
    parallelism: ParallelismConfig,
    compile_config: CompileConfig,
    ac_config: ActivationCheckpointingConfig,
    dump_folder: str,
) -> TitanTransformer:
    """Memory parallelism, activation checkpointing, per-block compile and FSDP2, in that order."""
    param_dtype = TORCH_DTYPE_MAP[training.mixed_precision_param]
    memory_degree = getattr(parallelism, "memory_parallel_degree", 1)
    if memory_degree > 1:
        # First, so that checkpoint wrappers and compiled blocks see the routed lookups.
        mesh = build_memory_mesh(titan_utils.device_type, memory_degree)
        shard_memory_values(model, mesh, compute_dtype=param_dtype)
        logger.info(f"Column-sharded the memory values over {memory_degree} ranks (mesh {mesh})")

    if ac_config is not None:
        policy = ac_config.build(dump_folder=dump_folder)
        for layer_id, block in model.layers.named_children():
            # On torch 2.13, torch.compile + activation checkpointing of a block that reads a
            # DTensor parameter (the column-sharded value table) fails in AOTAutograd ("expected
            # all tensors_saved_with_vc_check to be Tensors ... DeviceMesh"); memory blocks are
            # also the cheapest to keep (their activations are [tokens, dim], the table is not
            # an activation). So only dense blocks are checkpointed.
            if block.is_memory_block:
                continue
            model.layers.register_module(layer_id, policy._wrap_block(block, base_fqn=f"layers.{layer_id}"))
        logger.info(f"Applied {type(policy).__name__} activation checkpointing to the dense blocks")

    if compile_config.enable and "model" in compile_config.components:
        for block in model.layers.values():
            # FSDP's hooks cannot run inside a fullgraph region: compile exactly what FSDP wraps,
            # except torch.nn built-ins (norms): dynamo skips their frames when they are the
            # top-level compiled module ("found no compiled frames"); they run eagerly.
            for module in _fsdp_units(block, memory_degree):
                if not type(module).__module__.startswith("torch.nn."):
                    module.compile(backend=compile_config.backend, fullgraph=True)
        logger.info("Compiling each transformer block with torch.compile")

    names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
    fsdp_config: dict[str, Any] = {
        "mesh": parallel_dims.get_mesh(names),
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=param_dtype,
            reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
            cast_forward_inputs=False,
        ),
    }
    reshard_after_forward = get_fsdp_reshard_after_forward_policy(
        parallelism.fsdp_reshard_after_forward, pp_enabled=False
    )
    fully_shard(model.tok_embeddings, **fsdp_config, reshard_after_forward=reshard_after_forward)
    for block in model.layers.values():
        fully_shard(_fsdp_units(block, memory_degree), **fsdp_config, reshard_after_forward=reshard_after_forward)
    # The last layers are not resharded after forward: backward needs them first.
    fully_shard([model.norm, model.output], **fsdp_config, reshard_after_forward=False)
    # A column-sharded table stays out of FSDP: all-gathering it would defeat the sharding.
    ignored = {model.memory_values} if memory_degree > 1 else None
    fully_shard(model, **fsdp_config, ignored_params=ignored)
    disable_fsdp_gradient_division(model)
    shims.allow_fsdp_on_gloo(model)
    return model


def _fsdp_units(block: nn.Module, memory_degree: int) -> list[nn.Module]:
    """The modules of a block that form its FSDP unit (one all-gather per block either way).

    Every block is called with the value table, and FSDP passes a unit's tensor inputs through
    an autograd function; a block that does not read a column-sharded (DTensor) table then gets
    a materialised *plain* zero gradient for it, which cannot be added to the DTensor gradients.
    So with a sharded table the unit is the block's children, whose inputs include the table
    only where it is read. Activation-checkpoint wrappers are looked through.
    """
    if memory_degree == 1:
        return [block]
    inner = getattr(block, "_checkpoint_wrapped_module", block)
    return list(inner.children())


def model_spec(name: str) -> ModelSpec:
    """The torchtitan model spec of the memcompile flavor ``name``."""
    if name not in FLAVORS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(FLAVORS)}")
    return ModelSpec(
        name="memcompile",
        flavor=name,
        model=TitanTransformer.Config(transformer=FLAVORS[name]),
        parallelize_fn=parallelize_memory_transformer,
        pipelining_fn=None,
        post_optimizer_build_fn=None,
        state_dict_adapter=None,
    )
