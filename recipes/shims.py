"""Every patch of torchtitan 0.3.0 / torch 2.13 the recipes need, in one place.

torchtitan 0.3.0 is developed against CUDA and torch nightlies (~2.15). Every shim below is a
small, targeted patch with the reason it exists, the condition that enables it and what would
let it go; ``tests/recipes/test_shims.py`` checks that each reason still holds, so it fails when
an upgrade makes a shim unnecessary. ``apply()`` installs them once, from the recipe entry
point, before the Trainer is built; ``allow_fsdp_on_gloo`` runs after ``fully_shard``.

Two more incompatibilities need no patch, only a setting (``recipes/config_registry.py``):
FlexAttention has no CPU backward (memcompile attends through SDPA), and the default
``spmd_backend="spmd_types"`` fails with FSDP > 1 on torch 2.13 (the recipe uses
``partial_dtensor``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import warnings
from collections.abc import Callable, Iterator
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
    _quiet_run_log()


def _use_cpu_device() -> None:
    """torchtitan picks ``"cuda"`` when no accelerator is found (``tools/utils.get_device_info``),
    so ``set_device`` fails and the backend becomes nccl. The module-level ``device_type`` /
    ``device_module`` are bound by name in several modules: rebind each to ``"cpu"`` /
    ``torch.cpu`` (``init_distributed`` then maps ``cpu`` to gloo).
    Condition: no CUDA device. Upstream: torchtitan 0.3.0 has no CPU fallback."""
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
    Condition: no CUDA device. Upstream: torchtitan 0.3.0 has no CPU monitor."""
    import torchtitan.components.metrics as metrics

    metrics.build_device_memory_monitor = _CPUMemoryMonitor


