"""Compile every Triton kernel of ``ops/`` for Ampere and Hopper without a GPU: registers,
spills, shared memory and the occupancy they allow.

    python -m benchmarks.kernels_static                       # every kernel, width, dtype, arch
    python -m benchmarks.kernels_static --dims 4096 --archs 90 --out static.json

No GPU and no network: ``triton.compile`` runs Triton's whole pipeline for a
``GPUTarget("cuda", 80 | 90, 32)`` on the CPU, and the ``ptxas`` shipped in the Triton wheel
(``triton/backends/nvidia/bin``) reports, with ``-v``, each kernel's registers per thread and its
spill stores. Each kernel is compiled with the launch choices its launcher really makes (grid,
compile-time constants, warps: the ``*_launch`` functions of ``ops/lookup_triton.py`` and
``ops/row_sparse_triton.py``, which the launchers call) and with the argument types and
specialization (16-byte alignment, ints divisible by 16) Triton's JIT derives from real
arguments, at:

- every value width D of ``memcompile/flavors.py`` and of the benchmarks' defaults, plus twice the
  widest flavor (``MemoryConfig.value_dim`` is free, and a spill there is a cliff one config
  away);
- values / table in fp32 and bf16, indices int64 and int32 (where a kernel reads indices);
- bags of every flavor's ``heads * topk`` rows (the tile shape of the lookup kernels depends
  on it); compiles whose choices and types coincide are done once.

Occupancy is the warps per SM that registers, shared memory and the per-SM limits allow, as a
fraction of the SM's 64 warp slots (H100 / A100: 65,536 registers per SM, allocated per warp in
units of 256; 228 / 164 KB of shared memory per SM, 1 KB of it reserved per block; at most 32
blocks per SM). ``bar.sync`` counts the barriers in the PTX, ``in loops`` those inside a loop:
a barrier there is a reduction or layout change through shared memory at every step.

Exits non-zero when a kernel fails to compile or spills: ``scripts/gpu_check.sh`` runs it before
spending device time, and ``tests/benchmarks/test_kernels_static.py`` runs a subset of it.
Compiles run in ``--jobs`` (2) fresh processes with ``TRITON_INTERPRET`` unset (an
interpreted kernel cannot be compiled) and a throwaway Triton cache.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import tyro

from benchmarks.common import DTYPES, config_as_json, environment, format_table, write_json
from memcompile.cli import UsageError, check_between, check_each_at_least, reported_errors

DtypeName = Literal["fp32", "bf16"]
IndexDtypeName = Literal["int64", "int32"]
Arch = Literal[80, 90]
INDEX_DTYPES: dict[str, torch.dtype] = {"int64": torch.int64, "int32": torch.int32}

#: The paper's table (1M values): the row count every kernel sees.
NUM_ROWS = 1 << 20


@dataclass(frozen=True)
class SmLimits:
    """The per-SM resources that bound occupancy."""

    registers: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    shared_memory: int = 228 * 1024
    reserved_shared_per_block: int = 1024


SM_LIMITS: dict[int, SmLimits] = {90: SmLimits(), 80: SmLimits(shared_memory=164 * 1024)}


def occupancy(arch: int, registers: int, shared_bytes: int, num_warps: int) -> float:
    """The fraction of an SM's warp slots that blocks of this kernel can fill."""
    limits = SM_LIMITS[arch]
    registers_per_warp = -(-registers * 32 // 256) * 256  # allocated per warp in units of 256
    blocks = min(
        limits.max_blocks,
        limits.max_warps // num_warps,
        limits.registers // (registers_per_warp * num_warps),
        limits.shared_memory // (shared_bytes + limits.reserved_shared_per_block),
    )
    return blocks * num_warps / limits.max_warps


# --------------------------------------------------------------------------- widths


def flavor_widths() -> tuple[set[int], set[int]]:
    """(value widths D, bag sizes heads * topk) of every flavor with a memory."""
    from memcompile.flavors import FLAVORS

    memories = [config.memory for config in FLAVORS.values() if config.memory is not None]
    return {m.value_dim for m in memories}, {m.heads * m.topk for m in memories}


def benchmark_widths() -> tuple[set[int], set[int]]:
    """(value widths D, bag sizes) the benchmarks use by default on CUDA and in gpu_check.sh."""
    from benchmarks.lookup import LookupBenchmark, _defaults

    lookup = _defaults(LookupBenchmark(), torch.device("cuda"))
    value_step_dims = {1024, 2048}  # gpu_check.sh's value-step stage
    return set(lookup.dim) | value_step_dims, {lookup.rows_per_token}


def default_dims() -> tuple[int, ...]:
    flavor_dims, _ = flavor_widths()
    return tuple(sorted(flavor_dims | benchmark_widths()[0] | {2 * max(flavor_dims)}))


def default_bag_sizes() -> tuple[int, ...]:
    return tuple(sorted(flavor_widths()[1] | benchmark_widths()[1]))


# --------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class Case:
    """One compile: a kernel at one width, dtype, index dtype, bag size, for one arch."""

    kernel: str
    arch: int
    dim: int
    dtype: str
    index_dtype: str
    bag_size: int


def _stand_in(dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor standing for a kernel argument: the JIT reads only its dtype and alignment."""
    return torch.empty(16, dtype=dtype)


def _lookup_forward(case: Case):
    from ops import lookup_triton as k

    values, indices = _stand_in(DTYPES[case.dtype]), _stand_in(INDEX_DTYPES[case.index_dtype])
    weights = _stand_in(torch.float32)  # the model's softmax weights
    launch = k.forward_launch(1, case.bag_size, case.dim, values.dtype)
    args = (values, indices, weights, values, NUM_ROWS, case.bag_size, case.dim, case.dim)
    return k._lookup_forward_kernel, launch, args


def _lookup_quantized(case: Case):
    from ops import lookup_quantized_triton as k

    rows, scale = _stand_in(torch.int8), _stand_in(torch.float32)
    indices, weights = _stand_in(INDEX_DTYPES[case.index_dtype]), _stand_in(torch.float32)
    launch = k.lookup_quantized_launch(1, case.bag_size, case.dim, rows.dtype)
    out = _stand_in(torch.bfloat16)
    args = (rows, scale, indices, weights, out, NUM_ROWS, case.bag_size, case.dim, case.dim)
    return k._lookup_quantized_kernel, launch, args


def _sorted_grad_args(case: Case):
    from ops import lookup_triton as k

    grad_out, positions = _stand_in(DTYPES[case.dtype]), _stand_in(torch.int64)
    weights, partials = _stand_in(torch.float32), _stand_in(torch.float32)
    launch = k.hits_launch(NUM_ROWS, case.bag_size, case.dim, grad_out.dtype)
    return k, grad_out, positions, weights, partials, launch


def _hot_row_pieces(case: Case):
    k, grad_out, positions, weights, partials, launch = _sorted_grad_args(case)
    args = (
        grad_out, weights, positions, positions, positions, positions, partials,
        NUM_ROWS, case.bag_size, case.dim, k._HITS_PER_PIECE,
    )  # fmt: skip
    return k._hot_row_pieces_kernel, launch, args


def _values_grad_sorted(case: Case):
    k, grad_out, positions, weights, partials, launch = _sorted_grad_args(case)
    args = (
        grad_out, weights, positions, positions, positions, partials, grad_out,
        case.bag_size, case.dim,
    )  # fmt: skip
    return k._values_grad_sorted_kernel, launch, args


def _values_grad_atomic(case: Case):
    from ops import lookup_triton as k

    grad_out, indices = _stand_in(DTYPES[case.dtype]), _stand_in(INDEX_DTYPES[case.index_dtype])
    weights, buffer = _stand_in(torch.float32), _stand_in(torch.float32)
    launch = k.values_grad_atomic_launch(1, case.bag_size, case.dim)
    args = (grad_out, indices, weights, buffer, NUM_ROWS, case.bag_size, case.dim)
    return k._values_grad_atomic_kernel, launch, args


def _weights_grad(case: Case):
    from ops import lookup_triton as k

    values, indices = _stand_in(DTYPES[case.dtype]), _stand_in(INDEX_DTYPES[case.index_dtype])
    launch = k.weights_grad_launch(1, case.bag_size, case.dim)
    args = (values, values, indices, _stand_in(torch.float32))
    args += (NUM_ROWS, case.bag_size, case.dim, case.dim)
    return k._weights_grad_kernel, launch, args


def _row_sq_norms(case: Case):
    from ops import row_sparse_triton as k

    grad_out, groups, out = (_stand_in(d) for d in (torch.float32, torch.int64, torch.float64))
    launch = k.row_sq_norms_launch(1, case.dim)
    args = (grad_out, grad_out, groups, groups, groups, grad_out, out, case.bag_size, case.dim)
    return k._row_sq_norms_kernel, launch, args


def _update_rows(rule: str, use_mean_sq: bool = False):
    def build(case: Case):
        from ops import row_sparse_triton as k
        from ops.table_rule import Rule, TableRule

        table, state = _stand_in(DTYPES[case.dtype]), _stand_in(torch.float32)
        grad_out, groups = _stand_in(torch.float32), _stand_in(torch.int64)
        mean_sq = _stand_in(torch.float64) if use_mean_sq else groups
        code, hyperparameters = TableRule(rule, lr=1e-3).packed()
        launch = k.update_rows_launch(1, case.dim, Rule(code), use_mean_sq)
        args = (
            table, state, state, grad_out, grad_out, groups, groups, groups, groups, grad_out,
            mean_sq,
            NUM_ROWS, case.bag_size, case.dim,
            *k.update_rows_scalars(hyperparameters, 1.0),
        )  # fmt: skip
        return k._update_rows_kernel, launch, args

    return build


@dataclass(frozen=True)
class KernelSpec:
    """How to compile one kernel: its arguments and launch, and which axes change its code."""

    build: Callable[[Case], tuple[Any, Any, tuple]]
    reads_indices: bool = False
    """Reads the caller's indices (int32 or int64); else its index tensors are int64."""
    value_dtype: bool = True
    """Has a value/table dtype; else everything it reads is fp32."""
    tiles_bags: bool = False
    """Its tile shape depends on the bag size."""


KERNELS: dict[str, KernelSpec] = {
    "lookup_forward": KernelSpec(_lookup_forward, reads_indices=True, tiles_bags=True),
    "lookup_quantized": KernelSpec(
        _lookup_quantized, reads_indices=True, value_dtype=False, tiles_bags=True
    ),
    "hot_row_pieces": KernelSpec(_hot_row_pieces, tiles_bags=True),
    "values_grad_sorted": KernelSpec(_values_grad_sorted, tiles_bags=True),
    "values_grad_atomic": KernelSpec(_values_grad_atomic, reads_indices=True, tiles_bags=True),
    "weights_grad": KernelSpec(_weights_grad, reads_indices=True, tiles_bags=True),
    "row_sq_norms": KernelSpec(_row_sq_norms, value_dtype=False),
    "update_rows[sgd]": KernelSpec(_update_rows("sgd")),
    "update_rows[rowwise_adagrad]": KernelSpec(_update_rows("rowwise_adagrad")),
    "update_rows[rowwise_adagrad,row_mean_sq]": KernelSpec(_update_rows("rowwise_adagrad", True)),
    "update_rows[adam]": KernelSpec(_update_rows("adam")),
}
KernelName = Literal[tuple(KERNELS)]  # type: ignore[valid-type]


# --------------------------------------------------------------------------- compiling


def ptxas_missing() -> str | None:
    """Why this Triton cannot compile for sm_80/sm_90 here (no NVIDIA backend or ptxas, or not
    the internals :func:`compile_case` binds arguments with), or None when it can."""
    try:
        from triton import knobs  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as error:
        return f"this Triton lacks what the static check compiles with ({error})"
    if not hasattr(JITFunction, "_pack_args"):
        return "this Triton's JITFunction has no _pack_args (the static check binds with it)"
    for arch in SM_LIMITS:
        try:
            path = get_ptxas(arch).path
        except RuntimeError as error:  # knobs raise when the binary is not found
            return f"no ptxas for sm_{arch} in the Triton wheel ({error})"
        if not path or not os.access(path, os.X_OK):
            return f"no executable ptxas for sm_{arch} in the Triton wheel (looked at {path})"
    return None


_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"\bbar(?:rier)?\.sync\b")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")


def loop_barriers(ptx: str) -> int:
    """The barriers inside loops of a kernel's PTX (LLVM marks each loop header, and the loop
    ends at the branch back to it): a barrier there is paid at every step."""
    lines = ptx.splitlines()
    headers = {line.split(":")[0]: i for i, line in enumerate(lines) if "Loop Header" in line}
    in_loops: set[int] = set()
    for i, line in enumerate(lines):
        branch = _BRANCH.search(line)
        if branch and headers.get(branch[1], i) < i:
            in_loops.update(range(headers[branch[1]], i))
    return sum(bool(_BARRIERS.search(lines[i])) for i in in_loops)


def _start_worker(cache_dir: str) -> None:
    """A compile process: compiled kernels, not interpreted ones, cached only in ``cache_dir``."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    torch.set_num_threads(1)


@contextlib.contextmanager
def _environment_variable(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def compile_case(case: Case) -> dict[str, Any]:
    """Compiles one case for its arch: the launch choices and what ptxas reports."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    warnings.filterwarnings("ignore", "TRITON_DEFAULT_FP_FUSION")  # Triton 3.9's notice
    kernel, launch, args = KERNELS[case.kernel].build(case)
    row = {**asdict(case), **launch.constexprs, "num_warps": launch.num_warps}
    row = {key: str(value) if key == "ACC_DTYPE" else value for key, value in row.items()}
    target = GPUTarget("cuda", case.arch, 32)
    backend = make_backend(target)
    # Triton's JIT, bound to real arguments: the signature, constants and specialization a
    # launch on the GPU would compile.
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    options_in = {"num_warps": launch.num_warps}
    bound, specialization, options = binder(*args, **launch.constexprs, **options_in)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, options_in, bound, specialization, options
    )
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    try:
        # A fresh cache per compile: a cache hit would skip ptxas and its report.
        with (
            tempfile.TemporaryDirectory(dir=os.environ["TRITON_CACHE_DIR"]) as cache,
            _environment_variable("TRITON_CACHE_DIR", cache),
            contextlib.redirect_stdout(log),
        ):
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs),
                target=target,
                options=options.__dict__,
            )
    except Exception as error:  # a compile error is a finding, reported in the table
        return {**row, "error": f"{type(error).__name__}: {str(error).strip()[-300:]}"}
    registers = int(_PTXAS_REGISTERS.search(log.getvalue())[1])
    stack, spill_stores, _ = map(int, _PTXAS_SPILLS.search(log.getvalue()).groups())
    shared = compiled.metadata.shared
    return {
        **row,
        "registers": registers,
        "spill_bytes": spill_stores,
        "stack_bytes": stack,
        "shared_bytes": shared,
        "barriers": len(_BARRIERS.findall(compiled.asm["ptx"])),
        "loop_barriers": loop_barriers(compiled.asm["ptx"]),
        "occupancy": occupancy(case.arch, registers, shared, launch.num_warps),
    }


