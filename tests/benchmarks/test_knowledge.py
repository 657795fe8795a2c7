"""The knowledge benchmark at a tiny size: it trains the dense model and its four memory twins
(Memory, Memory+, Engram, PEER) on two seeds and writes its report, per seed and summarised over
the seeds."""

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
    summarize,
)
from memcompile.cli import UsageError  # noqa: E402
from recipes.data.knowledge import KnowledgeCorpus, QAPair  # noqa: E402
from recipes.data.tokenizer import VOCAB_SIZE  # noqa: E402


def test_tiny_knowledge_benchmark_writes_its_report(tmp_path: Path):
    threads = torch.get_num_threads()
    config = KnowledgeBenchmarkConfig(
        num_people=12, dim=32, n_layers=2, n_heads=2, n_keys=8, memory_heads=2, memory_topk=4,
        memory_plus_layers=(0, 1), steps=4, batch_size=2, seq_len=96, warmup_steps=2, evals=1,
        eval_people=2, seeds=(0, 1), cache_dir=str(tmp_path / "cache"),
        output_dir=tmp_path / "out",
    )  # fmt: skip
    try:
        run(config)
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "out" / "knowledge.json").read_text())
    assert list(report["seeds"]) == ["0", "1"]
    for seed, seed_report in report["seeds"].items():
        _check_seed(seed_report, int(seed))
    assert report["summary"] == summarize(report["seeds"])
    assert tuple(report["summary"]) == MODEL_NAMES
    tables = (tmp_path / "out" / "knowledge.md").read_text()
    assert "Over 2 seeds (0, 1)" in tables
    for name in (*MODEL_NAMES, "majority answer (no model)"):
        assert all(f"| {seed} | {name} |" in tables for seed in (0, 1))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "out" / "knowledge.png").stat().st_size > 0


def _check_seed(report: dict, seed: int) -> None:
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
        # The twins are FLOP-matched: the feed-forward replacements from below, Engram (which
        # keeps every feed-forward and adds its gate) within a few percent above.
        limit = 1.1 if name == "engram" else 1.0
        assert result["train_flops_per_token"] <= limit * dense_flops
        assert (result["params"]["memory"] > 0) == (name != "dense")
    # Each seed draws its own people.
    assert report["majority_baseline"] == majority_baseline(
        KnowledgeCorpus(num_people=12, seed=seed)
    )


def _seed_report(recall: dict[str, tuple[float, float]], loss: float) -> dict:
    """A seed's report as run_seed writes it, reduced to what summarize reads."""
    return {
        "models": {
            name: {
                "train_flops_per_token": 100.0,
                "params": {"total": 1, "dense": 1, "memory": 0},
                "final_train_loss": loss,
                "final": {
                    "recall_trained": trained,
                    "recall_heldout": heldout,
                    "answer_nll": 1.0,
                    "biography_nll": 2.0,
                },
            }
            for name, (trained, heldout) in recall.items()
        }
    }


def test_the_summary_is_the_mean_and_spread_over_seeds_and_each_seeds_ratio_to_dense():
    summary = summarize(
        {
            "0": _seed_report({"dense": (0.2, 0.0), "memory": (0.4, 0.1)}, loss=1.0),
            "1": _seed_report({"dense": (0.4, 0.2), "memory": (0.4, 0.1)}, loss=2.0),
            "2": _seed_report({"dense": (0.6, 0.4), "memory": (0.4, 0.1)}, loss=3.0),
        }
    )
    assert list(summary) == ["dense", "memory"]
    dense, memory = summary["dense"], summary["memory"]
    assert dense["recall_trained"]["mean"] == pytest.approx(0.4)
    assert dense["recall_trained"]["std"] == pytest.approx(0.2)  # sample standard deviation
    assert (dense["recall_trained"]["min"], dense["recall_trained"]["max"]) == (0.2, 0.6)
    assert dense["train_loss"]["per_seed"] == [1.0, 2.0, 3.0]
    assert memory["recall_trained"]["std"] == 0.0
    # The ratio is taken per seed (same corpus), then averaged: 2, 1, 2/3.
    assert memory["recall_trained_vs_dense"]["per_seed"] == pytest.approx([2.0, 1.0, 2 / 3])
    assert memory["recall_trained_vs_dense"]["mean"] == pytest.approx((2 + 1 + 2 / 3) / 3)
    # Seed 0's dense model recalls no held-out fact: that seed has no ratio.
    assert memory["recall_heldout_vs_dense"]["per_seed"] == pytest.approx([0.5, 0.25])
    assert "recall_trained_vs_dense" not in dense
    assert memory["seeds"] == ["0", "1", "2"]


def test_a_model_trained_on_some_seeds_only_is_summarised_over_those():
    summary = summarize(
        {
            "0": _seed_report({"dense": (0.2, 0.1), "peer": (0.3, 0.1)}, loss=1.0),
            "1": _seed_report({"dense": (0.4, 0.2)}, loss=2.0),
        }
    )
    assert summary["dense"]["seeds"] == ["0", "1"] and summary["peer"]["seeds"] == ["0"]
    assert summary["peer"]["recall_trained"]["per_seed"] == [0.3]
    assert summary["peer"]["recall_trained_vs_dense"]["per_seed"] == pytest.approx([1.5])


@pytest.mark.parametrize(
    "seeds, message",
    [((), "--seeds needs at least one seed"), ((1, 1), "--seeds must be distinct")],
)
def test_the_seeds_are_checked_before_any_work(seeds, message, tmp_path: Path):
    with pytest.raises(UsageError, match=message):
        run(KnowledgeBenchmarkConfig(seeds=seeds, output_dir=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


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