def _barrier_without_device_ids() -> None:
    """``dist_utils.set_pg_timeouts`` calls ``barrier(device_ids=[...])``, which gloo rejects.
    The replacement is the same function with a plain barrier.
    Condition: no CUDA device (the backend is then gloo). Upstream: torchtitan 0.3.0."""
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
    Condition: ``torch.distributed`` has no ``set_timeout`` (gone with torch >= 2.15)."""

    def set_timeout(timeout: timedelta, group: dist.ProcessGroup | None = None) -> None:
        (group or dist.distributed_c10d._get_default_group()).set_timeout(timeout)

    dist.set_timeout = set_timeout


def allow_fsdp_on_gloo(model: torch.nn.Module) -> None:
    """FSDP2 reduce-scatters with ``PREMUL_SUM`` (pre-multiplied by 1/world), which gloo
    rejects; forcing SUM reductions gives the same result here because torchtitan already sets
    the gradient divide factor to 1 (the loss is normalised by the global token count).
    Condition: the default process group is gloo. Call after ``fully_shard``. Upstream: gloo
    has no ``PREMUL_SUM`` in torch 2.13."""
    from torch.distributed.fsdp import FSDPModule

    if dist.get_backend() != "gloo":
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


@contextlib.contextmanager
def gradients_clipped_by(clip: Callable[..., torch.Tensor]) -> Iterator[None]:
    """``Trainer.train_step`` clips every gradient as one vector through
    ``dist_utils.clip_grad_norm_``, with no per-group option. That fails when gradients live on
    different device meshes (a column-sharded table is not on FSDP's mesh: "must have the same
    mesh"), and it would let the sparse, large-LR table gradients share the dense budget, where
    the paper clips the values separately. Within this block that call goes to ``clip`` (same
    arguments; it returns the norm the Trainer logs): the recipe's trainer wraps each
    ``train_step`` in it, so nothing outside its steps is affected.
    Condition: the recipe's train step. Upstream: torchtitan 0.3.0 has no per-group clipping
    hook. TODO: drop when the Trainer can clip parameter groups separately."""
    import torchtitan.distributed.utils as dist_utils

    original = dist_utils.clip_grad_norm_
    dist_utils.clip_grad_norm_ = clip
    try:
        yield
    finally:
        dist_utils.clip_grad_norm_ = original


# --------------------------------------------------------------------------- a quiet log
# Messages of torch, torchtitan and torchao that say nothing a user can act on. Each entry is a
# message prefix with why it is dropped and when; the test of each checks that upstream still
# emits it.

#: Logged as torchao imports its CUDA-only libraries (torchtitan imports torchao).
_TORCHAO_CUDA_LIBRARIES = "Failed to load "
#: torch 2.13 deprecates ``register_constant`` on Enums; torchao 0.17 still calls it at import.
_PYTREE_ENUM_DEPRECATION = "is an Enum subclass and is now natively supported"
#: torchtitan 0.3.0 warns about its own default (``initial_load_model_only=True``) whenever a
#: checkpoint config without an ``initial_load_path`` is built: on every run.
_TITAN_OWN_DEFAULT = "initial_load_model_only=True has no effect without an initial_load_path"
#: torchtitan looks for a GPU model name (``lspci``) and its peak FLOPS for MFU; a CPU has
#: neither, so its per-step line reports MFU against an A100 (``recipes.trainer.ProgressMetrics``
#: logs its own step line on a CPU).
_TITAN_PEAK_FLOPS = ("Error running lspci", "Peak flops undefined for", "Peak FLOPS used for")
_TITAN_STEP_LINE = "mfu: "
#: torchdata's StatefulDataLoader calls ``torch.set_vital``, deprecated in torch 2.13.
_TORCHDATA_SET_VITAL = "'set_vital' is deprecated"
#: DTensor's RNG tracker does not run on CPU meshes, so sharded random init would repeat one
#: shard on every rank; ``recipes.model.TitanTransformer.init_weights`` initialises sharded
#: parameters from an unsharded copy instead, so the warning no longer applies.
_DTENSOR_CPU_RNG = "DTensor random operators may not have complete support on cpu device mesh"
#: torchtitan 0.3.0's ``LRSchedulersContainer.load_state_dict`` recomputes each rate with
#: ``LambdaLR.get_lr()`` outside a step, which torch warns against on every resume; the rate it
#: computes is the right one (a resumed run's losses equal an uninterrupted run's).
_TITAN_LR_SCHEDULER_LOAD = "To get the last learning rate computed by the scheduler"


class _DropMessages(logging.Filter):
    """Drops records whose message starts with (or, for ``contains``, holds) one of the given
    strings, and repeats of any warning already let through."""

    def __init__(self, prefixes: tuple[str, ...] = (), contains: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.prefixes, self.contains = prefixes, contains
        self.warned: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.prefixes) or any(c in message for c in self.contains):
            return False
        if record.levelno >= logging.WARNING:
            if message in self.warned:
                return False
            self.warned.add(message)
        return True


def quiet_import_messages() -> None:
    """Drop the import-time messages of torchao that mean nothing to a user: its CUDA
    libraries on a machine without CUDA, and torch 2.13's Enum deprecation.
    Condition: importing torchtitan (hence torchao) on a CPU machine / on torch 2.13. Called by
    ``recipes/__init__.py``, before anything imports torchtitan."""
    if running_on_cpu():
        logging.getLogger("torchao").addFilter(_DropMessages((_TORCHAO_CUDA_LIBRARIES,)))
    logging.getLogger("torch.utils._pytree").addFilter(
        _DropMessages(contains=(_PYTREE_ENUM_DEPRECATION,))
    )


def _quiet_run_log() -> None:
    """torchtitan logs through the root logger: each warning once, none of the above.
    Condition: always; the CPU-only entries on a CPU. Upstream: torchtitan 0.3.0, torch 2.13."""
    on_cpu = running_on_cpu()
    drop = (_TITAN_OWN_DEFAULT, *(_TITAN_PEAK_FLOPS if on_cpu else ()))
    contains = (_TITAN_STEP_LINE,) if on_cpu else ()
    logging.getLogger().addFilter(_DropMessages(drop, contains))
    warnings.filterwarnings("ignore", message=_TORCHDATA_SET_VITAL, category=UserWarning)
    warnings.filterwarnings("ignore", message=_TITAN_LR_SCHEDULER_LOAD, category=UserWarning)
    if running_on_cpu():
        warnings.filterwarnings("ignore", message=_DTENSOR_CPU_RNG, category=UserWarning)
