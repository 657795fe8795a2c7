"""Each benchmark at tiny sizes: it runs end to end and writes the JSON it promises.

No timing assertions (the CI machine is shared and noisy): only the structure and sanity of what
is written.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import ops
from benchmarks import lookup, models, value_step
from benchmarks.common import evaluate_targets
from memcompile.model import Transformer
from memcompile.stats import model_stats

pytestmark = pytest.mark.usefixtures("one_thread")


TINY_LOOKUP = [
    "--device",
    "cpu",
    "--num-rows",
    "100",
    "--dim",
    "33",
    "--tokens",
    "0",
    "5",
    "--rows-per-token",
    "6",
    "--heads",
    "2",
    "--warmup",
    "1",
    "--repeats",
    "2",
    "--copy-megabytes",
    "4",
]


def _assert_timed(row: dict) -> None:
    assert "error" not in row, row
    assert math.isfinite(row["time_ms"]) and row["time_ms"] > 0, row


def test_lookup_writes_json(tmp_path):
    out = tmp_path / "lookup.json"
    lookup.main(
        [*TINY_LOOKUP, "--impls", "ours", "aten", "naive", "--no-product-key", "--out", str(out)]
    )
    payload = json.loads(out.read_text())

    assert payload["benchmark"] == "lookup"
    assert payload["environment"]["torch"] == torch.__version__
    assert payload["environment"]["command"].startswith("python -m benchmarks.lookup")
    assert payload["copy_bandwidth_gbps"] > 0
    lookup_rows = [row for row in payload["results"] if row["op"] == "lookup"]
    # 2 token counts x 3 impls x 3 passes, in one process on the same inputs.
    assert len(lookup_rows) == 2 * 3 * 3
    assert {row["impl"] for row in lookup_rows} == {"ours", "aten", "naive"}
    assert {row["pass"] for row in lookup_rows} == {"forward", "backward", "forward+backward"}
    for row in lookup_rows:
        _assert_timed(row)
        assert row["bytes"] == lookup.lookup_bytes(
            lookup.Shape(**{key: row[key] for key in lookup.SHAPE_KEYS}), row["pass"]
        )
        # T=0 moves nothing in the forward, yet still writes the dense [N, D] value gradient.
        assert (row["gbps"] > 0) == (row["bytes"] > 0)
        assert row["copy_fraction"] == pytest.approx(row["gbps"] / payload["copy_bandwidth_gbps"])
        assert isinstance(row["speedup"], float) and row["speedup"] > 0
    assert all(row["speedup"] == 1.0 for row in lookup_rows if row["impl"] == "aten")
    # The CPU targets name N=1M, D=256: no verdict for this tiny shape.
    assert payload["targets"] == []


def test_lookup_compiled_and_product_key(tmp_path):
    out = tmp_path / "lookup.json"
    lookup.main(
        [
            *TINY_LOOKUP,
            "--tokens",
            "7",
            "--impls",
            "aten",
            "naive_compiled",
            "--product-key-impls",
            "ours",
            "plain",
            "--passes",
            "forward+backward",
            "--out",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())["results"]
    for row in rows:
        _assert_timed(row)
    assert {row["impl"] for row in rows if row["op"] == "lookup"} == {"aten", "naive_compiled"}
    product_key_rows = [row for row in rows if row["op"] == "product_key_topk"]
    assert {row["impl"] for row in product_key_rows} == {"ours", "plain"}
    assert all(row["subkeys_per_half"] == 10 and row["k"] == 3 for row in product_key_rows)
    assert all(isinstance(row["speedup"], float) for row in product_key_rows)


def test_plain_product_key_topk_is_the_search_it_is_timed_against():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(5, 3, 8, generator=generator)
    subkeys = torch.randn(3, 2, 7, 4, generator=generator)
    scores, indices = lookup.plain_product_key_topk(query, subkeys, k=4)
    expected_scores, expected_indices = ops.reference_product_key_topk(query, subkeys, 4)
    torch.testing.assert_close(scores.double(), expected_scores)
    assert torch.equal(indices, expected_indices)


def test_lookup_rejects_rows_per_token_not_divisible_by_heads():
    with pytest.raises(ValueError, match="--rows-per-token .* multiple of --heads"):
        lookup.main([*TINY_LOOKUP, "--rows-per-token", "5", "--impls", "aten"])


def test_cpu_target_verdict_uses_the_issue_shape():
    shape = dict(num_rows=1 << 20, dim=256, tokens=4096, rows_per_token=128, dtype="fp32")
    rows = [
        {"op": "lookup", "impl": "ours", "pass": "forward+backward", "speedup": 1.7, **shape},
        {
            "op": "lookup",
            "impl": "ours",
            "pass": "forward+backward",
            "speedup": 9.0,
            **{**shape, "dim": 128},
        },
    ]
    verdicts = evaluate_targets(lookup.TARGETS, rows, torch.device("cpu"), lookup.SHAPE_KEYS)
    assert [(v["threshold"], v["met"]) for v in verdicts] == [(1.5, True), (2.0, False)]
    assert all(v["at"] == shape for v in verdicts)


def test_lookup_rejects_tables_too_small_for_the_product_key_search():
    with pytest.raises(ValueError, match=r"--num-rows \[4\].*sqrt\(N\) >= k = .* = 3"):
        lookup.main([*TINY_LOOKUP, "--num-rows", "4", "--impls", "aten"])


TINY_MODELS = [
    "--device",
    "cpu",
    "--bases",
    "debug",
    "--batch-size",
    "2",
    "--seq-len",
    "9",
    "--warmup",
    "1",
    "--repeats",
    "2",
]


def test_models_writes_json(tmp_path):
    out = tmp_path / "models.json"
    # aot_eager traces forward and backward like inductor but generates no code: seconds, not
    # minutes, on a CPU.
    models.main([*TINY_MODELS, "--compile-backend", "aot_eager", "--out", str(out)])
    payload = json.loads(out.read_text())

    assert payload["benchmark"] == "models"
    assert payload["environment"]["command"].startswith("python -m benchmarks.models")
    rows = payload["results"]
    assert [(row["architecture"], row["mode"]) for row in rows] == [
        (architecture, mode) for architecture in models.ARCHITECTURES for mode in models.MODES
    ]
    for row in rows:
        _assert_timed(row)
        assert row["flavor"] == f"{row['architecture']}_debug"
        assert row["tokens_per_step"] == 18
        assert row["tokens_per_s"] == pytest.approx(18 / (row["time_ms"] * 1e-3))
        config = models.flavor_config("debug", row["architecture"], None)
        with torch.device("meta"):
            assert row["total_params"] == sum(p.numel() for p in Transformer(config).parameters())
        flops_per_token = model_stats(config, seq_len=9).train_flops_per_token
        assert row["tflops"] == pytest.approx(flops_per_token * row["tokens_per_s"] / 1e12)
        table_rows = None if config.table_shape is None else config.table_shape[0]
        assert row["memory_values"] == table_rows
        assert row["peak_memory_mb"] > 0
        assert ("compile_speedup" in row) == (row["mode"] == "compiled")
        assert ("time_vs_dense" in row) == (row["architecture"] != "dense")
    compiled_mem = next(r for r in rows if r["architecture"] == "mem" and r["mode"] == "compiled")
    [verdict] = payload["targets"]
    assert verdict["value"] == compiled_mem["compile_speedup"] and verdict["threshold"] == 1.0


def test_models_memory_values_override():
    config = models.flavor_config("debug", "mem", memory_values=48**2)
    assert config.memory.num_values == 48**2
    assert config.memory.layers == models.flavor_config("debug", "mem", None).memory.layers
    with pytest.raises(ValueError, match="perfect square"):
        models.flavor_config("debug", "mem", memory_values=1000)


TINY_VALUE_STEP = [
    "--device",
    "cpu",
    "--rows",
    "50",
    "200",
    "--dim",
    "8",
    "--tokens",
    "6",
    "--rows-per-token",
    "4",
    "--warmup",
    "1",
    "--repeats",
    "2",
    "--copy-megabytes",
    "4",
]


def test_value_step_writes_json(tmp_path, capsys):
    out = tmp_path / "value_step.json"
    value_step.main([*TINY_VALUE_STEP, "--out", str(out)])
    payload = json.loads(out.read_text())

    assert payload["benchmark"] == "value_step"
    assert payload["environment"]["command"].startswith("python -m benchmarks.value_step")
    assert "environment_variables" in payload["environment"]
    assert isinstance(payload["transparent_hugepage"], dict)
    assert payload["copy_bandwidth_gbps"] > 0
    assert payload["skipped"] == []
    rows = payload["results"]
    # Every method at both table sizes, in one process on the same inputs.
    assert [(row["num_rows"], row["method"]) for row in rows] == [
        (num_rows, method) for num_rows in (50, 200) for method in value_step.METHODS
    ]
    for num_rows in (50, 200):
        same = [row for row in rows if row["num_rows"] == num_rows]
        (touched,) = {row["touched_rows"] for row in same}
        assert 0 < touched <= min(num_rows, 6 * 4)
        assert payload["baselines"][str(num_rows)] in value_step.ATEN_METHODS
        assert max(row["speedup"] for row in same if row["method"] in value_step.ATEN_METHODS) == 1
    for row in rows:
        _assert_timed(row)
        shape = value_step.Shape(row["num_rows"], 8, 6, 4, "fp32")
        assert row["bytes"] == value_step.step_bytes(row["method"], shape, row["touched_rows"])
        assert row["copy_fraction"] == pytest.approx(row["gbps"] / payload["copy_bandwidth_gbps"])
        assert isinstance(row["speedup"], float) and row["speedup"] > 0
        assert row["peak_memory_mb"] > 0
        # The table, plus what each method keeps: a dense gradient and two moments for AdamW.
        table_mb = row["num_rows"] * 8 * 4 / 2**20
        dense = "adamw" in row["method"]
        assert row["state_mb"] >= (4 if dense else 1) * table_mb
        if row["method"] == "ours_row_sparse_sgd":
            # No [N, D] gradient or state: the table and a log of [T, D] + [T, B] numbers.
            assert row["state_mb"] < 2 * table_mb + 0.01
    printed = capsys.readouterr().out
    assert all(method in printed for method in value_step.METHODS)
    # The per-kernel table profiles Triton kernels: on CPU it says why it is not there.
    assert "per-kernel table skipped" in printed and all("kernels" not in row for row in rows)


def test_value_step_skips_what_does_not_fit(monkeypatch):
    monkeypatch.setattr(value_step, "available_bytes", lambda device: 0)
    payload = value_step.main(
        [*TINY_VALUE_STEP, "--rows", "50", "--methods", "ours_row_sparse_sgd", "aten_adamw_fused"]
    )
    assert [row["method"] for row in payload["results"]] == []
    assert [row["method"] for row in payload["skipped"]] == [
        "ours_row_sparse_sgd",
        "aten_adamw_fused",
    ]
