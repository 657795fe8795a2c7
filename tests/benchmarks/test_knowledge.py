"""The knowledge benchmark at a tiny size: it trains the three twins and writes its report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("torchtitan", reason="the benchmark reuses the recipes' corpus and tokenizer")

from benchmarks.knowledge import (  # noqa: E402
    MODEL_NAMES,
    KnowledgeBenchmarkConfig,
    majority_baseline,
    run,
)
from recipes.data.knowledge import KnowledgeCorpus, QAPair  # noqa: E402
from recipes.data.tokenizer import VOCAB_SIZE  # noqa: E402


def test_tiny_knowledge_benchmark_writes_its_report(tmp_path: Path):
    threads = torch.get_num_threads()
    config = KnowledgeBenchmarkConfig(
        num_people=12, dim=32, n_layers=2, n_heads=2, n_keys=8, memory_heads=2, memory_topk=4,
        memory_plus_layers=(0, 1), steps=4, batch_size=2, seq_len=96, warmup_steps=2, evals=1,
        eval_people=2, cache_dir=str(tmp_path / "cache"), output_dir=tmp_path / "out",
    )  # fmt: skip
    try:
        run(config)
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "out" / "knowledge.json").read_text())
    assert tuple(report["models"]) == MODEL_NAMES
    dense_flops = report["models"]["dense"]["train_flops_per_token"]
    for name, result in report["models"].items():
        assert [point["step"] for point in result["curve"]] == [2, 4]
        assert result["curve"][-1]["all_people"] and not result["curve"][0].get("all_people")
        final = result["final"]
        # 4 steps (a fifth of an epoch) teach no facts; the NLL is still about a uniform guess.
        assert final["recall_heldout"] <= 0.05 and final["recall_trained"] <= 0.05
        uniform = math.log(VOCAB_SIZE)  # the built-in tokenizer's
        assert abs(final["answer_nll"] - uniform) < 0.25 * uniform
        assert abs(final["biography_nll"] - uniform) < 0.25 * uniform
        # The memory twins are FLOP-matched from below: they never cost more than dense.
        assert result["train_flops_per_token"] <= dense_flops
        assert (result["params"]["memory"] > 0) == (name != "dense")
    assert report["majority_baseline"] == majority_baseline(KnowledgeCorpus(num_people=12, seed=0))
    table = (tmp_path / "out" / "knowledge.md").read_text()
    assert all(f"| {name} |" in table for name in (*MODEL_NAMES, "majority answer (no model)"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "out" / "knowledge.png").stat().st_size > 0


def test_majority_baseline_answers_each_attributes_most_frequent_trained_value():
    def qa(person: str, attribute: str, answer: str) -> QAPair:
        return QAPair(person, attribute, f"{attribute} of {person}?", answer)

    trained = [
        qa("A", "birth_city", "Oslo"),
        qa("B", "birth_city", "Oslo"),
        qa("C", "birth_city", "Lima"),
        qa("A", "employer", "Acme"),
        qa("B", "employer", "Bolt"),
        qa("C", "employer", "Bolt"),
    ]
    heldout = [
        qa("D", "birth_city", "Oslo"),
        qa("E", "birth_city", "Lima"),
        qa("D", "employer", "Bolt"),
        qa("E", "employer", "Cora"),
    ]
    corpus = SimpleNamespace(train_qa_pairs=lambda: trained, eval_qa_pairs=lambda: heldout)
    # "Oslo" and "Bolt" for everyone: 2 of 3 right per attribute on the trained people, 1 of 2
    # on the held-out ones.
    assert majority_baseline(corpus) == {"recall_heldout": 2 / 4, "recall_trained": 4 / 6}
