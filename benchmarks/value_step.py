"""What does one training step of the value table cost, dense vs row-sparse?

    python -m benchmarks.value_step                  # N = 1M and 4M, D = 256, T = 4096, B = 128
    python -m benchmarks.value_step --rows 1000000 \\
        --methods aten_adamw_fused ours_row_sparse_adam --out value_step.json
    THP_MEM_ALLOC_ENABLE=1 python -m benchmarks.value_step --out value_step_thp.json

Times one training step of an ``[N, D]`` fp32 value table alone: the weighted lookup of ``B``
rows for each of ``T`` tokens (``out[t] = sum_b w[t, b] * table[idx[t, b]]``), its backward
with a fixed random ``grad_out [T, D]``, gradient clipping to norm ``--max-norm`` (the recipe
clips the table on its own, whichever optimizer trains it) and the optimizer's update, then the
gradient is dropped (``zero_grad(set_to_none=True)``). The weights are a softmax of random
scores that require grad, as in a model, so every method also computes the weight gradient.
Methods, run one after another in the same process on the same inputs:

- ``aten_adamw_fused`` / ``aten_adamw_foreach``: ``F.embedding_bag(idx, table,
  per_sample_weights=w, mode="sum")`` with a dense ``[N, D]`` gradient,
  ``torch.nn.utils.clip_grad_norm_`` and ``torch.optim.AdamW(fused=True)`` /
  ``AdamW(foreach=True)`` (lr 1e-3);
- ``aten_sparse_adam``: ``nn.EmbeddingBag(N, D, mode="sum", sparse=True)`` (over the same
  table) and ``torch.optim.SparseAdam``; its sparse gradient is coalesced and clipped by hand
  (``clip_grad_norm_`` does not take sparse gradients);
- ``ours_dense_adamw_fused``: ``torch.ops.memlayer.lookup`` with a dense gradient, then as
  ``aten_adamw_fused``;
- ``ours_row_sparse_<rule>`` for ``rule`` in sgd, rowwise_adagrad, adam:
  ``memcompile.sparse_optim.RowSparseOptimizer`` over a module holding the table and a
  ``ValueLookup``: the backward records ``(grad_out, indices, weights)`` instead of forming a
  gradient, and ``clip_grad_norm_`` + ``step`` touch only the rows the step read.

Indices are uniform in ``[0, N)``; ``touched`` is the number of distinct rows they read.
Every method starts from the same freshly drawn table (same seed); everything a method
allocated is freed before the next one starts, so the largest table only needs room for one
method's state at a time (a method that would not fit in the memory available is skipped and
listed under ``skipped``).

Reported per method:

- ``ms``: the median step time (``--repeats`` steps after ``--warmup`` untimed ones: the first
  step creates the optimizer state);
- ``state MiB``: the training state alive at the end of a step, before ``zero_grad``, counted
  from the tensors themselves (distinct storages): table + gradient + optimizer state; for the
  row-sparse methods the table, the optimizer state and the recorded gradient (what the step read
  from it is freed by the step itself);
- ``peak MiB`` / ``+MiB``: the process's peak RSS during the timed steps on a Linux CPU (CUDA:
  peak allocated), and that peak minus the memory in use before the method built its table:
  what the method's step costs in memory, workspace included;
- ``huge MiB``: ``AnonHugePages`` of the process while that state is alive (Linux): how much of
  it sits on transparent huge pages;
- ``GB/s`` and ``of copy``: the fewest bytes the step must move over its time, and that as a
  fraction of the copy bandwidth (``dst.copy_(src)``, read + write) measured at the start of the
  same run. The lookup's and the row-sparse update's bytes are the sums of their Triton kernels'
  (``benchmarks/kernel_bytes.py``, which gives each formula); with ``e`` the table's element
  bytes, ``ei = 8`` (int64 indices), ``U`` touched rows:

      lookup (all)      lookup_forward + weights_grad (fp32 weights)
      dense AdamW       + the deterministic value gradient's kernels (the [N, D] gradient
                        written whole) + N*D*e (clip: read it)
                        + 7*N*D*e (AdamW: read table, grad, 2 moments; write table, 2 moments)
      SparseAdam        + U*(D*e + ei) (coalesced gradient) + U*D*e (clip) + 7*U*D*e (update)
      row-sparse        + hot_row_pieces (once) + row_sq_norms + update_rows[rule]

  On CUDA, each ``ours_*`` step is also profiled (``torch.profiler``) and a second table gives
  each Triton kernel's time, fewest bytes, FLOPs, GB/s and fraction of copy bandwidth ("other":
  the torch kernels around them: sorting, AdamW, the norm); on CPU the ops run C++ kernels and
  that table is skipped.
- ``x aten``: the fastest ATen method's time over this one's, at the same shape.

Transparent huge pages: PyTorch's CPU allocator asks for huge pages for large tensors only when
``THP_MEM_ALLOC_ENABLE=1`` is set, and reads it once, at the first allocation of the process. It
is therefore not a flag: rerun the benchmark with the variable set (third command above) to
compare. Each JSON records the variables that were set (``environment.environment_variables``)
and the kernel's THP settings (``transparent_hugepage``); the op's own dense value gradient
asks for huge pages either way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
import tyro
from torch import Tensor, nn

import ops  # noqa: F401  (registers torch.ops.memlayer)
from benchmarks import kernel_bytes
from benchmarks.common import (
    DTYPES,
    config_as_json,
    copy_bandwidth_gbps,
    environment,
    format_table,
    measure,
    peak_memory_mb,
    release_memory,
    reset_peak_memory,
    resolve_device,
    write_json,
)
from benchmarks.lookup import DtypeName, Shape
from memcompile.cli import (
    UsageError,
    check_at_least,
    check_between,
    check_each_at_least,
    check_finite,
    check_positive,
    reported_errors,
)
from memcompile.memory import ValueLookup
from memcompile.sparse_optim import RowSparseOptimizer
from ops.table_rule import RULES

Method = Literal[
    "aten_adamw_fused",
    "aten_adamw_foreach",
    "aten_sparse_adam",
    "ours_dense_adamw_fused",
    "ours_row_sparse_sgd",
    "ours_row_sparse_rowwise_adagrad",
    "ours_row_sparse_adam",
]
METHODS: tuple[Method, ...] = get_args(Method)
ATEN_METHODS = tuple(name for name in METHODS if name.startswith("aten_"))


@dataclass
class ValueStepBenchmark:
    """Benchmark one training step of the value table: ATen dense / sparse vs ours."""

    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda[:index]"."""
    rows: tuple[int, ...] = (1_000_000, 4_000_000)
    """Table rows N to sweep."""
    dim: int = 256
    """Table columns D."""
    dtype: DtypeName = "fp32"
    """The table's dtype (the row-sparse optimizer state stays fp32; torch's AdamW keeps its
    moments in the parameter's dtype)."""
    tokens: int = 4096
    """Tokens T per step."""
    rows_per_token: int = 128
    """Rows B read per token."""
    methods: tuple[Method, ...] = METHODS
    lr: float = 1e-3
    """Learning rate of every optimizer."""
    max_norm: float | None = 1.0
    """Clip the table's gradient to this norm every step (None: no clipping)."""
    warmup: int = 2
    repeats: int = 5
    copy_megabytes: int | None = None
    """Buffer size of the copy-bandwidth measurement (default: 256 on CPU, 2048 on CUDA)."""
    memory_headroom: float = 0.95
    """Skip a method whose estimated peak exceeds this fraction of the available memory."""
    seed: int = 0
    out: Path | None = None
    """Write the results as JSON here."""


