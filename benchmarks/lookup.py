"""How close is ``torch.ops.memlayer.lookup`` to the hardware limit, and how much faster than ATen?

    python -m benchmarks.lookup                      # this device's default sweep
    python -m benchmarks.lookup --num-rows 65536 1048576 --dim 1024 --dtype bf16 \\
        --out lookup.json --plot lookup.png

Times the weighted bag ``out[t] = sum_b w[t, b] * values[idx[t, b]]`` (forward, backward, and
both) for each of these implementations, on the same inputs in one process:

- ``ours``: ``torch.ops.memlayer.lookup`` (deterministic value gradient), ``ours_atomic`` the
  same with ``deterministic=False`` (differs only on CUDA, so it runs there by default);
- ``aten``: ``F.embedding_bag(idx, values, per_sample_weights=w, mode="sum")``, i.e.
  ``nn.EmbeddingBag`` with a dense gradient;
- ``naive``: ``(values[idx] * w[..., None]).sum(1)``;
- ``*_compiled``: each of them under ``torch.compile`` (``--dynamic``, the default, compiles each
  graph once per dtype for the whole sweep; ``--no-dynamic`` compiles every shape statically).

Every backward produces both a dense [N, D] value gradient and the [T, B] weight gradient, via
``torch.autograd.grad`` (so no gradient accumulates across runs). Indices are uniform in [0, N);
weights are in the values' dtype (ATen requires it).

Effective bandwidth counts the fewest bytes the op's Triton kernels must move
(``benchmarks/kernel_bytes.py``: one model per kernel; a pass is the sum of its kernels), with
e, ei, ew the bytes per element of values, indices, weights, H = T*B hits, and indices without
hot rows (uniform ones have none):

    forward           lookup_forward:      H*(ei + ew) + H*D*e (gathered rows) + T*D*e (output)
    backward          values_grad_sorted:  2*(N + 1)*8 (row offsets) + H*(8 + ew) (positions,
                                           weights) + H*D*e (grad_out row per hit) + N*D*e (the
                                           dense value gradient, written whole)
                      (ours_atomic: values_grad_atomic: T*D*e + H*(ei + ew) + 2*H*D*4, atomics)
                      + hot_row_pieces:    (2*H // 1024)*8 (its upper-bound grid)
                      + weights_grad:      T*D*e + H*ei + H*D*e (rows re-read) + H*4 (fp32 dots)
    forward+backward  the sum of both

and is reported as a fraction of the device's copy bandwidth (``dst.copy_(src)``, read + write)
measured at the start of the same run; every implementation is measured against the same bytes
(ours_atomic's against its own kernels'). On CUDA, each ``ours*`` pass is also profiled
(``torch.profiler``) and a second table gives each Triton kernel's time, fewest bytes, FLOPs,
GB/s and fraction of copy bandwidth ("other": the torch kernels around them, e.g. the sort);
on CPU the ops run C++ kernels and that table is skipped.

``product_key_topk`` (ours) is timed against the plain PyTorch formulation (einsum, top-k per
half, top-k of the k x k candidate sums, with autograd) for the same N = n * n, with ``--heads``
heads, k = rows_per_token / heads and key dim ``--key-dim`` (default D / 2, as in the paper).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
import tyro
from torch import Tensor

import ops  # noqa: F401  (registers torch.ops.memlayer)
from benchmarks import kernel_bytes
from benchmarks.common import (
    DTYPES,
    Target,
    config_as_json,
    copy_bandwidth_gbps,
    environment,
    evaluate_targets,
    format_table,
    matplotlib_pyplot,
    measure,
    print_verdicts,
    release_memory,
    resolve_device,
    write_json,
)
from memcompile.cli import UsageError, check_at_least, check_each_at_least, reported_errors

DtypeName = Literal["fp32", "bf16"]
Pass = Literal["forward", "backward", "forward+backward"]
LookupImpl = Literal[
    "ours",
    "ours_atomic",
    "aten",
    "naive",
    "ours_compiled",
    "ours_atomic_compiled",
    "aten_compiled",
    "naive_compiled",
]
ProductKeyImpl = Literal["ours", "plain", "ours_compiled", "plain_compiled"]

PASSES: tuple[Pass, ...] = ("forward", "backward", "forward+backward")
LOOKUP_BASELINE = "aten"
PRODUCT_KEY_BASELINE = "plain"


@dataclass
class LookupBenchmark:
    """Benchmark the memlayer lookup and product-key ops against ATen and plain PyTorch."""

    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda[:index]"."""
    num_rows: tuple[int, ...] | None = None
    """Value-table rows N to sweep (default: 1M on CPU; 64K, 1M, 4M, 16M on CUDA)."""
    dim: tuple[int, ...] | None = None
    """Value dims D to sweep (default: 256 on CPU; 256, 1024, 4096 on CUDA)."""
    tokens: tuple[int, ...] | None = None
    """Tokens T per call (default: 4096 on CPU, 16384 on CUDA)."""
    rows_per_token: int = 128
    """Rows B gathered per token (the paper: 4 heads x k = 32)."""
    dtype: tuple[DtypeName, ...] | None = None
    """Value dtypes (default: fp32 on CPU; bf16 and fp32 on CUDA)."""
    impls: tuple[LookupImpl, ...] | None = None
    """Lookup implementations (default: all; the ours_atomic ones only on CUDA)."""
    passes: tuple[Pass, ...] = PASSES
    product_key: bool = True
    """Also benchmark product_key_topk against the plain PyTorch search."""
    product_key_impls: tuple[ProductKeyImpl, ...] = (
        "ours",
        "plain",
        "ours_compiled",
        "plain_compiled",
    )
    heads: int = 4
    """Product-key heads (k = rows_per_token / heads)."""
    key_dim: int | None = None
    """Product-key query dim per head (default: D / 2)."""
    dynamic: bool = True
    """Compile with dynamic shapes: each graph compiles once for the whole sweep."""
    compile_backend: str = "inductor"
    """torch.compile backend of the *_compiled impls."""
    warmup: int = 2
    repeats: int = 7
    copy_megabytes: int | None = None
    """Buffer size of the copy-bandwidth measurement (default: 256 on CPU, 2048 on CUDA)."""
    seed: int = 0
    out: Path | None = None
    """Write the results as JSON here."""
    plot: Path | None = None
    """Draw the bandwidth fraction vs N into this PNG (needs matplotlib)."""


