"""Evaluate a pretrained checkpoint on the synthetic knowledge corpus.

    python -m recipes.evaluate --checkpoint outputs/mem_debug/checkpoint/step-200 --model mem_debug
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

From Python, for a trained model::

    model = load_checkpoint("outputs/mem_debug/checkpoint/step-200", "mem_debug")
    tokenizer = load_tokenizer()
    generate_texts(model, tokenizer, ["Question: When was Ivojes Corgar born?\\nAnswer:"])
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memcompile.flavors import FLAVORS
from memcompile.generate import generate
from memcompile.model import Transformer
from recipes.data.knowledge import ATTRIBUTES, KnowledgeCorpus, QAPair
from recipes.data.tokenizer import BUILTIN_TOKENIZER_DIR
from torchtitan.components.tokenizer import HuggingFaceTokenizer

ModelName = Literal[tuple(FLAVORS)]  # type: ignore[valid-type]


# --------------------------------------------------------------------------- loading


def load_tokenizer(path: str | Path = BUILTIN_TOKENIZER_DIR) -> HuggingFaceTokenizer:
    """The tokenizer a checkpoint was trained with (``--hf_assets_path`` of the pretraining)."""
    return HuggingFaceTokenizer(tokenizer_path=str(path))


def load_checkpoint(
    checkpoint: str | Path, model: str, vocab_size: int | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """The weights of a ``recipes.pretrain`` DCP checkpoint in a plain memcompile model, in eval mode.

    ``checkpoint`` is a ``step-N`` folder (full training state or model only: the model's
    parameters are stored under their own names either way); ``model`` is the flavor it was
    trained as. ``vocab_size`` defaults to the built-in tokenizer's, as in pretraining.
    """
    import torch.distributed.checkpoint as dcp

    checkpoint = Path(checkpoint)
    if not (checkpoint / ".metadata").is_file():
        raise FileNotFoundError(
            f"checkpoint {str(checkpoint)!r} is not a DCP checkpoint folder (no .metadata); "
            f"pass a step-N folder such as outputs/<model>/checkpoint/step-200"
        )
    if model not in FLAVORS:
        raise ValueError(f"unknown model {model!r}; choose one of: {', '.join(FLAVORS)}")
    if vocab_size is None:
        vocab_size = load_tokenizer().get_vocab_size()
    with torch.device(device):
        transformer = Transformer(replace(FLAVORS[model], vocab_size=vocab_size))
    state = transformer.state_dict()
    with warnings.catch_warnings():  # a single-process load is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    transformer.load_state_dict(state)
    return transformer.eval()


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def loglikelihoods(
    model: nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 32
) -> list[tuple[float, bool, int]]:
    """For each ``(context, continuation)`` pair of token lists: the log-probability of the
    continuation given the context, whether greedy decoding would produce it, and its length.

    Sequences longer than the model's ``max_seq_len`` lose the start of their context. Pairs
    are right-padded into batches: causal attention keeps padding from affecting them.
    """
    max_len = model.config.max_seq_len + 1  # inputs are the sequence minus its last token
    sequences = []
    for context, continuation in requests:
        if not context or not continuation:
            raise ValueError(
                f"every request needs a non-empty context and continuation, got "
                f"{len(context)} and {len(continuation)} tokens"
            )
        if len(continuation) >= max_len:
            raise ValueError(
                f"continuation of {len(continuation)} tokens does not fit max_seq_len "
                f"{model.config.max_seq_len} with any context"
            )
        sequences.append((list(context) + list(continuation))[-max_len:])
    device = model.output.weight.device
    results = []
    # Longest first, so that each batch pads little (results are put back in order below).
    order = sorted(range(len(requests)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            tokens[row, : len(sequences[i])] = torch.tensor(sequences[i])
        tokens = tokens.to(device)
        logits = model(tokens[:, :-1])
        logprobs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        for row, i in enumerate(batch):
            length, num_scored = len(sequences[i]), len(requests[i][1])
            targets = tokens[row, length - num_scored : length]
            scored = logprobs[row, length - num_scored - 1 : length - 1]
            logprob = scored.gather(-1, targets[:, None]).sum().item()
            greedy = bool((scored.argmax(-1) == targets).all())
            results.append((i, (logprob, greedy, num_scored)))
    return [result for _, result in sorted(results, key=lambda pair: pair[0])]


def mean_nll(
    model: nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 32
) -> dict[str, float]:
    """Per-token NLL (nats) and perplexity of the continuations, over all their tokens."""
    scores = loglikelihoods(model, requests, batch_size)
    num_tokens = sum(n for _, _, n in scores)
    nll = -sum(logprob for logprob, _, _ in scores) / max(num_tokens, 1)
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": num_tokens}


def document_requests(tokenizer: HuggingFaceTokenizer, documents: Iterable[str]) -> list[tuple[list[int], list[int]]]:
    """Documents as scored in training: ``BOS text EOS``, every token after BOS predicted."""
    requests = []
    for text in documents:
        ids = tokenizer.encode(text, add_bos=True, add_eos=True)
        requests.append((ids[:1], ids[1:]))
    return requests


def answer_requests(tokenizer: HuggingFaceTokenizer, qa_pairs: Iterable[QAPair]) -> list[tuple[list[int], list[int]]]:
    """``(BOS prompt, " answer" EOS)`` token pairs, as the Q/A training documents are written."""
    requests = []
    for qa in qa_pairs:
        prompt = tokenizer.encode(qa.prompt, add_bos=True, add_eos=False)
        full = tokenizer.encode(qa.text, add_bos=True, add_eos=True)
        if full[: len(prompt)] != prompt:
            raise ValueError(f"the prompt of {qa.text!r} does not tokenise as a prefix of it")
        requests.append((prompt, full[len(prompt) :]))
    return requests


# --------------------------------------------------------------------------- generation


def generate_batched(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    stop_token: int | None = None,
    batch_size: int = 32,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """The new tokens after each prompt (token ids), cut before the first ``stop_token``.

    Prompts are batched by length, so no padding is needed; results are in prompt order.
    """
    for ids in prompts:
        if not ids or len(ids) + max_new_tokens > model.config.max_seq_len:
            raise ValueError(
                f"every prompt needs 1 to max_seq_len - max_new_tokens = "
                f"{model.config.max_seq_len - max_new_tokens} tokens, got {len(ids)}"
            )
    device = model.output.weight.device
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)
    outputs: list[list[int]] = [[] for _ in prompts]
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            prompt = torch.tensor([list(prompts[i]) for i in batch], device=device)
            new_tokens = generate(model, prompt, max_new_tokens, temperature=temperature,
                                  stop_token=stop_token, generator=generator)
            for i, ids in zip(batch, new_tokens.tolist()):
                outputs[i] = ids[: ids.index(stop_token)] if stop_token in ids else ids
    return outputs


def generate_texts(
    model: nn.Module,
    tokenizer: HuggingFaceTokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    *,
    batch_size: int = 32,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Continue each prompt (as ``BOS prompt``) up to the end-of-text token or ``max_new_tokens``."""
    encoded = [tokenizer.encode(p, add_bos=True, add_eos=False) for p in prompts]
    outputs = generate_batched(model, encoded, max_new_tokens, stop_token=tokenizer.eos_id,
                               batch_size=batch_size, temperature=temperature, generator=generator)
    return [tokenizer.decode(ids) for ids in outputs]