@dataclass
class Inputs:
    """What every method of one shape reads: indices, the scores whose softmax weighs the rows
    (a leaf that requires grad), and the output gradient."""

    indices: Tensor
    scores: Tensor
    grad_out: Tensor


@dataclass
class Step:
    """A built method: ``run`` does forward + backward + clip + update and leaves the gradient in
    place; ``zero_grad`` drops it; ``alive`` lists the training state's tensors."""

    run: Callable[[], None]
    zero_grad: Callable[[], None]
    alive: Callable[[], list[Tensor]]

    def timed(self) -> None:
        self.run()
        self.zero_grad()


# --------------------------------------------------------------------------- methods


def _weights(inputs: Inputs) -> Tensor:
    return torch.softmax(inputs.scores, dim=-1)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor)
    ]


def _grad_tensors(grad: Tensor | None) -> list[Tensor]:
    if grad is None:
        return []
    if grad.is_sparse:
        return [grad._indices(), grad._values()]
    return [grad]


def _clip_sparse_(parameter: nn.Parameter, max_norm: float) -> None:
    """``clip_grad_norm_`` for a sparse gradient: coalesce (duplicate rows sum), then scale."""
    grad = parameter.grad.coalesce()
    parameter.grad = grad
    norm = torch.linalg.vector_norm(grad._values())
    grad._values().mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