# --------------------------------------------------------------------------- the check


@dataclass
class KernelsStatic:
    """Compile every Triton kernel of ops/ for sm_80 and sm_90 and report its resources."""

    kernels: tuple[KernelName, ...] = tuple(KERNELS)
    dims: tuple[int, ...] | None = None
    """Value widths D (default: every flavor's and benchmark's, and twice the widest flavor)."""
    dtypes: tuple[DtypeName, ...] = ("fp32", "bf16")
    """Value / table dtypes."""
    index_dtypes: tuple[IndexDtypeName, ...] = ("int64", "int32")
    bag_sizes: tuple[int, ...] | None = None
    """Rows per token (default: every flavor's heads * topk and the benchmarks')."""
    archs: tuple[Arch, ...] = (80, 90)
    jobs: int = 2
    """Compile processes (at most the CPU count)."""
    out: Path | None = None
    """Write the results as JSON here."""


def cases(config: KernelsStatic) -> list[list[Case]]:
    """Every case the config asks for, grouped by the code they compile to (same launch choices
    and types): each group is compiled once."""
    dims = config.dims or default_dims()
    bag_sizes = config.bag_sizes or default_bag_sizes()
    result: dict[tuple, list[Case]] = {}
    for name in config.kernels:
        spec = KERNELS[name]
        for arch in config.archs:
            for dim in dims:
                for dtype in config.dtypes if spec.value_dtype else ("fp32",):
                    indices = config.index_dtypes if spec.reads_indices else ("int64",)
                    for index_dtype in indices:
                        for bag_size in bag_sizes if spec.tiles_bags else (max(bag_sizes),):
                            case = Case(name, arch, dim, dtype, index_dtype, bag_size)
                            _, launch, _ = spec.build(case)
                            # The width enters the code only through the launch choices
                            # and its divisibility by 16 (a specialization of the JIT).
                            key = (name, arch, dim % 16 == 0, dtype, index_dtype)
                            key += (repr(launch.constexprs), launch.num_warps)
                            result.setdefault(key, []).append(case)
    return list(result.values())


