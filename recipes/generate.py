"""Ask a pretrained checkpoint a question, or continue a text; the answer streams as it comes.

    python -m recipes.generate --checkpoint outputs/mem_debug/checkpoint/step-400 \\
        --model mem_debug --question "In which city was Ivofay Rinkorund born?"
    python -m recipes.generate --checkpoint ... --prompt "Ivofay Rinkorund was born in"

``--question`` asks as the knowledge corpus writes its Q/A documents (``Question: ...`` then
``Answer:``); ``--prompt`` continues the text as given. Generation is greedy unless
``--temperature`` is above 0, and stops at the end-of-text token or ``--max-new-tokens``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from memcompile.cli import (
    UsageError,
    check_at_least,
    check_device,
    check_finite,
    check_seed,
    reported_errors,
)
from memcompile.flavors import FlavorName
from memcompile.generate import generate_tokens
from recipes.checkpoints import load_checkpoint, load_tokenizer
from recipes.data.knowledge import question_prompt
from recipes.data.tokenizer import BUILTIN_TOKENIZER_DIR
from recipes.knowledge_eval import TextTokenizer


def stream_text(
    model: nn.Module,
    tokenizer: TextTokenizer,
    text: str,
    max_new_tokens: int = 32,
    *,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Iterator[str]:
    """Continue ``text`` (as ``BOS text``), yielding the new text piece by piece as tokens
    are generated, up to the end-of-text token, ``max_new_tokens`` or the model's
    ``max_seq_len``."""
    ids = tokenizer.encode(text, add_bos=True, add_eos=False)
    room = model.config.max_seq_len - len(ids)
    if room < 1:
        raise ValueError(
            f"the prompt has {len(ids)} tokens; the model reads at most "
            f"{model.config.max_seq_len} (max_seq_len), answer included"
        )
    prompt = torch.tensor([ids], device=model.output.weight.device)
    new_ids: list[int] = []
    shown = ""
    for token in generate_tokens(
        model,
        prompt,
        min(max_new_tokens, room),
        temperature=temperature,
        stop_token=tokenizer.eos_id,
        generator=generator,
    ):
        if int(token) == tokenizer.eos_id:
            return
        new_ids.append(int(token))
        decoded = tokenizer.decode(new_ids)
        if decoded.endswith("\ufffd"):  # a character cut between tokens: wait for the rest
            continue
        yield decoded[len(shown) :]
        shown = decoded


@dataclass
class GenerateConfig:
    """Ask a recipes.pretrain checkpoint a question, or continue a text (streamed)."""

    checkpoint: Path
    """A DCP step-N folder written by recipes.pretrain"""

    model: FlavorName = "mem_debug"
    """The flavor the checkpoint was trained as"""

    question: str | None = None
    """A question, asked as the corpus's Q/A documents are written"""

    prompt: str | None = None
    """Text to continue as it is"""

    max_new_tokens: int = 32
    temperature: float = 0.0
    """0: greedy; above 0: sampled from softmax(logits / temperature)"""

    seed: int = 0
    """Seed of the sampling (with --temperature above 0)"""

    seq_len: int | None = None
    """The pretraining's --training.seq_len, if longer than the flavor's max_seq_len"""

    hf_assets_path: Path = BUILTIN_TOKENIZER_DIR
    """The tokenizer of the pretraining (its --hf_assets_path)"""

    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def validate(config: GenerateConfig) -> None:
    """Refuse values the command cannot run with (:class:`memcompile.cli.UsageError`)."""
    if (config.question is None) == (config.prompt is None):
        raise UsageError("pass exactly one of --question and --prompt")
    check_at_least("--max-new-tokens", config.max_new_tokens, 1)
    check_finite("--temperature", config.temperature, minimum=0)
    check_seed("--seed", config.seed)
    check_at_least("--seq-len", config.seq_len, 1)
    check_device("--device", config.device)


def run(config: GenerateConfig) -> str:
    """Print the prompt, then the continuation as it streams; returns the continuation."""
    validate(config)
    if config.question is not None:
        text = question_prompt(config.question)
    else:
        text = config.prompt
    tokenizer = load_tokenizer(config.hf_assets_path)
    model = load_checkpoint(
        config.checkpoint,
        config.model,
        tokenizer.get_vocab_size(),
        config.device,
        seq_len=config.seq_len,
    )
    generator = torch.Generator(device=config.device).manual_seed(config.seed)
    print(text, end="", flush=True)
    pieces = []
    for piece in stream_text(
        model,
        tokenizer,
        text,
        config.max_new_tokens,
        temperature=config.temperature,
        generator=generator,
    ):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print(flush=True)
    return "".join(pieces)


def main(argv: list[str] | None = None) -> None:
    import tyro

    config = tyro.cli(
        GenerateConfig, args=sys.argv[1:] if argv is None else argv, description=__doc__
    )
    with reported_errors(ValueError, FileNotFoundError):
        run(config)


if __name__ == "__main__":
    main()
