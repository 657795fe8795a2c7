"""The memcompile Transformer as a torchtitan model: its model config and model spec.

``TitanTransformer`` *is* a ``memcompile.model.Transformer`` (same modules, same parameter names,
so checkpoints load into plain memcompile models) that also satisfies torchtitan's ``BaseModel``
protocol: a nested ``Config`` whose ``build()`` constructs it, ``init_states`` for meta-device
initialisation, and parameter/FLOP counts for the metrics. Its parallelize function is in
``recipes/parallelize.py``. ``FinetuneTransformer`` is the same model for ``recipes.finetune``:
initialised from a pretrained checkpoint, with only what the finetuning method trains trainable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor
from torchtitan.protocols.model import BaseModel
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.tools.logging import logger
from torchtitan.tools.utils import has_cuda_capability, has_rocm_capability

from memcompile.config import TransformerConfig
from memcompile.flavors import fit_to_run, get_flavor
from memcompile.model import Transformer
from memcompile.optim import MEMORY_VALUES
from memcompile.stats import model_stats
from recipes.parallelize import parallelize_memory_transformer


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
            raise ValueError(
                "--float8.enable needs an NVIDIA SM89+ or AMD MI300+ GPU "
                "(or --float8.emulate for testing)"
            )

    def convert(self, model: nn.Module, memory_modules: set[str]) -> None:
        """Swap eligible ``nn.Linear`` modules for torchao ``Float8Linear`` in place."""
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = (
            Float8LinearConfig(emulate=True)
            if self.emulate
            else Float8LinearConfig.from_recipe_name(self.recipe_name)
        )

        def eligible(module: nn.Module, fqn: str) -> bool:
            if not isinstance(module, nn.Linear):
                return False
            # float8 GEMMs need every dim divisible by 16.
            if module.in_features % 16 or module.out_features % 16:
                return False
            if not self.include_memory_layers and any(
                fqn.startswith(m + ".") for m in memory_modules
            ):
                return False
            return not any(f in fqn for f in self.filter_fqns)

        convert_to_float8_training(model, module_filter_fn=eligible, config=config)
        logger.info(
            f"float8 ({'emulated' if self.emulate else self.recipe_name}) for the dense linears"
        )


class TitanTransformer(Transformer, BaseModel):
    """A ``memcompile.model.Transformer`` that torchtitan's Trainer can build and initialise."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseModel.Config):
        transformer: TransformerConfig
        """The memcompile architecture (a flavor from ``memcompile.flavors``)"""

        float8: Float8Config = field(default_factory=Float8Config)

        def update_from_config(self, *, config: Any, **kwargs) -> None:
            """Fit the architecture to the run (``memcompile.flavors.fit_to_run``): the
            tokenizer's vocabulary (the flavors assume the Llama tokenizers; the built-in
            corpus uses a 2K BPE) and RoPE tables long enough for ``training.seq_len``."""
            from torchtitan.components.tokenizer import HuggingFaceTokenizer

            self.float8 = config.float8
            vocab_size = HuggingFaceTokenizer(tokenizer_path=config.hf_assets_path).get_vocab_size()
            self.transformer = fit_to_run(
                self.transformer, vocab_size=vocab_size, seq_len=config.training.seq_len
            )

        def get_nparams_and_flops(self, model: torch.nn.Module, seq_len: int) -> tuple[int, int]:
            stats = model_stats(self.transformer, seq_len)
            return stats.total_params, stats.train_flops_per_token

    def __init__(self, config: Config) -> None:
        Transformer.__init__(self, config.transformer)
        if config.float8.enable:
            memory_modules = {
                f"layers.{i}.feed_forward"
                for i, block in self.layers.items()
                if block.is_memory_block
            }
            config.float8.convert(self, memory_modules)

    def init_states(self, *, buffer_device: torch.device | None = None) -> None:
        # memcompile initialises every parameter and buffer in one place (paper/reference init).
        self.init_weights()

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        if not any(_is_cpu_dtensor(p) for p in self.parameters()):
            Transformer.init_weights(self)
            return
        # DTensor's random ops keep shards apart with an RNG tracker that does not run on CPU
        # meshes: there every rank draws its shard from the same seeded stream, so the shards
        # of a parameter would be copies of each other. Initialise an unsharded copy instead
        # (drawing what one process draws) and keep each rank's shard of it.
        with torch.device("meta"):
            full = Transformer(self.config)
        full.to_empty(device="cpu")
        full.init_weights()
        with torch.random.fork_rng(devices=[]):
            Transformer.init_weights(self)  # the buffers; the parameters are replaced below
        set_model_state_dict(
            self, full.state_dict(), options=StateDictOptions(full_state_dict=True)
        )

    def verify_module_protocol(self) -> None:
        """memcompile layers are plain ``nn.Module``s by design (readable outside torchtitan);
        torchtitan's per-module protocol (param_init dicts, sharding configs) is not used here:
        ``init_states`` and ``parallelize_memory_transformer`` cover the whole model."""


