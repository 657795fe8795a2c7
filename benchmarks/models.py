"""What does a memory layer cost over a dense FFN, and how much does ``torch.compile`` buy?

    python -m benchmarks.models                       # this device's default flavors
    python -m benchmarks.models --bases 134m --batch-size 4 --seq-len 2048 --out models.json

Times one training step (forward, cross-entropy loss, backward, AdamW step, gradients set to
None) of the dense, Memory (one plain memory layer), Memory+, Engram and PEER twins of each base
(``dense_<base>``, ``memplain_<base>``, ``mem_<base>``, ``engram_<base>``, ``peer_<base>`` in
:mod:`memcompile.flavors`; a base without some family's flavor skips it), eager and
with the forward + loss under ``torch.compile`` (the optimizer step stays eager), on random
tokens. Reports the median step time, tokens/s, achieved TFLOP/s (the flavors' training FLOPs
per token, :func:`memcompile.stats.model_stats`), and peak memory: CUDA allocator peak, or the
process's peak RSS on a Linux CPU (which includes earlier variants' memory the allocator kept).

``--memory-values`` overrides the table size of the product-key memory flavors (Memory and
Memory+; e.g. 4194304 = 2048² for the 4M study); ``--precision bf16`` runs the step under bf16
autocast with fp32 parameters; ``--table-optimizers adamw rowwise_adagrad`` times each memory
flavor with its table trained densely and row-sparsely (:mod:`memcompile.sparse_optim`; column
``x adamw table``). For peak memory per variant on a CPU run one variant per process: RSS peaks
only grow.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import tyro

from benchmarks.common import (
    Target,
    config_as_json,
    environment,
    evaluate_targets,
    format_table,
    matplotlib_pyplot,
    measure,
    print_verdicts,
    release_memory,
    report_error,
    resolve_device,
    save_figure,
    write_json,
)
from memcompile.cli import check_at_least, check_finite, reported_errors
from memcompile.config import TransformerConfig
from memcompile.flavors import FLAVORS, get_flavor
from memcompile.model import Transformer
from memcompile.optim import dense_trainable_parameters
from memcompile.sparse_optim import RowSparseOptimizer
from memcompile.stats import model_stats

Architecture = Literal["dense", "memplain", "mem", "engram", "peer"]
Mode = Literal["eager", "compiled"]

ARCHITECTURES: tuple[Architecture, ...] = ("dense", "memplain", "mem", "engram", "peer")
TableOptimizer = Literal["adamw", "sgd", "rowwise_adagrad", "adam"]
MODES: tuple[Mode, ...] = ("eager", "compiled")


@dataclass
class ModelBenchmark:
    """Benchmark a training step of dense vs Memory, Memory+, Engram and PEER twins, eager vs
    compiled."""

    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda[:index]"."""
    bases: tuple[str, ...] | None = None
    """Base models (default: tiny on CPU; 134m, 373m, 1b on CUDA)."""
    architectures: tuple[Architecture, ...] = ARCHITECTURES
    """dense = the base, memplain = Memory (one plain layer), mem = Memory+ (3 layers),
    engram = Engram (hashed n-grams, 2 blocks), peer = PEER (in Memory+'s blocks)."""
    modes: tuple[Mode, ...] = MODES
    compile_backend: str = "inductor"
    """torch.compile backend of the compiled mode ("aot_eager" traces without code generation)."""
    memory_values: int | None = None
    """Rows of the Memory / Memory+ value table (a perfect square); default: the flavor's."""
    batch_size: int = 4
    """Sequences per step."""
    seq_len: int | None = None
    """Tokens per sequence (default: 256 on CPU, 2048 on CUDA)."""
    precision: Literal["fp32", "bf16"] | None = None
    """fp32, or bf16 autocast with fp32 parameters (default: fp32 on CPU, bf16 on CUDA)."""
    lr: float = 1e-3
    table_optimizers: tuple[TableOptimizer, ...] = ("adamw",)
    """How the memory value table trains: adamw (dense, fused, with the other parameters) and/or
    a row-sparse rule of memcompile.sparse_optim (sgd, rowwise_adagrad, adam); each memory
    flavor runs once per entry."""
    warmup: int = 2
    repeats: int = 5
    seed: int = 0
    out: Path | None = None
    """Write the results as JSON here."""
    plot: Path | None = None
    """Draw step times per flavor into this PNG (needs matplotlib)."""


