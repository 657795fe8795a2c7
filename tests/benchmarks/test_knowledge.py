"""The knowledge benchmark at a tiny size: it trains the three twins and writes its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchtitan", reason="the benchmark reuses the recipes' corpus and tokenizer")

from benchmarks.knowledge import MODEL_NAMES, KnowledgeBenchmarkConfig, run  # noqa: E402


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
        assert 0 <= final["recall_heldout"] <= 1 and 0 <= final["recall_trained"] <= 1
        assert final["answer_nll"] > 0 and final["biography_nll"] > 0
        # The memory twins are FLOP-matched from below: they never cost more than dense.
        assert result["train_flops_per_token"] <= dense_flops
        assert (result["params"]["memory"] > 0) == (name != "dense")
    assert all(0 <= report["majority_baseline"][split] <= 1 for split in ("recall_heldout", "recall_trained"))
    table = (tmp_path / "out" / "knowledge.md").read_text()
    assert all(f"| {name} |" in table for name in (*MODEL_NAMES, "majority answer (no model)"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "out" / "knowledge.png").stat().st_size > 0