def _validate(config: KernelsStatic) -> None:
    check_between("--jobs", config.jobs, 1, os.cpu_count() or 1)
    for name, values in (("--dims", config.dims), ("--bag-sizes", config.bag_sizes)):
        if values is not None and not values:
            raise UsageError(f"{name} needs at least one value")
        check_each_at_least(name, values, 1)


def compile_all(config: KernelsStatic) -> list[dict[str, Any]]:
    """One result row per case, compiled in ``config.jobs`` fresh processes."""
    groups = cases(config)
    with tempfile.TemporaryDirectory(prefix="kernels_static_") as cache_dir:
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=min(config.jobs, len(groups)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(cache_dir,),
        ) as pool:
            compiled = list(pool.map(compile_case, [group[0] for group in groups]))
    return [{**row, **asdict(case)} for group, row in zip(groups, compiled) for case in group]


def failures(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What must not happen: a compile error or a spill."""
    found = []
    for row in rows:
        where = f"{row['kernel']} sm_{row['arch']} D={row['dim']} {row['dtype']}"
        if "error" in row:
            found.append(f"{where}: does not compile: {row['error']}")
        elif row["spill_bytes"] or row["stack_bytes"]:
            found.append(
                f"{where}: spills ({row['registers']} registers, {row['spill_bytes']} bytes of "
                f"spill stores, {row['stack_bytes']} bytes of stack)"
            )
    return found


_COLUMNS = [
    ("kernel", "kernel", "s"),
    ("arch", "sm", "d"),
    ("dim", "D", "d"),
    ("dtype", "dtype", "s"),
    ("index_dtype", "index", "s"),
    ("bag_size", "bag", "d"),
    ("BLOCK_B", "BLOCK_B", "d"),
    ("BLOCK_HITS", "BLOCK_HITS", "d"),
    ("BLOCK_D", "BLOCK_D", "d"),
    ("ACC_ROWS", "acc rows", "d"),
    ("num_warps", "warps", "d"),
    ("registers", "regs", "d"),
    ("spill_bytes", "spill B", "d"),
    ("shared_bytes", "smem B", "d"),
    ("barriers", "bar.sync", "d"),
    ("loop_barriers", "in loops", "d"),
    ("occupancy", "occupancy", ".1%"),
    ("error", "error", "s"),
]


def run(config: KernelsStatic, argv: Sequence[str]) -> dict[str, Any]:
    _validate(config)
    missing = ptxas_missing()
    if missing is not None:
        raise RuntimeError(f"benchmarks.kernels_static: {missing}")
    rows = compile_all(config)
    print(format_table(rows, _COLUMNS))
    found = failures(rows)
    for failure in found:
        print(f"FAIL {failure}", file=sys.stderr)
    print(f"{len(rows)} cases, {len(found)} failures", file=sys.stderr)
    import triton

    payload = {
        "benchmark": "kernels_static",
        "environment": {
            **environment(torch.device("cpu"), "benchmarks.kernels_static", argv),
            "compiler": f"triton {triton.__version__}, ptxas of the Triton wheel (no GPU)",
        },
        "config": config_as_json(config),
        "sm_limits": {f"sm_{arch}": limits.__dict__ for arch, limits in SM_LIMITS.items()},
        "results": rows,
        "failures": found,
    }
    if config.out is not None:
        write_json(config.out, payload)
    return payload


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(tyro.cli(KernelsStatic, args=argv), argv)


#: Exit code when this Triton cannot run the check (told apart from a failing check, 1).
CANNOT_CHECK = 3

if __name__ == "__main__":
    if (missing := ptxas_missing()) is not None:
        print(f"benchmarks.kernels_static: {missing}", file=sys.stderr)
        sys.exit(CANNOT_CHECK)
    with reported_errors():
        sys.exit(1 if main()["failures"] else 0)
