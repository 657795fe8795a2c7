"""What every benchmark shares: timing, the machine's description, copy bandwidth, tables, JSON
and plots.

A timing is the median of ``repeats`` runs after ``warmup`` runs. Each run may first call an
untimed ``prepare`` (e.g. the forward whose backward is timed); on CUDA a run is bracketed by
CUDA events after a ``torch.cuda.synchronize()``, on CPU by ``time.perf_counter``.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when available; anything else must name an available device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_ms(
    prepare: Callable[[], Callable[[], object]],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
) -> float:
    """Median milliseconds of ``prepare()()``; ``prepare`` itself is not timed.

    The timed call's result is dropped before the next ``prepare``, so gradients and saved
    activations of one run never overlap the next.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times_ms = []
    for iteration in range(warmup + repeats):
        timed = prepare()
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = timed()
            end.record()
            end.synchronize()
            elapsed_ms = start.elapsed_time(end)
        else:
            start_s = time.perf_counter()
            result = timed()
            elapsed_ms = (time.perf_counter() - start_s) * 1e3
        del result, timed
        if iteration >= warmup:
            times_ms.append(elapsed_ms)
    return statistics.median(times_ms)


def measure(
    prepare: Callable[[], Callable[[], object]],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """``time_ms`` and ``peak_memory_mb`` of a variant, or the ``error`` that stopped it.

    Out of memory, a missing kernel or a compile failure is recorded (and printed) so that one
    variant cannot end a long sweep; any other exception is a bug and propagates.
    """
    reset_peak_memory(device)
    try:
        time_ms = median_time_ms(prepare, device, warmup=warmup, repeats=repeats)
    except RuntimeError as error:  # torch.OutOfMemoryError, NotImplementedError, Dynamo errors
        release_memory(device)
        return {"error": report_error(error)}
    return {"time_ms": time_ms, "peak_memory_mb": peak_memory_mb(device)}


def report_error(error: Exception) -> str:
    """The error's type and first line, printed and returned for the results."""
    lines = str(error).strip().splitlines() or [""]
    message = f"{type(error).__name__}: {lines[0][:200]}"
    print(f"  error: {message}", file=sys.stderr)
    return message


def copy_bandwidth_gbps(
    device: torch.device, *, megabytes: int, warmup: int, repeats: int
) -> float:
    """The device's copy bandwidth: ``dst.copy_(src)`` of a large buffer, read + write bytes.

    The ceiling a gather can hope for: a kernel that moves B bytes in t seconds reaches
    ``B / t`` out of this figure.
    """
    numel = megabytes * 2**20 // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    time_ms = median_time_ms(lambda: lambda: dst.copy_(src), device, warmup=warmup, repeats=repeats)
    return 2 * src.nbytes / (time_ms * 1e-3) / 1e9


# --------------------------------------------------------------------------- memory


def release_memory(device: torch.device) -> None:
    """Free what the last variant left (cycles, cached CUDA blocks) before the next one starts."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    """Start a peak-memory window: CUDA allocator stats, or the process RSS high-water (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        # Writing 5 resets the kernel's VmHWM (peak RSS) counter of this process.
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory since ``reset_peak_memory``: CUDA allocated bytes, or the process peak RSS on
    Linux CPUs (None elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # reported in kB
    return None


# --------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


_TIMING_VARIABLES = (
    "OMP_NUM_THREADS",
    "THP_MEM_ALLOC_ENABLE",
    "CUDA_VISIBLE_DEVICES",
    "MEMCOMPILE_CHECK_INDICES",
)


def environment(device: torch.device, module: str, argv: Sequence[str]) -> dict[str, Any]:
    """What a reader needs to reproduce or discount a number: machine, versions, date, command."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", module, *argv]),
        "device": device.type,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        # Settings that change the numbers but not the command line.
        "environment_variables": {
            name: os.environ[name] for name in _TIMING_VARIABLES if name in os.environ
        },
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """A goal from the issues, judged on the result rows it ``applies_to``."""

    name: str
    device_type: str
    metric: str
    threshold: float
    applies_to: Callable[[dict[str, Any]], bool]
    at_most: bool = False
    """The metric must stay at or below the threshold (a cost ratio) instead of reaching it."""

    def verdict(self, row: dict[str, Any], context: Sequence[str]) -> dict[str, Any]:
        value = row[self.metric]
        return {
            "target": self.name,
            "metric": self.metric,
            "threshold": self.threshold,
            "value": value,
            "met": value <= self.threshold if self.at_most else value >= self.threshold,
            "at": {key: row[key] for key in context},
        }


def evaluate_targets(
    targets: Sequence[Target],
    rows: Sequence[dict[str, Any]],
    device: torch.device,
    context: Sequence[str],
) -> list[dict[str, Any]]:
    """One verdict per (target, measured row it applies to); ``context`` names the row keys
    that say where it was measured."""
    return [
        target.verdict(row, context)
        for target in targets
        if target.device_type == device.type
        for row in rows
        if target.metric in row and target.applies_to(row)
    ]


def print_verdicts(verdicts: Sequence[dict[str, Any]]) -> None:
    for verdict in verdicts:
        status = "met" if verdict["met"] else "MISSED"
        where = ", ".join(f"{key}={value}" for key, value in verdict["at"].items())
        print(f"{verdict['target']}: {verdict['value']:.2f} ({status}) at {where}")


# --------------------------------------------------------------------------- output


def config_as_json(config: Any) -> dict[str, Any]:
    """A benchmark's dataclass config with paths as strings."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}


Column = tuple[str, str, str]
"""(result key, header, format spec); a missing or None value prints as "-"."""


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Right-aligned text table; columns that no row has a value for are left out."""

    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        value = row.get(key)
        return "-" if value is None else format(value, spec)

    columns = [c for c in columns if any(row.get(c[0]) is not None for row in rows)]

    cells = [[cell(row, key, spec) for key, _, spec in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [
        "  ".join(h.rjust(w) for h, w in zip(headers, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def matplotlib_pyplot():
    """``matplotlib.pyplot`` on a file-only backend, or None (with a note) when not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipping the plot", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> None:
    """Lays out ``figure`` (from :func:`matplotlib_pyplot`), writes it to ``path`` and closes it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}")
