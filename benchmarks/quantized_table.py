"""Quantized value tables for inference: bytes, lookup time and fact recall, per table dtype.

    python -m benchmarks.quantized_table                     # lookup time and table bytes
    python -m benchmarks.quantized_table --checkpoint outputs/mem_debug/checkpoint/step-400 \\
        --out quantized_table.json                           # + fact recall of the checkpoint

Lookup: the forward ``out[t] = sum_b w[t, b] * table[idx[t, b]]`` (inference reads no
gradient) for one table stored four ways: ``fp32`` and ``bf16`` (``memlayer::lookup``), ``int8``
and ``fp8`` (e4m3; ``memlayer::lookup_quantized``, one fp32 scale per row, dequantized inside
the kernel, bf16 output as the bf16 table's). Indices uniform in [0, N), fp32 softmax-like
weights. Reported: median time, the table's bytes, the gathered bytes per second (rows and
scales read: ``T * B * (D * e + scale bytes)``) and the time relative to the bf16 table.

Recall (with ``--checkpoint``, a ``recipes.pretrain`` checkpoint or an exported folder of
``--model``; needs the ``recipes`` extra): the table as trained (fp32), cast to bf16, and
quantized to int8 and fp8 by ``memcompile.memory.quantize_table`` (torchao), each measured by
``recipes.knowledge_eval.fact_recall`` on the corpus's trained and held-out questions (exact
match of greedy answers, as ``recipes.evaluate``); deltas in points against the bf16 table.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import tyro
from torch import Tensor

from benchmarks.common import (
    config_as_json,
    environment,
    format_table,
    measure,
    resolve_device,
    write_json,
)
from memcompile.cli import check_at_least, reported_errors
from memcompile.memory import QuantizedTable, quantize_table
from ops.lookup_quantized import QUANTIZED_DTYPES, quantize_rows

TableDtype = Literal["fp32", "bf16", "int8", "fp8"]
TABLE_DTYPES: tuple[TableDtype, ...] = ("fp32", "bf16", "int8", "fp8")


@dataclass
class QuantizedTableBenchmark:
    """Quantized value tables: lookup time, bytes and fact recall against fp32 / bf16 tables."""

    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda[:index]"."""
    rows: tuple[int, ...] = (65_536, 1_048_576)
    """Table rows N to sweep."""
    dim: int = 512
    """Table columns D."""
    tokens: int = 2048
    """Tokens T per lookup."""
    rows_per_token: int = 128
    """Rows B read per token (the paper's 4 heads x top-32)."""
    dtypes: tuple[TableDtype, ...] = TABLE_DTYPES
    warmup: int = 2
    repeats: int = 7
    checkpoint: Path | None = None
    """Also measure fact recall of this checkpoint (or exported folder) per table dtype."""
    model: str = "mem_debug"
    """The checkpoint's flavor."""
    seed: int = 0
    out: Path | None = None
    """Write the results as JSON here."""


# --------------------------------------------------------------------------- lookup


def _table(values: Tensor, dtype: TableDtype) -> tuple[Tensor, ...]:
    """The table as the lookup of ``dtype`` reads it: (values,) or (rows, scale)."""
    if dtype in QUANTIZED_DTYPES:
        return quantize_rows(values, QUANTIZED_DTYPES[dtype])
    return (values.to(torch.float32 if dtype == "fp32" else torch.bfloat16),)


def _read(table: tuple[Tensor, ...], indices: Tensor, weights: Tensor) -> Tensor:
    if len(table) == 2:
        rows, scale = table
        return torch.ops.memlayer.lookup_quantized(rows, scale, indices, weights, torch.bfloat16)
    return torch.ops.memlayer.lookup(table[0], indices, weights)


def _time_lookup(
    table: tuple[Tensor, ...],
    indices: Tensor,
    weights: Tensor,
    device: torch.device,
    config: QuantizedTableBenchmark,
) -> dict[str, Any]:
    with torch.no_grad():
        return measure(
            lambda: lambda: _read(table, indices, weights),
            device,
            warmup=config.warmup,
            repeats=config.repeats,
        )


def lookup_rows(config: QuantizedTableBenchmark, device: torch.device) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(config.seed)
    results = []
    for num_rows in config.rows:
        values = (torch.randn(num_rows, config.dim, generator=generator) * 0.05).to(device)
        shape = (config.tokens, config.rows_per_token)
        indices = torch.randint(0, num_rows, shape, generator=generator).to(device)
        weights = torch.rand(shape, generator=generator).softmax(-1).to(device)
        for dtype in config.dtypes:
            table = _table(values, dtype)
            table_bytes = sum(t.nbytes for t in table)
            row_bytes = sum(t[0].nbytes for t in table)  # a row and its scale
            timing = _time_lookup(table, indices, weights, device, config)
            row = {"rows": num_rows, "dim": config.dim, "table": dtype, **timing}
            row["table_mib"] = table_bytes / 2**20
            if "time_ms" in row:
                gathered = config.tokens * config.rows_per_token * row_bytes
                row["gathered_gbps"] = gathered / (row["time_ms"] * 1e-3) / 1e9
            results.append(row)
        bf16 = next((r for r in results[-len(config.dtypes) :] if r["table"] == "bf16"), None)
        for row in results[-len(config.dtypes) :]:
            if bf16 is not None and "time_ms" in row and "time_ms" in bf16:
                row["time_vs_bf16"] = row["time_ms"] / bf16["time_ms"]
                row["bytes_vs_bf16"] = row["table_mib"] / bf16["table_mib"]
        del values
    return results


