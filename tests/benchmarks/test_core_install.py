"""``benchmarks.lookup`` and ``benchmarks.models`` need the core install only: they import and
run with every package of the ``recipes`` extra (and lm_eval) unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: pyproject.toml's ``recipes`` and ``hf`` extras, and the lm-evaluation-harness.
NOT_IN_THE_CORE_INSTALL = (
    "torchtitan",
    "torchao",
    "tensordict",
    "tokenizers",
    "datasets",
    "tensorboard",
    "peft",
    "transformers",
    "lm_eval",
)

PROGRAM = """
import sys

sys.modules.update(dict.fromkeys({blocked!r}))  # None there: `import name` raises ImportError

from benchmarks import lookup, models

lookup.main(["--device", "cpu", "--num-rows", "100", "--dim", "8", "--tokens", "5",
             "--rows-per-token", "4", "--heads", "2", "--impls", "ours", "aten",
             "--product-key-impls", "ours", "--warmup", "0", "--repeats", "1",
             "--copy-megabytes", "1", "--out", {lookup_json!r}])
models.main(["--device", "cpu", "--bases", "debug", "--modes", "eager", "--batch-size", "1",
             "--seq-len", "8", "--warmup", "0", "--repeats", "1", "--out", {models_json!r}])
assert not any(sys.modules[name] for name in {blocked!r})
"""


def test_lookup_and_models_benchmarks_run_without_the_recipes_extra(tmp_path: Path):
    lookup_json, models_json = tmp_path / "lookup.json", tmp_path / "models.json"
    program = PROGRAM.format(
        blocked=NOT_IN_THE_CORE_INSTALL, lookup_json=str(lookup_json), models_json=str(models_json)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lookup_rows = json.loads(lookup_json.read_text())["results"]
    assert {(row["op"], row["impl"]) for row in lookup_rows} == {
        ("lookup", "ours"),
        ("lookup", "aten"),
        ("product_key_topk", "ours"),
    }
    model_rows = json.loads(models_json.read_text())["results"]
    assert [row["flavor"] for row in model_rows] == [
        "dense_debug",
        "memplain_debug",
        "mem_debug",
        "engram_debug",
        "peer_debug",
    ]
    assert all("error" not in row for row in lookup_rows + model_rows)
