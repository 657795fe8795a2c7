"""torchtitan's Trainer and the components it builds, for memcompile models.

- :class:`MemoryOptimizers`: AdamW with the shared value table in its own group.
- :class:`ProgressMetrics`: torchtitan's metrics plus progress, ETA and an exact JSONL log.
- :class:`PretrainTrainer`: the Trainer, with a ``--model`` flavor and memory parallelism.

The run configurations are in ``recipes/config_registry.py``; the entry point is
``python -m recipes.pretrain``.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig
from torchtitan.distributed.utils import clip_grad_norm_ as titan_clip_grad_norm_
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from memcompile.flavors import FlavorName
from memcompile.optim import MEMORY_VALUES, dense_trainable_parameters, param_groups
from memcompile.sparse_optim import RowSparseOptimizer
from recipes import shims
from recipes.data.knowledge import KnowledgeCorpus, QAPair
from recipes.data.loader import BUILTIN_DATASET
from recipes.knowledge_eval import TextTokenizer, evaluate_knowledge, format_table, generate_texts
from recipes.memory_parallel import (
    MemoryParallelismConfig,
    sum_table_grad_over_replicas,
    table_replicas_agree,
)
from recipes.model import Float8Config, model_spec
from recipes.parallelize import ActivationCheckpointingConfig, SelectiveAC

DEFAULT_MODEL = "mem_debug"


class MemoryOptimizers(OptimizersContainer):
    """AdamW with the shared value table in its own group (own learning rate and weight decay,
    why in :mod:`memcompile.optim`), or, with ``--optimizer.memory_optimizer`` sgd /
    rowwise_adagrad / adam, the table trained row-sparsely by
    :class:`memcompile.sparse_optim.RowSparseOptimizer` (only the rows a step touched are
    updated; no ``[N, D]`` gradient). Set ``param_groups`` explicitly to take full control of the
    other parameters' groups.
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

        memory_optimizer: Literal["adamw", "sgd", "rowwise_adagrad", "adam"] = "adamw"
        """Optimizer of the memory value table. adamw: dense, over the whole table from its
        autograd gradient, by the optimizer of the other parameters (AdamW, or SGD with
        --optimizer.name SGD). sgd, rowwise_adagrad (FBGEMM's), adam (lazy AdamW): row-sparse,
        only the rows a step read are updated (on several ranks: with memory parallelism)"""

        name: Literal["AdamW", "SGD"] = "AdamW"
        """Optimizer of the parameters the table's row-sparse optimizer does not own (SGD: plain,
        without momentum, as finetuning recipes compare it)"""

    def __init__(self, config: Config, *, model_parts: list[torch.nn.Module]) -> None:
        # Built first: the table is its alone, so the dense groups below leave it out.
        self.row_sparse = self.build_row_sparse(config, model_parts)
        if not config.param_groups:
            config = replace(config, param_groups=self.default_param_groups(config, model_parts))
        super().__init__(config, model_parts=model_parts)
        if self.row_sparse is not None:
            self.optimizers.append(self.row_sparse)

    def _build_param_groups(
        self, model: torch.nn.Module, param_group_configs: list[ParamGroupConfig], impl_kwargs
    ):
        # No dense group may claim a table its row-sparse optimizer trains.
        dense = _DenseParameters(model)
        return OptimizersContainer._build_param_groups(dense, param_group_configs, impl_kwargs)

    def _validate_params(self, all_params: list[torch.nn.Parameter]) -> None:
        # torchtitan checks that every trainable parameter has an optimizer: the table has.
        row_sparse = [] if self.row_sparse is None else [self.row_sparse.table]
        super()._validate_params([*all_params, *row_sparse])

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Callable[..., torch.optim.Optimizer]:
        if name == "SGD":
            return torch.optim.SGD
        return OptimizersContainer._resolve_optimizer_factory(name)

    def _post_init(self, all_params: list[torch.nn.Parameter]) -> None:
        # torch.optim.Optimizer refuses an empty parameter list: when the row-sparse table is
        # all that trains (sparse memory finetuning), the container's hooks hang on the table.
        if not all_params and self.row_sparse is not None:
            all_params = [self.row_sparse.table]
        super()._post_init(all_params)

    @staticmethod
    def build_row_sparse(
        config: Config, model_parts: list[torch.nn.Module]
    ) -> RowSparseOptimizer | None:
        """The table's row-sparse optimizer, if ``memory_optimizer`` asks for one."""
        if config.memory_optimizer == "adamw":
            return None
        if len(model_parts) != 1 or getattr(model_parts[0], MEMORY_VALUES, None) is None:
            raise ValueError(
                f"--optimizer.memory_optimizer {config.memory_optimizer} trains a memory value "
                "table; this model has none (pick a mem_* flavor, or leave it at adamw)"
            )
        return RowSparseOptimizer(
            model_parts[0],
            config.memory_optimizer,
            lr=config.lr * config.memory_lr_multiplier,
            betas=config.betas,
            weight_decay=config.memory_weight_decay,
        )

    @staticmethod
    def default_param_groups(
        config: Config, model_parts: list[torch.nn.Module]
    ) -> list[ParamGroupConfig]:
        """:func:`memcompile.optim.param_groups` as torchtitan ``ParamGroupConfig``s."""
        names = [name for part in model_parts for name, _ in dense_trainable_parameters(part)]
        if not names:
            return []
        groups = param_groups(
            names,
            lr=config.lr,
            weight_decay=config.weight_decay,
            memory_lr_multiplier=config.memory_lr_multiplier,
            memory_weight_decay=config.memory_weight_decay,
        )
        rule = {"betas": config.betas, "eps": config.eps} if config.name == "AdamW" else {}
        return [
            ParamGroupConfig(
                pattern=pattern, optimizer_name=config.name, optimizer_kwargs={**rule, **options}
            )
            for pattern, options in groups
        ]


