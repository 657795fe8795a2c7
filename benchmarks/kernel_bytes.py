"""The fewest bytes (and the FLOPs) each Triton kernel launch of ``ops/`` must move, from shapes.

One model for every benchmark: the op-level "fewest bytes" of ``benchmarks.lookup`` and
``benchmarks.value_step`` are sums of these per-kernel entries, and on CUDA each kernel's time
(from ``torch.profiler``) over its entry gives its achieved bandwidth at once.

How bytes are counted, per launch:

- an operand read in order (indices, weights, a token's ``grad_out`` row, an output) counts once;
- a row fetched through an index (a table row, a hit's ``grad_out`` row in sorted order) counts
  at every fetch: random rows of a table larger than L2 get no reuse (on shapes that fit in L2,
  the cache can beat the model, and a fraction of copy bandwidth above 1 says so);
- an atomic add reads and writes its element;
- the ``torch`` work around the kernels (sorting and searching the indices, the atomic path's
  zero fill and cast) is not a Triton kernel and is not counted; the profiler table shows its
  time as "other".

Symbols: ``T`` tokens, ``B`` rows per token, ``H = T * B`` hits, ``D`` columns, ``N`` table rows,
``U`` touched rows; element bytes ``e`` (values / table), ``eg`` (``grad_out``), ``ei``
(indices), ``ew`` (weights), ``ea`` (accumulator: 4, 8 for fp64); ``P`` hot-row pieces holding
``Hh`` hits (rows with more than ``hits_per_piece`` hits: none with uniform indices).
FLOPs count a multiply-add as 2.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: ops.lookup_triton._HITS_PER_PIECE (read here without importing Triton).
HITS_PER_PIECE = 1024


@dataclass(frozen=True)
class Hits:
    """What a step's indices look like to the kernels: hits, distinct rows, hot rows."""

    tokens: int
    bag_size: int
    touched: int = 0
    """Distinct rows (only the row-sparse kernels depend on it)."""
    hot_hits: int = 0
    """Hits of rows with more than ``hits_per_piece`` hits (summed in pieces first)."""
    hot_pieces: int = 0

    @property
    def hits(self) -> int:
        return self.tokens * self.bag_size

    @property
    def piece_slots(self) -> int:
        """The hot-row kernel's grid: an upper bound on the pieces (``ops.lookup_triton``)."""
        return 2 * self.hits // HITS_PER_PIECE

    @classmethod
    def of(cls, indices: torch.Tensor, hits_per_piece: int = HITS_PER_PIECE) -> Hits:
        """The hits of ``indices [T, B]``."""
        counts = torch.unique(indices, return_counts=True)[1]
        hot = counts[counts > hits_per_piece]
        return cls(
            tokens=indices.shape[0],
            bag_size=indices.shape[1],
            touched=counts.numel(),
            hot_hits=int(hot.sum()),
            hot_pieces=int(((hot + hits_per_piece - 1) // hits_per_piece).sum()),
        )


@dataclass(frozen=True)
class Sizes:
    """Element bytes of a launch's operands."""

    value: int
    grad: int | None = None
    """``grad_out``'s (default: the values')."""
    index: int = 8
    weight: int | None = None
    """The weights' (default: the values')."""
    acc: int = 4

    @property
    def g(self) -> int:
        return self.value if self.grad is None else self.grad

    @property
    def w(self) -> int:
        return self.value if self.weight is None else self.weight


@dataclass(frozen=True)
class KernelCost:
    """One launch: the Triton kernel (its function name, as the profiler shows it), the fewest
    bytes it must move and its FLOPs."""

    kernel: str
    bytes: int
    flops: int


def _sum_hits(hits: Hits, dim: int, sizes: Sizes, csr_rows: int) -> tuple[int, int]:
    """(bytes, flops) of summing each row's non-hot hits in sorted order, or its pieces: two CSR
    offset arrays over ``csr_rows`` rows, per hit its position, weight and ``grad_out`` row."""
    cold = hits.hits - hits.hot_hits
    bytes_ = 2 * (csr_rows + 1) * 8 + cold * (8 + sizes.w + dim * sizes.g)
    bytes_ += hits.hot_pieces * dim * sizes.acc
    return bytes_, 2 * cold * dim + hits.hot_pieces * dim


def lookup_forward(hits: Hits, dim: int, sizes: Sizes) -> KernelCost:
    """Indices and weights ``H*(ei + ew)``, gathered rows ``H*D*e``, output ``T*D*e``."""
    H = hits.hits
    bytes_ = H * (sizes.index + sizes.w) + H * dim * sizes.value + hits.tokens * dim * sizes.value
    return KernelCost("_lookup_forward_kernel", bytes_, 2 * H * dim)


def lookup_quantized(hits: Hits, dim: int, sizes: Sizes, out: int = 2) -> KernelCost:
    """``lookup_forward`` over int8/fp8 rows (``sizes.value`` = 1): also a 4-byte scale per
    hit, output ``T*D*out`` (bf16 by default, as the model reads it)."""
    H = hits.hits
    bytes_ = H * (sizes.index + sizes.w + 4) + H * dim * sizes.value + hits.tokens * dim * out
    return KernelCost("_lookup_quantized_kernel", bytes_, 2 * H * dim + H)


def hot_row_pieces(hits: Hits, dim: int, sizes: Sizes) -> KernelCost:
    """Every piece slot reads its row ``8``; a piece its three offsets ``24``, its hits
    ``Hh*(8 + ew + D*eg)``, and writes its partial sum ``D*ea``."""
    per_hit = 8 + sizes.w + dim * sizes.g
    bytes_ = hits.piece_slots * 8 + hits.hot_pieces * (24 + dim * sizes.acc)
    bytes_ += hits.hot_hits * per_hit
    return KernelCost("_hot_row_pieces_kernel", bytes_, 2 * hits.hot_hits * dim)


def values_grad_sorted(hits: Hits, num_rows: int, dim: int, sizes: Sizes) -> KernelCost:
    """Sums every row's hits (CSR over ``N`` rows) and writes the whole ``[N, D]`` gradient."""
    bytes_, flops = _sum_hits(hits, dim, sizes, num_rows)
    return KernelCost("_values_grad_sorted_kernel", bytes_ + num_rows * dim * sizes.g, flops)


def values_grad_atomic(hits: Hits, dim: int, sizes: Sizes) -> KernelCost:
    """``grad_out`` once ``T*D*eg``, indices and weights, an atomic add per hit ``2*H*D*ea``."""
    H = hits.hits
    bytes_ = hits.tokens * dim * sizes.g + H * (sizes.index + sizes.w) + 2 * H * dim * sizes.acc
    return KernelCost("_values_grad_atomic_kernel", bytes_, 2 * H * dim)


def weights_grad(hits: Hits, dim: int, sizes: Sizes) -> KernelCost:
    """``grad_out`` once ``T*D*eg``, indices ``H*ei``, gathered rows ``H*D*e``, dots ``H*ea``."""
    H = hits.hits
    bytes_ = hits.tokens * dim * sizes.g + H * sizes.index + H * dim * sizes.value + H * sizes.acc
    return KernelCost("_weights_grad_kernel", bytes_, 2 * H * dim)


def row_sq_norms(hits: Hits, dim: int, sizes: Sizes) -> KernelCost:
    """Sums each touched row's hits (CSR over ``U`` rows), writes its fp64 squared norm."""
    bytes_, flops = _sum_hits(hits, dim, sizes, hits.touched)
    return KernelCost(
        "_row_sq_norms_kernel", bytes_ + hits.touched * 8, flops + 2 * hits.touched * dim
    )


def _state_bytes(rule: str, dim: int) -> int:
    """A touched row's optimizer state, read and written: Adam's two fp32 moments, row-wise
    AdaGrad's one fp32 sum, SGD none."""
    return {"sgd": 0, "rowwise_adagrad": 2 * 4, "adam": 2 * 2 * dim * 4}[rule]


#: FLOPs of a rule's update per element of a row (a count of the kernel's arithmetic).
_UPDATE_FLOPS = {"sgd": 4, "rowwise_adagrad": 5, "adam": 14}


def update_rows(
    hits: Hits, dim: int, sizes: Sizes, rule: str, use_mean_sq: bool = False
) -> KernelCost:
    """Sums each touched row's hits, reads its row id ``8``, reads and writes the row ``2*D*e``
    and its state (``_state_bytes``); row-wise AdaGrad reads the row's mean square ``8`` when
    given it (``use_mean_sq``), else computes it (3 more FLOPs per element)."""
    U = hits.touched
    bytes_, flops = _sum_hits(hits, dim, sizes, U)
    bytes_ += U * (8 + 2 * dim * sizes.value + _state_bytes(rule, dim))
    element_flops = _UPDATE_FLOPS[rule]
    if rule == "rowwise_adagrad":
        bytes_ += U * 8 if use_mean_sq else 0
        element_flops += 0 if use_mean_sq else 3
    return KernelCost("_update_rows_kernel", bytes_, flops + U * dim * element_flops)


#: Every Triton kernel of ``ops/`` and the function of this model that costs its launch.
MODEL: dict[str, Callable[..., KernelCost]] = {
    "_lookup_forward_kernel": lookup_forward,
    "_lookup_quantized_kernel": lookup_quantized,
    "_hot_row_pieces_kernel": hot_row_pieces,
    "_values_grad_sorted_kernel": values_grad_sorted,
    "_values_grad_atomic_kernel": values_grad_atomic,
    "_weights_grad_kernel": weights_grad,
    "_row_sq_norms_kernel": row_sq_norms,
    "_update_rows_kernel": update_rows,
}


# --------------------------------------------------------------------------- ops as launches


def _hot_pieces_launch(hits: Hits, dim: int, sizes: Sizes) -> list[KernelCost]:
    """The hot-row kernel runs when its upper-bound grid is not empty."""
    return [hot_row_pieces(hits, dim, sizes)] if hits.piece_slots > 0 else []


def lookup_backward(
    hits: Hits, num_rows: int, dim: int, sizes: Sizes, deterministic: bool = True
) -> list[KernelCost]:
    """The value gradient (sorted: hot-row pieces, then every row; or atomic), then the weight
    gradient."""
    if deterministic:
        values_grad = [
            *_hot_pieces_launch(hits, dim, sizes),
            values_grad_sorted(hits, num_rows, dim, sizes),
        ]
    else:
        values_grad = [values_grad_atomic(hits, dim, sizes)]
    return [*values_grad, weights_grad(hits, dim, sizes)]


def row_sparse_step(hits: Hits, dim: int, sizes: Sizes, rule: str) -> list[KernelCost]:
    """A ``RowSparseOptimizer`` step after the backward: the hot rows' pieces (summed once), then
    the rows' squared norms (clipping and row-wise AdaGrad read them) and the update, both
    reading the pieces."""
    use_mean_sq = rule == "rowwise_adagrad"  # weight decay 0: the norms give the mean square
    return [
        *_hot_pieces_launch(hits, dim, sizes),
        row_sq_norms(hits, dim, sizes),
        update_rows(hits, dim, sizes, rule, use_mean_sq),
    ]


def total_bytes(costs: Iterable[KernelCost]) -> int:
    return sum(cost.bytes for cost in costs)


# --------------------------------------------------------------------------- the model's coverage


def triton_kernels(modules: Sequence[Any]) -> set[str]:
    """The ``@triton.jit`` functions of ``modules`` that are launched, not called from another
    kernel (helpers such as ``_sum_hits`` are called by name in a kernel's source)."""
    jitted = {
        name: inspect.getsource(obj.fn)
        for module in modules
        for name, obj in vars(module).items()
        if type(obj).__module__.startswith("triton") and hasattr(obj, "fn")
    }
    return {
        name
        for name in jitted
        if not any(re.search(rf"\b{name}\(", src) for other, src in jitted.items() if other != name)
    }


# --------------------------------------------------------------------------- profiler rows


def model_kernel(profiler_name: str) -> str | None:
    """The model entry of a profiler's kernel name, or None for a kernel that is not ours.

    Triton names a kernel after its function; some versions append the specialization
    (``_lookup_forward_kernel_0d1d2d3de``). The longest entry that matches wins.
    """
    matches = [
        kernel
        for kernel in MODEL
        if profiler_name == kernel or re.fullmatch(rf"{kernel}(_[0-9a-z]+)+", profiler_name)
    ]
    return max(matches, key=len, default=None)


def kernel_times_ms(events: Iterable[tuple[str, float, int]]) -> dict[str, float]:
    """Device milliseconds per model kernel, summed over launches, and "other" for the rest, from
    ``(name, total device microseconds, calls)`` of a profile's averaged events."""
    times: dict[str, float] = {}
    for name, device_us, _calls in events:
        if device_us <= 0:
            continue
        key = model_kernel(name) or "other"
        times[key] = times.get(key, 0.0) + device_us / 1e3
    return times


def kernel_rows(
    costs: Sequence[KernelCost],
    times_ms: dict[str, float],
    copy_gbps: float,
    repeats: int = 1,
    **context: Any,
) -> list[dict[str, Any]]:
    """One row per model kernel of ``costs`` (launches of one kernel summed) and one for the
    other kernels: per-run time, fewest bytes, GB/s and fraction of copy bandwidth."""
    by_kernel: dict[str, tuple[int, int]] = {}
    for cost in costs:
        bytes_, flops = by_kernel.get(cost.kernel, (0, 0))
        by_kernel[cost.kernel] = (bytes_ + cost.bytes, flops + cost.flops)
    rows = []
    for kernel, (bytes_, flops) in by_kernel.items():
        row = {**context, "kernel": kernel, "bytes": bytes_, "flops": flops}
        if kernel in times_ms:
            row["kernel_ms"] = times_ms[kernel] / repeats
            row["gbps"] = bytes_ / (row["kernel_ms"] * 1e-3) / 1e9
            row["copy_fraction"] = row["gbps"] / copy_gbps
        rows.append(row)
    if "other" in times_ms:
        rows.append({**context, "kernel": "other", "kernel_ms": times_ms["other"] / repeats})
    return rows


def profile_kernels(prepare: Callable[[], Callable[[], object]], repeats: int) -> dict[str, float]:
    """Device milliseconds per model kernel (and "other"), summed over ``repeats`` runs of
    ``prepare()()`` on CUDA; ``prepare`` itself is not profiled (as in
    ``benchmarks.common.median_time_ms``: e.g. the forward of a timed backward)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    events = []
    for _ in range(repeats):
        timed = prepare()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            timed()
            torch.cuda.synchronize()
        del timed
        # Kernels only: the host-side launch calls carry their kernels' time too.
        events += [
            (event.key, event.device_time_total, event.count)
            for event in prof.key_averages()
            if event.device_type == DeviceType.CUDA
        ]
    return kernel_times_ms(events)


KERNEL_COLUMNS = [
    ("kernel", "kernel", "s"),
    ("kernel_ms", "ms", ".3f"),
    ("bytes", "min bytes", ",d"),
    ("flops", "FLOPs", ",d"),
    ("gbps", "GB/s", ".1f"),
    ("copy_fraction", "of copy", ".1%"),
]

CPU_REASON = "per-kernel table skipped: it profiles the Triton kernels, and on CPU the ops run C++"
