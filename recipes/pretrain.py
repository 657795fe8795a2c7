"""Pretrain a memcompile model with torchtitan 0.3.0.

    python -m recipes.pretrain                      # small memory model, built-in corpus, CPU ok
    python -m recipes.pretrain --model mem_1b --training.steps 10000 --compile.enable
    torchrun --nproc_per_node 8 -m recipes.pretrain --model mem_1b
    python -m recipes.pretrain --help               # every flag

Every torchtitan flag is available as ``--section.key value``; ``--model`` picks a flavor of
``memcompile.flavors``. Without torchrun the process is a world of one (the rendezvous
variables are set here). CUDA runs use nccl, CPU runs gloo (see ``recipes/shims.py``).
Configuration errors (unknown model, bad flag, bad parallel degree, missing dataset path) are
reported before any model, data or process group is built.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import tyro

from memcompile.flavors import FLAVORS
from recipes import shims
from recipes.data.loader import CorpusDataLoader
from recipes.data.tokenizer import BUILTIN_TOKENIZER_DIR
from recipes.model import Float8Config, model_spec
from recipes.preflight import check_memory
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.config.manager import ConfigManager, custom_registry
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import init_logger, logger
from torchtitan.trainer import Trainer

DEFAULT_MODEL = "mem_debug"
ModelName = Literal[tuple(FLAVORS)]  # type: ignore[valid-type]
MEMORY_VALUES = "memory_values"
_CLIP_GRAD_NORM = dist_utils.clip_grad_norm_


class MemoryOptimizers(OptimizersContainer):
    """AdamW with the shared value table in its own group (own learning rate and weight decay).

    The reference code trains the values with a 10x larger learning rate: each value row is
    read by few tokens per step, so its gradient is sparse and small. Set
    ``param_groups`` explicitly to take full control instead.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        lr: float = 3e-3
        """Learning rate of every parameter but the memory values"""

        weight_decay: float = 0.1
        """AdamW weight decay of every parameter but the memory values"""

        betas: tuple[float, float] = (0.9, 0.95)
        eps: float = 1e-8

        memory_lr_multiplier: float = 10.0
        """Learning rate of the memory value table, as a multiple of lr"""

        memory_weight_decay: float = 0.0
        """AdamW weight decay of the memory value table"""

        memory_max_norm: float = 1.0
        """Gradient-norm clipping of the memory value table, applied separately from the
        other parameters (clipped to training.max_norm)"""

    def __init__(self, config: Config, *, model_parts: list[torch.nn.Module]) -> None:
        if not config.param_groups:
            config = replace(config, param_groups=self.default_param_groups(config, model_parts))
        super().__init__(config, model_parts=model_parts)

    @staticmethod
    def default_param_groups(config: Config, model_parts: list[torch.nn.Module]) -> list[ParamGroupConfig]:
        adamw = {"betas": config.betas, "eps": config.eps}
        groups = []
        if any(name == MEMORY_VALUES for part in model_parts for name, _ in part.named_parameters()):
            memory_kwargs = {
                "lr": config.lr * config.memory_lr_multiplier,
                "weight_decay": config.memory_weight_decay,
            }
            groups.append(ParamGroupConfig(pattern=f"^{MEMORY_VALUES}$", optimizer_name="AdamW",
                                           optimizer_kwargs={**adamw, **memory_kwargs}))
        groups.append(ParamGroupConfig(pattern=".*", optimizer_name="AdamW",
                                       optimizer_kwargs={**adamw, "lr": config.lr, "weight_decay": config.weight_decay}))
        return groups


class ProgressMetrics(MetricsProcessor):
    """torchtitan's metrics (console, TensorBoard, wandb) plus progress (step k/N, ETA) and,
    on rank 0, one exact JSON line per logged step in ``<dump_folder>/metrics.jsonl``
    (appended across restarts; the reliability tests compare these losses bitwise)."""

    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        pass

    total_steps: int = 0
    _first_log: tuple[int, float] | None = None

    def __init__(self, config: Config, *, dump_folder: str = "./outputs", **kwargs) -> None:
        super().__init__(config, dump_folder=dump_folder, **kwargs)
        self.jsonl_path = os.path.join(dump_folder, "metrics.jsonl")

    def log(self, step: int, global_avg_loss: float, global_max_loss: float, grad_norm: float,
            extra_metrics: dict[str, Any] | None = None) -> None:
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics)
        if torch.distributed.get_rank() == 0:
            os.makedirs(os.path.dirname(self.jsonl_path) or ".", exist_ok=True)
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": global_avg_loss, "grad_norm": grad_norm,
                                    **(extra_metrics or {})}) + "\n")
        now = time.perf_counter()
        if self._first_log is None:  # the first step includes compilation: time from here on
            self._first_log = (step, now)
            return
        first_step, first_time = self._first_log
        seconds_per_step = (now - first_time) / (step - first_step)
        eta = seconds_per_step * (self.total_steps - step)
        logger.info(
            f"progress: step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)  "
            f"loss {global_avg_loss:.4f}  {seconds_per_step:.2f}s/step  ETA {_clock(eta)}"
        )


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}:{seconds:02d}"