class _DenseParameters:
    """``module`` as torchtitan's param-group builder sees it (``named_parameters`` alone), with
    only the parameters a dense optimizer may train
    (:func:`memcompile.optim.dense_trainable_parameters`)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def named_parameters(self):
        return iter(dense_trainable_parameters(self.module))


class ProgressMetrics(MetricsProcessor):
    """torchtitan's metrics (console, TensorBoard, wandb) plus progress (step k/N, ETA) and,
    on rank 0, one exact JSON line per logged step in ``<dump_folder>/metrics.jsonl``
    (appended across restarts; the reliability tests compare these losses bitwise).

    On a CPU the console shows one line per logged step, without torchtitan's MFU (computed
    against an A100's peak FLOPS, as a CPU has no entry in its table)."""

    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        pass

    total_steps: int = 0
    _first_log: tuple[int, float] | None = None

    def __init__(self, config: Config, *, dump_folder: str = "./outputs", **kwargs) -> None:
        super().__init__(config, dump_folder=dump_folder, **kwargs)
        self.jsonl_path = os.path.join(dump_folder, "metrics.jsonl")
        self.on_cpu = shims.running_on_cpu()

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ) -> None:
        tokens, seconds = self.ntokens_since_last_log, time.perf_counter() - self.time_last_log
        # On a CPU, shims drop torchtitan's console line (MFU against an A100's peak).
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics)
        if torch.distributed.get_rank() == 0:
            record = {"step": step, "loss": global_avg_loss, "grad_norm": grad_norm}
            self.append_record({**record, **(extra_metrics or {})})
        logger.info(self._progress(step, global_avg_loss, grad_norm, tokens / seconds))

    def append_record(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (rank 0's to call)."""
        os.makedirs(os.path.dirname(self.jsonl_path) or ".", exist_ok=True)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _progress(self, step: int, loss: float, grad_norm: float, tokens_per_s: float) -> str:
        line = f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)"
        line += f"  loss {loss:.4f}"
        if self.on_cpu:  # torchtitan's line, which has these, is not shown on a CPU
            memory = self.device_memory_monitor.get_peak_stats().max_reserved_gib
            line += f"  grad_norm {grad_norm:.4f}  {tokens_per_s:,.0f} tokens/s  {memory:.2f}GiB"
        now = time.perf_counter()
        if self._first_log is None:  # the first step includes compilation: time from here on
            self._first_log = (step, now)
            return line
        first_step, first_time = self._first_log
        seconds_per_step = (now - first_time) / (step - first_step)
        eta = seconds_per_step * (self.total_steps - step)
        return line + f"  {seconds_per_step:.2f}s/step  ETA {_clock(eta)}"


def clip_table_apart(
    parameters: list[torch.nn.Parameter],
    max_norm: float,
    *,
    table: torch.nn.Parameter,
    table_max_norm: float,
    row_sparse: RowSparseOptimizer | None = None,
    **kwargs,
) -> torch.Tensor:
    """Clip ``parameters`` together to ``max_norm`` as torchtitan does, and the value table on
    its own to ``table_max_norm`` (the paper clips the values separately: their sparse, large-LR
    gradients would otherwise take the dense budget; a column-sharded table also lives on
    another mesh than FSDP's). ``row_sparse`` clips the gradient its table's lookups recorded.
    Returns the norm of all gradients together (before clipping)."""
    norms = [titan_clip_grad_norm_(parameters, max_norm, **kwargs)]
    if row_sparse is not None:
        norms.append(row_sparse.clip_grad_norm_(table_max_norm))
    else:
        norms.append(titan_clip_grad_norm_([table], table_max_norm, **kwargs))
    return torch.stack([norm.to(norms[0].device) for norm in norms]).norm()


def _a_question_it_answers(
    model: torch.nn.Module, tokenizer: TextTokenizer, corpus: KnowledgeCorpus
) -> QAPair:
    """A trained birth-city question the model answers right (the first one if none of the
    first few), for the command line the run suggests."""
    candidates = [qa for qa in corpus.train_qa_pairs() if qa.attribute == "birth_city"][:16]
    answers = generate_texts(model, tokenizer, [qa.prompt for qa in candidates], 8)
    return next(
        (qa for qa, answer in zip(candidates, answers) if answer.strip() == qa.answer),
        candidates[0],
    )


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}:{seconds:02d}"


