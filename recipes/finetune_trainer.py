"""torchtitan's Trainer for finetuning a pretrained memcompile model on new facts.

- :class:`FinetuneConfig`: the ``--finetune.*`` flags (method, slots, LoRA, evaluation).
- :class:`FinetuneTrainer`: ``PretrainTrainer`` starting from a pretrained checkpoint
  (``recipes.model.FinetuneTransformer``), with sparse memory finetuning's slot choice and the
  learning / forgetting measurements.

Sparse memory finetuning (Lin et al., 2025, arXiv 2510.15103): the value table is trained
row-sparsely (``memcompile.sparse_optim.RowSparseOptimizer``) and each step updates only the
``--finetune.trainable_slots`` slots with the highest TF-IDF of the step's reads against how
often the base model reads them on its pretraining data
(``memcompile.slot_ranking.TfidfSlotSelector``). Those background frequencies are measured once
and cached next to the checkpoint. The entry point is ``python -m recipes.finetune``.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torchtitan.tools.logging import logger

from memcompile.slot_ranking import BackgroundFrequency, TfidfSlotSelector
from recipes.data.knowledge import KnowledgeCorpus
from recipes.data.loader import (
    BUILTIN_DATASET,
    CorpusDataLoader,
    PackedWindows,
    cache_key,
    load_token_stream,
)
from recipes.knowledge_eval import learning_and_forgetting
from recipes.model import FinetuneTransformer, is_adapter, model_spec, pretrained_name
from recipes.trainer import PretrainTrainer

FinetuneMethod = Literal["sparse_memory", "full", "lora"]

#: The linears LoRA adapts by default: attention and feed-forward (in Memory+ blocks, the
#: memory layer's gate projections w1/w2; its query projection stays frozen).
LORA_TARGETS = r".*\.(attention\.(wq|wk|wv|wo)|feed_forward\.(w1|w2|w3))$"


@dataclass(kw_only=True, slots=True)
class FinetuneConfig:
    checkpoint: str = ""
    """The pretrained model: a step-N DCP folder written by recipes.pretrain (--checkpoint PATH
    for short). Background slot frequencies are cached in it"""

    method: FinetuneMethod = "sparse_memory"
    """sparse_memory: only the top slots of each batch's memory reads train (TF-IDF, Lin et al.
    2025); full: every parameter; lora: LoRA adapters (peft) on the attention and feed-forward
    linears"""

    optimizer: Literal["sgd", "adamw"] | None = None
    """sgd or adamw (default: sgd for sparse_memory, adamw for full and lora)"""

    lr: float | None = None
    """Learning rate (sets --optimizer.lr; the value table's is --optimizer.memory-lr-multiplier
    times it). Default: per method and optimizer, see DEFAULT_LEARNING_RATES"""

    trainable_slots: int = 500
    """sparse_memory: the slots (value-table rows) each step may train, the t of the paper"""

    background_sequences: int = 256
    """sparse_memory: pretraining sequences (of --training.seq_len tokens) on which the base
    model's slot reads are counted: a slot's document frequency is how many of them read it"""

    pretraining: CorpusDataLoader.Config = field(default_factory=CorpusDataLoader.Config)
    """The base model's pretraining data (its --dataloader.* flags): the background sample,
    and, for the built-in corpus, what forgetting is measured on"""

    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = LORA_TARGETS
    """Regex of the linears LoRA adapts (full module names)"""

    eval_every: int = 0
    """Measure learning and forgetting every N steps (0: before and after training only);
    single-process runs on the built-in corpus"""

    eval_max_people: int | None = None
    """Measure on at most this many people per split (None: all)"""

    @property
    def optimizer_name(self) -> Literal["sgd", "adamw"]:
        if self.optimizer is not None:
            return self.optimizer
        return "sgd" if self.method == "sparse_memory" else "adamw"

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LEARNING_RATES[self.method, self.optimizer_name]


#: --optimizer.lr by (method, optimizer), the table's 10x that. The AdamW ones and sparse
#: memory's SGD were chosen on benchmarks.continual's sweep (benchmarks/RESULTS.md): the value
#: gradients of a mean loss over a batch are small, so SGD on the slots needs a large rate. The
#: SGD rates of full and LoRA are starting points, not tuned.
DEFAULT_LEARNING_RATES: dict[tuple[str, str], float] = {
    ("sparse_memory", "sgd"): 100.0,
    ("sparse_memory", "adamw"): 1e-2,
    ("full", "adamw"): 1e-3,
    ("full", "sgd"): 1e-1,
    ("lora", "adamw"): 1e-2,
    ("lora", "sgd"): 1.0,
}


def _optimizer_settings(finetune: FinetuneConfig) -> dict[str, Any]:
    """``MemoryOptimizers.Config`` fields for a method and optimizer: sparse memory finetuning
    trains the table alone, row-sparsely (SGD, or AdamW applied lazily to the touched rows);
    full and LoRA train the trainable parameters densely."""
    sgd = finetune.optimizer_name == "sgd"
    lr = finetune.learning_rate
    if finetune.method == "sparse_memory":
        return {"lr": lr, "memory_optimizer": "sgd" if sgd else "adam"}
    return {"lr": lr, "memory_optimizer": "adamw", "name": "SGD" if sgd else "AdamW"}


class FinetuneTrainer(PretrainTrainer):
    """``PretrainTrainer`` for ``recipes.finetune``: the model starts from
    ``--finetune.checkpoint``, trains what ``--finetune.method`` trains, and learning and
    forgetting are measured before, during (``--finetune.eval_every``) and after training."""

    @dataclass(kw_only=True, slots=True)
    class Config(PretrainTrainer.Config):
        finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

        def __post_init__(self) -> None:
            spec = self.model_spec
            finetunes = spec is not None and isinstance(spec.model, FinetuneTransformer.Config)
            if not finetunes or spec.flavor != self.model:
                self.model_spec = model_spec(self.model, FinetuneTransformer)
            # The method decides which optimizer trains what (see _optimizer_settings).
            self.optimizer = replace(self.optimizer, **_optimizer_settings(self.finetune))
            PretrainTrainer.Config.__post_init__(self)

    def __init__(self, config: Config) -> None:
        finetune = config.finetune
        # "{method}" in the dump folder: each method's run resumes from its own checkpoints.
        config = replace(
            config, dump_folder=config.dump_folder.replace("{method}", finetune.method)
        )
        super().__init__(config)
        self.new_corpus = _builtin_corpus(config.dataloader)
        self.old_corpus = _builtin_corpus(finetune.pretraining)
        if finetune.method == "sparse_memory":
            selector = TfidfSlotSelector(self._background_frequency(), finetune.trainable_slots)
            self.optimizers.row_sparse.trainable_rows = selector

    # ------------------------------------------------------------------ slot ranking

    def _background_frequency(self) -> BackgroundFrequency:
        """How many of ``background_sequences`` pretraining sequences read each slot, measured
        on the base model (before any step, resumed or not) and cached in the checkpoint
        folder."""
        config, finetune = self.config, self.config.finetune
        data = finetune.pretraining
        model = self.model_parts[0]
        num_rows = model.memory_values.shape[0]
        sample = {
            **data.source(),
            "window_seed": data.seed,
            "background_sequences": finetune.background_sequences,
            "seq_len": config.training.seq_len,
        }
        path = Path(finetune.checkpoint) / f"slot_frequency-{cache_key(sample, self.tokenizer)}.pt"
        if path.is_file():
            logger.info(f"Background slot frequencies: {path} (cached)")
            return BackgroundFrequency.load(path, num_rows)
        started = time.perf_counter()
        tokens = load_token_stream(data.source(), data.documents, self.tokenizer, data.cache_dir)
        windows = iter(
            PackedWindows(
                tokens, seq_len=config.training.seq_len, seed=data.seed, dp_rank=0, dp_world_size=1
            )
        )
        sequences = (
            next(windows)[0]["input"][None].to(self.device)
            for _ in range(finetune.background_sequences)
        )
        background = BackgroundFrequency.measure(model, sequences)
        read = int((background.document_frequency > 0).sum())
        logger.info(
            f"Background slot frequencies: {finetune.background_sequences} pretraining sequences "
            f"read {read:,} of {num_rows:,} slots ({time.perf_counter() - started:.1f}s)"
        )
        if torch.distributed.get_rank() == 0:
            _save_atomically(background, path)
        return background

    # ------------------------------------------------------------------ learning and forgetting

    def should_continue_training(self) -> bool:
        first_call = self._first_step is None
        more = super().should_continue_training()
        if first_call and self.step == 0 and self._evaluates():
            self._evaluate()  # the base model: what forgetting is measured against
        return more

    def train_step(self, data_iterator) -> None:
        super().train_step(data_iterator)
        every = self.config.finetune.eval_every
        last = self.step == self.config.training.steps  # measured by the final report
        if every and self.step % every == 0 and not last and self._evaluates():
            self._evaluate()

    def _evaluates(self) -> bool:
        wanted = self.config.final_eval or self.config.finetune.eval_every > 0
        return wanted and self._can_evaluate()

    def _can_evaluate(self) -> bool:
        single_process = torch.distributed.get_world_size() == 1
        return single_process and (self.new_corpus is not None or self.old_corpus is not None)

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        model = self.model_parts[0]
        model.eval()
        started = time.perf_counter()
        metrics = learning_and_forgetting(
            model,
            self.tokenizer,
            new=self.new_corpus,
            old=self.old_corpus,
            max_people=self.config.finetune.eval_max_people,
            batch_size=64,
        )
        model.train()
        self.metrics_processor.logger.log({f"eval/{k}": v for k, v in metrics.items()}, self.step)
        if torch.distributed.get_rank() == 0:
            self.metrics_processor.append_record({"step": self.step, "eval": metrics})
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        logger.info(f"eval at step {self.step}: {shown}  ({time.perf_counter() - started:.1f}s)")
        return metrics

    def _final_report(self) -> None:
        after = self._evaluate()
        before = self._base_metrics()
        lines = ["| metric | base model | finetuned |", "|---|---|---|"]
        for name, value in after.items():
            base = f"{before[name]:.4f}" if name in before else "-"
            lines.append(f"| {name} | {base} | {value:.4f} |")
        config = self.config
        logger.info(
            f"Learning (new_*) and forgetting (old_*) after {self.step} steps of "
            f"{config.finetune.method} finetuning:\n" + "\n".join(lines)
        )
        if config.finetune.method == "lora":
            # Adapters merged into the weights: a checkpoint of the plain flavor.
            checkpoint = os.path.join(config.dump_folder, "merged", f"step-{self.step}")
            save_merged(self.model_parts[0], checkpoint)
        elif config.checkpoint.enable:
            checkpoint = os.path.join(
                config.dump_folder, config.checkpoint.folder, f"step-{self.step}"
            )
        else:
            return
        logger.info(
            "Evaluate it:  python -m recipes.evaluate --checkpoint "
            f"{shlex.quote(os.path.abspath(checkpoint))} --model {config.model}"
        )

    def _base_metrics(self) -> dict[str, float]:
        """The step-0 measurements of this run (a resumed run logged them before)."""
        path = Path(self.metrics_processor.jsonl_path)
        records = (
            [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        )
        return next((r["eval"] for r in records if r["step"] == 0 and "eval" in r), {})


def save_merged(model: torch.nn.Module, checkpoint: str) -> None:
    """Save a LoRA-adapted model with its adapters merged into the weights they adapt, under the
    pretrained names: a model-only DCP checkpoint that loads as the plain flavor
    (``recipes.evaluate``, ``recipes.generate``)."""
    import torch.distributed.checkpoint as dcp
    from peft.tuners.lora import LoraLayer

    state = {
        pretrained_name(name): tensor
        for name, tensor in model.state_dict().items()
        if not is_adapter(name)
    }
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight.detach()
            state[pretrained_name(f"{name}.weight")] = weight + module.get_delta_weight("default")
    dcp.save(state, checkpoint_id=checkpoint)
    logger.info(f"LoRA adapters merged into the weights: {checkpoint}")


def _builtin_corpus(data: CorpusDataLoader.Config) -> KnowledgeCorpus | None:
    return data.knowledge if data.dataset == BUILTIN_DATASET else None


def _save_atomically(background: BackgroundFrequency, path: Path) -> None:
    """Write the cache whole or not at all; a read-only checkpoint folder only costs a rerun."""
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            staging = Path(f.name)
        background.save(staging)
        os.replace(staging, path)
    except OSError as error:
        logger.warning(f"Could not cache the background slot frequencies in {path}: {error}")