class FinetuneTransformer(TitanTransformer):
    """A ``TitanTransformer`` that starts from a pretrained checkpoint, with only what the
    finetuning method trains left trainable (``recipes.finetune``):

    - ``full``: every parameter;
    - ``sparse_memory``: the value table alone (its rows are then picked per step by the
      optimizer, ``recipes.finetune_trainer``); every other parameter is frozen;
    - ``lora``: LoRA adapters (peft) on the linears ``lora_targets`` matches; the rest frozen.

    The pretrained weights are its initialisation (``init_states``), so torchtitan's checkpointer
    still resumes the finetuning itself from the run's own checkpoints.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(TitanTransformer.Config):
        finetune: Any = None
        """The run's ``--finetune`` section (``FinetuneConfig``), set from the job config"""

        def update_from_config(self, *, config: Any, **kwargs) -> None:
            TitanTransformer.Config.update_from_config(self, config=config, **kwargs)
            self.finetune = config.finetune

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.finetune = config.finetune
        if self.finetune.method == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(
                r=self.finetune.lora_rank,
                lora_alpha=self.finetune.lora_alpha,
                lora_dropout=self.finetune.lora_dropout,
                target_modules=self.finetune.lora_targets,
            )
            inject_adapter_in_model(lora, self)  # also freezes every other parameter
        elif self.finetune.method == "sparse_memory":
            for name, parameter in self.named_parameters():
                parameter.requires_grad_(name == MEMORY_VALUES)

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        # The buffers; the parameters are the checkpoint's (loaded below), but the adapters'.
        Transformer.init_weights(self)
        if "finetune" not in self.__dict__:  # Transformer.__init__'s call, on the meta device
            return
        for module in self.modules():  # LoRA: A random, B zero (the adapted model starts equal)
            if isinstance(module, _lora_layer_type()):
                module.reset_lora_parameters("default", init_lora_weights=True)
        load_pretrained(self, self.finetune.checkpoint)


def _lora_layer_type() -> type:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no LoRA without peft, so no LoRA layers either
        return type(None)
    return LoraLayer


def pretrained_name(name: str) -> str:
    """The name a parameter of a (possibly LoRA-adapted, checkpoint-wrapped or compiled) model
    has in a pretraining checkpoint."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name.replace(".base_layer.", ".")


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def load_pretrained(model: nn.Module, checkpoint: str) -> None:
    """Load the weights of a ``recipes.pretrain`` DCP checkpoint (a ``step-N`` folder) into
    ``model`` in place, sharded or not (DCP reshards); LoRA adapters keep their values."""
    import torch.distributed.checkpoint as dcp

    # state_dict() tensors share the parameters' storage (local shards for FSDP's DTensors).
    state = model.state_dict()
    pretrained = {pretrained_name(k): v for k, v in state.items() if not is_adapter(k)}
    dcp.load(pretrained, checkpoint_id=checkpoint)
    logger.info(f"Initialised from the pretrained checkpoint {checkpoint}")


def _is_cpu_dtensor(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor) and tensor.device_mesh.device_type == "cpu"


def model_spec(name: str, model: type[TitanTransformer] = TitanTransformer) -> ModelSpec:
    """The torchtitan model spec of the memcompile flavor ``name`` (``model``: pretraining's
    ``TitanTransformer`` or finetuning's ``FinetuneTransformer``)."""
    return ModelSpec(
        name="memcompile",
        flavor=name,
        model=model.Config(transformer=get_flavor(name)),
        parallelize_fn=parallelize_memory_transformer,
        pipelining_fn=None,
        post_optimizer_build_fn=None,
        state_dict_adapter=None,
    )
