"""Memory telemetry: which rows of the shared value table each memory layer reads.

With ``MemoryConfig(telemetry=True)`` every memory layer owns a :class:`UsageCounter`, a
``[num_values]`` int64 buffer that each forward increments once per row read (``heads × topk``
per token), outside autograd. The update is one ``index_add_`` of ``T·heads·topk`` ones, which
``torch.compile(fullgraph=True)`` captures as a buffer mutation without a graph break: cheap next
to the lookup itself, which moves ``value_dim`` numbers per read. Memory: 8 bytes per table row
and layer (3 × 8 × 64M = 1.5 GiB for ``mem_1b_64m``, next to its 275 GB bf16 table).

A window is the span between two :func:`memory_usage` calls with ``reset=True`` (e.g. one
logging interval). The counters are per process and not saved in checkpoints
(``persistent=False``); under data parallelism, all-reduce ``counter.counts`` (see
:func:`usage_counters`) before reading them to describe the global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class UsageCounter(nn.Module):
    """Per-row read counts of a value table, accumulated until :meth:`reset`."""

    def __init__(self, num_rows: int) -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(num_rows, dtype=torch.int64), persistent=False)

    @torch.no_grad()
    def record(self, indices: Tensor) -> None:
        """Count every index of ``indices`` (any shape) as one read of that row."""
        flat = indices.reshape(-1)
        self.counts.index_add_(0, flat, torch.ones_like(flat, dtype=self.counts.dtype))

    @torch.no_grad()
    def reset(self) -> None:
        self.counts.zero_()

    def init_weights(self) -> None:
        self.reset()


@dataclass(frozen=True)
class MemoryUsage:
    """How one layer (or all of them) used the table over a window."""

    #: Row reads counted (tokens × heads × topk).
    reads: int
    #: Rows read at least once / rows in the table.
    fraction_used: float
    #: Shannon entropy of the read distribution over rows, in nats.
    entropy: float
    #: ``entropy / log(num_rows)``: 1 when every row is read equally often, 0 for a single row.
    normalized_entropy: float

    @classmethod
    def from_counts(cls, counts: Tensor) -> MemoryUsage:
        num_rows = counts.numel()
        reads = int(counts.sum())
        if reads == 0:
            return cls(reads=0, fraction_used=0.0, entropy=0.0, normalized_entropy=0.0)
        probs = counts[counts > 0].double() / reads
        entropy = float(-(probs * probs.log()).sum())
        return cls(
            reads=reads,
            fraction_used=probs.numel() / num_rows,
            entropy=entropy,
            normalized_entropy=entropy / math.log(num_rows) if num_rows > 1 else 0.0,
        )


def usage_counters(model: nn.Module) -> dict[str, UsageCounter]:
    """The model's usage counters by module name (empty when telemetry is off)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, UsageCounter)}


def memory_usage(model: nn.Module, reset: bool = True) -> dict[str, MemoryUsage]:
    """Usage of the shared table per memory layer, plus ``"all"`` for the layers together.

    ``reset=True`` zeroes the counters, so that the next call describes a fresh window.
    """
    counters = usage_counters(model)
    if not counters:
        return {}
    usage = {name: MemoryUsage.from_counts(c.counts) for name, c in counters.items()}
    usage["all"] = MemoryUsage.from_counts(sum(c.counts for c in counters.values()))
    if reset:
        for counter in counters.values():
            counter.reset()
    return usage