class PretrainTrainer(Trainer):
    """torchtitan's Trainer for memcompile models: the flavor is ``--model``, the value table
    can be column-sharded (``--parallelism.memory_parallel_degree``), float8 trains the dense
    linears, and the table is clipped on its own (``--optimizer.memory_max_norm``)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        model: FlavorName = DEFAULT_MODEL
        """memcompile flavor to train (see python -m memcompile.flavors)"""

        parallelism: MemoryParallelismConfig = field(default_factory=MemoryParallelismConfig)
        float8: Float8Config = field(default_factory=Float8Config)
        activation_checkpoint: ActivationCheckpointingConfig = field(
            default_factory=SelectiveAC.Config
        )

        preflight_memory_check: bool = True
        """Before building anything, refuse a run whose estimated memory per rank exceeds what
        this rank's device has (see recipes/preflight.py)"""

        final_eval: bool = True
        """After training on the built-in knowledge corpus in one process, measure fact recall
        and held-out perplexity (seconds) and print them, with the commands to evaluate and
        to question the checkpoint"""

        def __post_init__(self) -> None:
            # The model spec follows --model (a registry config may bring its own spec of the
            # same flavor, e.g. with a modified architecture).
            if self.model_spec is None or self.model_spec.flavor != self.model:
                self.model_spec = model_spec(self.model)
            self.parallelism.row_sparse_table = self.optimizer.memory_optimizer != "adamw"
            Trainer.Config.__post_init__(self)

    def __init__(self, config: Config) -> None:
        # "{model}" in the dump folder is the flavor (outputs/{model} by default). Resolved
        # here, not in Config: a resolved default would outlive a --model flag.
        config = replace(config, dump_folder=config.dump_folder.replace("{model}", config.model))
        super().__init__(config)
        self.metrics_processor.total_steps = config.training.steps
        self._first_step: int | None = None
        #: The checkpoint loaded was the last step: the run trains nothing and says so, last.
        self._had_finished = False

    def train_step(self, data_iterator) -> None:
        with shims.gradients_clipped_by(self.clip_grad_norm_):
            super().train_step(data_iterator)

    def clip_grad_norm_(
        self, parameters: list[torch.nn.Parameter], max_norm: float, **kwargs
    ) -> torch.Tensor:
        """What the train step does between the last micro-batch's backward and the optimizer
        step (torchtitan's clipping call, with its arguments): the value table's gradient is
        summed over its replicas (memory parallelism), once, and clipped on its own to
        ``--optimizer.memory_max_norm`` (row-sparse or dense), every other gradient to
        ``max_norm`` as torchtitan clips them. Returns the norm of all gradients together,
        which the Trainer logs."""
        model = self.model_parts[0]
        table = getattr(model, MEMORY_VALUES, None)
        if table is None:
            return titan_clip_grad_norm_(parameters, max_norm, **kwargs)
        sum_table_grad_over_replicas(model)
        return clip_table_apart(
            [p for p in parameters if p is not table],
            max_norm,
            table=table,
            table_max_norm=self.config.optimizer.memory_max_norm,
            row_sparse=getattr(self.optimizers, "row_sparse", None),
            **kwargs,
        )

    def should_continue_training(self) -> bool:
        more = super().should_continue_training()
        if self._first_step is None:  # first call: the checkpoint (if any) is loaded
            self._first_step = self.step
            self._had_finished = not more and self.step > 0
        return more

    def _say_already_finished(self) -> None:
        steps = self.config.training.steps
        checkpoints = os.path.join(self.config.dump_folder, self.config.checkpoint.folder)
        logger.info(
            f"This run had already finished: {checkpoints} holds step {self.step} of {steps}. "
            f"To train longer, rerun with --training.steps N (N > {steps}; it resumes from step "
            f"{self.step}); to start afresh, pass another --dump_folder or delete {checkpoints}."
        )

    def train(self) -> None:
        super().train()
        self._check_table_replicas()
        # A rerun of a finished run reports nothing again: its message ends the log (close).
        if self.config.final_eval and self._can_evaluate() and not self._had_finished:
            self._final_report()

    def _check_table_replicas(self) -> None:
        """After training, the replicas of each column shard of the table must hold the same
        values (memory parallelism with fewer ranks per group than the world): say so, or stop
        before the run is taken for good."""
        agree = table_replicas_agree(self.model_parts[0])
        if agree is None:
            return
        if not agree:
            raise RuntimeError(
                "the replicas of the memory value table diverged during training: each was "
                "trained on its own tokens (a missed replica reduce), and the checkpoint holds one "
                "of them"
            )
        logger.info("The replicas of the memory value table hold the same values (checked)")

    def _can_evaluate(self) -> bool:
        """Knowledge measurements need the built-in corpus and one process (generation is not
        sharded)."""
        single_process = not torch.distributed.is_initialized() or (
            torch.distributed.get_world_size() == 1
        )
        return single_process and self.config.dataloader.dataset == BUILTIN_DATASET

    @torch.no_grad()
    def _final_report(self) -> None:
        """What the trained model knows of its corpus, and how to use the checkpoint."""
        config = self.config
        corpus = config.dataloader.knowledge
        model = self.model_parts[0]
        model.eval()
        started = time.perf_counter()
        results = evaluate_knowledge(model, self.tokenizer, corpus, batch_size=64)
        trained = results["recall_trained_questions"]["accuracy"]
        logger.info(
            f"What the model knows after {self.step} steps "
            f"({time.perf_counter() - started:.0f}s to measure):\n{format_table(results)}\n"
            f"It recalls {100 * trained:.1f}% of the facts it was trained on."
        )
        if not config.checkpoint.enable:
            return
        checkpoint = os.path.join(config.dump_folder, config.checkpoint.folder, f"step-{self.step}")
        flags = f"--checkpoint {shlex.quote(os.path.abspath(checkpoint))} --model {config.model}"
        if config.training.seq_len > model.config.max_seq_len:
            flags += f" --seq-len {config.training.seq_len}"
        corpus_flags = "".join(
            f" --knowledge.{f.name.replace('_', '-')} {getattr(corpus, f.name)}"
            for f in fields(corpus)
            if getattr(corpus, f.name) != f.default
        )
        question = _a_question_it_answers(model, self.tokenizer, corpus)
        ask = f"{flags} --question {shlex.quote(question.question)}"
        logger.info(
            f"Evaluate it:  python -m recipes.evaluate {flags}{corpus_flags}\n"
            f"Ask it:       python -m recipes.generate {ask}"
        )

    def close(self) -> None:
        super().close()
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        config = self.config
        if config.metrics.enable_tensorboard:
            tb = os.path.abspath(os.path.join(config.dump_folder, config.metrics.save_tb_folder))
            logger.info(f"TensorBoard logs: {tb}   (tensorboard --logdir {tb})")
        if self._had_finished:
            self._say_already_finished()
        elif config.checkpoint.enable:
            ckpt = os.path.abspath(os.path.join(config.dump_folder, config.checkpoint.folder))
            logger.info(f"Checkpoints: {ckpt}   (rerun the same command to resume from the latest)")