def fact_recall(
    model: nn.Module,
    tokenizer: HuggingFaceTokenizer,
    qa_pairs: Sequence[QAPair],
    *,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers, overall and per attribute.

    ``max_new_tokens`` defaults to the longest answer's tokens, its end-of-text token and 2 more
    (a wrong answer may tokenise longer).
    """
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode(" " + qa.answer)) for qa in qa_pairs) + 3
    answers = generate_texts(model, tokenizer, [qa.prompt for qa in qa_pairs], max_new_tokens,
                             batch_size=batch_size)
    correct: dict[str, list[bool]] = defaultdict(list)
    for qa, answer in zip(qa_pairs, answers):
        correct[qa.attribute].append(answer.strip() == qa.answer)
    per_attribute = {a: sum(c) / len(c) for a, c in correct.items()}
    hits = [hit for c in correct.values() for hit in c]
    return {
        "accuracy": sum(hits) / max(len(hits), 1),
        "questions": len(hits),
        "per_attribute": per_attribute,
        "examples": [
            {"question": qa.question, "answer": qa.answer, "generated": answer.strip()}
            for qa, answer in list(zip(qa_pairs, answers))[:5]
        ],
    }


def evaluate_knowledge(
    model: nn.Module,
    tokenizer: HuggingFaceTokenizer,
    corpus: KnowledgeCorpus,
    *,
    max_people: int | None = None,
    batch_size: int = 32,
    include_trained_questions: bool = True,
) -> dict[str, Any]:
    """Held-out perplexity, answer NLL and fact recall of ``model`` on ``corpus``.

    ``max_people`` caps how many people each measurement uses (the first ones of each split).
    """
    people = slice(0, max_people)
    heldout_qa = [qa for person in _people_qa(corpus.eval_qa_pairs())[people] for qa in person]
    trained_qa = [qa for person in _people_qa(corpus.train_qa_pairs())[people] for qa in person]
    biographies = list(corpus.heldout_documents())[people]
    results: dict[str, Any] = {
        "heldout_biographies": mean_nll(model, document_requests(tokenizer, biographies), batch_size),
    }
    if heldout_qa:
        results["heldout_answers"] = mean_nll(model, answer_requests(tokenizer, heldout_qa), batch_size)
        results["recall_heldout_questions"] = fact_recall(model, tokenizer, heldout_qa, batch_size=batch_size)
    if include_trained_questions and trained_qa:
        results["recall_trained_questions"] = fact_recall(model, tokenizer, trained_qa, batch_size=batch_size)
    return results


def _people_qa(qa_pairs: Iterable[QAPair]) -> list[list[QAPair]]:
    """Q/A pairs grouped by person (each person's pairs are consecutive)."""
    people: dict[str, list[QAPair]] = {}
    for qa in qa_pairs:
        people.setdefault(qa.person, []).append(qa)
    return list(people.values())


def format_table(results: dict[str, Any]) -> str:
    """A markdown table of :func:`evaluate_knowledge`'s results."""
    lines = ["| metric | value |", "|---|---|"]
    bios = results["heldout_biographies"]
    lines.append(f"| held-out biographies: NLL / perplexity | {bios['nll']:.4f} / {bios['perplexity']:.3f} "
                 f"({bios['tokens']} tokens) |")
    if "heldout_answers" in results:
        answers = results["heldout_answers"]
        lines.append(f"| held-out answers: NLL / token | {answers['nll']:.4f} ({answers['tokens']} tokens) |")
    for key, label in (("recall_heldout_questions", "held-out questions"),
                       ("recall_trained_questions", "trained questions")):
        if key in results:
            recall = results[key]
            lines.append(f"| fact recall, {label} | {100 * recall['accuracy']:.1f}% "
                         f"({recall['questions']} questions) |")
            for attribute in ATTRIBUTES:
                if attribute in recall["per_attribute"]:
                    lines.append(f"| &nbsp; {attribute} | {100 * recall['per_attribute'][attribute]:.1f}% |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


@dataclass
class EvaluateConfig:
    """Evaluate a recipes.pretrain checkpoint: held-out perplexity and fact recall."""

    checkpoint: Path
    """A DCP step-N folder written by recipes.pretrain"""

    model: ModelName = "mem_debug"  # type: ignore[valid-type]
    """The flavor the checkpoint was trained as"""

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
    """lm-evaluation-harness tasks to run as well (e.g. nq_open triviaqa hellaswag)"""

    lm_eval_limit: int | None = None
    """Examples per lm-eval task (None: all)"""


def run(config: EvaluateConfig) -> dict[str, Any]:
    tokenizer = load_tokenizer(config.hf_assets_path)
    model = load_checkpoint(config.checkpoint, config.model, tokenizer.get_vocab_size(), config.device)
    results: dict[str, Any] = {
        "checkpoint": str(config.checkpoint),
        "model": config.model,
        "corpus": asdict(config.knowledge),
        **evaluate_knowledge(model, tokenizer, config.knowledge, max_people=config.max_people,
                             batch_size=config.batch_size),
    }
    print(format_table(results))
    if config.lm_eval_tasks:
        from recipes.lm_eval_adapter import run_lm_eval

        results["lm_eval"] = run_lm_eval(model, tokenizer, config.lm_eval_tasks, limit=config.lm_eval_limit,
                                         batch_size=config.batch_size)
        print(json.dumps(results["lm_eval"], indent=2, default=str))
    output = config.output or config.checkpoint / "eval.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {output}")
    return results


def main(argv: list[str] | None = None) -> None:
    import tyro

    config = tyro.cli(EvaluateConfig, args=sys.argv[1:] if argv is None else argv, description=__doc__)
    try:
        run(config)
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
