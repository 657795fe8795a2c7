"""Run configurations of ``recipes.pretrain``, read by torchtitan's ``ConfigManager``.

    python -m recipes.pretrain                          # --config default
    python -m recipes.pretrain --config smoke           # seconds, for a quick check
    python -m recipes.pretrain --config default --model mem_1b --training.steps 10000

Each function returns a ``PretrainTrainer.Config``; every flag then overrides it. A config
picks a flavor with ``model``; ``{model}`` in ``dump_folder`` is replaced by it. Every config
here is seeded (``--debug.seed 0``: a rerun on the same machine gives the same losses);
``--debug.seed None`` makes a run unseeded.
"""

from __future__ import annotations

import dataclasses

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.components.optimizer import LRSchedulersContainer
from torchtitan.config import CompileConfig, DebugConfig, TrainingConfig
from torchtitan.trainer import Trainer

from recipes import shims
from recipes.data.knowledge import KnowledgeCorpus
from recipes.data.loader import CorpusDataLoader
from recipes.data.tokenizer import BUILTIN_TOKENIZER_DIR
from recipes.finetune_trainer import FinetuneConfig, FinetuneOptimizers, FinetuneTrainer
from recipes.memory_parallel import MemoryParallelismConfig
from recipes.parallelize import SelectiveAC
from recipes.trainer import DEFAULT_MODEL, MemoryOptimizers, PretrainTrainer, ProgressMetrics


def default() -> PretrainTrainer.Config:
    """``mem_debug`` on the built-in knowledge corpus (100 people): about two minutes on 2 CPU
    cores, after which the model recalls most of its trained facts (and, from biographies
    alone, many held-out ones). On CUDA with the settings a GPU run wants (compile, bf16 FSDP
    params, selective AC)."""
    on_cpu = shims.running_on_cpu()
    return PretrainTrainer.Config(
        model=DEFAULT_MODEL,
        hf_assets_path=str(BUILTIN_TOKENIZER_DIR),
        dump_folder="outputs/{model}",
        tokenizer=Trainer.Config().tokenizer,
        dataloader=CorpusDataLoader.Config(),
        loss=CrossEntropyLoss.Config(),
        # 1e-2 (value table: 10x): a small model memorising a small corpus in 400 steps.
        # Fused AdamW (torchtitan's default, on CPU too since torch 2.4): a whole-table step is
        # several times faster than foreach on a large value table.
        optimizer=MemoryOptimizers.Config(lr=1e-2),
        lr_scheduler=LRSchedulersContainer.Config(
            warmup_steps=20, decay_ratio=0.8, decay_type="cosine", min_lr_factor=0.1
        ),
        training=TrainingConfig(
            local_batch_size=8,
            seq_len=256,
            steps=400,
            # bf16 matmuls are slow on most CPUs, and fp32 keeps CPU resumes bitwise exact.
            mixed_precision_param="float32" if on_cpu else "bfloat16",
            disable_cuda_graphs=True,
        ),
        metrics=ProgressMetrics.Config(log_freq=10, enable_tensorboard=True),
        # The memory path uses DTensor only for the value table (partial_dtensor); the
        # spmd_types backend also fails with FSDP > 1 on torch 2.13.
        parallelism=MemoryParallelismConfig(spmd_backend="partial_dtensor"),
        checkpoint=CheckpointManager.Config(
            enable=True, interval=100, last_save_model_only=False, keep_latest_k=2
        ),
        # Compilation and recomputation cost more than they save for small CPU models.
        activation_checkpoint=None if on_cpu else SelectiveAC.Config(),
        compile=CompileConfig(enable=not on_cpu, components=["model"]),
        # Seeded, so that the README's numbers come back run after run (--debug.seed None: not).
        debug=DebugConfig(seed=0),
    )


def smoke() -> PretrainTrainer.Config:
    """``default`` shrunk to seconds: 40 people, 8 steps of 2 x 32 tokens, a checkpoint
    every 2 steps, every step logged."""
    config = default()
    config.dataloader.knowledge = dataclasses.replace(config.dataloader.knowledge, num_people=40)
    config.training.steps = 8
    config.training.seq_len = 32
    config.training.local_batch_size = 2
    config.metrics.log_freq = 1
    config.checkpoint.interval = 2
    return config


def finetune() -> FinetuneTrainer.Config:
    """``recipes.finetune``'s default: teach a ``default``-pretrained model the 20 people after
    its 100 (biographies and Q/A pairs), for 200 steps, with sparse memory finetuning. The
    checkpoint (``--checkpoint``) and flavor (``--model``) are the pretraining's; the optimizers
    and the learning rate (``--optimizer.*``, by default per method: ``FinetuneOptimizers``) are
    constant after a short warmup."""
    base = default()
    config = FinetuneTrainer.Config(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init},
        finetune=FinetuneConfig(pretraining=dataclasses.replace(base.dataloader)),
    )
    pretrained = config.finetune.pretraining.knowledge
    config.dataloader.knowledge = KnowledgeCorpus(
        num_people=20,
        first_person=pretrained.first_person + pretrained.num_people,
        seed=pretrained.seed,
        qa_train_fraction=1.0,
    )
    config.optimizer = FinetuneOptimizers()  # lr, name and memory_optimizer: per method
    config.dump_folder = "outputs/{model}_finetune_{method}"
    config.training.steps = 200
    config.checkpoint.interval = 50
    config.lr_scheduler = LRSchedulersContainer.Config(warmup_steps=5, decay_ratio=0.0)
    return config


def finetune_smoke() -> FinetuneTrainer.Config:
    """``finetune`` shrunk to seconds, on ``smoke``'s corpus (40 people) and shapes: 8 new
    people, 6 steps of 2 x 32 tokens (2 of warmup), a checkpoint every 2 steps."""
    config = finetune()
    smoke_run = smoke()
    config.finetune.pretraining = smoke_run.dataloader
    config.dataloader.knowledge = dataclasses.replace(
        config.dataloader.knowledge, num_people=8, first_person=40
    )
    config.finetune.background_sequences = 16
    config.training = smoke_run.training
    config.training.steps = 6
    config.lr_scheduler.warmup_steps = 2  # so a run stopped at step 4 and resumed is the same run
    config.metrics.log_freq = 1
    config.checkpoint.interval = 2
    return config
