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

From Python, for a trained model (the measurements, and ``generate_texts``, are
:mod:`recipes.knowledge_eval`'s)::

    model = load_checkpoint("outputs/mem_debug/checkpoint/step-400", "mem_debug")
    tokenizer = load_tokenizer()
    generate_texts(model, tokenizer, ["Question: When was Ivojes Corgar born?\\nAnswer:"])
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from memcompile.config import TransformerConfig
from memcompile.flavors import FlavorName, get_flavor
from memcompile.model import Transformer
from memcompile.pretrained import CONFIG_NAME, from_pretrained, load_config
from recipes.data.knowledge import KnowledgeCorpus
from recipes.data.tokenizer import BUILTIN_TOKENIZER_DIR
from recipes.knowledge_eval import evaluate_knowledge, format_table

# --------------------------------------------------------------------------- loading


def load_tokenizer(path: str | Path = BUILTIN_TOKENIZER_DIR) -> HuggingFaceTokenizer:
    """The tokenizer a checkpoint was trained with (``--hf_assets_path`` of the pretraining)."""
    return HuggingFaceTokenizer(tokenizer_path=str(path))


def load_checkpoint(
    checkpoint: str | Path,
    model: str,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
    *,
    seq_len: int | None = None,
) -> Transformer:
    """The weights of a ``recipes.pretrain`` DCP checkpoint in a plain memcompile model, in
    eval mode.

    ``checkpoint`` is a ``step-N`` folder (full training state or model only: the model's
    parameters are stored under their own names either way), or a folder written by
    ``recipes.export``; ``model`` is the flavor it was trained as. ``vocab_size`` defaults to
    the built-in tokenizer's and ``seq_len`` (the pretraining's ``--training.seq_len``) to the
    flavor's ``max_seq_len``: the model is built by :func:`memcompile.flavors.get_flavor`, as
    in pretraining.
    """
    import torch.distributed.checkpoint as dcp

    checkpoint = Path(checkpoint)
    if vocab_size is None:
        vocab_size = load_tokenizer().get_vocab_size()
    config = get_flavor(model, vocab_size=vocab_size, seq_len=seq_len)
    if (checkpoint / CONFIG_NAME).is_file():
        return _load_exported(checkpoint, model, config, device)
    if not (checkpoint / ".metadata").is_file():
        raise FileNotFoundError(
            f"checkpoint {str(checkpoint)!r} is not a DCP checkpoint folder (no .metadata); "
            f"pass a step-N folder such as outputs/<model>/checkpoint/step-400"
        )
    with torch.device(device):
        transformer = Transformer(config)
    state = transformer.state_dict()
    with warnings.catch_warnings():  # a single-process load is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    transformer.load_state_dict(state)
    return transformer.eval()


def _load_exported(
    folder: Path, model: str, config: TransformerConfig, device: str | torch.device
) -> Transformer:
    """A ``recipes.export`` folder, checked to be the flavor ``model`` (any RoPE length)."""
    exported = load_config(folder)
    if replace(exported, max_seq_len=config.max_seq_len) != config:
        raise ValueError(
            f"{str(folder)!r} holds a model whose config is not --model {model}'s: {exported}"
        )
    return from_pretrained(folder, device)


def check_checkpoint(checkpoint: str | Path, model: str, config: TransformerConfig) -> None:
    """Raise a clear error unless ``checkpoint`` is a DCP folder holding every parameter of
    ``config`` (the flavor ``model``, fitted to the run) with its shape. Reads only metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from recipes.model import is_adapter, pretrained_name

    checkpoint = Path(checkpoint)
    if not (checkpoint / ".metadata").is_file():
        raise FileNotFoundError(
            f"checkpoint {str(checkpoint)!r} is not a DCP checkpoint folder (no .metadata); "
            f"pass a step-N folder such as outputs/<model>/checkpoint/step-400"
        )
    with torch.device("meta"):
        expected = Transformer(config).state_dict()
    saved = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    for name, tensor in expected.items():
        stored = saved.get(pretrained_name(name))
        if stored is None:
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} has no {name!r}: it was not trained as "
                f"--model {model} (pass the flavor it was trained as)"
            )
        if isinstance(stored, TensorStorageMetadata) and not is_adapter(name):
            if tuple(stored.size) != tuple(tensor.shape):
                raise ValueError(
                    f"checkpoint {str(checkpoint)!r} holds {name} of shape "
                    f"{tuple(stored.size)}, but --model {model} has {tuple(tensor.shape)}: it "
                    f"was not trained as {model} (pass the flavor it was trained as)"
                )


# --------------------------------------------------------------------------- CLI


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


def run(config: EvaluateConfig) -> dict[str, Any]:
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
    try:
        run(config)
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
