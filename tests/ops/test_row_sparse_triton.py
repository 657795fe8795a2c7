"""The Triton kernels of the row-sparse table update against the float64 reference.

Property tests call the launchers of ``ops/row_sparse_triton.py`` directly on tiny shapes: on
CPU tensors under ``TRITON_INTERPRET=1`` without a GPU (the custom op would dispatch CPU tensors
to the CPU kernel), on the GPU where there is one. An optimizer step runs the ops' CUDA kernels
(on CPU tensors, by routing the ops' CPU dispatch to them). The CUDA tests at the bottom run
``torch.ops.memlayer.update_rows`` end to end at realistic sizes.
"""

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the Triton kernels need triton (Linux)")

from memcompile.sparse_optim import RowSparseOptimizer  # noqa: E402
from ops import lookup_triton, row_sparse_triton  # noqa: E402
from ops.lookup import lookup_values_grad  # noqa: E402
from ops.row_sparse import group_by_row, row_sq_norms, update_rows  # noqa: E402
from ops.table_rule import RULES, TableRule  # noqa: E402
from tests.memcompile.test_sparse_optim import reader, reader_batch, reader_loss  # noqa: E402
from tests.ops.test_row_sparse import (  # noqa: E402
    assert_bitwise_equal,
    assert_close_to_reference,
    draw_indices,
    dyadic,
    fresh_state,
    in_guarded_buffer,
    reference,
    split_hyper,
    update_cases,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: As ``TOLERANCE`` of the CPU tests, but one whole bf16 ulp: the interpreter truncates fp32 to
#: bf16 where the GPU rounds to nearest.
TRITON_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-7}


def launch_update(table, state, grad_out, weights, groups, hyper, mean_sq=None, **options):
    """``row_sparse_triton.update_rows`` with a test's hyperparameters (see ``split_hyper``)."""
    rule, grad_scale = split_hyper(hyper)
    row_sparse_triton.update_rows(
        table, state, grad_out, weights, *groups, mean_sq, *rule.packed(), grad_scale, **options
    )


def to_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@settings(max_examples=15)  # each example is a few interpreted launches
@given(update_cases(max_rows=24, max_tokens=8, max_bag=4, dims=(1, 3, 5, 16, 33)))
def test_update_rows_matches_float64_reference(case):
    table, state, grad_out, indices, weights, hyper = case
    expected_table, expected_state = reference(table, state, grad_out, indices, weights, hyper)
    before_table, before_state = table.clone(), [s.clone() for s in state]
    buffer, table = in_guarded_buffer(table.to(DEVICE))
    guards = buffer.clone()
    state_on_device = to_device(*state)
    groups = group_by_row(indices.to(DEVICE))
    launch_update(table, state_on_device, *to_device(grad_out, weights), groups, hyper)

    table, buffer, guards = table.cpu(), buffer.cpu(), guards.cpu()
    touched = torch.unique(indices.long().reshape(-1))
    untouched = torch.ones(table.shape[0], dtype=torch.bool)
    untouched[touched] = False
    assert_close_to_reference(
        table[touched], expected_table[touched], before_table[touched], "table", TRITON_TOLERANCE
    )
    assert_bitwise_equal(table[untouched], before_table[untouched], "untouched rows of the table")
    for new, old, expected in zip(state_on_device, before_state, expected_state):
        new = new.cpu()
        assert_close_to_reference(
            new[touched], expected[touched], old[touched], "state", TRITON_TOLERANCE
        )
        assert_bitwise_equal(new[untouched], old[untouched], "untouched rows of the state")
    assert_bitwise_equal(buffer[:3], guards[:3], "the rows before the table")
    assert_bitwise_equal(buffer[-3:], guards[-3:], "the rows after the table")


