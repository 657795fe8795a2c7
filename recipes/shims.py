"""Compatibility shims that let torchtitan 0.3.0 train on a CPU-only build of torch 2.13.

torchtitan 0.3.0 is developed against CUDA and torch nightlies (~2.15). Every shim below is a
small, targeted patch with the reason it exists and the condition that enables it; none of them
changes behaviour on a CUDA machine with a recent torch. ``apply()`` is called once, from the
recipe entry point, before the Trainer is built.

Two more incompatibilities need no patch, only a setting (in ``recipes/pretrain.py``):
FlexAttention has no CPU backward (memcompile attends through SDPA), and the default
``spmd_backend="spmd_types"`` fails with FSDP > 1 on torch 2.13 (the recipe uses
``partial_dtensor``).
"""

from __future__ import annotations

import os
import resource
from datetime import timedelta

import torch
import torch.distributed as dist

_applied = False


def running_on_cpu() -> bool:
    """True when training runs on the CPU (no CUDA device visible)."""
    return not torch.cuda.is_available()


def apply() -> None:
    """Apply every shim whose condition holds. Idempotent."""
    global _applied
    if _applied:
        return
    _applied = True
    if running_on_cpu():
        _use_cpu_device()
        _use_cpu_memory_monitor()
        _barrier_without_device_ids()
    if not hasattr(dist, "set_timeout"):
        _polyfill_set_timeout()


def _use_cpu_device() -> None:
    """torchtitan picks ``"cuda"`` when no accelerator is found (``tools/utils.get_device_info``),
    so ``set_device`` fails and the backend becomes nccl. The module-level ``device_type`` /
    ``device_module`` are bound by name in several modules: rebind each to ``"cpu"`` /
    ``torch.cpu`` (``init_distributed`` then maps ``cpu`` to gloo).
    Condition: no CUDA device."""
    import torchtitan.components.metrics
    import torchtitan.distributed.parallel_dims
    import torchtitan.distributed.utils
    import torchtitan.models.common.token_dispatcher
    import torchtitan.tools.profiler
    import torchtitan.tools.utils

    for module in (
        torchtitan.tools.utils,
        torchtitan.components.metrics,
        torchtitan.distributed.utils,
        torchtitan.distributed.parallel_dims,
        torchtitan.models.common.token_dispatcher,
        torchtitan.tools.profiler,
    ):
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = torch.cpu


class _CPUMemoryMonitor:
    """Stands in for ``metrics.DeviceMemoryMonitor``, whose CUDA memory-stat calls have no CPU
    equivalent. Reports the process's peak resident set size (Linux ``ru_maxrss`` is in KiB);
    there is no "active" vs "reserved" split or OOM counter on the CPU."""

    device_name = "cpu"

    def __init__(self) -> None:
        page_size, num_pages = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES")
        self.capacity_gib = page_size * num_pages / 2**30

    def get_peak_stats(self):
        from torchtitan.components.metrics import DeviceMemStats

        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        peak_pct = 100 * peak_gib / self.capacity_gib
        return DeviceMemStats(peak_gib, peak_pct, peak_gib, peak_pct, 0, 0)

    def reset_peak_stats(self) -> None:
        """Peak RSS cannot be reset; it stays the process-lifetime peak."""


def _use_cpu_memory_monitor() -> None:
    """``MetricsProcessor`` builds a CUDA-only ``DeviceMemoryMonitor``.
    Condition: no CUDA device."""
    import torchtitan.components.metrics as metrics

    metrics.build_device_memory_monitor = _CPUMemoryMonitor


def _barrier_without_device_ids() -> None:
    """``dist_utils.set_pg_timeouts`` calls ``barrier(device_ids=[...])``, which gloo rejects.
    The replacement is the same function with a plain barrier.
    Condition: no CUDA device (the backend is then gloo)."""
    import torchtitan.distributed.utils as dist_utils

    def set_pg_timeouts(timeout: timedelta, parallel_dims) -> None:
        dist.barrier()
        groups = [m.get_group() for m in parallel_dims.get_all_one_dimensional_meshes().values()]
        for group in [*groups, None]:
            dist.set_timeout(timeout, group)

    dist_utils.set_pg_timeouts = set_pg_timeouts


def _polyfill_set_timeout() -> None:
    """``torch.distributed.set_timeout`` (used by ``set_pg_timeouts`` after the first step) was
    added after torch 2.13; ``ProcessGroup.set_timeout`` does the same per group.
    Condition: ``torch.distributed`` has no ``set_timeout``."""

    def set_timeout(timeout: timedelta, group: dist.ProcessGroup | None = None) -> None:
        (group or dist.distributed_c10d._get_default_group()).set_timeout(timeout)

    dist.set_timeout = set_timeout


def allow_fsdp_on_gloo(model: torch.nn.Module) -> None:
    """FSDP2 reduce-scatters with ``PREMUL_SUM`` (pre-multiplied by 1/world), which gloo
    rejects; forcing SUM reductions gives the same result here because torchtitan already sets
    the gradient divide factor to 1 (the loss is normalised by the global token count).
    Condition: the default process group is gloo. Call after ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    if dist.get_backend() != "gloo":
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