@dataclass(kw_only=True, slots=True)
class MemoryParallelismConfig(ParallelismConfig):
    memory_parallel_degree: int = 1
    """Ranks that share one column-sharded copy of the memory value table (Shard(1));
    must divide the world size and the value dim. 1: the table is handled by FSDP like any
    other parameter."""


class PretrainTrainer(Trainer):
    """torchtitan's Trainer, configured for memcompile models (see ``pretrain_config``)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        model: ModelName = DEFAULT_MODEL
        """memcompile flavor to train (see python -m memcompile.flavors)"""

        parallelism: MemoryParallelismConfig = field(default_factory=MemoryParallelismConfig)
        float8: Float8Config = field(default_factory=Float8Config)

        preflight_memory_check: bool = True
        """Before building anything, refuse a run whose estimated memory per rank exceeds what
        this rank's device has (see recipes/preflight.py)"""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.metrics_processor.total_steps = config.training.steps

    def train_step(self, data_iterator) -> None:
        # torchtitan clips all gradients as one vector, which fails across meshes (the
        # column-sharded table is not on FSDP's mesh) and would let the sparse, large-LR table
        # gradients steal the dense budget. Within this step, clipping is per group.
        dist_utils.clip_grad_norm_ = self._clip_grad_norm_per_group
        try:
            super().train_step(data_iterator)
        finally:
            dist_utils.clip_grad_norm_ = _CLIP_GRAD_NORM

    def _clip_grad_norm_per_group(self, parameters, max_norm: float, **kwargs) -> torch.Tensor:
        """Clip the memory table to ``optimizer.memory_max_norm`` and everything else to
        ``max_norm``; return the norm of all gradients together (for logging)."""
        parameters = list(parameters)
        memory = [p for p in parameters if p is getattr(self.model_parts[0], MEMORY_VALUES, None)]
        dense = [p for p in parameters if not any(p is m for m in memory)]
        norms = [_CLIP_GRAD_NORM(dense, max_norm, **kwargs)]
        if memory:
            norms.append(_CLIP_GRAD_NORM(memory, self.config.optimizer.memory_max_norm, **kwargs))
        return torch.stack([n.to(norms[0].device) for n in norms]).norm()

    def close(self) -> None:
        super().close()
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        config = self.config
        if config.metrics.enable_tensorboard:
            tb = os.path.abspath(os.path.join(config.dump_folder, config.metrics.save_tb_folder))
            logger.info(f"TensorBoard logs: {tb}   (tensorboard --logdir {tb})")
        if config.checkpoint.enable:
            ckpt = os.path.abspath(os.path.join(config.dump_folder, config.checkpoint.folder))
            logger.info(f"Checkpoints: {ckpt}   (rerun the same command to resume from the latest)")


def pretrain_config(model: str = DEFAULT_MODEL) -> PretrainTrainer.Config:
    """The defaults: small enough to train ``mem_debug`` on 2 CPU cores in a few minutes,
    with the settings that a GPU run wants (compile, bf16 FSDP params, selective AC) on CUDA."""
    on_cpu = shims.running_on_cpu()
    spec = model_spec(model)
    return PretrainTrainer.Config(
        model=model,
        model_spec=spec,
        hf_assets_path=str(BUILTIN_TOKENIZER_DIR),
        dump_folder=os.path.join("outputs", model),
        tokenizer=Trainer.Config().tokenizer,
        dataloader=CorpusDataLoader.Config(),
        loss=CrossEntropyLoss.Config(),
        optimizer=MemoryOptimizers.Config(implementation="foreach"),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=20, decay_ratio=0.8, decay_type="cosine",
                                                  min_lr_factor=0.1),
        training=TrainingConfig(
            local_batch_size=8,
            seq_len=256,
            steps=200,
            # bf16 matmuls are slow on most CPUs, and fp32 keeps CPU resumes bitwise exact.
            mixed_precision_param="float32" if on_cpu else "bfloat16",
            disable_cuda_graphs=True,
        ),
        metrics=ProgressMetrics.Config(log_freq=10, enable_tensorboard=True),
        # The memory path uses DTensor only for the value table (partial_dtensor); the
        # spmd_types backend also fails with FSDP > 1 on torch 2.13.
        parallelism=MemoryParallelismConfig(spmd_backend="partial_dtensor"),
        checkpoint=CheckpointManager.Config(enable=True, interval=50, last_save_model_only=False,
                                            keep_latest_k=2),
        # Compilation and recomputation cost more than they save for small CPU models.
        activation_checkpoint=None if on_cpu else Trainer.Config().activation_checkpoint,
        compile=CompileConfig(enable=not on_cpu, components=["model"]),
    )