def _dense_step(
    table: Tensor, inputs: Inputs, config: ValueStepBenchmark, lookup: str, optimizer: str
) -> Step:
    parameter = nn.Parameter(table)
    adamw = torch.optim.AdamW(
        [parameter], lr=config.lr, fused=optimizer == "fused", foreach=optimizer == "foreach"
    )

    def run() -> None:
        weights = _weights(inputs)
        if lookup == "aten":
            # ATen takes the weights in the table's dtype.
            weights = weights.to(parameter.dtype)
            out = F.embedding_bag(inputs.indices, parameter, per_sample_weights=weights, mode="sum")
        else:
            out = torch.ops.memlayer.lookup(parameter, inputs.indices, weights)
        out.backward(inputs.grad_out)
        if config.max_norm is not None:
            torch.nn.utils.clip_grad_norm_([parameter], config.max_norm)
        adamw.step()

    def zero_grad() -> None:
        adamw.zero_grad(set_to_none=True)
        inputs.scores.grad = None

    def alive() -> list[Tensor]:
        return [parameter, *_grad_tensors(parameter.grad), *_optimizer_tensors(adamw)]

    return Step(run, zero_grad, alive)


def _sparse_adam_step(table: Tensor, inputs: Inputs, config: ValueStepBenchmark) -> Step:
    # nn.EmbeddingBag(N, D, mode="sum", sparse=True) over this table (not a second random one).
    bag = nn.EmbeddingBag.from_pretrained(table, freeze=False, mode="sum", sparse=True)
    sparse_adam = torch.optim.SparseAdam([bag.weight], lr=config.lr)

    def run() -> None:
        out = bag(inputs.indices, per_sample_weights=_weights(inputs).to(bag.weight.dtype))
        out.backward(inputs.grad_out)
        if config.max_norm is not None:
            _clip_sparse_(bag.weight, config.max_norm)
        sparse_adam.step()

    def zero_grad() -> None:
        sparse_adam.zero_grad(set_to_none=True)
        inputs.scores.grad = None

    def alive() -> list[Tensor]:
        return [bag.weight, *_grad_tensors(bag.weight.grad), *_optimizer_tensors(sparse_adam)]

    return Step(run, zero_grad, alive)