LOOKUP_COLUMNS = [
    ("rows", "rows N", ","),
    ("dim", "D", "d"),
    ("table", "table", "s"),
    ("table_mib", "table MiB", ".1f"),
    ("bytes_vs_bf16", "bytes/bf16", ".3f"),
    ("time_ms", "ms", ".2f"),
    ("time_vs_bf16", "time/bf16", ".2f"),
    ("gathered_gbps", "gathered GB/s", ".1f"),
    ("error", "error", "s"),
]


# --------------------------------------------------------------------------- recall


def _with_table(model: torch.nn.Module, dtype: TableDtype) -> torch.nn.Module:
    model = copy.deepcopy(model)
    if dtype in QUANTIZED_DTYPES:
        quantize_table(model, dtype)
    elif dtype == "bf16":
        model.memory_values.data = model.memory_values.data.bfloat16()
    return model


def recall_rows(config: QuantizedTableBenchmark, device: torch.device) -> list[dict[str, Any]]:
    from recipes.checkpoints import load_checkpoint, load_tokenizer
    from recipes.data.knowledge import KnowledgeCorpus
    from recipes.knowledge_eval import fact_recall

    tokenizer = load_tokenizer()
    trained = load_checkpoint(config.checkpoint, config.model, tokenizer.get_vocab_size(), device)
    if isinstance(trained.memory_values, QuantizedTable):
        raise ValueError(f"--checkpoint {config.checkpoint}: its table is already quantized")
    corpus = KnowledgeCorpus()
    questions = {
        "trained": list(corpus.train_qa_pairs()),
        "heldout": list(corpus.eval_qa_pairs()),
    }
    results = []
    for dtype in config.dtypes:
        model = _with_table(trained, dtype).eval()
        table = model.memory_values
        tensors = table.buffers() if isinstance(table, QuantizedTable) else [table]
        row = {"table": dtype, "table_bytes": sum(t.nbytes for t in tensors)}
        with torch.no_grad():
            for split, qa_pairs in questions.items():
                row[f"recall_{split}"] = 100 * fact_recall(model, tokenizer, qa_pairs)["accuracy"]
        results.append(row)
        recalls = f"trained {row['recall_trained']:.1f}%, held-out {row['recall_heldout']:.1f}%"
        print(f"  {dtype} table: {recalls}", flush=True)
    bf16 = next((r for r in results if r["table"] == "bf16"), None)
    for row in results:
        if bf16 is not None:
            for split in questions:
                row[f"delta_{split}"] = row[f"recall_{split}"] - bf16[f"recall_{split}"]
    return results


RECALL_COLUMNS = [
    ("table", "table", "s"),
    ("table_bytes", "table bytes", ","),
    ("recall_trained", "recall trained %", ".1f"),
    ("delta_trained", "vs bf16 (points)", "+.1f"),
    ("recall_heldout", "recall held-out %", ".1f"),
    ("delta_heldout", "vs bf16 (points)", "+.1f"),
]


# --------------------------------------------------------------------------- command


def run(config: QuantizedTableBenchmark, argv: Sequence[str] = ()) -> dict[str, Any]:
    for flag, value in [
        ("--dim", config.dim),
        ("--tokens", config.tokens),
        ("--rows-per-token", config.rows_per_token),
        ("--repeats", config.repeats),
    ]:
        check_at_least(flag, value, 1)
    for num_rows in config.rows:
        check_at_least("--rows", num_rows, 1)
    check_at_least("--warmup", config.warmup, 0)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    payload: dict[str, Any] = {
        "benchmark": "quantized_table",
        "config": config_as_json(config),
        **environment(device, "benchmarks.quantized_table", argv),
    }
    payload["lookup"] = lookup_rows(config, device)
    print(format_table(payload["lookup"], LOOKUP_COLUMNS))
    if config.checkpoint is not None:
        payload["recall"] = recall_rows(config, device)
        print(format_table(payload["recall"], RECALL_COLUMNS))
    if config.out is not None:
        write_json(config.out, payload)
    return payload


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(tyro.cli(QuantizedTableBenchmark, args=argv, description=__doc__), argv)


if __name__ == "__main__":
    with reported_errors(ValueError, FileNotFoundError):
        main()
