"""How fast do memory models decode, against their FLOP-matched dense twins, and how does the
table's size, dtype and storage change it?

    python -m benchmarks.decode                                   # this device's defaults
    python -m benchmarks.decode --engines eager compiled hf --out decode.json --plot decode.png
    python -m benchmarks.decode --table-rows 65536 1048576 16777216 --storages ram mmap-cold

Greedy generation of ``--new-tokens`` after a random ``--prompt-len`` prompt, two parts:

- **twins**: the dense, Memory and Memory+ twins of ``--base`` (``dense_<base>``,
  ``memplain_<base>``, ``mem_<base>``, as :mod:`benchmarks.models` builds them) at each
  ``--batch-sizes``, with each of ``--engines``: ``eager`` (:func:`memcompile.generate`),
  ``compiled`` (the same loop, its one-token decode step under ``torch.compile(dynamic=True)``:
  one graph for every cache length and batch size), ``hf`` (``generate()`` of the
  ``transformers`` class on the exported folder).
- **sweep**: the Memory+ twin, batch 1, eager, with ``--table-rows`` rows at the flavor's width,
  each table in every ``--table-dtypes`` (fp32, bf16: the whole model cast; int8, fp8: the table
  quantized with a per-row scale, :func:`memcompile.memory.quantize_table`) and from every
  ``--storages``:
  ``ram`` (in memory), ``mmap-warm`` (``from_pretrained(mmap=True)`` on a page cache holding
  the file), ``mmap-cold`` (the file's pages dropped from the page cache just before the run).

Reported per run: time to the first token (the prompt's forward, ``prefill_ms``), the decode
step (``ms_per_token``: one step for the whole batch; for ``hf``, which has no separate
prefill, the whole call / new tokens), tokens/s over the whole call (batch x new tokens),
peak memory (CUDA allocator, or the process's peak RSS on a Linux CPU: it only grows within a
process), the table's bytes, ``/ dense`` (decode step / the dense twin's, same engine and
batch) and whether the greedy tokens equal the eager engine's. Rows a model cannot run
(memory, a compile failure) record the error and the sweep goes on.

On a shared CPU, set ``OMP_NUM_THREADS`` to the cores you own: an oversubscribed OpenMP
thread pool makes every step wait for a descheduled thread.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import tyro

from benchmarks.common import (
    DTYPES,
    config_as_json,
    environment,
    format_table,
    matplotlib_pyplot,
    peak_memory_mb,
    release_memory,
    report_error,
    reset_peak_memory,
    resolve_device,
    save_figure,
    synchronize,
    write_json,
)
from benchmarks.models import ARCHITECTURES, Architecture, flavor_config
from memcompile.cli import UsageError, check_at_least, check_each_at_least, reported_errors
from memcompile.generate import KVCache, generate_tokens
from memcompile.memory import QuantizedTable, quantize_table
from memcompile.model import Transformer
from memcompile.pretrained import from_pretrained, save_pretrained
from ops.lookup_quantized import QUANTIZED_DTYPES

Engine = Literal["eager", "compiled", "hf"]
Storage = Literal["ram", "mmap-warm", "mmap-cold"]
TableDtype = Literal["fp32", "bf16", "int8", "fp8"]


@dataclass
class DecodeBenchmark:
    """Benchmark greedy decoding: dense vs Memory vs Memory+ twins, engines, table sizes."""

    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda[:index]"."""
    base: str | None = None
    """Base of the twins (default: tiny on CPU, 134m on CUDA)."""
    architectures: tuple[Architecture, ...] = ARCHITECTURES
    """dense = the base, memplain = Memory (one plain layer), mem = Memory+ (3 layers)."""
    engines: tuple[Engine, ...] | None = None
    """eager, compiled, hf (default: eager and hf on CPU, where compiling a decode step takes
    minutes; all three on CUDA)."""
    batch_sizes: tuple[int, ...] = (1, 16)
    prompt_len: int = 128
    new_tokens: int = 256
    table_rows: tuple[int, ...] | None = None
    """Table sizes of the sweep, perfect squares (default: 64K, 256K, 1M rows on CPU; up to
    16M on CUDA). An empty list skips the sweep."""
    table_dtypes: tuple[TableDtype, ...] = ("fp32", "bf16", "int8")
    """fp32 and bf16 cast the whole model; int8 and fp8 (e4m3) quantize the table alone, rows
    with a per-row scale, read without a dequantized copy (memcompile.memory.quantize_table)."""
    storages: tuple[Storage, ...] = ("ram",)
    """Where the sweep's tables live: ram, mmap-warm, mmap-cold (mmap needs the CPU)."""
    compile_backend: str = "inductor"
    repeats: int = 1
    """Timed runs per row (the median is kept), after one short warm-up run."""
    seed: int = 0
    out: Path | None = None
    """Write the results as JSON here."""
    markdown: Path | None = None
    """Write the table as markdown here."""
    plot: Path | None = None
    """Draw decode time against table size into this PNG (needs matplotlib)."""


