"""torchtitan's Trainer for finetuning a pretrained memcompile model on new facts.

- :class:`FinetuneConfig`: the ``--finetune.*`` flags (method, slots, LoRA, evaluation).
- :class:`FinetuneOptimizers`: the ``--optimizer.*`` flags, those not given following the method.
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
from typing import Literal

import torch
from torchtitan.tools.logging import logger

from memcompile.cli import UsageError
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
from recipes.trainer import MemoryOptimizers, PretrainTrainer

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


#: --optimizer.lr by (method, the optimizer that trains); the table's is
#: --optimizer.memory_lr_multiplier (10) times that. The AdamW ones and sparse memory's SGD were
#: chosen on benchmarks.continual's sweep (benchmarks/RESULTS.md): the value gradients of a mean
#: loss over a batch are small, so SGD on the slots needs a large rate. The SGD rates of full
#: and LoRA are starting points, not tuned. FinetuneOptimizers.lr's help lists them.
DEFAULT_LEARNING_RATES: dict[tuple[str, str], float] = {
    ("sparse_memory", "sgd"): 100.0,
    ("sparse_memory", "adam"): 1e-2,
    ("full", "AdamW"): 1e-3,
    ("full", "SGD"): 1e-1,
    ("lora", "AdamW"): 1e-2,
    ("lora", "SGD"): 1.0,
}


@dataclass(kw_only=True, slots=True)
class FinetuneOptimizers(MemoryOptimizers.Config):
    """``--optimizer.*`` of ``recipes.finetune``: what a flag leaves unset (None) follows
    ``--finetune.method`` (:func:`optimizer_for_method`); a flag that contradicts it is refused."""

    lr: float | None = None
    """Learning rate of the dense parameters; the value table's is
    --optimizer.memory-lr-multiplier times it. Default per method and optimizer: sparse_memory
    100 (sgd) or 1e-2 (adam), rowwise_adagrad has none (pass it); full 1e-3 (AdamW) or 0.1
    (SGD); lora 1e-2 (AdamW) or 1 (SGD)"""

    memory_optimizer: Literal["adamw", "sgd", "rowwise_adagrad", "adam"] | None = None
    """Optimizer of the value table. sparse_memory: row-sparse, sgd (default, the paper's),
    adam (lazy AdamW) or rowwise_adagrad. full and lora: adamw (default and only: the table
    trains in the dense optimizer, --optimizer.name; LoRA freezes it)"""

    name: Literal["AdamW", "SGD"] | None = None
    """full and lora: the optimizer of the trainable parameters, AdamW (default) or SGD (plain,
    without momentum). sparse_memory: not allowed (only the table trains)"""


def optimizer_for_method(
    method: FinetuneMethod, optimizer: FinetuneOptimizers
) -> FinetuneOptimizers:
    """``optimizer`` with what it leaves unset filled in for ``method``: sparse memory finetuning
    trains the table alone, row-sparsely (SGD by default); full and LoRA train their parameters
    densely (AdamW by default), the table in its own group (full) or frozen (LoRA). A setting the
    method cannot honour raises a :class:`memcompile.cli.UsageError` naming the flag. Completing a
    completed ``optimizer`` changes nothing."""
    if method == "sparse_memory":
        if optimizer.name is not None:
            raise UsageError(
                f"--optimizer.name {optimizer.name}: sparse_memory trains only the value table, "
                "every other parameter is frozen; pick the table's optimizer with "
                "--optimizer.memory_optimizer sgd, adam or rowwise_adagrad"
            )
        table = optimizer.memory_optimizer or "sgd"
        if table == "adamw":
            raise UsageError(
                "--optimizer.memory_optimizer adamw trains the whole table densely; sparse_memory "
                "trains each step's top slots row-sparsely: sgd (default), adam (lazy AdamW) or "
                "rowwise_adagrad"
            )
        rule, settings = table, {"memory_optimizer": table}  # name stays None: nothing dense
    else:
        if optimizer.memory_optimizer not in (None, "adamw"):
            raise UsageError(
                f"--optimizer.memory_optimizer {optimizer.memory_optimizer} trains the table "
                f"row-sparsely, which only --finetune.method sparse_memory does; {method} "
                "finetuning takes adamw (the default) and --optimizer.name AdamW or SGD"
            )
        rule = optimizer.name or "AdamW"
        settings = {"memory_optimizer": "adamw", "name": rule}
    lr = optimizer.lr
    if lr is None:
        if (method, rule) not in DEFAULT_LEARNING_RATES:
            raise UsageError(
                f"--finetune.method {method} with {rule} has no default learning rate: pass "
                "--optimizer.lr"
            )
        lr = DEFAULT_LEARNING_RATES[method, rule]
    return replace(optimizer, lr=lr, **settings)


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
            PretrainTrainer.Config.__post_init__(self)

        def for_method(self) -> FinetuneTrainer.Config:
            """This config with its ``--optimizer.*`` settings completed for
            ``--finetune.method`` (:func:`optimizer_for_method`). Not in ``__post_init__``:
            the flags are applied after it runs, and must find the unset ones still unset."""
            if not isinstance(self.optimizer, FinetuneOptimizers):  # a config's own choice
                return self
            optimizer = optimizer_for_method(self.finetune.method, self.optimizer)
            return replace(self, optimizer=optimizer)

    def __init__(self, config: Config) -> None:
        finetune = config.finetune
        # "{method}" in the dump folder: each method's run resumes from its own checkpoints.
        config = replace(
            config.for_method(), dump_folder=config.dump_folder.replace("{method}", finetune.method)
        )
        super().__init__(config)
        self._log_what_trains()
        self.new_corpus = _builtin_corpus(config.dataloader)
        self.old_corpus = _builtin_corpus(finetune.pretraining)
        if finetune.method == "sparse_memory":
            selector = TfidfSlotSelector(self._background_frequency(), finetune.trainable_slots)
            self.optimizers.row_sparse.trainable_rows = selector

    def _log_what_trains(self) -> None:
        """What trains, with which optimizer, at which rate: the rates the built optimizers hold
        (their peak, which the LR schedule's warmup ramps up to)."""
        config = self.config
        optimizer, method = config.optimizer, config.finetune.method
        table = getattr(self.model_parts[0], "memory_values", None)
        table_lr = dense_lr = None
        for part in self.optimizers:
            for group in part.param_groups:
                lr = group.get("initial_lr", group["lr"])
                if any(p is table for p in group["params"]):
                    table_lr = lr
                else:
                    dense_lr = lr
        multiplier = (
            f"--optimizer.lr {optimizer.lr:g} x --optimizer.memory_lr_multiplier "
            f"{optimizer.memory_lr_multiplier:g}"
        )
        if method == "sparse_memory":
            trains = (
                f"the value table trains with {optimizer.memory_optimizer} (row-sparse: each "
                f"step's top {config.finetune.trainable_slots} slots) at lr {table_lr:g} "
                f"({multiplier}); every other parameter is frozen"
            )
        else:
            what = "every parameter trains" if method == "full" else "the LoRA adapters train"
            trains = f"{what} with {optimizer.name} at lr {dense_lr:g}"
            if table_lr is not None:
                trains += f", the value table at lr {table_lr:g} ({multiplier})"
            if method == "lora":
                trains += "; every pretrained weight is frozen"
        logger.info(f"Finetuning ({method}): {trains}. Peak rates, after the LR warmup.")

    # ------------------------------------------------------------------ slot ranking

    def _background_frequency(self) -> BackgroundFrequency:
        """How many of ``background_sequences`` pretraining sequences read each slot, measured
        on the base model (before any step, resumed or not) and cached in the checkpoint
        folder. A damaged cache is measured again and replaced, with a warning naming it."""
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
            try:
                background = BackgroundFrequency.load(path, num_rows)
            except ValueError as error:  # only a cache: measure again and replace it
                logger.warning(f"{error}; measuring the background slot frequencies again")
            else:
                logger.info(f"Background slot frequencies: {path} (cached)")
                return background
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
