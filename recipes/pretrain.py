"""Pretrain a memcompile model with torchtitan 0.3.0.

    python -m recipes.pretrain                      # small memory model, built-in corpus, CPU ok
    python -m recipes.pretrain --model mem_1b --training.steps 10000 --compile.enable
    torchrun --nproc_per_node 8 -m recipes.pretrain --model mem_1b
    python -m recipes.pretrain --config smoke       # a run configuration of config_registry.py
    python -m recipes.pretrain --help               # every flag

The run's config is a function of ``recipes/config_registry.py`` (``--config``, default
``default``), read by torchtitan's ``ConfigManager``; every torchtitan flag then overrides it as
``--section.key value``, and ``--model`` picks a flavor of ``memcompile.flavors``. Without
torchrun the process is a world of one (the rendezvous variables are set here). CUDA runs use
nccl, CPU runs gloo (see ``recipes/shims.py``). Configuration errors (unknown model, bad flag,
bad parallel degree, missing dataset path, a run that cannot fit in memory) are reported before
any model, data or process group is built, as one line ``error: ...``; a flag's value out of
range or one this recipe cannot run exits with code 2 (see ``recipes/cli.py``), the others with 1.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

import torch
from torchtitan.config.manager import ConfigManager
from torchtitan.tools.logging import init_logger, logger

from memcompile.cli import (
    UsageError,
    check_at_least,
    check_finite,
    check_fraction,
    check_positive,
    check_seed,
    reported_errors,
)
from recipes import shims
from recipes.preflight import check_memory
from recipes.trainer import PretrainTrainer


def check_values(config: PretrainTrainer.Config, world_size: int) -> None:
    """Every number of the run in its range (a :class:`memcompile.cli.UsageError` names the flag);
    torchtitan checks ``--checkpoint.interval`` and ``--checkpoint.keep_latest_k`` itself."""
    training, optimizer, schedule = config.training, config.optimizer, config.lr_scheduler
    for flag, value in (
        ("--training.steps", training.steps),
        ("--training.local_batch_size", training.local_batch_size),
        ("--training.seq_len", training.seq_len),
        ("--training.gc_freq", training.gc_freq),
        ("--metrics.log_freq", config.metrics.log_freq),
        ("--lr_scheduler.total_steps", schedule.total_steps),
        ("--dataloader.max_documents", config.dataloader.max_documents),
        ("--dataloader.prefetch_factor", config.dataloader.prefetch_factor),
        (
            "--parallelism.data_parallel_replicate_degree",
            config.parallelism.data_parallel_replicate_degree,
        ),
        ("--validator.freq", config.validator.freq),
        ("--profiler.profile_freq", config.profiler.profile_freq),
        ("--comm.init_timeout_seconds", config.comm.init_timeout_seconds),
        ("--comm.train_timeout_seconds", config.comm.train_timeout_seconds),
    ):
        check_at_least(flag, value, 1)
    check_at_least("--lr_scheduler.warmup_steps", schedule.warmup_steps, 0)
    check_at_least("--dataloader.num_workers", config.dataloader.num_workers, 0)
    check_at_least("--checkpoint.load_step", config.checkpoint.load_step, -1)
    for flag, value in (
        ("--optimizer.lr", optimizer.lr),
        ("--optimizer.weight_decay", optimizer.weight_decay),
        ("--optimizer.eps", optimizer.eps),
        ("--optimizer.memory_lr_multiplier", optimizer.memory_lr_multiplier),
        ("--optimizer.memory_weight_decay", optimizer.memory_weight_decay),
    ):
        check_finite(flag, value, minimum=0)
    for beta in optimizer.betas:
        check_fraction("--optimizer.betas", beta, below_one=True)
    # A norm of 0 would zero every gradient, a negative one flip it; inf turns clipping off.
    check_positive("--training.max_norm", training.max_norm)
    check_positive("--optimizer.memory_max_norm", optimizer.memory_max_norm)
    check_fraction("--lr_scheduler.decay_ratio", schedule.decay_ratio)
    check_fraction("--lr_scheduler.min_lr_factor", schedule.min_lr_factor)
    if config.debug.seed is not None:
        check_seed("--debug.seed", config.debug.seed)
    _check_batch_sizes(config, world_size)


def _check_batch_sizes(config: PretrainTrainer.Config, world_size: int) -> None:
    """As torchtitan's trainer (which asserts it after building everything): the global batch
    is a whole number of local batches on every data-parallel rank (gradient accumulation)."""
    parallelism, training = config.parallelism, config.training
    shard = parallelism.data_parallel_shard_degree
    if shard != -1:
        check_at_least("--parallelism.data_parallel_shard_degree (or -1)", shard, 1)
    replicate = parallelism.data_parallel_replicate_degree
    data_parallel = world_size if shard == -1 else replicate * shard
    if data_parallel != world_size or world_size % replicate:
        raise UsageError(
            f"--parallelism.data_parallel_replicate_degree {replicate} x "
            f"--parallelism.data_parallel_shard_degree {shard} must be the world size "
            f"{world_size}"
        )
    per_step = training.local_batch_size * data_parallel
    if training.global_batch_size != -1 and (
        training.global_batch_size < 1 or training.global_batch_size % per_step
    ):
        raise UsageError(
            f"--training.global_batch_size must be -1 (one local batch per rank) or a multiple "
            f"of --training.local_batch_size x data-parallel ranks = {per_step}, got "
            f"{training.global_batch_size}"
        )


def validate(config: PretrainTrainer.Config, world_size: int) -> None:
    """Reject configurations this recipe cannot run, before any work starts."""
    check_values(config, world_size)
    parallelism = config.parallelism
    unsupported = {
        "tensor_parallel_degree": parallelism.tensor_parallel_degree,
        "pipeline_parallel_degree": parallelism.pipeline_parallel_degree,
        "context_parallel_degree": parallelism.context_parallel_degree,
        "expert_parallel_degree": parallelism.expert_parallel_degree,
    }
    for name, degree in unsupported.items():
        if degree != 1:
            raise UsageError(
                f"--parallelism.{name} {degree}: memcompile models support data "
                f"parallelism (FSDP/HSDP) and memory parallelism only"
            )
    if parallelism.spmd_backend != "partial_dtensor":
        raise UsageError(
            f"--parallelism.spmd_backend {parallelism.spmd_backend}: only "
            f"'partial_dtensor' is supported (spmd_types fails with FSDP > 1 on torch "
            f"{torch.__version__}; full_dtensor logs a wrong loss)"
        )
    degree = parallelism.memory_parallel_degree
    transformer = config.model_spec.model.transformer
    if degree < 1 or world_size % degree:
        raise UsageError(
            f"--parallelism.memory_parallel_degree {degree} must be >= 1 and divide "
            f"the world size {world_size}"
        )
    if degree > 1:
        if transformer.table_shape is None:
            raise UsageError(
                f"--parallelism.memory_parallel_degree {degree}: model {config.model!r} "
                f"has no memory layers"
            )
        if transformer.table_shape[1] % degree:
            raise UsageError(
                f"--parallelism.memory_parallel_degree {degree} must divide the value "
                f"dim {transformer.table_shape[1]} of {config.model!r}"
            )
    table_optimizer = config.optimizer.memory_optimizer
    if table_optimizer != "adamw":
        if transformer.table_shape is None:
            raise UsageError(
                f"--optimizer.memory_optimizer {table_optimizer}: model {config.model!r} has no "
                "memory layers"
            )
        if world_size > 1 and degree == 1:
            raise UsageError(
                f"--optimizer.memory_optimizer {table_optimizer} (row-sparse) on {world_size} "
                "ranks needs the table out of FSDP, which shards its rows: add "
                "--parallelism.memory_parallel_degree G (G > 1 divides the world size)"
            )
    config.float8.check_supported(
        compile_enabled=config.compile.enable and "model" in config.compile.components
    )
    if not os.path.isdir(config.hf_assets_path):
        raise FileNotFoundError(
            f"--hf_assets_path {config.hf_assets_path!r} is not a directory "
            f"(expected tokenizer.json and tokenizer_config.json)"
        )
    if config.checkpoint.initial_load_path and not os.path.isabs(
        config.checkpoint.initial_load_path
    ):
        raise UsageError(
            f"--checkpoint.initial_load_path must be absolute, got "
            f"{config.checkpoint.initial_load_path!r}"
        )


def parse_args(argv: list[str]) -> PretrainTrainer.Config:
    """The run's config: a ``recipes/config_registry.py`` function (``--config``, default
    ``default``) overridden by every other flag."""
    # torchtitan's ConfigManager takes the last --module/--config given: the user's win.
    return ConfigManager().parse_args(["--module", "recipes", "--config", "default", *argv])


def _set_single_process_env() -> None:
    """Without torchrun, run as rank 0 of a world of one on a free local port."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def main(argv: list[str] | None = None) -> None:
    run(parse_args, validate, argv)


