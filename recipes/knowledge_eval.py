"""What a model knows of the synthetic knowledge corpus (:mod:`recipes.data.knowledge`).

:func:`evaluate_knowledge` measures the per-token NLL of held-out biographies
(:func:`document_requests`) and of the answers to held-out questions (:func:`answer_requests`),
and fact recall (:func:`fact_recall`: greedy answers, exact match, per attribute);
:func:`format_table` shows the results. ``python -m recipes.evaluate`` runs it on a checkpoint
(its ``--help`` says what each measurement holds out).

Any tokenizer with torchtitan ``HuggingFaceTokenizer``'s ``encode(text, add_bos=, add_eos=)``,
``decode(ids)`` and ``eos_id`` works (:class:`TextTokenizer`)::

    results = evaluate_knowledge(model, tokenizer, KnowledgeCorpus())
    print(format_table(results))
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from memcompile.generate import generate_batched
from memcompile.scoring import mean_nll
from recipes.data.knowledge import ATTRIBUTES, KnowledgeCorpus, QAPair


class TextTokenizer(Protocol):
    """What the evaluation needs of a tokenizer (torchtitan's ``HuggingFaceTokenizer`` has it)."""

    eos_id: int

    def encode(self, text: str, *, add_bos: bool, add_eos: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def document_requests(
    tokenizer: TextTokenizer, documents: Iterable[str]
) -> list[tuple[list[int], list[int]]]:
    """Documents as scored in training: ``BOS text EOS``, every token after BOS predicted."""
    requests = []
    for text in documents:
        ids = tokenizer.encode(text, add_bos=True, add_eos=True)
        requests.append((ids[:1], ids[1:]))
    return requests


def answer_requests(
    tokenizer: TextTokenizer, qa_pairs: Iterable[QAPair]
) -> list[tuple[list[int], list[int]]]:
    """``(BOS prompt, " answer" EOS)`` token pairs, as the Q/A training documents are written."""
    requests = []
    for qa in qa_pairs:
        prompt = tokenizer.encode(qa.prompt, add_bos=True, add_eos=False)
        full = tokenizer.encode(qa.text, add_bos=True, add_eos=True)
        if full[: len(prompt)] != prompt:
            raise ValueError(f"the prompt of {qa.text!r} does not tokenise as a prefix of it")
        requests.append((prompt, full[len(prompt) :]))
    return requests


def generate_texts(
    model: nn.Module,
    tokenizer: TextTokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    *,
    batch_size: int = 32,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Continue each prompt (as ``BOS prompt``) up to the end-of-text token or
    ``max_new_tokens``."""
    encoded = [tokenizer.encode(p, add_bos=True, add_eos=False) for p in prompts]
    outputs = generate_batched(
        model,
        encoded,
        max_new_tokens,
        stop_token=tokenizer.eos_id,
        batch_size=batch_size,
        temperature=temperature,
        generator=generator,
    )
    return [tokenizer.decode(ids) for ids in outputs]


def fact_recall(
    model: nn.Module,
    tokenizer: TextTokenizer,
    qa_pairs: Sequence[QAPair],
    *,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers, overall and per attribute.

    ``max_new_tokens`` defaults to the longest answer's tokens, its end-of-text token and 3 more
    (a wrong answer may tokenise longer).
    """
    if max_new_tokens is None:
        answer_lengths = (
            len(tokenizer.encode(" " + qa.answer, add_bos=False, add_eos=True)) for qa in qa_pairs
        )
        max_new_tokens = max(answer_lengths) + 3
    answers = generate_texts(
        model, tokenizer, [qa.prompt for qa in qa_pairs], max_new_tokens, batch_size=batch_size
    )
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
    tokenizer: TextTokenizer,
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
        "heldout_biographies": mean_nll(
            model, document_requests(tokenizer, biographies), batch_size
        ),
    }
    if heldout_qa:
        results["heldout_answers"] = mean_nll(
            model, answer_requests(tokenizer, heldout_qa), batch_size
        )
        results["recall_heldout_questions"] = fact_recall(
            model, tokenizer, heldout_qa, batch_size=batch_size
        )
    if include_trained_questions and trained_qa:
        results["recall_trained_questions"] = fact_recall(
            model, tokenizer, trained_qa, batch_size=batch_size
        )
    return results


def learning_and_forgetting(
    model: nn.Module,
    tokenizer: TextTokenizer,
    *,
    new: KnowledgeCorpus | None,
    old: KnowledgeCorpus | None,
    max_people: int | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """What a finetuned model learnt of the ``new`` corpus and kept of the ``old`` one (its
    pretraining), as flat metrics (``None`` corpora are skipped):

    - ``new_recall``: fact recall on the new people's trained questions (learning);
      ``new_heldout_recall`` on those whose Q/A pairs were not trained, if any;
    - ``old_recall`` / ``old_heldout_recall``: fact recall on the pretraining's trained /
      held-out questions (forgetting);
    - ``old_nll``: per-token NLL of the old people's held-out biographies (forgetting).
    """
    people = slice(0, max_people)
    metrics: dict[str, float] = {}

    def recall(key: str, qa_pairs: Iterable[QAPair]) -> None:
        questions = [qa for person in _people_qa(qa_pairs)[people] for qa in person]
        if questions:
            results = fact_recall(model, tokenizer, questions, batch_size=batch_size)
            metrics[key] = results["accuracy"]

    if new is not None:
        recall("new_recall", new.train_qa_pairs())
        recall("new_heldout_recall", new.eval_qa_pairs())
    if old is not None:
        recall("old_recall", old.train_qa_pairs())
        recall("old_heldout_recall", old.eval_qa_pairs())
        biographies = list(old.heldout_documents())[people]
        nll = mean_nll(model, document_requests(tokenizer, biographies), batch_size)
        metrics["old_nll"] = nll["nll"]
    return metrics


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
    lines.append(
        f"| held-out biographies: NLL / perplexity | {bios['nll']:.4f} / "
        f"{bios['perplexity']:.3f} ({bios['tokens']} tokens) |"
    )
    if "heldout_answers" in results:
        answers = results["heldout_answers"]
        lines.append(
            f"| held-out answers: NLL / token | {answers['nll']:.4f} ({answers['tokens']} tokens) |"
        )
    for key, label in (
        ("recall_heldout_questions", "held-out questions"),
        ("recall_trained_questions", "trained questions"),
    ):
        if key in results:
            recall = results[key]
            lines.append(
                f"| fact recall, {label} | {100 * recall['accuracy']:.1f}% "
                f"({recall['questions']} questions) |"
            )
            for attribute in ATTRIBUTES:
                if attribute in recall["per_attribute"]:
                    share = recall["per_attribute"][attribute]
                    lines.append(f"| &nbsp; {attribute} | {100 * share:.1f}% |")
    return "\n".join(lines)
