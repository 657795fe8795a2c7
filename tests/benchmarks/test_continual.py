"""The continual-learning benchmark at a tiny size: real pretraining and finetuning runs of each
method, and the report they make."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torchtitan", reason="the benchmark runs the recipes")

from benchmarks.continual import ContinualBenchmarkConfig, run, summarize  # noqa: E402


def test_matched_learning_compares_each_method_where_all_have_learnt_as_much():
    curves = {
        "a": [
            {"step": 0, "new_recall": 0.0, "old_recall": 0.9, "old_nll": 1.0},
            {"step": 5, "new_recall": 0.5, "old_recall": 0.8, "old_nll": 1.1},
            {"step": 10, "new_recall": 0.9, "old_recall": 0.5, "old_nll": 1.5},
        ],
        "b": [
            {"step": 0, "new_recall": 0.0, "old_recall": 0.9, "old_nll": 1.0},
            {"step": 5, "new_recall": 0.2, "old_recall": 0.9, "old_nll": 1.0},
            {"step": 10, "new_recall": 0.6, "old_recall": 0.85, "old_nll": 1.05},
        ],
    }
    summary = summarize(curves)
    # Every method reaches 0.6: "a" first does at step 10, "b" at step 10.
    assert summary["a"]["matched"]["target_new_recall"] == 0.6
    assert summary["a"]["matched"]["step"] == 10 and summary["b"]["matched"]["step"] == 10
    assert summary["a"]["final"]["forgetting"] == pytest.approx(0.4)
    assert summary["b"]["final"]["old_nll_increase"] == pytest.approx(0.05)


def test_tiny_continual_benchmark_writes_its_report(tmp_path: Path):
    config = ContinualBenchmarkConfig(
        seeds=(0,), pretrain_steps=2, base_people=20, new_people=4, seq_len=32, batch_size=2,
        finetune_steps=2, eval_every=1, eval_max_people=2, output_dir=tmp_path / "out",
        methods=("sparse_memory", "full"),  # LoRA runs the same glue (and its own recipe tests)
        cache_dir=tmp_path / "cache",
    )  # fmt: skip
    run(config)
    report = json.loads((tmp_path / "out" / "continual.json").read_text())
    result = report["seeds"]["0"]
    assert tuple(result["curves"]) == ("sparse_memory", "full")
    for curve in result["curves"].values():
        assert [point["step"] for point in curve] == [0, 1, 2]
        assert curve[0] == result["base"]  # every method starts from the same base
    assert set(report["paper_shape"]) == {"forgetting_ratio", "learning_ratio", "met"}
    table = (tmp_path / "out" / "continual.md").read_text()
    assert all(f"| {method} | 0 | final |" in table for method in result["curves"])
    pytest.importorskip("matplotlib")
    assert (tmp_path / "out" / "continual.png").stat().st_size > 0