def run(
    parse: Callable[[list[str]], PretrainTrainer.Config],
    check: Callable[[PretrainTrainer.Config, int], None],
    argv: list[str] | None = None,
) -> None:
    """Parse and check the config (errors before any work), then build the trainer and train;
    the body of ``recipes.pretrain`` and ``recipes.finetune``."""
    argv = sys.argv[1:] if argv is None else argv
    init_logger()
    shims.apply()  # first: building the config already logs (see shims._quiet_run_log)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    with reported_errors(ValueError, FileNotFoundError):
        config = parse(argv)
        check(config, world_size)
        if config.preflight_memory_check:
            check_memory(config, world_size)
    _set_single_process_env()

    trainer = config.build()
    try:
        if config.checkpoint.create_seed_checkpoint:
            # As torchtitan's train.py: step-0 weights, for identical starts at any parallelism.
            if int(os.environ["WORLD_SIZE"]) != 1 or not config.checkpoint.enable:
                raise SystemExit(
                    "error: --checkpoint.create_seed_checkpoint needs a single process "
                    "and checkpointing enabled"
                )
            trainer.checkpointer.save(curr_step=0, last_step=True)
            logger.info(f"Created a seed checkpoint in {trainer.config.dump_folder}")
        else:
            trainer.train()
    finally:
        trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
