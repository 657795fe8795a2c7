"""The per-kernel bytes-and-FLOPs model (``benchmarks/kernel_bytes.py``): its numbers against
arithmetic written out for small shapes, the ops' totals as sums of their kernels, the profiler
names it maps, and that every Triton kernel of ``ops/`` has an entry.

Shapes: T = 3 tokens, B = 2 rows each (H = 6 hits), D = 4, N = 10 rows; element bytes e (values),
ei = 8 (int64 indices), ew (weights), ea = 4 (fp32 accumulator).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from benchmarks import kernel_bytes, lookup, value_step
from benchmarks.common import format_table
from benchmarks.kernel_bytes import Hits, Sizes

HITS = Hits(tokens=3, bag_size=2, touched=5)
BF16 = Sizes(value=2)  # weights and grad_out in the values' dtype, as benchmarks.lookup
FP32 = Sizes(value=4, weight=4)

# lookup_forward, bf16: H*(ei + ew) + H*D*e + T*D*e
FORWARD = 6 * (8 + 2) + 6 * 4 * 2 + 3 * 4 * 2  # 132
# values_grad_sorted, bf16: 2*(N + 1)*8 offsets + H*(8 + ew + D*eg) hits + N*D*eg gradient
SORTED = 2 * 11 * 8 + 6 * (8 + 2 + 4 * 2) + 10 * 4 * 2  # 364
# values_grad_atomic, bf16: T*D*eg + H*(ei + ew) + 2*H*D*ea atomics
ATOMIC = 3 * 4 * 2 + 6 * (8 + 2) + 2 * 6 * 4 * 4  # 276
# weights_grad, bf16: T*D*eg + H*ei + H*D*e rows + H*ea dots
WEIGHTS_GRAD = 3 * 4 * 2 + 6 * 8 + 6 * 4 * 2 + 6 * 4  # 144
# Row-sparse kernels, fp32, U = 5 touched rows: 2*(U + 1)*8 offsets + H*(8 + ew + D*eg) hits
ROW_HITS = 2 * 6 * 8 + 6 * (8 + 4 + 4 * 4)  # 264


def test_lookup_kernels_against_written_out_arithmetic():
    forward = kernel_bytes.lookup_forward(HITS, 4, BF16)
    assert (forward.bytes, forward.flops) == (FORWARD, 2 * 6 * 4)
    sorted_ = kernel_bytes.values_grad_sorted(HITS, 10, 4, BF16)
    assert (sorted_.bytes, sorted_.flops) == (SORTED, 2 * 6 * 4)
    assert kernel_bytes.values_grad_atomic(HITS, 4, BF16).bytes == ATOMIC
    assert kernel_bytes.weights_grad(HITS, 4, BF16).bytes == WEIGHTS_GRAD


def test_row_sparse_kernels_against_written_out_arithmetic():
    norms = kernel_bytes.row_sq_norms(HITS, 4, FP32)
    assert norms.bytes == ROW_HITS + 5 * 8  # + U fp64 norms
    assert norms.flops == 2 * 6 * 4 + 2 * 5 * 4  # hits' multiply-adds + squares summed
    # + U*(8 row id + 2*D*e row read and written + state)
    adam = kernel_bytes.update_rows(HITS, 4, FP32, "adam")
    assert adam.bytes == ROW_HITS + 5 * (8 + 2 * 4 * 4 + 4 * 4 * 4)  # two fp32 moments, r + w
    assert adam.flops == 2 * 6 * 4 + 5 * 4 * 14
    adagrad = kernel_bytes.update_rows(HITS, 4, FP32, "rowwise_adagrad", use_mean_sq=True)
    assert adagrad.bytes == ROW_HITS + 5 * (8 + 2 * 4 * 4) + 5 * 8 + 5 * 2 * 4  # mean sq, sum
    assert kernel_bytes.update_rows(HITS, 4, FP32, "sgd").bytes == ROW_HITS + 5 * (8 + 2 * 4 * 4)


def test_hot_rows_are_summed_in_pieces():
    # 512 tokens x 4 rows, 2048 of the hits on hot rows, cut into 2 pieces; fp32, D = 4.
    hits = Hits(tokens=512, bag_size=4, touched=3, hot_hits=2048, hot_pieces=2)
    assert hits.piece_slots == 2 * 2048 // 1024
    pieces = kernel_bytes.hot_row_pieces(hits, 4, FP32)
    # 4 slots read their row; 2 pieces read 3 offsets and write D*ea; 2048 hits read 8 + 4 + 16.
    assert pieces.bytes == 4 * 8 + 2 * (24 + 4 * 4) + 2048 * (8 + 4 + 4 * 4)
    # The row kernel reads the 2 partial sums instead of the hot hits.
    assert kernel_bytes.values_grad_sorted(hits, 10, 4, FP32).bytes == (
        2 * 11 * 8 + 2 * 4 * 4 + 10 * 4 * 4
    )


def test_a_row_sparse_step_sums_the_hot_rows_pieces_once():
    hits = Hits(tokens=512, bag_size=4, touched=3, hot_hits=2048, hot_pieces=2)
    kernels = [cost.kernel for cost in kernel_bytes.row_sparse_step(hits, 4, FP32, "adam")]
    assert kernels == ["_hot_row_pieces_kernel", "_row_sq_norms_kernel", "_update_rows_kernel"]


def test_hits_of_indices():
    indices = torch.tensor([[7, 7], [7, 1], [1, 3]])
    # Row 7 has 3 hits > 2 per piece: 2 pieces; rows 1 and 3 are cold.
    assert Hits.of(indices, hits_per_piece=2) == Hits(3, 2, touched=3, hot_hits=3, hot_pieces=2)
    assert Hits.of(indices) == Hits(3, 2, touched=3)


def test_op_bytes_are_the_sums_of_their_kernels():
    shape = lookup.Shape(num_rows=10, dim=4, tokens=3, rows_per_token=2, dtype="bf16")
    assert lookup.lookup_bytes(shape, "forward") == FORWARD
    # No hot-row launch: its grid, 2 * 6 // 1024 pieces, is empty.
    assert lookup.lookup_bytes(shape, "backward") == SORTED + WEIGHTS_GRAD
    assert lookup.lookup_bytes(shape, "forward+backward") == FORWARD + SORTED + WEIGHTS_GRAD
    assert lookup.lookup_bytes(shape, "backward", deterministic=False) == ATOMIC + WEIGHTS_GRAD
    kernels = [cost.kernel for cost in lookup.lookup_kernels(shape, "forward+backward")]
    assert kernels == [
        "_lookup_forward_kernel",
        "_values_grad_sorted_kernel",
        "_weights_grad_kernel",
    ]

    step = value_step.Shape(num_rows=10, dim=4, tokens=3, rows_per_token=2, dtype="fp32")
    forward = 6 * (8 + 4) + 6 * 4 * 4 + 3 * 4 * 4  # fp32 weights
    weights_grad = 3 * 4 * 4 + 6 * 8 + 6 * 4 * 4 + 6 * 4
    norms = ROW_HITS + 5 * 8
    adam = ROW_HITS + 5 * (8 + 2 * 4 * 4 + 4 * 4 * 4)
    total = forward + weights_grad + norms + adam
    assert value_step.step_bytes("ours_row_sparse_adam", step, 5) == total
    sorted_ = 2 * 11 * 8 + 6 * (8 + 4 + 4 * 4) + 10 * 4 * 4
    dense = forward + sorted_ + weights_grad + 8 * 10 * 4 * 4  # + clip read + AdamW's 7
    assert value_step.step_bytes("ours_dense_adamw_fused", step, 5) == dense
    assert value_step.step_bytes("aten_adamw_fused", step, 5) == dense


def test_profiler_names_map_to_model_entries():
    model_kernel = kernel_bytes.model_kernel
    assert model_kernel("_lookup_forward_kernel") == "_lookup_forward_kernel"
    # Older Triton appends the specialization to the name.
    assert model_kernel("_update_rows_kernel_0d1d2d3de4de") == "_update_rows_kernel"
    assert model_kernel("_row_sq_norms_kernel") == "_row_sq_norms_kernel"
    for not_ours in (
        "void at::native::elementwise_kernel<128, 2>",
        "_lookup_forward_kernelx",
        "lookup_forward_kernel",
        "DeviceRadixSortOnesweepKernel",
    ):
        assert model_kernel(not_ours) is None, not_ours

    times = kernel_bytes.kernel_times_ms(
        [
            ("_weights_grad_kernel", 300.0, 2),
            ("_weights_grad_kernel_0d1d", 100.0, 1),
            ("DeviceRadixSortOnesweepKernel", 50.0, 1),
            ("cudaLaunchKernel", 0.0, 3),
        ]
    )
    assert times == {"_weights_grad_kernel": 0.4, "other": 0.05}
    rows = kernel_bytes.kernel_rows(
        [kernel_bytes.KernelCost("_weights_grad_kernel", 4_000_000, 10)],
        times,
        copy_gbps=20.0,
        repeats=2,
        method="m",
    )
    assert rows[0]["kernel_ms"] == pytest.approx(0.2)
    assert rows[0]["gbps"] == pytest.approx(4e6 / 0.2e-3 / 1e9)  # 20 GB/s
    assert rows[0]["copy_fraction"] == pytest.approx(1.0)
    assert rows[1] == {"method": "m", "kernel": "other", "kernel_ms": pytest.approx(0.025)}
    table = format_table(rows, [("method", "method", "s"), *kernel_bytes.KERNEL_COLUMNS])
    assert "4,000,000" in table and "100.0%" in table


def test_every_triton_kernel_of_ops_has_a_model_entry():
    pytest.importorskip("triton", reason="lists the ops' @triton.jit kernels")
    ops_dir = Path(importlib.import_module("ops").__file__).parent
    modules = [
        importlib.import_module(f"ops.{path.stem}")
        for path in sorted(ops_dir.glob("*.py"))
        if "_jit" in path.read_text() or "triton.jit" in path.read_text()
    ]
    kernels = kernel_bytes.triton_kernels(modules)
    assert "_lookup_forward_kernel" in kernels and "_sum_hits" not in kernels  # helpers left out
    assert kernels == set(kernel_bytes.MODEL)
    from ops import lookup_triton

    assert kernel_bytes.HITS_PER_PIECE == lookup_triton._HITS_PER_PIECE
