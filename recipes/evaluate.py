"""Evaluate a pretrained checkpoint on the synthetic knowledge corpus.

    python -m recipes.evaluate --checkpoint outputs/mem_debug/checkpoint/step-400 --model mem_debug
    python -m recipes.evaluate --checkpoint ... --lm-eval-tasks hellaswag --lm-eval-limit 100

Reports, for the corpus the checkpoint was trained on (``--knowledge.*`` as in pretraining):

* held-out perplexity: per-token NLL of one biography per person written with a paraphrase
  template that training never used for that person;
* answer NLL: per-token NLL of the answers to the held-out questions (people whose Q/A pairs
  were never trained on), given the question;
* fact recall: greedy generation (KV cache) from ``Question: ...\\nAnswer:`` up to the end of
  text token, exact match with the answer, per attribute, on the held-out questions and, for
  reference, on the trained ones.

It prints a table and writes JSON (``--output``, default ``<checkpoint>/eval.json``). With
``--lm-eval-tasks``, the checkpoint also runs through the lm-evaluation-harness
(:mod:`recipes.lm_eval_adapter`; ``pip install lm_eval``).

From Python, for a trained model (loading is :mod:`recipes.checkpoints`'s; the measurements,
and ``generate_texts``, are :mod:`recipes.knowledge_eval`'s)::

    model = load_checkpoint("outputs/mem_debug/checkpoint/step-400", "mem_debug")
    tokenizer = load_tokenizer()
    generate_texts(model, tokenizer, ["Question: When was Ivojes Corgar born?\\nAnswer:"])
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from memcompile.cli import check_at_least, check_device, reported_errors
from memcompile.flavors import FlavorName
from recipes.checkpoints import load_checkpoint, load_tokenizer
from recipes.data.knowledge import KnowledgeCorpus
from recipes.data.tokenizer import BUILTIN_TOKENIZER_DIR
from recipes.knowledge_eval import evaluate_knowledge, format_table


@dataclass
class EvaluateConfig:
    """Evaluate a recipes.pretrain checkpoint: held-out perplexity and fact recall."""

    checkpoint: Path
    """A DCP step-N folder written by recipes.pretrain"""

    model: FlavorName = "mem_debug"
    """The flavor the checkpoint was trained as"""

    seq_len: int | None = None
    """The pretraining's --training.seq_len, if longer than the flavor's max_seq_len"""

    hf_assets_path: Path = BUILTIN_TOKENIZER_DIR
    """The tokenizer of the pretraining (its --hf_assets_path)"""

    knowledge: KnowledgeCorpus = field(default_factory=KnowledgeCorpus)
    """The corpus of the pretraining (its --dataloader.knowledge.* flags)"""

    max_people: int | None = None
    """Evaluate on at most this many people per split (None: all)"""

    batch_size: int = 32
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    output: Path | None = None
    """Where to write the JSON results (default: <checkpoint>/eval.json)"""

    lm_eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks to run as well (e.g. nq_open triviaqa hellaswag, or
    memcompile_knowledge: the held-out questions of --knowledge, recipes/lm_eval_task.py)"""

    lm_eval_limit: int | None = None
    """Examples per lm-eval task (None: all)"""


def validate(config: EvaluateConfig) -> None:
    """Refuse values the command cannot run with (:class:`memcompile.cli.UsageError`); the
    ``--knowledge.*`` values are the corpus's own checks."""
    check_at_least("--seq-len", config.seq_len, 1)
    check_at_least("--max-people", config.max_people, 1)
    check_at_least("--batch-size", config.batch_size, 1)
    check_at_least("--lm-eval-limit", config.lm_eval_limit, 1)
    check_device("--device", config.device)


def run(config: EvaluateConfig) -> dict[str, Any]:
    validate(config)
    tokenizer = load_tokenizer(config.hf_assets_path)
    model = load_checkpoint(
        config.checkpoint,
        config.model,
        tokenizer.get_vocab_size(),
        config.device,
        seq_len=config.seq_len,
    )
    results: dict[str, Any] = {
        "checkpoint": str(config.checkpoint),
        "model": config.model,
        "corpus": asdict(config.knowledge),
        **evaluate_knowledge(
            model,
            tokenizer,
            config.knowledge,
            max_people=config.max_people,
            batch_size=config.batch_size,
        ),
    }
    print(format_table(results))
    if config.lm_eval_tasks:
        from recipes.lm_eval_adapter import run_lm_eval
        from recipes.lm_eval_task import TASK_NAME, write_task

        with tempfile.TemporaryDirectory() as tasks:
            if TASK_NAME in config.lm_eval_tasks:
                write_task(tasks, config.knowledge, tokenizer)
            results["lm_eval"] = run_lm_eval(
                model,
                tokenizer,
                config.lm_eval_tasks,
                limit=config.lm_eval_limit,
                batch_size=config.batch_size,
                include_path=tasks,
            )
        print(json.dumps(results["lm_eval"], indent=2, default=str))
    output = config.output or config.checkpoint / "eval.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {output}")
    return results


def main(argv: list[str] | None = None) -> None:
    import tyro

    config = tyro.cli(
        EvaluateConfig, args=sys.argv[1:] if argv is None else argv, description=__doc__
    )
    with reported_errors(ValueError, FileNotFoundError, ImportError):
        run(config)


if __name__ == "__main__":
    main()
