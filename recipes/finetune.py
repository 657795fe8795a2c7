"""Finetune a pretrained memcompile model on new facts, with torchtitan 0.3.0.

    python -m recipes.pretrain --model mem_debug_64k          # a base model to finetune
    python -m recipes.finetune --checkpoint outputs/mem_debug_64k/checkpoint/step-400 \\
        --model mem_debug_64k --finetune.method sparse_memory
    python -m recipes.finetune ... --finetune.method full     # or lora (peft)
    python -m recipes.finetune ... --optimizer.memory_optimizer adam --finetune.trainable_slots 4000
    python -m recipes.finetune --help                         # every flag

Methods (``--finetune.method``), as compared by Lin et al. 2025 ("Continual Learning via Sparse
Memory Finetuning", arXiv 2510.15103):

- ``sparse_memory`` (default): only the memory slots most specific to each batch train: the top
  ``--finetune.trainable_slots`` by TF-IDF of the batch's reads against the base model's reads
  of its pretraining data (counted once, cached in the checkpoint folder). The table's optimizer
  is ``--optimizer.memory_optimizer``: sgd by default (the paper's choice; on the small CPU
  models lazy AdamW, ``adam``, with more slots learns more, see ``benchmarks/RESULTS.md``); a
  step updates only those table rows. Everything else is frozen.
- ``full``: every parameter (``--optimizer.name``: AdamW by default, or SGD).
- ``lora``: LoRA adapters (peft) on the attention and feed-forward linears (AdamW by default).

``--optimizer.lr`` defaults per method and optimizer (``--help`` lists the rates); the value
table's rate is ``--optimizer.memory_lr_multiplier`` (10) times it. The run logs the rates it
trains with; an ``--optimizer.*`` flag the method cannot honour (``--optimizer.name`` with
``sparse_memory``, a row-sparse table with ``full``) is refused.

By default the data are 20 *new* people of the built-in knowledge corpus (``--dataloader.*``:
people 100-119 of the pretraining's sequence, their biographies and Q/A pairs); any Hugging Face
dataset or local file works as in pretraining. Before, during (``--finetune.eval_every``) and
after training the run measures learning (recall of the new facts) and forgetting (recall of the
pretraining's facts, held-out NLL of its corpus), logged to TensorBoard and metrics.jsonl.

Everything else is ``recipes.pretrain``'s: the config is ``finetune`` of
``recipes/config_registry.py`` (``--config`` picks another), every torchtitan flag overrides it,
checkpoints go to ``outputs/<model>_finetune_<method>`` and a rerun resumes exactly. A missing
checkpoint, a ``--model`` that does not match it, ``sparse_memory`` on a model without memory
layers and other bad configurations are refused before any work starts.
"""

from __future__ import annotations

from pathlib import Path

from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config.manager import ConfigManager

from memcompile.cli import UsageError, check_at_least, check_finite, check_fraction
from memcompile.flavors import fit_to_run
from recipes import pretrain
from recipes.checkpoints import check_checkpoint
from recipes.data.loader import BUILTIN_DATASET
from recipes.finetune_trainer import FinetuneConfig, FinetuneTrainer


def parse_args(argv: list[str]) -> FinetuneTrainer.Config:
    """The run's config: ``finetune`` of ``recipes/config_registry.py`` (or ``--config``)
    overridden by every other flag; ``--checkpoint PATH`` is ``--finetune.checkpoint PATH``.
    The ``--optimizer.*`` settings no flag gave follow ``--finetune.method``; one that
    contradicts it is a usage error (exit code 2)."""
    expanded: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--checkpoint":
            expanded += ["--finetune.checkpoint", next(args, "")]
        elif arg.startswith("--checkpoint="):
            expanded += ["--finetune.checkpoint", arg.split("=", 1)[1]]
        else:
            expanded.append(arg)
    config = ConfigManager().parse_args(["--module", "recipes", "--config", "finetune", *expanded])
    return config.for_method()  # the --optimizer.* settings a flag left to the method