def flavor_config(
    base: str, architecture: Architecture, memory_values: int | None
) -> TransformerConfig:
    """The flavor ``<architecture>_<base>``; its table resized to ``memory_values`` rows if set."""
    config = get_flavor(f"{architecture}_{base}")
    if memory_values is None or config.memory is None:
        return config
    # replace() re-runs the configs' validation (a square table, topk <= sqrt(num_values)).
    return replace(config, memory=replace(config.memory, num_values=memory_values))


def _make_step(
    model: Transformer,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    mode: Mode,
    config: ModelBenchmark,
    table_optimizer: TableOptimizer,
) -> Callable[[], torch.Tensor]:
    """One training step of ``model`` on fixed tokens, returning the (detached) loss."""
    device_type = tokens.device.type
    optimizers = []
    if table_optimizer != "adamw" and model.memory_values is not None:
        # Built first: the table is then its alone (dense_trainable_parameters leaves it out).
        optimizers.append(RowSparseOptimizer(model, table_optimizer, lr=10 * config.lr))
    # Fused AdamW (CUDA, and CPU since torch 2.4): what a real training loop would use.
    trainable = [p for _, p in dense_trainable_parameters(model)]
    optimizers.append(torch.optim.AdamW(trainable, lr=config.lr, fused=True))

    def loss_of(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            logits = model(tokens)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    forward_loss = (
        torch.compile(loss_of, backend=config.compile_backend) if mode == "compiled" else loss_of
    )

    def step() -> torch.Tensor:
        loss = forward_loss(tokens, targets)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def benchmark_flavor(
    base: str,
    architecture: Architecture,
    mode: Mode,
    config: ModelBenchmark,
    device: torch.device,
    table_optimizer: TableOptimizer = "adamw",
) -> dict[str, Any]:
    model_config = flavor_config(base, architecture, config.memory_values)
    stats = model_stats(model_config, seq_len=config.seq_len)
    row: dict[str, Any] = {
        "base": base,
        "architecture": architecture,
        "mode": mode,
        "table_optimizer": table_optimizer,
        "flavor": f"{architecture}_{base}",
        # Rows of the model's one table (values, Engram's hashed rows, PEER's down + up vectors).
        "memory_values": None if model_config.table_shape is None else model_config.table_shape[0],
        "total_params": stats.total_params,
        "active_params": stats.active_params,
        "tokens_per_step": config.batch_size * config.seq_len,
    }
    print(f"{row['flavor']} {mode} {table_optimizer}", file=sys.stderr)
    torch.manual_seed(config.seed)
    try:
        with torch.device(device):
            model = Transformer(model_config)
    except RuntimeError as error:  # e.g. a table that does not fit in memory
        row["error"] = report_error(error)
        release_memory(device)
        return row
    generator = torch.Generator(device=device).manual_seed(config.seed)
    shape = (config.batch_size, config.seq_len)
    tokens = torch.randint(model_config.vocab_size, shape, device=device, generator=generator)
    targets = torch.randint(model_config.vocab_size, shape, device=device, generator=generator)
    step = _make_step(model, tokens, targets, mode, config, table_optimizer)

    row.update(measure(lambda: step, device, warmup=config.warmup, repeats=config.repeats))
    if "time_ms" in row:
        row["tokens_per_s"] = row["tokens_per_step"] / (row["time_ms"] * 1e-3)
        row["tflops"] = stats.train_flops_per_token * row["tokens_per_s"] / 1e12
    del model
    step = None  # the step holds the model too
    torch.compiler.reset()  # drops the compiled graphs, which hold on to the model
    release_memory(device)
    return row


def add_ratios(rows: Sequence[dict[str, Any]]) -> None:
    """``compile_speedup`` = eager / compiled step time of the same flavor (and table
    optimizer); ``time_vs_dense`` = step time / its dense twin's, in the same mode;
    ``table_speedup`` = the step time with a dense AdamW table / this one's."""
    times = {
        (row["base"], row["architecture"], row["mode"], row["table_optimizer"]): row["time_ms"]
        for row in rows
        if "time_ms" in row
    }
    for row in rows:
        if "time_ms" not in row:
            continue
        base, architecture, mode, table = (
            row[k] for k in ("base", "architecture", "mode", "table_optimizer")
        )
        eager = times.get((base, architecture, "eager", table))
        if mode == "compiled" and eager is not None:
            row["compile_speedup"] = eager / row["time_ms"]
        dense = times.get((base, "dense", mode, "adamw"))
        if architecture != "dense" and dense is not None:
            row["time_vs_dense"] = row["time_ms"] / dense
        dense_table = times.get((base, architecture, mode, "adamw"))
        if table != "adamw" and dense_table is not None:
            row["table_speedup"] = dense_table / row["time_ms"]


def _memory_plus(mode: Mode) -> Callable[[dict[str, Any]], bool]:
    return lambda row: (
        row["architecture"] == "mem" and row["mode"] == mode and row["table_optimizer"] == "adamw"
    )


TARGETS = (
    Target(
        "issue 5: CPU compiled Memory+ step >= 1.0x eager",
        "cpu",
        "compile_speedup",
        1.0,
        _memory_plus("compiled"),
    ),
    Target(
        "issue 5: GPU compiled Memory+ step >= 1.2x eager",
        "cuda",
        "compile_speedup",
        1.2,
        _memory_plus("compiled"),
    ),
    *(
        Target(
            f"issue 5: GPU {mode} Memory+ step <= 1.25x its dense twin",
            "cuda",
            "time_vs_dense",
            1.25,
            _memory_plus(mode),
            at_most=True,
        )
        for mode in MODES
    ),
)

_COLUMNS = [
    ("flavor", "flavor", "s"),
    ("mode", "mode", "s"),
    ("table_optimizer", "table", "s"),
    ("memory_values", "table rows", "d"),
    ("total_params", "params", ",d"),
    ("tokens_per_step", "tokens", "d"),
    ("time_ms", "step ms", ".1f"),
    ("tokens_per_s", "tokens/s", ",.0f"),
    ("tflops", "TFLOP/s", ".3g"),
    ("compile_speedup", "x eager", ".2f"),
    ("time_vs_dense", "/ dense", ".2f"),
    ("table_speedup", "x adamw table", ".2f"),
    ("peak_memory_mb", "peak MiB", ",.0f"),
    ("error", "error", "s"),
]


def plot_step_times(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Step time per flavor, eager and compiled side by side."""
    plt = matplotlib_pyplot()
    if plt is None:
        return
    flavors = list(dict.fromkeys(row["flavor"] for row in rows))
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(flavors)), 4.5))
    width = 0.8 / len(modes)
    for offset, mode in enumerate(modes):
        times = {row["flavor"]: row.get("time_ms", 0.0) for row in rows if row["mode"] == mode}
        positions = [i + offset * width for i in range(len(flavors))]
        axis.bar(positions, [times.get(f, 0.0) for f in flavors], width, label=mode)
    axis.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(flavors))], flavors)
    axis.set(ylabel="training step (ms)", title="dense vs Memory, Memory+, Engram, PEER")
    axis.legend()
    save_figure(figure, path)


def _validate(config: ModelBenchmark) -> None:
    for flag, value in (
        ("--memory-values", config.memory_values),
        ("--batch-size", config.batch_size),
        ("--seq-len", config.seq_len),
        ("--repeats", config.repeats),
    ):
        check_at_least(flag, value, 1)
    check_at_least("--warmup", config.warmup, 0)
    check_finite("--lr", config.lr, 0)


def _defaults(config: ModelBenchmark, device: torch.device) -> ModelBenchmark:
    on_cuda = device.type == "cuda"
    config.bases = config.bases or (("134m", "373m", "1b") if on_cuda else ("tiny",))
    config.seq_len = config.seq_len or (2048 if on_cuda else 256)
    config.precision = config.precision or ("bf16" if on_cuda else "fp32")
    return config


def run(config: ModelBenchmark, argv: Sequence[str]) -> dict[str, Any]:
    _validate(config)
    device = resolve_device(config.device)
    config = _defaults(config, device)
    env = environment(device, "benchmarks.models", argv)
    rows = [
        benchmark_flavor(base, architecture, mode, config, device, table)
        for base in config.bases
        for architecture in config.architectures
        if f"{architecture}_{base}" in FLAVORS  # e.g. Engram and PEER have no 373m twin
        for mode in config.modes
        for table in (config.table_optimizers if architecture != "dense" else ("adamw",))
    ]
    add_ratios(rows)
    targets = evaluate_targets(TARGETS, rows, device, context=("base", "mode"))
    print(format_table(rows, _COLUMNS))
    print()
    print_verdicts(targets)
    payload = {
        "benchmark": "models",
        "environment": env,
        "config": config_as_json(config),
        "results": rows,
        "targets": targets,
    }
    if config.out is not None:
        write_json(config.out, payload)
    if config.plot is not None:
        plot_step_times(rows, config.plot)
    return payload


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(tyro.cli(ModelBenchmark, args=argv), argv)


if __name__ == "__main__":
    with reported_errors():
        main()
