"""benchmarks.decode on a debug model: every part, engine, table dtype and storage runs, agrees
with eager generation, and lands in the JSON, the markdown table and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import decode
from memcompile.cli import UsageError
from memcompile.flavors import get_flavor

pytest.importorskip("transformers", reason="the hf engine loads the transformers class")


def test_decode_benchmark_runs_every_variant_and_writes_its_tables(tmp_path: Path):
    argv = [
        "--device", "cpu", "--base", "debug", "--architectures", "dense", "mem",
        "--engines", "eager", "hf", "--batch-sizes", "2", "--prompt-len", "5", "--new-tokens", "4",
        "--table-rows", "1024", "--table-dtypes", "fp32", "int8", "--storages", "ram", "mmap-cold",
        "--out", str(tmp_path / "decode.json"), "--markdown", str(tmp_path / "decode.md"),
        "--plot", str(tmp_path / "decode.png"),
    ]  # fmt: skip
    rows = decode.main(argv)["results"]

    assert [r for r in rows if "error" in r] == []
    twins = [(r["flavor"], r["engine"]) for r in rows if r["part"] == "twins"]
    assert twins == [(f, e) for f in ("dense_debug", "mem_debug") for e in ("eager", "hf")]
    sweep = [(r["dtype"], r["storage"]) for r in rows if r["part"] == "sweep"]
    assert sweep == [(d, s) for d in ("fp32", "int8") for s in ("ram", "mmap-cold")]
    for row in rows:
        assert row["ms_per_token"] > 0 and row["tokens_per_s"] > 0
        # every engine and storage generates the eager, in-memory model's tokens
        if row["engine"] != "eager" or row["storage"] != "ram":
            assert row["same_tokens"] == "yes", row
        if row["part"] == "twins" and row["architecture"] == "mem":
            assert row["time_vs_dense"] > 0

    memory = get_flavor("mem_debug").memory
    fp32_bytes = 1024 * memory.value_dim * 4
    table_bytes = {r["dtype"]: r["table_bytes"] for r in rows if r["part"] == "sweep"}
    assert table_bytes == {"fp32": fp32_bytes, "int8": fp32_bytes // 4 + 1024 * 4}

    assert json.loads((tmp_path / "decode.json").read_text())["results"] == rows
    markdown = (tmp_path / "decode.md").read_text().splitlines()
    assert len(markdown) == 2 + len(rows) and "| ms/token |" in markdown[0]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "decode.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-sizes", "1", "0"], "--batch-sizes must be >= 1, got 0"),
        (["--new-tokens", "0"], "--new-tokens must be >= 1, got 0"),
        (["--table-rows", "1000"], "--table-rows must be perfect squares (n_keys²), got 1000"),
        (["--base", "debug", "--prompt-len", "200", "--new-tokens", "100"], "max_seq_len 256"),
        (["--base", "huge"], "--base huge: unknown flavor 'dense_huge'"),
    ],
)
def test_decode_benchmark_refuses_a_bad_value_naming_the_flag(args: list[str], message: str):
    with pytest.raises(UsageError) as refused:
        decode.main([*args, "--device", "cpu"])
    assert message in str(refused.value)


def test_the_compiled_decode_step_generates_the_eager_tokens():
    # compile_backend eager: Dynamo traces the decode step without Inductor's code generation.
    argv = [
        "--device", "cpu", "--base", "debug", "--architectures", "mem",
        "--engines", "eager", "compiled", "--compile-backend", "eager", "--batch-sizes", "2",
        "--prompt-len", "5", "--new-tokens", "4", "--table-rows",
    ]  # fmt: skip
    eager, compiled = decode.main(argv)["results"]
    assert compiled["engine"] == "compiled" and compiled["same_tokens"] == "yes"
    assert "same_tokens" not in eager  # the reference
