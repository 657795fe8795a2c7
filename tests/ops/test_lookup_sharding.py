"""DTensor sharding rules of the lookup ops, on two real gloo ranks on the CPU.

Starting processes dominates the cost, so one spawn of two ranks runs every case: each rank
records what it saw (placements, local shapes, full tensors) and the tests compare that with the
single-process op on the same inputs.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._dynamo.testing import CompileCounterWithBackend
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Partial, Placement, Replicate, Shard, distribute_tensor

import ops.lookup  # noqa: F401  (registers torch.ops.memlayer.* and their sharding rules)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)

WORLD_SIZE = 2
PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=60)
SPAWN_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Layout:
    """Placements of the inputs and the placements the sharding rules must give back."""

    values: Placement
    indices_and_weights: Placement
    out: Placement
    values_grad: Placement
    weights_grad: Placement


COLUMN_SHARDED = Layout(Shard(1), Replicate(), Shard(1), Shard(1), Partial())
REPLICATED = Layout(Replicate(), Replicate(), Replicate(), Replicate(), Replicate())
# The memory-parallel pattern: tokens sharded over the table's mesh dimension get all-gathered.
TOKEN_SHARDED_BATCH = Layout(Shard(1), Shard(0), Shard(1), Shard(1), Partial())


@dataclass(frozen=True)
class Case:
    name: str
    layout: Layout
    num_rows: int
    dim: int
    tokens: int
    bag: int
    all_indices_equal: bool = False
    deterministic: bool | None = None  # None: left to the op's default
    grad_out_placement: Placement | None = None  # None: the output's placement
    compiled: bool = False


CASES = [
    Case("column", COLUMN_SHARDED, num_rows=13, dim=6, tokens=7, bag=3),
    Case("column_uneven_colliding", COLUMN_SHARDED, 5, 5, 9, 4, all_indices_equal=True),
    Case("column_empty_batch", COLUMN_SHARDED, 13, 6, tokens=0, bag=3),
    Case("column_atomic", COLUMN_SHARDED, 13, 6, 7, 3, deterministic=False),
    Case("column_grad_out_replicated", COLUMN_SHARDED, 13, 6, 7, 3, grad_out_placement=Replicate()),
    Case(
        "column_grad_out_partial_compiled",
        COLUMN_SHARDED,
        13,
        6,
        7,
        3,
        grad_out_placement=Partial(),
        compiled=True,
    ),
    Case("replicated", REPLICATED, 13, 6, 7, 3, deterministic=True),
    Case("token_sharded_batch_uneven", TOKEN_SHARDED_BATCH, 13, 6, 7, 3),
]


def _make_inputs(case: Case) -> tuple[torch.Tensor, ...]:
    """The full (unsharded) values, indices, weights and output gradient of a case, seeded."""
    generator = torch.Generator().manual_seed(sum(map(ord, case.name)))
    values = torch.randn(case.num_rows, case.dim, generator=generator)
    if case.all_indices_equal:
        indices = torch.full((case.tokens, case.bag), case.num_rows - 1)
    else:
        indices = torch.randint(0, case.num_rows, (case.tokens, case.bag), generator=generator)
    weights = torch.randn(case.tokens, case.bag, generator=generator)
    grad_out = torch.randn(case.tokens, case.dim, generator=generator)
    return values, indices, weights, grad_out


def _lookup_args(case: Case, values, indices, weights) -> tuple:
    if case.deterministic is None:
        return values, indices, weights
    return values, indices, weights, case.deterministic


def _run_case(case: Case, mesh: DeviceMesh) -> dict:
    values, indices, weights, grad_out = _make_inputs(case)
    layout = case.layout
    values = distribute_tensor(values, mesh, [layout.values]).requires_grad_()
    indices = distribute_tensor(indices, mesh, [layout.indices_and_weights])
    weights = distribute_tensor(weights, mesh, [layout.indices_and_weights]).requires_grad_()

    lookup = torch.ops.memlayer.lookup
    compile_counter = CompileCounterWithBackend("inductor")
    if case.compiled:
        lookup = torch.compile(lookup, fullgraph=True, backend=compile_counter)
    out = lookup(*_lookup_args(case, values, indices, weights))
    grad_out_placement = case.grad_out_placement or out.placements[0]
    out.backward(distribute_tensor(grad_out, mesh, [grad_out_placement]))

    return {
        "out_placements": out.placements,
        "values_grad_placements": values.grad.placements,
        "weights_grad_placements": weights.grad.placements,
        "values_grad_local_shape": tuple(values.grad.to_local().shape),
        "compiled_graphs": compile_counter.frame_count,
        "out": out.full_tensor(),
        "values_grad": values.grad.full_tensor(),
        "weights_grad": weights.grad.full_tensor(),
    }


def _rank_main(rank: int, store_file: str, results_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=PROCESS_GROUP_TIMEOUT,
    )
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        results = {case.name: _run_case(case, mesh) for case in CASES}
        torch.save(results, Path(results_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    """What each of the two ranks recorded, per case name."""
    workdir = tmp_path_factory.mktemp("lookup_sharding")
    context = mp.start_processes(
        _rank_main,
        args=(str(workdir / "store"), str(workdir)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    # join() raises with the rank's traceback if a rank fails; it returns True once all are done.
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} ranks did not finish within {SPAWN_TIMEOUT_S} s")
    return [torch.load(workdir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def _single_process(case: Case) -> dict:
    values, indices, weights, grad_out = _make_inputs(case)
    values.requires_grad_()
    weights.requires_grad_()
    out = torch.ops.memlayer.lookup(*_lookup_args(case, values, indices, weights))
    out.backward(grad_out)
    return {"out": out.detach(), "values_grad": values.grad, "weights_grad": weights.grad}


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def case(request) -> Case:
    return request.param


def test_placements_follow_the_rules(case: Case, rank_results: list[dict]):
    for results in rank_results:
        seen = results[case.name]
        assert seen["out_placements"] == (case.layout.out,)
        assert seen["values_grad_placements"] == (case.layout.values_grad,)
        assert seen["weights_grad_placements"] == (case.layout.weights_grad,)


def test_values_grad_keeps_the_values_layout(case: Case, rank_results: list[dict]):
    full_values = torch.empty(case.num_rows, case.dim)
    for rank, results in enumerate(rank_results):
        if case.layout.values == Shard(1):
            # torch.chunk semantics: rank 0 holds ceil(D / 2) columns, the global N rows.
            expected = full_values.chunk(WORLD_SIZE, dim=1)[rank].shape
        else:
            expected = full_values.shape
        assert results[case.name]["values_grad_local_shape"] == tuple(expected)


@pytest.mark.parametrize("name", ["out", "values_grad", "weights_grad"])
def test_matches_single_process(case: Case, rank_results: list[dict], name: str):
    expected = _single_process(case)[name]
    for results in rank_results:
        torch.testing.assert_close(results[case.name][name], expected)


def test_compiles_to_one_graph_on_dtensors(rank_results: list[dict]):
    for results in rank_results:
        assert results["column_grad_out_partial_compiled"]["compiled_graphs"] == 1