def _model_from_argv(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return DEFAULT_MODEL


def validate(config: PretrainTrainer.Config, world_size: int) -> None:
    """Reject configurations this recipe cannot run, before any work starts."""
    parallelism = config.parallelism
    unsupported = {
        "tensor_parallel_degree": parallelism.tensor_parallel_degree,
        "pipeline_parallel_degree": parallelism.pipeline_parallel_degree,
        "context_parallel_degree": parallelism.context_parallel_degree,
        "expert_parallel_degree": parallelism.expert_parallel_degree,
    }
    for name, degree in unsupported.items():
        if degree != 1:
            raise ValueError(f"--parallelism.{name} {degree}: memcompile models support data "
                             f"parallelism (FSDP/HSDP) and memory parallelism only")
    if parallelism.spmd_backend != "partial_dtensor":
        raise ValueError(f"--parallelism.spmd_backend {parallelism.spmd_backend}: only "
                         f"'partial_dtensor' is supported (spmd_types fails with FSDP > 1 on torch "
                         f"{torch.__version__}; full_dtensor logs a wrong loss)")
    degree = parallelism.memory_parallel_degree
    transformer = config.model_spec.model.transformer
    if degree < 1 or world_size % degree:
        raise ValueError(f"--parallelism.memory_parallel_degree {degree} must be >= 1 and divide "
                         f"the world size {world_size}")
    if degree > 1:
        if transformer.memory is None:
            raise ValueError(f"--parallelism.memory_parallel_degree {degree}: model {config.model!r} "
                             f"has no memory layers")
        if transformer.memory.value_dim % degree:
            raise ValueError(f"--parallelism.memory_parallel_degree {degree} must divide the value "
                             f"dim {transformer.memory.value_dim} of {config.model!r}")
    config.float8.check_supported(compile_enabled=config.compile.enable and "model" in config.compile.components)
    if not os.path.isdir(config.hf_assets_path):
        raise FileNotFoundError(f"--hf_assets_path {config.hf_assets_path!r} is not a directory "
                                f"(expected tokenizer.json and tokenizer_config.json)")
    if config.checkpoint.initial_load_path and not os.path.isabs(config.checkpoint.initial_load_path):
        raise ValueError(f"--checkpoint.initial_load_path must be absolute, got "
                         f"{config.checkpoint.initial_load_path!r}")


def parse_args(argv: list[str]) -> PretrainTrainer.Config:
    """The run's config: the defaults of ``--model``'s flavor overridden by every flag."""
    model = _model_from_argv(argv)
    if model not in FLAVORS:
        raise SystemExit(f"error: unknown model {model!r}; choose one of: {', '.join(FLAVORS)}")
    ConfigManager.register_tyro_rules(custom_registry)
    return tyro.cli(PretrainTrainer.Config, args=argv, default=pretrain_config(model),
                    registry=custom_registry, description=__doc__)


def _set_single_process_env() -> None:
    """Without torchrun, run as rank 0 of a world of one on a free local port."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    init_logger()
    try:
        config = parse_args(argv)
        validate(config, int(os.environ.get("WORLD_SIZE", "1")))
        if config.preflight_memory_check:
            check_memory(config, int(os.environ.get("WORLD_SIZE", "1")))
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    _set_single_process_env()
    shims.apply()

    trainer = config.build()
    try:
        if config.checkpoint.create_seed_checkpoint:
            # As torchtitan's train.py: step-0 weights, for identical starts at any parallelism.
            if int(os.environ["WORLD_SIZE"]) != 1 or not config.checkpoint.enable:
                raise SystemExit("error: --checkpoint.create_seed_checkpoint needs a single process "
                                 "and checkpointing enabled")
            trainer.checkpointer.save(curr_step=0, last_step=True)
            logger.info(f"Created a seed checkpoint in {config.dump_folder}")
        else:
            trainer.train()
    finally:
        trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