def validate(config: FinetuneTrainer.Config, world_size: int) -> None:
    """Reject what this recipe cannot run, before any work starts: the flags first (with
    pretraining's checks), then the checkpoint."""
    finetune = config.finetune
    if not finetune.checkpoint:
        raise UsageError(
            "--checkpoint PATH is required: the step-N folder of a recipes.pretrain run "
            "(e.g. outputs/mem_debug_64k/checkpoint/step-400)"
        )
    transformer = config.model_spec.model.transformer
    method = finetune.method
    if method == "sparse_memory" and transformer.memory is None:
        raise UsageError(
            f"--finetune.method sparse_memory trains memory slots, and model {config.model!r} "
            "has no memory layers: use --finetune.method full or lora"
        )
    if method == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ValueError(
                "--finetune.method lora needs peft: pip install peft (or the recipes extra)"
            ) from None
        if world_size > 1:
            raise UsageError(
                "--finetune.method lora runs in one process (not yet on several ranks)"
            )
    _check_values(finetune)
    _check_new_people(config)
    pretrain.validate(config, world_size)
    checkpoint = Path(finetune.checkpoint).expanduser().resolve()
    if not (checkpoint / ".metadata").is_file():
        raise FileNotFoundError(
            f"--checkpoint {finetune.checkpoint!r} is not a DCP checkpoint folder (no "
            f"{checkpoint / '.metadata'}); pass a step-N folder written by recipes.pretrain"
        )
    finetune.checkpoint = str(checkpoint)
    _check_matches_flavor(config, checkpoint)


def _check_values(finetune: FinetuneConfig) -> None:
    """The ``--finetune.*`` numbers in their ranges (the corpus's are its own checks)."""
    for flag, value in (
        ("--finetune.trainable_slots", finetune.trainable_slots),
        ("--finetune.background_sequences", finetune.background_sequences),
        ("--finetune.lora_rank", finetune.lora_rank),
        ("--finetune.eval_max_people", finetune.eval_max_people),
        ("--finetune.pretraining.max_documents", finetune.pretraining.max_documents),
        ("--finetune.pretraining.prefetch_factor", finetune.pretraining.prefetch_factor),
    ):
        check_at_least(flag, value, 1)
    check_at_least("--finetune.eval_every", finetune.eval_every, 0)
    check_at_least("--finetune.pretraining.num_workers", finetune.pretraining.num_workers, 0)
    check_finite("--finetune.lora_alpha", finetune.lora_alpha)
    check_fraction("--finetune.lora_dropout", finetune.lora_dropout, below_one=True)


def _check_new_people(config: FinetuneTrainer.Config) -> None:
    """The built-in corpus's finetuning people must not be people the base was trained on."""
    new, old = config.dataloader, config.finetune.pretraining
    if new.dataset != BUILTIN_DATASET or old.dataset != BUILTIN_DATASET:
        return
    new, old = new.knowledge, old.knowledge
    overlap = (
        new.seed == old.seed
        and new.first_person < old.first_person + old.num_people
        and (old.first_person < new.first_person + new.num_people)
    )
    if overlap:
        raise UsageError(
            f"the finetuning people (--dataloader.knowledge: {new.first_person} to "
            f"{new.first_person + new.num_people - 1}) overlap the pretraining's "
            f"(--finetune.pretraining.knowledge: {old.first_person} to "
            f"{old.first_person + old.num_people - 1}); set --dataloader.knowledge.first-person "
            f"{old.first_person + old.num_people}"
        )


def _check_matches_flavor(config: FinetuneTrainer.Config, checkpoint: Path) -> None:
    """Every parameter of ``--model`` is in the checkpoint, with its shape."""
    # As TitanTransformer.Config.update_from_config: the vocabulary is the tokenizer's.
    vocab_size = HuggingFaceTokenizer(tokenizer_path=config.hf_assets_path).get_vocab_size()
    transformer = fit_to_run(
        config.model_spec.model.transformer, vocab_size=vocab_size, seq_len=config.training.seq_len
    )
    check_checkpoint(checkpoint, config.model, transformer)


def main(argv: list[str] | None = None) -> None:
    pretrain.run(parse_args, validate, argv)


if __name__ == "__main__":
    main()