@pytest.mark.parametrize("rule", RULES)
def test_rows_out_of_range_are_masked_never_written(rule):
    """Without the index check (CUDA's default), a bad row is skipped: the table and its state
    (each inside a buffer of sentinel rows) are written only at the good rows."""
    gen = torch.Generator().manual_seed(6)
    num_rows, dim = 10, 5
    indices = torch.tensor([[0, 3, 3, 9], [4, 0, 7, 2]])
    grad_out, weights = dyadic(gen, (2, dim), 4), dyadic(gen, (2, 4), 8)
    table = torch.randn(num_rows, dim, generator=gen)
    state = fresh_state(rule, num_rows, dim, gen)
    hyper = dict(rule=rule, lr=0.1, weight_decay=0.25, betas=(0.875, 0.9921875))
    expected_table, expected_state = reference(table, state, grad_out, indices, weights, hyper)

    groups = group_by_row(indices)
    rows = groups.rows.clone()  # rows 2 and 9 become -1 and 10 (one past the end)
    rows[rows == 2], rows[rows == 9] = -1, num_rows
    buffers, views = [], []
    for tensor in (table, *state):  # [N] state as [N, 1] rows
        buffer, view = in_guarded_buffer(tensor.reshape(num_rows, -1).to(DEVICE))
        buffers.append(buffer)
        views.append(view.view(tensor.shape))
    before = [buffer.cpu() for buffer in buffers]
    bad_groups = type(groups)(*to_device(rows, groups.row_starts, groups.positions))
    launch_update(views[0], views[1:], *to_device(grad_out, weights), bad_groups, hyper)

    written = torch.tensor([0, 3, 4, 7])
    others = ~torch.isin(torch.arange(num_rows), written)
    for buffer, old, view, expected in zip(
        buffers, before, views, [expected_table, *expected_state]
    ):
        buffer, view = buffer.cpu(), view.cpu()
        assert_bitwise_equal(buffer[:3], old[:3], "the rows before")
        assert_bitwise_equal(buffer[-3:], old[-3:], "the rows after")
        old_view = old[3:-3].view(view.shape)
        assert_bitwise_equal(view[others], old_view[others], "rows out of range or not touched")
        torch.testing.assert_close(view[written].double(), expected[written], rtol=1e-5, atol=1e-7)


