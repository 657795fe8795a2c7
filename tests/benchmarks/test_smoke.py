"""Each benchmark at tiny sizes: it runs end to end and writes the JSON it promises.

No timing assertions (the CI machine is shared and noisy): only the structure and sanity of what
is written.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import lookup
from benchmarks.common import evaluate_targets

TINY_LOOKUP = [
    "--device", "cpu", "--num-rows", "100", "--dim", "33", "--tokens", "0", "5",
    "--rows-per-token", "6", "--heads", "2", "--warmup", "1", "--repeats", "2",
    "--copy-megabytes", "4",
]


def _assert_timed(row: dict) -> None:
    assert "error" not in row, row
    assert math.isfinite(row["time_ms"]) and row["time_ms"] > 0, row


def test_lookup_writes_json(tmp_path):
    out = tmp_path / "lookup.json"
    lookup.main([*TINY_LOOKUP, "--impls", "ours", "aten", "naive", "--out", str(out)])
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
        assert row["bytes"] == lookup.lookup_bytes(lookup.Shape(**{
            key: row[key] for key in lookup.SHAPE_KEYS
        }), row["pass"])
        # T=0 moves nothing in the forward, yet still writes the dense [N, D] value gradient.
        assert (row["gbps"] > 0) == (row["bytes"] > 0)
        assert row["copy_fraction"] == pytest.approx(row["gbps"] / payload["copy_bandwidth_gbps"])
        assert isinstance(row["speedup"], float) and row["speedup"] > 0
    assert all(row["speedup"] == 1.0 for row in lookup_rows if row["impl"] == "aten")
    # The CPU targets name N=1M, D=256: no verdict for this tiny shape.
    assert payload["targets"] == []


def test_lookup_compiled_and_product_key(tmp_path):
    out = tmp_path / "lookup.json"
    lookup.main([
        *TINY_LOOKUP, "--tokens", "7", "--impls", "aten", "naive_compiled",
        "--passes", "forward+backward", "--out", str(out),
    ])
    rows = json.loads(out.read_text())["results"]
    for row in rows:
        _assert_timed(row)
    assert {row["impl"] for row in rows if row["op"] == "lookup"} == {"aten", "naive_compiled"}
    if hasattr(torch.ops.memlayer, "product_key_topk"):
        product_key_rows = [row for row in rows if row["op"] == "product_key_topk"]
        assert {row["impl"] for row in product_key_rows} == set(
            lookup.LookupBenchmark.product_key_impls
        )
        assert all(row["subkeys_per_half"] == 10 and row["k"] == 3 for row in product_key_rows)


def test_lookup_bytes_formula():
    shape = lookup.Shape(num_rows=10, dim=4, tokens=3, rows_per_token=2, dtype="bf16")
    forward = 3 * 2 * 4 * 2 + 3 * 2 * (8 + 2) + 3 * 4 * 2
    backward = 3 * 4 * 2 + 3 * 2 * (8 + 2) + 10 * 4 * 2 + 3 * 2 * 4 * 2 + 3 * 2 * 2
    assert lookup.lookup_bytes(shape, "forward") == forward
    assert lookup.lookup_bytes(shape, "backward") == backward
    assert lookup.lookup_bytes(shape, "forward+backward") == forward + backward


def test_lookup_rejects_rows_per_token_not_divisible_by_heads():
    with pytest.raises(ValueError, match="--rows-per-token .* multiple of --heads"):
        lookup.main([*TINY_LOOKUP, "--rows-per-token", "5", "--impls", "aten"])


def test_cpu_target_verdict_uses_the_issue_shape():
    shape = dict(num_rows=1 << 20, dim=256, tokens=4096, rows_per_token=128, dtype="fp32")
    rows = [
        {"op": "lookup", "impl": "ours", "pass": "forward+backward", "speedup": 1.7, **shape},
        {"op": "lookup", "impl": "ours", "pass": "forward+backward", "speedup": 9.0,
         **{**shape, "dim": 128}},
    ]
    verdicts = evaluate_targets(lookup.TARGETS, rows, torch.device("cpu"), lookup.SHAPE_KEYS)
    assert [(v["threshold"], v["met"]) for v in verdicts] == [(1.5, True), (2.0, False)]
    assert all(v["at"] == shape for v in verdicts)


def test_lookup_rejects_tables_too_small_for_the_product_key_search():
    with pytest.raises(ValueError, match=r"--num-rows \[4\].*sqrt\(N\) >= k = .* = 3"):
        lookup.main([*TINY_LOOKUP, "--num-rows", "4", "--impls", "aten"])