@dataclass(frozen=True)
class Shape:
    num_rows: int
    dim: int
    tokens: int
    rows_per_token: int
    dtype: DtypeName


SHAPE_KEYS = tuple(field.name for field in fields(Shape))

# --------------------------------------------------------------------------- implementations


def _ours(values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    return torch.ops.memlayer.lookup(values, indices, weights, True)


def _ours_atomic(values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    return torch.ops.memlayer.lookup(values, indices, weights, False)


def _aten(values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    return F.embedding_bag(indices, values, per_sample_weights=weights, mode="sum")


def _naive(values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    return (values[indices] * weights.unsqueeze(-1)).sum(dim=1)


_EAGER_LOOKUPS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "ours": _ours,
    "ours_atomic": _ours_atomic,
    "aten": _aten,
    "naive": _naive,
}


def plain_product_key_topk(query: Tensor, subkeys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The plain product-key search: autograd back-propagates through a dense k x k per token."""
    tokens, heads, key_dim = query.shape
    n = subkeys.shape[2]
    halves = query.view(tokens, heads, 2, key_dim // 2)
    half_scores, half_indices = torch.einsum("thcd,hcnd->thcn", halves, subkeys).topk(k, dim=-1)
    candidates = half_scores[:, :, 0, :, None] + half_scores[:, :, 1, None, :]  # [T, H, k, k]
    scores, flat = candidates.flatten(-2).topk(k, dim=-1)
    first = half_indices[:, :, 0].gather(-1, flat // k)
    second = half_indices[:, :, 1].gather(-1, flat % k)
    return scores, first * n + second


def _ours_product_key_topk(query: Tensor, subkeys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return torch.ops.memlayer.product_key_topk(query, subkeys, k)


_EAGER_PRODUCT_KEYS = {"ours": _ours_product_key_topk, "plain": plain_product_key_topk}


def _resolve_impls(
    names: Sequence[str], eager: dict[str, Callable], config: LookupBenchmark
) -> dict[str, Callable]:
    """Name -> callable; ``<name>_compiled`` wraps the eager ``<name>`` in ``torch.compile``."""
    resolved = {}
    for name in names:
        base = name.removesuffix("_compiled")
        resolved[name] = (
            eager[base]
            if name == base
            else torch.compile(eager[base], dynamic=config.dynamic, backend=config.compile_backend)
        )
    return resolved


# --------------------------------------------------------------------------- passes


def _prepare_pass(
    run: Callable[[], Tensor], inputs: tuple[Tensor, ...], grad_output: Tensor, which: Pass
) -> Callable[[], Callable[[], object]]:
    """``median_time_ms``'s ``prepare`` for one pass; "backward" runs its forward untimed."""

    def forward() -> Tensor:
        with torch.no_grad():
            return run()

    def backward(output: Tensor) -> tuple[Tensor, ...]:
        # product_key_topk scores in fp32 whatever the inputs' dtype; a no-op for the rest.
        return torch.autograd.grad(output, inputs, grad_output.to(output.dtype))

    def forward_backward() -> tuple[Tensor, ...]:
        return backward(run())

    def backward_of_fresh_forward() -> Callable[[], tuple[Tensor, ...]]:
        output = run()
        return lambda: backward(output)

    if which == "forward":
        return lambda: forward
    if which == "forward+backward":
        return lambda: forward_backward
    return backward_of_fresh_forward


def lookup_kernels(
    shape: Shape, which: Pass, index_bytes: int = 8, deterministic: bool = True
) -> list[kernel_bytes.KernelCost]:
    """The Triton launches of a pass at ``shape`` (indices without hot rows), each with the
    fewest bytes it must move."""
    hits = kernel_bytes.Hits(shape.tokens, shape.rows_per_token)
    sizes = kernel_bytes.Sizes(value=DTYPES[shape.dtype].itemsize, index=index_bytes)
    forward = [kernel_bytes.lookup_forward(hits, shape.dim, sizes)]
    backward = kernel_bytes.lookup_backward(hits, shape.num_rows, shape.dim, sizes, deterministic)
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[which]


def lookup_bytes(
    shape: Shape, which: Pass, index_bytes: int = 8, deterministic: bool = True
) -> int:
    """The fewest bytes a pass must move: the sum of its kernels' (see the module docstring)."""
    return kernel_bytes.total_bytes(lookup_kernels(shape, which, index_bytes, deterministic))


def _fits_on_device(shape: Shape, device: torch.device) -> bool:
    """Whether values, a dense value gradient and ATen's fp32 per-row partials fit the GPU."""
    if device.type != "cuda":
        return True
    elem = DTYPES[shape.dtype].itemsize
    table_bytes = shape.num_rows * shape.dim * elem
    partials_bytes = shape.tokens * shape.rows_per_token * shape.dim * 4
    needed = 2 * table_bytes + partials_bytes
    return needed < 0.9 * torch.cuda.mem_get_info(device)[0]


def _add_speedups(rows: list[dict[str, Any]], baseline: str, keys: Sequence[str]) -> None:
    """speedup = baseline time / time, for rows of the same shape and pass."""
    baseline_ms = {
        tuple(row[k] for k in keys): row["time_ms"]
        for row in rows
        if row["impl"] == baseline and "time_ms" in row
    }
    for row in rows:
        reference = baseline_ms.get(tuple(row[k] for k in keys))
        if reference is not None and "time_ms" in row:
            row["speedup"] = reference / row["time_ms"]


def benchmark_lookup(
    shape: Shape, impls: dict, config: LookupBenchmark, device: torch.device, copy_gbps: float
) -> list[dict[str, Any]]:
    generator = torch.Generator(device=device).manual_seed(config.seed)
    dtype = DTYPES[shape.dtype]
    T, B, D = shape.tokens, shape.rows_per_token, shape.dim
    values = torch.randn(shape.num_rows, D, device=device, dtype=dtype, generator=generator)
    indices = torch.randint(shape.num_rows, (T, B), device=device, generator=generator)
    weights = torch.rand(T, B, device=device, dtype=dtype, generator=generator)
    grad_output = torch.randn(T, D, device=device, dtype=dtype, generator=generator)
    values.requires_grad_(True)
    weights.requires_grad_(True)

    rows = []
    for name, fn in impls.items():
        for which in config.passes:
            print(f"  lookup {name} {which}", file=sys.stderr)
            prepare = _prepare_pass(
                lambda fn=fn: fn(values, indices, weights), (values, weights), grad_output, which
            )
            row = {"op": "lookup", "impl": name, "pass": which, **asdict(shape)}
            row.update(measure(prepare, device, warmup=config.warmup, repeats=config.repeats))
            if "time_ms" in row:
                deterministic = "atomic" not in name
                kernels = lookup_kernels(shape, which, indices.element_size(), deterministic)
                row["bytes"] = kernel_bytes.total_bytes(kernels)
                row["gbps"] = row["bytes"] / (row["time_ms"] * 1e-3) / 1e9
                row["copy_fraction"] = row["gbps"] / copy_gbps
                if device.type == "cuda" and name.startswith("ours"):
                    times = kernel_bytes.profile_kernels(prepare, config.repeats)
                    context = {"impl": name, "pass": which, **asdict(shape)}
                    row["kernels"] = kernel_bytes.kernel_rows(
                        kernels, times, copy_gbps, config.repeats, **context
                    )
            rows.append(row)
    return rows


def benchmark_product_key(
    shape: Shape, impls: dict, config: LookupBenchmark, device: torch.device
) -> list[dict[str, Any]]:
    n = math.isqrt(shape.num_rows)
    k = shape.rows_per_token // config.heads
    key_dim = config.key_dim or shape.dim // 2
    generator = torch.Generator(device=device).manual_seed(config.seed)
    dtype = DTYPES[shape.dtype]
    query = torch.randn(
        shape.tokens, config.heads, key_dim, device=device, dtype=dtype, generator=generator
    )
    subkeys = torch.randn(
        config.heads, 2, n, key_dim // 2, device=device, dtype=dtype, generator=generator
    )
    grad_scores = torch.randn(
        shape.tokens, config.heads, k, device=device, dtype=dtype, generator=generator
    )
    query.requires_grad_(True)
    subkeys.requires_grad_(True)

    rows = []
    for name, fn in impls.items():
        for which in config.passes:
            print(f"  product_key_topk {name} {which}", file=sys.stderr)
            prepare = _prepare_pass(
                lambda fn=fn: fn(query, subkeys, k)[0], (query, subkeys), grad_scores, which
            )
            row = {
                "op": "product_key_topk",
                "impl": name,
                "pass": which,
                **asdict(shape),
                "subkeys_per_half": n,
                "heads": config.heads,
                "k": k,
                "key_dim": key_dim,
            }
            row.update(measure(prepare, device, warmup=config.warmup, repeats=config.repeats))
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- targets


def _lookup_row(impl: str, which: Pass, shape: Shape | None = None) -> Callable[[dict], bool]:
    """Selects lookup rows of one impl and pass (and shape: None means any)."""
    return lambda row: (
        row["op"] == "lookup"
        and row["impl"] == impl
        and row["pass"] == which
        and (shape is None or all(row[k] == getattr(shape, k) for k in SHAPE_KEYS))
    )


# The issues' CPU targets name one shape; the GPU targets hold for every shape of the sweep.
_CPU_SHAPE = Shape(num_rows=1 << 20, dim=256, tokens=4096, rows_per_token=128, dtype="fp32")
TARGETS = (
    *(
        Target(
            f"issue {issue}: CPU fwd+bwd >= {threshold:g}x ATen",
            "cpu",
            "speedup",
            threshold,
            _lookup_row("ours", "forward+backward", _CPU_SHAPE),
        )
        for issue, threshold in ((2, 1.5), (5, 2.0))
    ),
    Target(
        "issues 2, 5: GPU forward >= 80% of copy",
        "cuda",
        "copy_fraction",
        0.8,
        _lookup_row("ours", "forward"),
    ),
    *(
        Target(
            f"issue {issue}: GPU {impl} backward >= {threshold:g}x ATen",
            "cuda",
            "speedup",
            threshold,
            _lookup_row(impl, "backward"),
        )
        for impl in ("ours", "ours_atomic")
        for issue, threshold in ((2, 3.0), (5, 5.0))
    ),
)


# --------------------------------------------------------------------------- driver


def _defaults(config: LookupBenchmark, device: torch.device) -> LookupBenchmark:
    on_cuda = device.type == "cuda"
    config.num_rows = config.num_rows or (
        (1 << 16, 1 << 20, 1 << 22, 1 << 24) if on_cuda else (1 << 20,)
    )
    config.dim = config.dim or ((256, 1024, 4096) if on_cuda else (256,))
    config.tokens = config.tokens or ((16384,) if on_cuda else (4096,))
    config.dtype = config.dtype or (("bf16", "fp32") if on_cuda else ("fp32",))
    config.impls = config.impls or tuple(
        name for name in get_args(LookupImpl) if on_cuda or not name.startswith("ours_atomic")
    )
    config.copy_megabytes = config.copy_megabytes or (2048 if on_cuda else 256)
    return config


def _validate(config: LookupBenchmark) -> None:
    check_each_at_least("--num-rows", config.num_rows, 1)
    check_each_at_least("--dim", config.dim, 1)
    check_each_at_least("--tokens", config.tokens, 0)  # an empty batch is a case worth timing
    for flag, value in (
        ("--rows-per-token", config.rows_per_token),
        ("--heads", config.heads),
        ("--key-dim", config.key_dim),
        ("--repeats", config.repeats),
        ("--copy-megabytes", config.copy_megabytes),
    ):
        check_at_least(flag, value, 1)
    check_at_least("--warmup", config.warmup, 0)
    if config.product_key and config.rows_per_token % config.heads:
        raise UsageError(
            f"--rows-per-token ({config.rows_per_token}) must be a multiple of --heads "
            f"({config.heads}): product-key k = rows_per_token / heads"
        )
    if config.key_dim is not None and config.key_dim % 2:
        raise UsageError(f"--key-dim must be even (two halves), got {config.key_dim}")
    k = config.rows_per_token // config.heads
    too_small = [n for n in config.num_rows if math.isqrt(n) < k]
    if config.product_key and too_small:
        raise UsageError(
            f"--num-rows {too_small}: product-key search needs sqrt(N) >= k = rows_per_token / "
            f"heads = {k} (each half keeps its top k of sqrt(N) sub-keys)"
        )


_LOOKUP_COLUMNS = [
    ("num_rows", "N", "d"),
    ("dim", "D", "d"),
    ("tokens", "T", "d"),
    ("dtype", "dtype", "s"),
    ("impl", "impl", "s"),
    ("pass", "pass", "s"),
    ("time_ms", "ms", ".3f"),
    ("gbps", "GB/s", ".1f"),
    ("copy_fraction", "of copy", ".1%"),
    ("speedup", f"x {LOOKUP_BASELINE}", ".2f"),
    ("peak_memory_mb", "peak MiB", ".0f"),
    ("error", "error", "s"),
]
_KERNEL_COLUMNS = [*_LOOKUP_COLUMNS[:6], *kernel_bytes.KERNEL_COLUMNS]  # shape, impl, pass
_PRODUCT_KEY_COLUMNS = [
    ("num_rows", "N", "d"),
    ("key_dim", "Kd", "d"),
    ("tokens", "T", "d"),
    ("dtype", "dtype", "s"),
    ("impl", "impl", "s"),
    ("pass", "pass", "s"),
    ("time_ms", "ms", ".3f"),
    ("speedup", f"x {PRODUCT_KEY_BASELINE}", ".2f"),
    ("peak_memory_mb", "peak MiB", ".0f"),
    ("error", "error", "s"),
]


def _print_kernel_table(rows: Sequence[dict[str, Any]], device: torch.device) -> None:
    """Each profiled pass's Triton kernels (CUDA), or why there are none."""
    if device.type != "cuda":
        print(kernel_bytes.CPU_REASON)
        return
    kernel_rows = [kernel for row in rows for kernel in row.get("kernels", [])]
    print("per kernel, one run (ms over fewest bytes: benchmarks/kernel_bytes.py):")
    print(format_table(kernel_rows, _KERNEL_COLUMNS))


def plot_bandwidth(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Fraction of copy bandwidth vs N, one panel per pass, one line per (impl, D, dtype)."""
    plt = matplotlib_pyplot()
    if plt is None:
        return
    passes = sorted({row["pass"] for row in rows if "copy_fraction" in row}, key=PASSES.index)
    figure, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.5), squeeze=False)
    for axis, which in zip(axes[0], passes):
        lines: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            if row["pass"] == which and "copy_fraction" in row:
                label = f"{row['impl']} D={row['dim']} {row['dtype']}"
                lines.setdefault(label, []).append((row["num_rows"], row["copy_fraction"]))
        for label, points in lines.items():
            axis.plot(*zip(*sorted(points)), marker="o", label=label)
        axis.set(xscale="log", xlabel="rows N", ylabel="fraction of copy bandwidth", title=which)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}")


def run(config: LookupBenchmark, argv: Sequence[str]) -> dict[str, Any]:
    device = resolve_device(config.device)
    config = _defaults(config, device)
    _validate(config)
    env = environment(device, "benchmarks.lookup", argv)
    copy_gbps = copy_bandwidth_gbps(
        device, megabytes=config.copy_megabytes, warmup=config.warmup, repeats=config.repeats
    )
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (read + write)", file=sys.stderr)

    lookup_impls = _resolve_impls(config.impls, _EAGER_LOOKUPS, config)
    product_key_impls = (
        _resolve_impls(config.product_key_impls, _EAGER_PRODUCT_KEYS, config)
        if config.product_key
        else {}
    )

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for dtype in config.dtype:
        for num_rows in config.num_rows:
            for dim in config.dim:
                for tokens in config.tokens:
                    shape = Shape(num_rows, dim, tokens, config.rows_per_token, dtype)
                    if not _fits_on_device(shape, device):
                        print(f"skipping {shape}: does not fit in GPU memory", file=sys.stderr)
                        skipped.append(asdict(shape))
                        continue
                    if not config.dynamic:
                        torch.compiler.reset()
                    print(f"{shape}", file=sys.stderr)
                    rows += benchmark_lookup(shape, lookup_impls, config, device, copy_gbps)
                    if product_key_impls:
                        rows += benchmark_product_key(shape, product_key_impls, config, device)
                    release_memory(device)

    shape_keys = ["op", "pass", *SHAPE_KEYS]
    lookup_rows = [row for row in rows if row["op"] == "lookup"]
    product_key_rows = [row for row in rows if row["op"] == "product_key_topk"]
    _add_speedups(lookup_rows, LOOKUP_BASELINE, shape_keys)
    _add_speedups(product_key_rows, PRODUCT_KEY_BASELINE, shape_keys)
    targets = evaluate_targets(TARGETS, rows, device, context=SHAPE_KEYS)

    print(format_table(lookup_rows, _LOOKUP_COLUMNS))
    print()
    _print_kernel_table(lookup_rows, device)
    if product_key_rows:
        print()
        print(format_table(product_key_rows, _PRODUCT_KEY_COLUMNS))
    print()
    print_verdicts(targets)

    payload = {
        "benchmark": "lookup",
        "environment": env,
        "config": config_as_json(config),
        "copy_bandwidth_gbps": copy_gbps,
        "baselines": {"lookup": LOOKUP_BASELINE, "product_key_topk": PRODUCT_KEY_BASELINE},
        "results": rows,
        "skipped_shapes": skipped,
        "targets": targets,
    }
    if config.out is not None:
        write_json(config.out, payload)
    if config.plot is not None:
        plot_bandwidth(lookup_rows, config.plot)
    return payload


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(tyro.cli(LookupBenchmark, args=argv), argv)


if __name__ == "__main__":
    with reported_errors():
        main()