@settings(max_examples=10)
@given(
    num_rows=st.integers(1, 24),
    dim=st.sampled_from([1, 3, 7, 16, 33]),
    num_tokens=st.integers(0, 8),
    bag_size=st.integers(0, 4),
    hits=st.sampled_from(["uniform", "hot", "one"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_row_sq_norms_match_the_dense_gradient(num_rows, dim, num_tokens, bag_size, hits, seed):
    gen = torch.Generator().manual_seed(seed)
    indices = draw_indices(gen, num_rows, num_tokens, bag_size, hits, torch.int64)
    grad_out = torch.randn(num_tokens, dim, generator=gen)
    weights = torch.randn(num_tokens, bag_size, generator=gen)
    groups = group_by_row(indices.to(DEVICE))
    norms = row_sparse_triton.row_sq_norms(
        *to_device(grad_out, weights), groups.row_starts, groups.positions
    ).cpu()
    assert norms.dtype == torch.float64 and norms.shape == groups.rows.shape

    dense = lookup_values_grad(grad_out.double(), indices, weights.double(), num_rows, True)
    magnitude = lookup_values_grad(
        grad_out.double().abs(), indices, weights.double().abs(), num_rows, True
    )
    rows = groups.rows.cpu()
    bound = 2 * num_tokens * bag_size * 2**-24 * magnitude[rows].square().sum(1) + 1e-30
    assert bool(((norms - dense[rows].square().sum(1)).abs() <= bound).all())


def test_rowwise_adagrad_given_row_mean_square_replaces_the_local_one():
    gen = torch.Generator().manual_seed(7)
    indices = draw_indices(gen, 12, 6, 3, "hot", torch.int64)
    grad_out, weights = dyadic(gen, (6, 9), 4), dyadic(gen, (6, 3), 8)
    groups = group_by_row(indices.to(DEVICE))
    grad_out, weights = to_device(grad_out, weights)
    local = row_sparse_triton.row_sq_norms(grad_out, weights, groups.row_starts, groups.positions)
    table0 = torch.randn(12, 9, generator=gen)
    sums = []
    for mean_sq in (None, 4 * local / 9):
        table, state = to_device(table0.clone(), torch.zeros(12))
        hyper = dict(rule="rowwise_adagrad", lr=0.1, grad_scale=0.5)
        launch_update(table, [state], grad_out, weights, groups, hyper, mean_sq)
        sums.append(state[groups.rows].cpu())
    expected = (0.5**2 * local.cpu() / 9).float()
    torch.testing.assert_close(sums[0], expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(sums[1], 4 * expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rule", RULES)
def test_update_is_bitwise_reproducible(rule):
    gen = torch.Generator().manual_seed(8)
    indices = draw_indices(gen, 16, 8, 4, "hot", torch.int64)
    grad_out, weights = torch.randn(8, 7, generator=gen), torch.randn(8, 4, generator=gen)
    table0, state0 = torch.randn(16, 7, generator=gen), fresh_state(rule, 16, 7, gen)
    groups = group_by_row(indices.to(DEVICE))
    results = []
    for _ in range(2):
        table, *state = to_device(table0, *state0)
        hyper = dict(rule=rule, lr=0.1, weight_decay=0.01, step=3)
        launch_update(table, state, *to_device(grad_out, weights), groups, hyper)
        results.append([t.cpu() for t in (table, *state)])
    for actual, expected in zip(*results):
        assert_bitwise_equal(actual, expected)


@pytest.mark.parametrize("rule", RULES)
def test_hot_rows_summed_in_pieces_give_the_same_update_and_norms(rule):
    """With ``hits_per_piece=2`` every row hit 3+ times (the hot row: half of all reads) is
    summed in parallel pieces, computed once and read by both kernels, then in piece order.
    Dyadic inputs sum exactly in fp32, so the update and the norms must equal the serial sums'
    bit for bit."""
    gen = torch.Generator().manual_seed(9)
    indices = draw_indices(gen, 16, 8, 4, "hot", torch.int64)
    grad_out, weights = to_device(dyadic(gen, (8, 7), 4), dyadic(gen, (8, 4), 8))
    table0, state0 = torch.randn(16, 7, generator=gen), fresh_state(rule, 16, 7, gen)
    groups = group_by_row(indices.to(DEVICE))
    assert int(groups.row_starts.diff().max()) > 2 * 2  # a row of several pieces
    pieces = row_sparse_triton.hot_row_pieces(
        grad_out, weights, groups.row_starts, groups.positions, hits_per_piece=2
    )
    assert int(pieces.starts.diff().max()) > 2  # the hot row is summed from its pieces
    results = []
    for options in ({}, {"pieces": pieces}):
        table, *state = to_device(table0, *state0)
        hyper = dict(rule=rule, lr=0.1, weight_decay=0.01, step=3)
        launch_update(table, state, grad_out, weights, groups, hyper, **options)
        norms = row_sparse_triton.row_sq_norms(
            grad_out, weights, groups.row_starts, groups.positions, **options
        )
        results.append([t.cpu() for t in (table, norms, *state)])
    for in_pieces, serial in zip(*results):
        assert_bitwise_equal(in_pieces, serial)


@contextlib.contextmanager
def step_ops_on_triton():
    """The row-sparse step ops run their CUDA (Triton) kernels: on CUDA they do; on CPU their
    CPU dispatch is routed to those kernels, which the interpreter runs on CPU tensors."""
    if DEVICE == "cuda":
        yield
        return
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with torch.library._scoped_library("memlayer", "IMPL") as library:
        for name in ("hot_row_pieces", "row_sq_norms", "update_rows"):
            op = getattr(torch.ops.memlayer, name).default
            library.impl(name, lambda *args, op=op: op.redispatch(cuda, *args), "CPU")
        yield


@pytest.mark.filterwarnings("ignore:Warning only once for all operators")
def test_a_clipped_optimizer_step_sums_the_hot_row_pieces_once(monkeypatch):
    """Clipping reads the rows' norms and the step updates the rows: both read the hot rows'
    pieces, which one launch of the pieces kernel computes. The step through the Triton kernels
    updates the table as the CPU kernels do."""
    pieces_kernel, launches = lookup_triton._hot_row_pieces_kernel, []

    class CountedLaunches:
        def __getitem__(self, grid):
            launches.append(grid)
            return pieces_kernel[grid]

    monkeypatch.setattr(lookup_triton, "_hot_row_pieces_kernel", CountedLaunches())
    # 512 reads (the pieces kernel has programs to launch) of 8 rows (few interpreted programs)
    batch = reader_batch(0, num_tokens=128, num_rows=8)
    tables = []
    for route in (step_ops_on_triton, contextlib.nullcontext):
        model = reader().to(DEVICE)
        optimizer = RowSparseOptimizer(model, "adam", lr=0.1)
        reader_loss(model, *to_device(*batch)).backward()
        with route():
            optimizer.clip_grad_norm_(1e-3)
            optimizer.step()
        tables.append(model.memory_values.detach().cpu())
    assert len(launches) == 1
    torch.testing.assert_close(tables[0], tables[1], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- CUDA, realistic


def realistic_problem(rule, dtype, seed=0):
    """N = 64K rows of D = 256, T = 2048 tokens reading B = 32 rows, half the reads on one row
    (32K hits). Gradients in [-2, 2] / 4 and weights in [-2, 2] / 8: sums of them are exact in
    fp32, so the kernels must match the float64 reference to fp32 rounding of the rule."""
    gen = torch.Generator().manual_seed(seed)
    num_rows, dim, num_tokens, bag_size = 1 << 16, 256, 2048, 32
    indices = draw_indices(gen, num_rows, num_tokens, bag_size, "hot", torch.int64)
    grad_out = torch.randint(-2, 3, (num_tokens, dim), generator=gen).float() / 4
    weights = torch.randint(-2, 3, (num_tokens, bag_size), generator=gen).float() / 8
    table = torch.randn(num_rows, dim, generator=gen).to(dtype)
    state = fresh_state(rule, num_rows, dim, gen)
    return table, state, grad_out, indices, weights


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rule", RULES)
def test_cuda_update_rows_realistic_sizes(rule, dtype):
    table, state, grad_out, indices, weights = realistic_problem(rule, dtype)
    hyper = dict(rule=rule, lr=0.01, weight_decay=0.1, betas=(0.875, 0.9921875), step=5)
    expected_table, expected_state = reference(table, state, grad_out, indices, weights, hyper)
    cuda = [t.cuda() for t in (table, *state, grad_out, indices, weights)]
    table_cuda, state_cuda = cuda[0], cuda[1 : 1 + len(state)]
    grad_out_cuda, indices_cuda, weights_cuda = cuda[1 + len(state) :]
    groups = group_by_row(indices_cuda)
    update_rows(table_cuda, state_cuda, grad_out_cuda, weights_cuda, groups, TableRule(**hyper))

    rows = groups.rows.cpu()
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8  # the GPU rounds to nearest
    scale = table[rows].double().abs() + (expected_table[rows] - table[rows].double()).abs()
    error = (table_cuda.cpu()[rows].double() - expected_table[rows]).abs()
    assert bool((error <= tolerance * scale + 1e-30).all()), f"max error {error.max():.3g}"
    untouched = torch.ones(table.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert_bitwise_equal(table_cuda.cpu()[untouched], table[untouched])
    for new, expected in zip(state_cuda, expected_state):
        torch.testing.assert_close(new.cpu()[rows].double(), expected[rows], rtol=1e-5, atol=1e-7)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("rule", RULES)
def test_cuda_update_is_bitwise_deterministic(rule):
    table, state, grad_out, indices, weights = realistic_problem(rule, torch.float32, seed=1)
    grad_out, weights = torch.randn_like(grad_out), torch.randn_like(weights)  # inexact sums
    results = []
    for _ in range(2):
        table_cuda, *state_cuda = (t.cuda() for t in (table, *state))
        groups = group_by_row(indices.cuda())
        update_rows(
            table_cuda, state_cuda, grad_out.cuda(), weights.cuda(), groups,
            TableRule(rule, lr=0.01),
        )  # fmt: skip
        results.append(
            [table_cuda, *state_cuda, row_sq_norms(grad_out.cuda(), weights.cuda(), groups)]
        )
    for actual, expected in zip(*results):
        assert_bitwise_equal(actual, expected)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("rule", RULES)
def test_cuda_opcheck(rule):
    gen = torch.Generator().manual_seed(9)
    indices = draw_indices(gen, 40, 6, 5, "hot", torch.int64).cuda()
    table = torch.randn(40, 33, device="cuda")
    state = [s.cuda() for s in fresh_state(rule, 40, 33, gen)]
    grad_out, weights = torch.randn(6, 33, device="cuda"), torch.rand(6, 5, device="cuda")
    groups = group_by_row(indices)
    args = (
        table, state, grad_out, weights, groups.rows, groups.row_starts, groups.positions, None,
        *TableRule(rule, lr=0.1, weight_decay=0.01, step=2).packed(), 1.0,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.memlayer.update_rows.default, args)
    norms_args = (grad_out, weights, groups.row_starts, groups.positions)
    torch.library.opcheck(torch.ops.memlayer.row_sq_norms.default, norms_args)
    torch.library.opcheck(torch.ops.memlayer.hot_row_pieces.default, norms_args)
    pieces = tuple(torch.ops.memlayer.hot_row_pieces(*norms_args))
    torch.library.opcheck(torch.ops.memlayer.update_rows.default, args + pieces)
    torch.library.opcheck(torch.ops.memlayer.row_sq_norms.default, norms_args + pieces)