class _ValueTableModule(nn.Module):
    """The least a RowSparseOptimizer trains: the table and one lookup that reads it."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.memory_values = nn.Parameter(table)
        self.lookup = ValueLookup()


def _row_sparse_step(table: Tensor, inputs: Inputs, config: ValueStepBenchmark, rule: str) -> Step:
    module = _ValueTableModule(table)
    optimizer = RowSparseOptimizer(module, rule, lr=config.lr)

    def run() -> None:
        out = module.lookup(module.memory_values, inputs.indices, _weights(inputs))
        out.backward(inputs.grad_out)
        if config.max_norm is not None:
            optimizer.clip_grad_norm_(config.max_norm)
        optimizer.step()

    def zero_grad() -> None:
        optimizer.zero_grad()
        inputs.scores.grad = None

    def alive() -> list[Tensor]:
        grad = module.memory_values.grad  # a RowSparseGrad: what the lookups recorded
        recorded = grad.tensors() if grad is not None else []
        return [module.memory_values, *_optimizer_tensors(optimizer), *recorded]

    return Step(run, zero_grad, alive)


def build_step(name: Method, table: Tensor, inputs: Inputs, config: ValueStepBenchmark) -> Step:
    if name == "aten_adamw_fused":
        return _dense_step(table, inputs, config, "aten", "fused")
    if name == "aten_adamw_foreach":
        return _dense_step(table, inputs, config, "aten", "foreach")
    if name == "aten_sparse_adam":
        return _sparse_adam_step(table, inputs, config)
    if name == "ours_dense_adamw_fused":
        return _dense_step(table, inputs, config, "ours", "fused")
    rule = name.removeprefix("ours_row_sparse_")
    assert rule in RULES, name
    return _row_sparse_step(table, inputs, config, rule)


# --------------------------------------------------------------------------- accounting


def step_kernels(name: Method, shape: Shape, touched: int) -> list[kernel_bytes.KernelCost]:
    """The Triton launches of one step of method ``name`` (uniform indices: no hot rows), each
    with the fewest bytes it must move; for the ATen methods, those of the same lookup."""
    hits = kernel_bytes.Hits(shape.tokens, shape.rows_per_token, touched)
    sizes = kernel_bytes.Sizes(value=DTYPES[shape.dtype].itemsize, weight=4)
    D = shape.dim
    lookup = [
        kernel_bytes.lookup_forward(hits, D, sizes),
        kernel_bytes.weights_grad(hits, D, sizes),
    ]
    if name == "ours_dense_adamw_fused":
        return [lookup[0], *kernel_bytes.lookup_backward(hits, shape.num_rows, D, sizes)]
    if name.startswith("ours_row_sparse_"):
        rule = name.removeprefix("ours_row_sparse_")
        return lookup + kernel_bytes.row_sparse_step(hits, D, sizes, rule)
    return lookup


def step_bytes(name: Method, shape: Shape, touched: int) -> int:
    """The fewest bytes a step must move (see the module docstring)."""
    N, D, U = shape.num_rows, shape.dim, touched
    e, ei = DTYPES[shape.dtype].itemsize, 8
    if name in ("aten_adamw_fused", "aten_adamw_foreach"):
        name = "ours_dense_adamw_fused"  # measured against the same lookup's bytes
    kernels = kernel_bytes.total_bytes(step_kernels(name, shape, touched))
    if name == "ours_dense_adamw_fused":
        return kernels + 8 * N * D * e
    if name == "aten_sparse_adam":
        return kernels + U * (D * e + ei) + 8 * U * D * e
    return kernels


def _estimated_peak_bytes(name: Method, shape: Shape) -> int:
    """A generous estimate of a method's peak: the ``[N, D]`` tensors its step holds at once
    (foreach AdamW adds a temporary), plus ``[T * B, D]`` workspace for the backward (and, for
    SparseAdam, for its uncoalesced gradient and the update's temporaries)."""
    tables = {
        "aten_adamw_fused": 4,
        "aten_adamw_foreach": 5,
        "aten_sparse_adam": 3,
        "ours_dense_adamw_fused": 4,
        "ours_row_sparse_sgd": 1,
        "ours_row_sparse_rowwise_adagrad": 1,
        "ours_row_sparse_adam": 3,
    }[name]
    per_token = shape.tokens * shape.rows_per_token * shape.dim * 4
    workspace = (5 if name == "aten_sparse_adam" else 2) * per_token
    return tables * shape.num_rows * shape.dim * 4 + workspace


def available_bytes(device: torch.device) -> int | None:
    """Memory a method may still take: free CUDA memory, or Linux's MemAvailable (None
    elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def storage_bytes(tensors: Sequence[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared tensors count once)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def huge_pages_mb() -> float | None:
    """``AnonHugePages`` of this process (Linux), in MiB."""
    rollup = Path("/proc/self/smaps_rollup")
    if not rollup.exists():
        return None
    for line in rollup.read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) / 1024  # reported in kB
    return None


def transparent_hugepage_settings() -> dict[str, str]:
    """The kernel's THP mode and defrag policy (the bracketed choice of each sysfs file)."""
    settings = {}
    for name in ("enabled", "defrag"):
        path = Path("/sys/kernel/mm/transparent_hugepage") / name
        if path.exists():
            text = path.read_text().strip()
            settings[name] = text[text.find("[") + 1 : text.find("]")] if "[" in text else text
    return settings


# --------------------------------------------------------------------------- driver


def _validate(config: ValueStepBenchmark) -> None:
    if not config.rows:
        raise UsageError("--rows needs at least one table size")
    check_each_at_least("--rows", config.rows, 1)
    for flag, value in (
        ("--dim", config.dim),
        ("--tokens", config.tokens),
        ("--rows-per-token", config.rows_per_token),
        ("--repeats", config.repeats),
        ("--copy-megabytes", config.copy_megabytes),
    ):
        check_at_least(flag, value, 1)
    check_at_least("--warmup", config.warmup, 0)
    check_finite("--lr", config.lr, 0)
    check_positive("--max-norm", config.max_norm)
    check_between("--memory-headroom", config.memory_headroom, 0, 1)
    check_positive("--memory-headroom", config.memory_headroom)


def _inputs(shape: Shape, device: torch.device, seed: int) -> Inputs:
    generator = torch.Generator(device=device).manual_seed(seed)
    T, B = shape.tokens, shape.rows_per_token
    indices = torch.randint(shape.num_rows, (T, B), device=device, generator=generator)
    scores = torch.randn(T, B, device=device, generator=generator).requires_grad_(True)
    grad_out = torch.randn(T, shape.dim, device=device, generator=generator)
    return Inputs(indices, scores, grad_out.to(DTYPES[shape.dtype]))


def _table(shape: Shape, device: torch.device, seed: int) -> Tensor:
    """The same table for every method of a shape (drawn afresh: methods update it in place)."""
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    table = torch.empty(shape.num_rows, shape.dim, device=device)
    return table.normal_(generator=generator).to(DTYPES[shape.dtype])


def benchmark_shape(
    shape: Shape, config: ValueStepBenchmark, device: torch.device, copy_gbps: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per method that ran (its time or error) and one per method skipped."""
    inputs = _inputs(shape, device, config.seed)
    touched = int(torch.unique(inputs.indices).numel())
    print(f"{shape}: {touched} touched rows", file=sys.stderr)
    rows, skipped = [], []
    for name in config.methods:
        release_memory(device)
        row: dict[str, Any] = {"method": name, **vars(shape), "touched_rows": touched}
        needed, available = _estimated_peak_bytes(name, shape), available_bytes(device)
        if available is not None and needed > config.memory_headroom * available:
            reason = f"needs ~{needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
            print(f"  skipping {name}: {reason}", file=sys.stderr)
            skipped.append({**row, "skipped": reason})
            continue
        print(f"  {name}", file=sys.stderr)
        reset_peak_memory(device)
        before_mb = peak_memory_mb(device)
        step = build_step(name, _table(shape, device, config.seed), inputs, config)
        row.update(
            measure(
                lambda step=step: step.timed, device, warmup=config.warmup, repeats=config.repeats
            )
        )
        if "time_ms" in row:
            if before_mb is not None and row["peak_memory_mb"] is not None:
                row["peak_delta_mb"] = row["peak_memory_mb"] - before_mb
            step.run()  # untimed: the state alive at the end of a step, before zero_grad
            row["state_mb"] = storage_bytes(step.alive()) / 2**20
            row["huge_pages_mb"] = huge_pages_mb() if device.type == "cpu" else None
            step.zero_grad()
            row["bytes"] = step_bytes(name, shape, touched)
            row["gbps"] = row["bytes"] / (row["time_ms"] * 1e-3) / 1e9
            row["copy_fraction"] = row["gbps"] / copy_gbps
            if device.type == "cuda" and name.startswith("ours_"):
                times = kernel_bytes.profile_kernels(lambda step=step: step.timed, config.repeats)
                row["kernels"] = kernel_bytes.kernel_rows(
                    step_kernels(name, shape, touched), times, copy_gbps, config.repeats,
                    method=name, **vars(shape),
                )  # fmt: skip
        del step
        rows.append(row)
    del inputs
    release_memory(device)
    return rows, skipped


def _add_speedups(rows: list[dict[str, Any]]) -> dict[int, str]:
    """speedup = the fastest ATen method's time / time, per table size; returns the baselines."""
    baselines = {}
    for num_rows in sorted({row["num_rows"] for row in rows}):
        same = [row for row in rows if row["num_rows"] == num_rows and "time_ms" in row]
        aten = [row for row in same if row["method"] in ATEN_METHODS]
        if not aten:
            continue
        fastest = min(aten, key=lambda row: row["time_ms"])
        baselines[num_rows] = fastest["method"]
        for row in same:
            row["speedup"] = fastest["time_ms"] / row["time_ms"]
    return baselines


_COLUMNS = [
    ("num_rows", "N", "d"),
    ("dim", "D", "d"),
    ("tokens", "T", "d"),
    ("rows_per_token", "B", "d"),
    ("touched_rows", "touched", "d"),
    ("method", "method", "s"),
    ("time_ms", "ms", ".1f"),
    ("gbps", "GB/s", ".1f"),
    ("copy_fraction", "of copy", ".1%"),
    ("speedup", "x aten", ".2f"),
    ("state_mb", "state MiB", ".0f"),
    ("peak_memory_mb", "peak MiB", ".0f"),
    ("peak_delta_mb", "+MiB", ".0f"),
    ("huge_pages_mb", "huge MiB", ".0f"),
    ("error", "error", "s"),
    ("skipped", "skipped", "s"),
]


_KERNEL_COLUMNS = [
    ("num_rows", "N", "d"),
    ("method", "method", "s"),
    *kernel_bytes.KERNEL_COLUMNS,
]


def run(config: ValueStepBenchmark, argv: Sequence[str]) -> dict[str, Any]:
    _validate(config)
    device = resolve_device(config.device)
    config.copy_megabytes = config.copy_megabytes or (2048 if device.type == "cuda" else 256)
    env = environment(device, "benchmarks.value_step", argv)
    thp = transparent_hugepage_settings()
    copy_gbps = copy_bandwidth_gbps(
        device, megabytes=config.copy_megabytes, warmup=config.warmup, repeats=config.repeats
    )
    release_memory(device)
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (read + write)", file=sys.stderr)

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for num_rows in config.rows:
        shape = Shape(num_rows, config.dim, config.tokens, config.rows_per_token, config.dtype)
        measured, left_out = benchmark_shape(shape, config, device, copy_gbps)
        rows += measured
        skipped += left_out
    baselines = _add_speedups(rows)

    thp_alloc = env["environment_variables"].get("THP_MEM_ALLOC_ENABLE", "unset")
    print(
        f"copy bandwidth {copy_gbps:.1f} GB/s; THP_MEM_ALLOC_ENABLE={thp_alloc}; "
        f"kernel THP {thp or 'unknown'}; x aten = fastest ATen method's ms / ms"
    )
    print(format_table(rows + skipped, _COLUMNS))
    print()
    if device.type == "cuda":
        print("per kernel, one step (ms over fewest bytes: benchmarks/kernel_bytes.py):")
        kernel_rows = [kernel for row in rows for kernel in row.get("kernels", [])]
        print(format_table(kernel_rows, _KERNEL_COLUMNS))
    else:
        print(kernel_bytes.CPU_REASON)

    payload = {
        "benchmark": "value_step",
        "environment": env,
        "transparent_hugepage": thp,
        "config": config_as_json(config),
        "copy_bandwidth_gbps": copy_gbps,
        "baselines": {str(num_rows): name for num_rows, name in baselines.items()},
        "results": rows,
        "skipped": skipped,
    }
    if config.out is not None:
        write_json(config.out, payload)
    return payload


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(tyro.cli(ValueStepBenchmark, args=argv), argv)


if __name__ == "__main__":
    with reported_errors():
        main()