# --------------------------------------------------------------------------- engines

Generator = Callable[[torch.Tensor, int], tuple[torch.Tensor, float]]
"""``(prompt, new_tokens) -> (tokens [B, new_tokens], prefill seconds or NaN)``."""


def _timestamped(
    tokens: Iterator[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, float]:
    """Drain a token stream; the seconds until its first token (the prefill) come back too."""
    start = time.perf_counter()
    first = None
    new = []
    for token in tokens:
        if first is None:
            synchronize(device)
            first = time.perf_counter() - start
        new.append(token)
    return torch.stack(new, dim=1), first


def eager_engine(model: Transformer, device: torch.device) -> Generator:
    return lambda prompt, n: _timestamped(generate_tokens(model, prompt, n), device)


def compiled_engine(model: Transformer, device: torch.device, backend: str) -> Generator:
    """:func:`memcompile.generate.generate_tokens` (greedy) with its decode step compiled; the
    prefill, run once, stays eager."""
    step = torch.compile(
        lambda token, cache: model(token[:, None], kv_cache=cache)[:, -1].argmax(-1),
        backend=backend,
        dynamic=True,  # the cache length grows every step: one graph for all of them
    )

    @torch.no_grad()
    def tokens(prompt: torch.Tensor, n: int) -> Iterator[torch.Tensor]:
        cache = KVCache.for_model(model, prompt.shape[0], prompt.shape[1] + n - 1)
        token = model(prompt, kv_cache=cache)[:, -1].argmax(-1)
        yield token
        for _ in range(n - 1):
            token = step(token, cache)
            yield token

    return lambda prompt, n: _timestamped(tokens(prompt, n), device)


def hf_engine(folder: Path, device: torch.device) -> Generator:
    """``generate()`` of the ``transformers`` class loaded from the exported ``folder``."""
    from memcompile.hf import MemcompileForCausalLM

    model = MemcompileForCausalLM.from_pretrained(folder).to(device).eval()

    def run(prompt: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[:, prompt.shape[1] :], float("nan")

    return run


# --------------------------------------------------------------------------- one row


def _time_generation(
    generator: Generator,
    prompt: torch.Tensor,
    config: DecodeBenchmark,
    device: torch.device,
    before_each: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Median timings of ``repeats`` runs after a short warm-up (which also compiles)."""
    generator(prompt, 2)
    runs = []
    reset_peak_memory(device)
    for _ in range(config.repeats):
        before_each()
        synchronize(device)
        start = time.perf_counter()
        tokens, prefill_s = generator(prompt, config.new_tokens)
        synchronize(device)
        runs.append((time.perf_counter() - start, prefill_s))
    total_s, prefill_s = sorted(runs)[len(runs) // 2]
    n, batch = config.new_tokens, prompt.shape[0]
    step_s = total_s / n if prefill_s != prefill_s else (total_s - prefill_s) / max(n - 1, 1)
    return {
        "prefill_ms": None if prefill_s != prefill_s else prefill_s * 1e3,
        "ms_per_token": step_s * 1e3,
        "tokens_per_s": batch * n / total_s,
        "peak_memory_mb": peak_memory_mb(device),
        "tokens": tokens,
    }


def _drop_page_cache(folder: Path) -> None:
    """Evict ``folder``'s files from the OS page cache (their clean pages; no root needed)."""
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as file:
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def table_bytes(table: torch.Tensor | QuantizedTable | None) -> int:
    """Bytes of a model's value table: a quantized one's rows and scales."""
    if isinstance(table, QuantizedTable):
        return table.rows.nbytes + table.scale.nbytes
    return 0 if table is None else table.nbytes


@contextmanager
def _exported(model: Transformer) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="decode-") as directory:
        folder = Path(directory) / "model"
        save_pretrained(model, folder)
        for path in folder.glob("*.safetensors"):
            with path.open("rb+") as file:
                os.fsync(file.fileno())  # dirty pages cannot be dropped from the page cache
        yield folder


def measure_row(
    row: dict[str, Any],
    engine: Engine,
    batch_size: int,
    config: DecodeBenchmark,
    device: torch.device,
    storage: Storage = "ram",
    dtype: TableDtype = "fp32",
) -> dict[str, Any]:
    """One row: build ``row["flavor"]`` (table resized to ``row["table_rows"]``), generate."""
    row = {**row, "engine": engine, "batch_size": batch_size, "storage": storage, "dtype": dtype}
    print(
        " ".join(
            f"{row[k]}"
            for k in ("flavor", "engine", "batch_size", "table_rows", "dtype", "storage")
        ),
        file=sys.stderr,
    )
    torch.manual_seed(config.seed)
    model_config = flavor_config(config.base, row["architecture"], row["table_rows"])
    generator = torch.Generator().manual_seed(config.seed)
    prompt = torch.randint(
        model_config.vocab_size, (batch_size, config.prompt_len), generator=generator
    ).to(device)
    try:
        with torch.device(device):
            model = Transformer(model_config).eval()
        if dtype in QUANTIZED_DTYPES:
            quantize_table(model, dtype)
        else:
            model.to(DTYPES[dtype])
        row["table_bytes"] = table_bytes(model.memory_values)
        with _exported(model) if engine == "hf" or storage != "ram" else _nothing() as folder:
            if storage != "ram":
                del model
                model = from_pretrained(folder, mmap=True)
            if engine == "hf":
                run = hf_engine(folder, device)
            elif engine == "compiled":
                run = compiled_engine(model, device, config.compile_backend)
            else:
                run = eager_engine(model, device)
            cold = storage == "mmap-cold"
            row.update(
                _time_generation(
                    run, prompt, config, device, lambda: _drop_page_cache(folder) if cold else None
                )
            )
    except (RuntimeError, OSError) as error:  # out of memory, a compile failure, a full disk
        row["error"] = report_error(error)
    finally:
        model = run = None
        torch.compiler.reset()  # compiled graphs hold on to the model
        release_memory(device)
    return row


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


# --------------------------------------------------------------------------- the grid


def _default_table_rows(device: torch.device) -> tuple[int, ...]:
    if device.type == "cuda":
        return (256**2, 512**2, 1024**2, 2048**2, 4096**2)
    return (256**2, 512**2, 1024**2)


def _add_comparisons(rows: list[dict[str, Any]]) -> None:
    """``time_vs_dense``: decode step / the dense twin's (twins, same engine and batch);
    ``same_tokens``: greedy tokens equal to the eager run of the same model and batch."""
    dense = {
        (r["engine"], r["batch_size"]): r["ms_per_token"]
        for r in rows
        if r["part"] == "twins" and r["architecture"] == "dense" and "ms_per_token" in r
    }
    eager = {
        (r["part"], r["flavor"], r["table_rows"], r["dtype"], r["batch_size"]): r["tokens"]
        for r in rows
        if r["engine"] == "eager" and r["storage"] == "ram" and "tokens" in r
    }
    for row in rows:
        if "ms_per_token" not in row:
            continue
        if row["part"] == "twins" and row["architecture"] != "dense":
            reference = dense.get((row["engine"], row["batch_size"]))
            row["time_vs_dense"] = None if reference is None else row["ms_per_token"] / reference
        key = (row["part"], row["flavor"], row["table_rows"], row["dtype"], row["batch_size"])
        if key in eager and (row["engine"] != "eager" or row["storage"] != "ram"):
            row["same_tokens"] = "yes" if torch.equal(eager[key], row["tokens"]) else "NO"


def run(config: DecodeBenchmark, argv: Sequence[str]) -> dict[str, Any]:
    _validate(config)
    device = resolve_device(config.device)
    on_cuda = device.type == "cuda"
    config.base = config.base or ("134m" if on_cuda else "tiny")
    config.engines = config.engines or (("eager", "compiled", "hf") if on_cuda else ("eager", "hf"))
    if config.table_rows is None:
        config.table_rows = _default_table_rows(device)
    if on_cuda and set(config.storages) != {"ram"}:
        raise UsageError(
            "--storages mmap-warm/mmap-cold map the table on the CPU: use --device cpu"
        )
    env = environment(device, "benchmarks.decode", argv)
    rows = []
    for architecture in config.architectures:
        base_row = {
            "part": "twins",
            "architecture": architecture,
            "flavor": f"{architecture}_{config.base}",
            "table_rows": None,
        }
        memory = flavor_config(config.base, architecture, None).memory
        base_row["table_rows"] = None if memory is None else memory.num_values
        for engine in config.engines:
            for batch_size in config.batch_sizes:
                rows.append(measure_row(base_row, engine, batch_size, config, device))
    for table_rows in config.table_rows:
        base_row = {
            "part": "sweep",
            "architecture": "mem",
            "flavor": f"mem_{config.base}",
            "table_rows": table_rows,
        }
        for dtype in config.table_dtypes:
            for storage in config.storages:
                rows.append(measure_row(base_row, "eager", 1, config, device, storage, dtype))
    _add_comparisons(rows)
    for row in rows:
        row.pop("tokens", None)
    table = format_table(rows, _COLUMNS)
    print(table)
    payload = {
        "benchmark": "decode",
        "environment": env,
        "config": config_as_json(config),
        "results": rows,
    }
    if config.out is not None:
        write_json(config.out, payload)
    if config.markdown is not None:
        write_markdown(config.markdown, rows)
    if config.plot is not None:
        plot_table_sweep(rows, config.plot)
    return payload


# --------------------------------------------------------------------------- output

_COLUMNS = [
    ("part", "part", "s"),
    ("flavor", "flavor", "s"),
    ("engine", "engine", "s"),
    ("batch_size", "batch", "d"),
    ("table_rows", "table rows", ",d"),
    ("dtype", "dtype", "s"),
    ("storage", "storage", "s"),
    ("table_bytes", "table bytes", ",d"),
    ("prefill_ms", "prefill ms", ".1f"),
    ("ms_per_token", "ms/token", ".2f"),
    ("tokens_per_s", "tokens/s", ",.1f"),
    ("time_vs_dense", "/ dense", ".2f"),
    ("same_tokens", "same tokens", "s"),
    ("peak_memory_mb", "peak MiB", ",.0f"),
    ("error", "error", "s"),
]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The printed table's columns and formats as a GitHub markdown table."""
    columns = [c for c in _COLUMNS if any(row.get(c[0]) is not None for row in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ("-" if row.get(k) is None else format(row[k], spec) for k, _, spec in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown_table(rows) + "\n")
    print(f"wrote {path}")


def plot_table_sweep(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Decode ms/token against table rows (log scale), one line per dtype and storage."""
    plt = matplotlib_pyplot()
    if plt is None:
        return
    sweep = [r for r in rows if r["part"] == "sweep" and "ms_per_token" in r]
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for dtype, storage in dict.fromkeys((r["dtype"], r["storage"]) for r in sweep):
        line = sorted(
            (r["table_rows"], r["ms_per_token"])
            for r in sweep
            if (r["dtype"], r["storage"]) == (dtype, storage)
        )
        axis.plot(*zip(*line), marker="o", label=f"{dtype} {storage}")
    axis.set_xscale("log", base=2)
    axis.set(
        xlabel="table rows",
        ylabel="decode ms/token (batch 1)",
        title="Memory+ decode cost against table size",
    )
    axis.legend()
    save_figure(figure, path)


# --------------------------------------------------------------------------- command line


def _validate(config: DecodeBenchmark) -> None:
    check_each_at_least("--batch-sizes", config.batch_sizes, 1)
    check_each_at_least("--table-rows", config.table_rows, 1)
    for flag, value in (
        ("--prompt-len", config.prompt_len),
        ("--new-tokens", config.new_tokens),
        ("--repeats", config.repeats),
    ):
        check_at_least(flag, value, 1)
    for rows in config.table_rows or ():
        if round(rows**0.5) ** 2 != rows:
            raise UsageError(f"--table-rows must be perfect squares (n_keys²), got {rows}")
    try:
        base = flavor_config(config.base or "tiny", "dense", None)
    except ValueError as error:  # an unknown flavor, named with the known ones
        raise UsageError(f"--base {config.base}: {error}") from None
    if config.prompt_len + config.new_tokens > base.max_seq_len:
        raise UsageError(
            f"--prompt-len + --new-tokens must be <= the base's max_seq_len {base.max_seq_len}, "
            f"got {config.prompt_len} + {config.new_tokens}"
        )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(tyro.cli(DecodeBenchmark, args=argv), argv)


if __name__ == "__main__":
    with reported_errors():
        main()
