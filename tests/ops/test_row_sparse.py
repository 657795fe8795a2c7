"""The row-sparse table update on CPU (``ops/row_sparse.py``): ``memlayer::update_rows`` against
the float64 ``reference_update_rows``, ``row_sq_norms``, ``hot_row_pieces``,
``record_value_grads`` and ``lookup_recording_grads``, determinism, opcheck and bad input.

The property tests draw dyadic gradients (small multiples of a power of two): every gradient
sum is then exact in fp32 in any order, so what is compared is each rule's arithmetic, to a few
fp32 ulps, and the sums' accuracy is tested apart (``row_sq_norms`` on random floats).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ops
from ops.lookup import lookup_values_grad, lookup_weights_grad
from ops.row_sparse import (
    GradRecorder,
    RowSparseGrad,
    group_by_row,
    hot_row_pieces,
    lookup_recording_grads,
    reference_update_rows,
    row_sq_norms,
    update_rows,
)
from ops.table_rule import RULES, TableRule
from tests.ops.test_lookup import lazy_device

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Error bound relative to a value's scale (its old value plus its update): a few fp32 ulps of
#: arithmetic, and for a half-precision table one rounding (half an ulp) of the result.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-8}
#: Betas exact in fp32, so that the fp32 kernels round no hyperparameter (0.999 in fp32 is
#: 0.999000013: 1 - beta2 is then 1.3e-5 off, which the default betas' tests allow for).
EXACT_BETAS = [(0.875, 0.9921875), (0.5, 0.75), (0.0, 0.5)]


def dyadic(generator, shape, denominator):
    """fp32 multiples of 1 / denominator in [-8, 8] / denominator: the products and sums of a
    few hundred of them are exact in fp32."""
    return torch.randint(-8, 9, shape, generator=generator).float() / denominator


def draw_indices(generator, num_rows, num_tokens, bag_size, hits, index_dtype):
    """[T, B] rows: uniform, a hot row (half of all positions hit one row), or all one row."""
    indices = torch.randint(0, num_rows, (num_tokens, bag_size), generator=generator)
    hot = int(torch.randint(0, num_rows, (), generator=generator))
    if hits == "hot":
        indices[torch.rand(indices.shape, generator=generator) < 0.5] = hot
    elif hits == "one":
        indices.fill_(hot)
    return indices.to(index_dtype)


def fresh_state(rule, num_rows, dim, generator=None):
    """The rule's state: zeros, or (with a generator) warm, Adam's second moment away from 0."""
    if generator is None:
        shapes = {"sgd": [], "rowwise_adagrad": [(num_rows,)], "adam": [(num_rows, dim)] * 2}
        return [torch.zeros(shape) for shape in shapes[rule]]
    return {
        "sgd": [],
        "rowwise_adagrad": [torch.rand(num_rows, generator=generator)],
        "adam": [
            torch.randn(num_rows, dim, generator=generator) / 4,
            torch.rand(num_rows, dim, generator=generator) + 0.05,
        ],
    }[rule]


@st.composite
def update_cases(draw, max_rows=40, max_tokens=12, max_bag=6, dims=(1, 3, 5, 7, 16, 33)):
    """One update_rows problem, with untouched rows of the table and state poisoned (NaN)."""
    num_rows = draw(st.integers(1, max_rows))
    dim = draw(st.sampled_from(dims))
    num_tokens = draw(st.integers(0, max_tokens))
    bag_size = draw(st.integers(0, max_bag))
    rule = draw(st.sampled_from(RULES))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    hits = draw(st.sampled_from(["uniform", "hot", "one"]))
    index_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    indices = draw_indices(gen, num_rows, num_tokens, bag_size, hits, index_dtype)
    warm = draw(st.booleans())
    state = fresh_state(rule, num_rows, dim, gen if warm else None)
    table = torch.randn(num_rows, dim, generator=gen).to(dtype)
    untouched = torch.ones(num_rows, dtype=torch.bool)
    untouched[indices.long().reshape(-1)] = False
    for tensor in (table, *state):
        tensor[untouched] = float("nan")  # rows not touched must be neither read nor written
    hyper = dict(
        rule=rule,
        lr=draw(st.sampled_from([1e-3, 0.1, 1.0])),
        eps=draw(st.sampled_from([1e-8, 1e-3])),
        betas=draw(st.sampled_from(EXACT_BETAS)),
        weight_decay=draw(st.sampled_from([0.0, 0.25])),
        grad_scale=draw(st.sampled_from([1.0, 0.375, 3.0])),
        step=draw(st.integers(1, 9)) if rule == "adam" else 1,
    )
    grad_out, weights = dyadic(gen, (num_tokens, dim), 4), dyadic(gen, (num_tokens, bag_size), 8)
    return table, state, grad_out, indices, weights, hyper


def in_guarded_buffer(table, guard=3):
    """``table`` copied into the middle of a larger buffer of sentinel rows: (buffer, view)."""
    buffer = torch.full((table.shape[0] + 2 * guard, table.shape[1]), 123.0, dtype=table.dtype)
    view = buffer[guard : guard + table.shape[0]]
    view.copy_(table)
    return buffer, view


def bits(tensor):
    """The tensor's bits as integers: equality of these is bitwise, NaN included."""
    width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(width)


def assert_bitwise_equal(actual, expected, what="the tensor"):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    differ = int((bits(actual) != bits(expected)).sum())
    assert differ == 0, f"{what}: {differ} of {actual.numel()} elements differ"


def assert_close_to_reference(actual, expected, before, what, tolerance=TOLERANCE):
    """|actual - expected| <= tolerance * (|before| + |expected - before|) + tiny, per element,
    with the tolerance of ``actual``'s dtype."""
    scale = before.double().abs() + (expected - before.double()).abs()
    error = (actual.double() - expected).abs()
    bound = tolerance[actual.dtype] * scale + 1e-30
    assert actual.shape == expected.shape, what
    worst = int((error - bound).argmax()) if error.numel() else 0
    assert bool((error <= bound).all()), (
        f"{what}: error {error.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} "
        f"(expected {expected.flatten()[worst]:.8g}, got {actual.flatten()[worst]:.8g})"
    )


def split_hyper(hyper):
    """A test's hyperparameters as ``(TableRule, grad_scale)``."""
    hyper = dict(hyper)
    grad_scale = hyper.pop("grad_scale", 1.0)
    return TableRule(**hyper), grad_scale


def reference(table, state, grad_out, indices, weights, hyper):
    rule, grad_scale = split_hyper(hyper)
    return reference_update_rows(
        table, state, grad_out, indices, weights, rule, grad_scale=grad_scale
    )


def run_update(table, state, grad_out, indices, weights, hyper):
    groups = group_by_row(indices)
    rule, grad_scale = split_hyper(hyper)
    update_rows(table, state, grad_out, weights, groups, rule, grad_scale=grad_scale)
    return groups


# --------------------------------------------------------------------------- update_rows


@given(update_cases())
def test_update_rows_matches_float64_reference(case):
    table, state, grad_out, indices, weights, hyper = case
    expected_table, expected_state = reference(table, state, grad_out, indices, weights, hyper)
    before_table, before_state = table.clone(), [s.clone() for s in state]
    buffer, table = in_guarded_buffer(table)
    guards = buffer.clone()
    run_update(table, state, grad_out, indices, weights, hyper)

    touched = torch.unique(indices.long().reshape(-1))
    untouched = torch.ones(table.shape[0], dtype=torch.bool)
    untouched[touched] = False
    assert_close_to_reference(
        table[touched], expected_table[touched], before_table[touched], "table"
    )
    for name, new, old, expected in zip(
        ("state 0", "state 1"), state, before_state, expected_state
    ):
        assert new.dtype == torch.float32
        assert_close_to_reference(new[touched], expected[touched], old[touched], name)
        assert_bitwise_equal(new[untouched], old[untouched], f"untouched rows of {name}")
    assert_bitwise_equal(table[untouched], before_table[untouched], "untouched rows of the table")
    guard = table.shape[0] + 3
    assert_bitwise_equal(buffer[:3], guards[:3], "the rows before the table")
    assert_bitwise_equal(buffer[guard:], guards[guard:], "the rows after the table")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adam_with_default_betas_matches_reference(dtype):
    """0.9 and 0.999 are not fp32 numbers: the kernel's 1 - beta2 is 1.3e-5 (relative) off."""
    gen = torch.Generator().manual_seed(0)
    indices = draw_indices(gen, 30, 16, 5, "hot", torch.int64)
    table = torch.randn(30, 9, generator=gen).to(dtype)
    state = fresh_state("adam", 30, 9, gen)
    grad_out, weights = torch.randn(16, 9, generator=gen), torch.rand(16, 5, generator=gen)
    hyper = dict(rule="adam", lr=0.01, weight_decay=0.1, step=4)
    expected, expected_state = reference(table, state, grad_out, indices, weights, hyper)
    before = table.clone()
    run_update(table, state, grad_out, indices, weights, hyper)
    rows = indices.unique()
    update_error = (table[rows].double() - expected[rows]).abs()
    rounding = 2**-8 * expected[rows].abs() if dtype == torch.bfloat16 else 0
    assert bool((update_error <= 1e-4 * hyper["lr"] + rounding).all())
    torch.testing.assert_close(state[1][rows].double(), expected_state[1][rows], rtol=1e-4, atol=0)
    untouched = ~torch.isin(torch.arange(30), rows)
    assert_bitwise_equal(table[untouched], before[untouched])


@pytest.mark.parametrize("rule", RULES)
def test_empty_batch_changes_nothing(rule):
    table = torch.randn(6, 5)
    state = fresh_state(rule, 6, 5, torch.Generator().manual_seed(1))
    before = [t.clone() for t in (table, *state)]
    for shape in [(0, 4), (3, 0)]:  # no tokens, or tokens reading no rows
        indices = torch.zeros(shape, dtype=torch.int64)
        grad_out = torch.randn(shape[0], 5)
        run_update(table, state, grad_out, indices, torch.ones(shape), dict(rule=rule, lr=0.5))
        for after, old in zip((table, *state), before):
            assert_bitwise_equal(after, old)


@pytest.mark.parametrize("rule", RULES)
def test_update_is_bitwise_deterministic_and_independent_of_threads(rule):
    """Random floats (sums that depend on their order), hot rows, more rows than one thread's
    share: twice, and on one thread, the same bits."""
    gen = torch.Generator().manual_seed(2)
    indices = draw_indices(gen, 300, 160, 12, "hot", torch.int64)
    grad_out, weights = torch.randn(160, 33, generator=gen), torch.randn(160, 12, generator=gen)
    table0, state0 = torch.randn(300, 33, generator=gen), fresh_state(rule, 300, 33, gen)
    hyper = dict(rule=rule, lr=0.1, weight_decay=0.01, step=3)
    results = []
    threads = torch.get_num_threads()
    for num_threads in (threads, threads, 1):
        table, state = table0.clone(), [s.clone() for s in state0]
        torch.set_num_threads(num_threads)
        try:
            groups = run_update(table, state, grad_out, indices, weights, hyper)
            norms = row_sq_norms(grad_out, weights, groups)
        finally:
            torch.set_num_threads(threads)
        results.append([table, *state, norms])
    for other in results[1:]:
        for actual, expected in zip(other, results[0]):
            assert_bitwise_equal(actual, expected)


def test_rowwise_adagrad_uses_a_given_row_mean_square_without_weight_decay():
    """A given mean square of each row's gradient (over a column-sharded table's full width)
    replaces the local one, mean(g²), in the accumulator; with weight decay the local decayed
    gradient is used."""
    gen = torch.Generator().manual_seed(3)
    indices = draw_indices(gen, 20, 10, 4, "uniform", torch.int64)
    grad_out, weights = dyadic(gen, (10, 6), 4), dyadic(gen, (10, 4), 8)
    groups = group_by_row(indices)
    local = row_sq_norms(grad_out, weights, groups)
    table0 = torch.randn(20, 6, generator=gen)
    for weight_decay in (0.0, 0.1):
        sums = []
        for mean_sq in (None, 4 * local / 6):
            table, state = table0.clone(), [torch.zeros(20)]
            update_rows(
                table, state, grad_out, weights, groups,
                TableRule("rowwise_adagrad", lr=0.1, weight_decay=weight_decay),
                grad_scale=0.5, row_mean_sq=mean_sq,
            )  # fmt: skip
            sums.append(state[0][groups.rows])
        if weight_decay == 0:
            expected = (0.5**2 * local / 6).float()
            torch.testing.assert_close(sums[0], expected, rtol=1e-6, atol=0)
            torch.testing.assert_close(sums[1], 4 * expected, rtol=1e-6, atol=0)
        else:
            assert_bitwise_equal(sums[1], sums[0])


# --------------------------------------------------------------------------- row_sq_norms


@given(
    num_rows=st.integers(1, 40),
    dim=st.sampled_from([1, 3, 7, 9, 16, 33]),
    num_tokens=st.integers(0, 16),
    bag_size=st.integers(0, 8),
    hits=st.sampled_from(["uniform", "hot", "one"]),
    index_dtype=st.sampled_from([torch.int64, torch.int32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_row_sq_norms_sum_to_the_dense_gradients_squared_norm(
    num_rows, dim, num_tokens, bag_size, hits, index_dtype, seed
):
    gen = torch.Generator().manual_seed(seed)
    indices = draw_indices(gen, num_rows, num_tokens, bag_size, hits, index_dtype)
    grad_out = torch.randn(num_tokens, dim, generator=gen)
    weights = torch.randn(num_tokens, bag_size, generator=gen)
    groups = group_by_row(indices)
    norms = row_sq_norms(grad_out, weights, groups)
    assert norms.dtype == torch.float64 and norms.shape == groups.rows.shape

    dense = lookup_values_grad(grad_out.double(), indices, weights.double(), num_rows, True)
    magnitude = lookup_values_grad(
        grad_out.double().abs(), indices, weights.double().abs(), num_rows, True
    )
    # fp32 sums of up to T * B terms: error <= T * B * 2^-24 * |terms| per element.
    bound = 2 * num_tokens * bag_size * 2**-24 * magnitude.square().sum(1) + 1e-30
    assert bool(((norms - dense[groups.rows].square().sum(1)).abs() <= bound[groups.rows]).all())
    total_error = (norms.sum() - dense.square().sum()).abs()
    assert total_error <= bound.sum(), f"{norms.sum()} vs {dense.square().sum()}"


# --------------------------------------------------------------------------- recording


def recorder_of(table: torch.Tensor) -> GradRecorder:
    recorder = GradRecorder()
    recorder.reads(table)
    return recorder


def test_lookup_recording_grads_records_the_value_gradient_as_the_tables_grad():
    gen = torch.Generator().manual_seed(4)
    values = torch.randn(25, 7, generator=gen, requires_grad=True)
    indices = torch.randint(0, 25, (9, 4), generator=gen, dtype=torch.int32)
    weights = torch.rand(9, 4, generator=gen, requires_grad=True)
    recorder = recorder_of(values)
    out = lookup_recording_grads(values, indices, weights, recorder)
    torch.testing.assert_close(out, ops.lookup(values, indices, weights))
    grad_out = torch.randn(9, 7, generator=gen)
    out.backward(grad_out)

    grad = values.grad  # what the value gradient is made of, never the [N, D] tensor
    assert isinstance(grad, RowSparseGrad) and grad.shape == values.shape
    expected_weights_grad = lookup_weights_grad(grad_out, values.detach(), indices)
    torch.testing.assert_close(weights.grad, expected_weights_grad)
    assert grad.num_tokens == 9 and int(recorder.recorded_tokens) == 9
    recorded_grad_out, recorded_indices, recorded_weights = grad.bags()
    assert torch.equal(recorded_grad_out, grad_out)
    assert recorded_indices.dtype == torch.int64 and torch.equal(recorded_indices, indices.long())
    assert torch.equal(recorded_weights, weights.detach())
    dense = lookup_values_grad(grad_out, indices, weights.detach(), 25, True)
    torch.testing.assert_close(grad.to_dense(), dense)

    # A second backward (a micro-batch) accumulates; zero_() forgets.
    lookup_recording_grads(values, indices[:3], weights[:3], recorder).backward(grad_out[:3])
    assert values.grad is grad and grad.num_tokens == 12 and int(recorder.recorded_tokens) == 12
    groups = group_by_row(grad.bags()[1])
    assert torch.equal(groups.rows, torch.unique(torch.cat([indices, indices[:3]]).long()))
    grad.zero_()
    assert grad.num_tokens == 0 and grad.bags()[0].shape == (0, 7)
    assert group_by_row(grad.bags()[1]).rows.numel() == 0


def test_only_a_backward_that_accumulates_into_the_table_records():
    """torch.autograd.grad of something else, or backward(inputs=...) without the table, leaves
    the table's gradient alone, as for any parameter; backward(inputs=[table]) records."""
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(10, 4, generator=gen, requires_grad=True)
    indices = torch.randint(0, 10, (5, 3), generator=gen)
    weights = torch.rand(5, 3, generator=gen, requires_grad=True)
    recorder = recorder_of(values)

    def loss():
        return lookup_recording_grads(values, indices, weights * 2, recorder).square().sum()

    (weights_grad,) = torch.autograd.grad(loss(), weights)
    assert weights_grad.abs().sum() > 0 and values.grad is None
    loss().backward(inputs=[weights])
    assert values.grad is None and int(recorder.recorded_tokens) == 0
    loss().backward(inputs=[values])
    assert values.grad.num_tokens == 5


def test_row_sparse_grad_keeps_a_gradients_promises():
    """What torch code does to gradients: accumulate, scale, clip (its norm is the dense
    gradient's), convert, clone, deepcopy and pickle; anything else is a clear error."""
    import copy
    import pickle

    gen = torch.Generator().manual_seed(8)
    table = torch.randn(12, 5, generator=gen, requires_grad=True)
    grad = RowSparseGrad.like(table)
    grad.record(torch.randn(4, 5, generator=gen), torch.randint(0, 12, (4, 3)), torch.rand(4, 3))
    other = RowSparseGrad.like(table)
    other.record(torch.randn(2, 5, generator=gen), torch.randint(0, 12, (2, 3)), torch.rand(2, 3))
    dense, other_dense = grad.to_dense(), other.to_dense()

    torch.testing.assert_close(torch.linalg.vector_norm(grad), dense.norm())
    torch.testing.assert_close((grad * 3).to_dense(), dense * 3)
    torch.testing.assert_close((grad + other).to_dense(), dense + other_dense)
    scaled = grad.clone().mul_(0.5)
    scaled.add_(other)  # entries of another scale join at their own worth
    torch.testing.assert_close(scaled.to_dense(), dense * 0.5 + other_dense)
    zeroed = grad.clone().mul_(0.0)
    torch.testing.assert_close(zeroed.add_(other).to_dense(), other_dense)

    table.grad = grad.clone()
    norm = torch.nn.utils.clip_grad_norm_([table], 0.1)
    torch.testing.assert_close(norm, dense.norm())
    torch.testing.assert_close(table.grad.to_dense(), dense * (0.1 / (dense.norm() + 1e-6)))
    for copied in (copy.deepcopy(grad), pickle.loads(pickle.dumps(grad))):
        assert isinstance(copied, RowSparseGrad) and copied._record is not grad._record
        torch.testing.assert_close(copied.to_dense(), dense)
    converted = grad.to(torch.float64)  # model.to(dtype) converts gradients too
    assert isinstance(converted, RowSparseGrad) and converted.dtype == torch.float64
    torch.testing.assert_close(converted.to_dense(), dense.double())
    alias = grad.detach()
    alias.zero_()  # an alias shares what it holds, as a detached tensor shares storage
    assert grad.num_tokens == 0

    with pytest.raises(TypeError, match="dense gradient was added"):
        other.add_(torch.zeros(12, 5))
    with pytest.raises(TypeError, match=r"aten.lerp_.*is row-sparse.*to_dense\(\)"):
        other.lerp_(torch.zeros(12, 5), 0.5)
    with pytest.raises(ValueError, match="same number of rows per token"):
        other.record(torch.randn(2, 5), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"grad_out must be \[T, 5\]"):
        other.record(torch.randn(2, 6), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))


# --------------------------------------------------------------------------- opcheck


def small_problem(rule="sgd", seed=5):
    gen = torch.Generator().manual_seed(seed)
    indices = draw_indices(gen, 12, 6, 3, "hot", torch.int64)
    table = torch.randn(12, 5, generator=gen)
    return (
        table,
        fresh_state(rule, 12, 5, gen),
        torch.randn(6, 5, generator=gen),
        indices,
        (torch.rand(6, 3, generator=gen)),
    )


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("with_mean_sq", [False, True])
def test_opcheck_update_rows(rule, with_mean_sq):
    # Every test_utils applies: the op declares its writes (table, state) and returns nothing,
    # so test_autograd_registration and test_aot_dispatch_dynamic check it like any other.
    table, state, grad_out, indices, weights = small_problem(rule)
    groups = group_by_row(indices)
    mean_sq = row_sq_norms(grad_out, weights, groups) / 5 if with_mean_sq else None
    pieces = hot_row_pieces(grad_out, weights, groups) if with_mean_sq else (None, None)
    args = (
        table, state, grad_out, weights, groups.rows, groups.row_starts, groups.positions, mean_sq,
        *TableRule(rule, lr=0.1, weight_decay=0.0 if with_mean_sq else 0.01, step=2).packed(),
        1.0, *pieces,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.memlayer.update_rows.default, args)


@pytest.mark.parametrize("with_pieces", [False, True])
def test_opcheck_row_sq_norms_and_hot_row_pieces(with_pieces):
    _, _, grad_out, indices, weights = small_problem()
    groups = group_by_row(indices)
    args = (grad_out, weights, groups.row_starts, groups.positions)
    pieces = tuple(hot_row_pieces(grad_out, weights, groups)) if with_pieces else ()
    torch.library.opcheck(torch.ops.memlayer.row_sq_norms.default, args + pieces)
    torch.library.opcheck(torch.ops.memlayer.hot_row_pieces.default, args)


def test_cpu_kernels_split_no_row_and_read_no_pieces():
    """The C++ kernels sum each row serially: the CPU's hot_row_pieces are none (every row's
    piece range empty), and the norms and the update given them are those computed without."""
    table, state, grad_out, weights, groups = update_args("adam")
    pieces = hot_row_pieces(grad_out, weights, groups)
    assert torch.equal(pieces.starts, torch.zeros(groups.row_starts.shape, dtype=torch.int64))
    assert pieces.partials.shape == (0, grad_out.shape[1])
    assert pieces.partials.dtype == torch.float32
    assert_bitwise_equal(
        row_sq_norms(grad_out, weights, groups, pieces), row_sq_norms(grad_out, weights, groups)
    )
    results = []
    for given_pieces in (pieces, None):
        new_table, new_state = table.clone(), [s.clone() for s in state]
        rule = TableRule("adam", lr=0.1)
        update_rows(new_table, new_state, grad_out, weights, groups, rule, pieces=given_pieces)
        results.append([new_table, *new_state])
    for with_pieces, without in zip(*results):
        assert_bitwise_equal(with_pieces, without)


def test_opcheck_record_value_grads():
    table, _, grad_out, indices, weights = small_problem()
    recorder = recorder_of(table)  # alive: the op finds it by key (each opcheck call records)
    args = (grad_out, indices, weights, recorder.recorded_tokens, recorder.key)
    torch.library.opcheck(torch.ops.memlayer.record_value_grads.default, args)
    assert table.grad.num_tokens > 0 and torch.equal(table.grad.bags()[0][:6], grad_out)


# --------------------------------------------------------------------------- bad input


def update_args(rule="adam"):
    table, state, grad_out, indices, weights = small_problem(rule)
    return table, state, grad_out, weights, group_by_row(indices)


@pytest.mark.parametrize("bad_row", [12, 1000, -1])
@pytest.mark.parametrize("rule", RULES)
def test_rows_out_of_range_raise_and_nothing_is_written(rule, bad_row):
    table, state, grad_out, weights, groups = update_args(rule)
    rows = groups.rows.clone()
    rows[-1 if bad_row >= 0 else 0] = bad_row
    buffer, table = in_guarded_buffer(table)
    before = [buffer.clone(), *(s.clone() for s in state)]
    with pytest.raises(IndexError, match=rf"update_rows: rows must lie in \[0, 12\).*{bad_row}"):
        update_rows(
            table, state, grad_out, weights, groups._replace(rows=rows), TableRule(rule, lr=1)
        )
    for after, old in zip([buffer, *state], before):
        assert_bitwise_equal(after, old)


def wrong_state(rule):
    """(state, error, message) triples of bad state for ``rule`` on a [12, 5] table."""
    good = fresh_state(rule, 12, 5)
    if rule == "sgd":
        return [([torch.zeros(12)], ValueError, r"rule 'sgd' takes state \[none\], got 1")]
    if rule == "rowwise_adagrad":
        return [
            ([], ValueError, r"rule 'rowwise_adagrad' takes state \[sum \[N\]\], got 0"),
            ([torch.zeros(11)], ValueError, r"state sum \[N\] must have shape \(12,\)"),
            ([torch.zeros(12, 5)], ValueError, r"state sum \[N\] must be 1-D"),
            ([torch.zeros(12, dtype=torch.bfloat16)], TypeError, r"state sum \[N\] must be fl"),
            ([torch.zeros(24)[::2]], ValueError, r"state sum \[N\] must be contiguous"),
        ]
    return [
        (good[:1], ValueError, r"rule 'adam' takes state \[exp_avg \[N, D\], exp_avg_sq"),
        ([good[0], torch.zeros(12, 4)], ValueError, r"state exp_avg_sq \[N, D\] must have shape"),
        ([good[0].double(), good[1]], TypeError, r"state exp_avg \[N, D\] must be float32"),
        ([torch.zeros(5, 12).t(), good[1]], ValueError, r"state exp_avg \[N, D\] must be contig"),
        ([good[0], torch.zeros(12, 5, device="meta")], ValueError, r"state_1 on meta"),
    ]


@pytest.mark.parametrize(
    "rule, state, error, match",
    [(rule, *case) for rule in RULES for case in wrong_state(rule)],
)
def test_wrong_state_raises_an_error_naming_state(rule, state, error, match):
    table, _, grad_out, weights, groups = update_args(rule)
    before = table.clone()
    with pytest.raises(error, match=rf"^update_rows: .*{match}"):
        update_rows(table, state, grad_out, weights, groups, TableRule(rule, lr=0.1))
    assert_bitwise_equal(table, before)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(lr=-1e-3), r"^TableRule: lr must be a finite number >= 0, got -0.001"),
        (dict(lr=float("nan")), r"^TableRule: lr must be a finite number >= 0"),
        (dict(lr=float("inf")), r"^TableRule: lr must be a finite number >= 0"),
        (dict(eps=-1.0), r"^TableRule: eps must be a finite number >= 0"),
        (dict(eps=float("inf")), r"^TableRule: eps must be a finite number >= 0"),
        (dict(betas=(1.0, 0.999)), r"^TableRule: beta1 must lie in \[0, 1\), got 1.0"),
        (dict(betas=(0.9, 1.5)), r"^TableRule: beta2 must lie in \[0, 1\), got 1.5"),
        (dict(betas=(-0.1, 0.9)), r"^TableRule: beta1 must lie in \[0, 1\)"),
        (dict(betas=(0.9, float("nan"))), r"^TableRule: beta2 must lie in"),
        (dict(betas=(0.9,)), r"^TableRule: betas must be two numbers"),
        (dict(weight_decay=-0.1), r"^TableRule: weight_decay must be a finite"),
        (dict(weight_decay=float("nan")), r"^TableRule: weight_decay must be a fi"),
        (dict(rule="adamw"), r"^TableRule: rule must be one of sgd, .*'adamw'"),
        (dict(rule="SGD"), r"^TableRule: rule must be one of"),
    ],
)
@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_bad_hyperparameters_are_refused_by_the_table_rule(rule, change, match):
    """Out of its range, a hyperparameter would turn rows into NaN or inf: refused when the
    rule is built, whichever rule (SGD ignores the betas but is handed them all the same)."""
    with pytest.raises(ValueError, match=match):
        TableRule(**(dict(rule=rule, lr=0.1) | change))


def test_the_op_checks_its_packed_rule_and_nothing_is_written():
    """The op, called directly, checks the packed rule as thoroughly (a bad code, a list of
    another length, a hyperparameter out of range) and the gradient's scale."""
    table, state, grad_out, weights, groups = update_args("adam")
    before, state_before = table.clone(), [t.clone() for t in state]
    code, good = TableRule("adam", lr=0.1).packed()
    cases = [
        (3, good, 1.0, r"rule must be a Rule code \[0, 1, 2\] .*got 3"),
        (code, good[:-1], 1.0, r"hyperparameters must be the 7 numbers \[lr, eps, .*got 6"),
        (code, [-1.0, *good[1:]], 1.0, r"lr must be a finite number >= 0, got -1.0"),
        (code, [*good[:5], 0.0, good[6]], 1.0, r"bias_correction1 must lie in \(0, 1\]"),
        (code, good, float("nan"), r"grad_scale must be finite"),
        (code, good, float("inf"), r"grad_scale must be finite"),
    ]
    for rule, hyperparameters, grad_scale, match in cases:
        with pytest.raises(ValueError, match="^update_rows: " + match):
            torch.ops.memlayer.update_rows(
                table, state, grad_out, weights, *groups, None, rule, hyperparameters, grad_scale
            )
    assert_bitwise_equal(table, before)
    for tensor, tensor_before in zip(state, state_before):
        assert_bitwise_equal(tensor, tensor_before)


def test_a_device_without_a_kernel_gets_an_error_naming_it():
    """row_sq_norms and update_rows have CPU and CUDA kernels; another device (the lazy tensor
    device, as in tests/ops/test_lookup.py) gets the op's checks, then an error naming it."""
    table, state, grad_out, weights, groups = update_args("adam")
    device = lazy_device()
    table, grad_out, weights = (t.to(device) for t in (table, grad_out, weights))
    state, groups = [s.to(device) for s in state], type(groups)(*(t.to(device) for t in groups))
    no_kernel = r"^{}: no kernel for device type 'lazy' \(cpu, cuda\)"
    with pytest.raises(NotImplementedError, match=no_kernel.format("row_sq_norms")):
        row_sq_norms(grad_out, weights, groups)
    # Lazy tensors functionalize in-place ops (refused for custom ones) before any backend runs:
    # skip that layer to reach the device's kernel, as a real device would.
    functionalize = torch._C.DispatchKeySet(torch._C.DispatchKey.Functionalize)
    with torch._C._ExcludeDispatchKeyGuard(functionalize):
        with pytest.raises(NotImplementedError, match=no_kernel.format("update_rows")):
            update_rows(table, state, grad_out, weights, groups, TableRule("adam", lr=0.1))
        with pytest.raises(ValueError, match=r"^update_rows: rule 'adam' takes state"):
            update_rows(table, state[:1], grad_out, weights, groups, TableRule("adam", lr=0.1))


@pytest.mark.parametrize("rule", RULES)
def test_repeated_or_unsorted_rows_are_refused(rule):
    """One program per row writes it: a row listed twice would be written by two at once (a
    race: different results run to run), so rows must be unique (and sorted, as group_by_row
    gives them, which makes the check one pass)."""
    table, state, grad_out, weights, groups = update_args(rule)
    before = table.clone()
    rows, starts = groups.rows.clone(), groups.row_starts
    repeated = groups._replace(rows=torch.cat([rows[:1], rows[:-1]]))
    unsorted = groups._replace(rows=rows.flip(0))
    for bad in (repeated, unsorted):
        with pytest.raises(ValueError, match=r"^update_rows: rows must be sorted and unique"):
            update_rows(table, state, grad_out, weights, bad, TableRule(rule, lr=0.1))
    assert_bitwise_equal(table, before)
    assert starts.numel() == rows.numel() + 1


def test_state_that_shares_memory_is_refused():
    table, (exp_avg, _), grad_out, weights, groups = update_args("adam")
    for state, shared in (
        ([exp_avg, exp_avg], "state 0"),
        ([exp_avg, exp_avg.view(-1).view(12, 5)], "state 0"),
        ([torch.zeros(12, 5), table.view(12, 5)], "table"),
    ):
        with pytest.raises(ValueError, match=rf"^update_rows: state 1 shares memory with {shared}"):
            update_rows(table, state, grad_out, weights, groups, TableRule("adam", lr=0.1))
    table_adagrad, _, grad_out, weights, groups = update_args("rowwise_adagrad")
    with pytest.raises(ValueError, match=r"state 0 shares memory with table"):
        update_rows(
            table_adagrad, [table_adagrad.view(-1)[:12]], grad_out, weights, groups,
            TableRule("rowwise_adagrad", lr=0.1),
        )  # fmt: skip


@pytest.mark.parametrize("rule", RULES)
def test_update_bumps_the_version_autograd_checks(rule):
    """update_rows writes the table in place: a backward that saved the table before must see
    it was modified (as after any in-place op) instead of silently using the new values."""
    table, state, grad_out, weights, groups = update_args(rule)
    leaf = table.clone().requires_grad_()
    current = leaf * 1.0  # a table a graph saved
    loss = (current * current).sum()
    versions = [t._version for t in (current, *state)]
    with torch.no_grad():
        update_rows(current, state, grad_out, weights, groups, TableRule(rule, lr=0.1))
    assert all(t._version > v for t, v in zip((current, *state), versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("rule", RULES)
def test_a_zero_learning_rate_leaves_the_table_as_it_was(rule):
    # An LR schedule may decay to 0 (torchtitan's linear decay does by default).
    table, state, grad_out, weights, groups = update_args(rule)
    before = table.clone()
    update_rows(table, state, grad_out, weights, groups, TableRule(rule, lr=0.0))
    assert_bitwise_equal(table, before)


def test_bad_tensors_raise_an_error_naming_them():
    table, state, grad_out, weights, groups = update_args("rowwise_adagrad")

    def call(**change):
        args = dict(table=table, state=state, grad_out=grad_out, weights=weights, groups=groups)
        update_rows(**(args | change), rule=TableRule("rowwise_adagrad", lr=0.1))

    with pytest.raises(TypeError, match=r"update_rows: table must be float32, bfloat16 or"):
        call(table=table.double())
    with pytest.raises(ValueError, match=r"update_rows: table must be contiguous"):
        call(table=torch.randn(5, 12).t())
    with pytest.raises(ValueError, match=r"update_rows: grad_out must have shape \(6, 5\)"):
        call(grad_out=torch.randn(6, 4))
    with pytest.raises(TypeError, match=r"update_rows: grad_out must be float32"):
        call(grad_out=grad_out.bfloat16())
    with pytest.raises(ValueError, match=r"update_rows: weights must have M = .* = 6 rows"):
        call(weights=weights[:5])
    with pytest.raises(ValueError, match=r"update_rows: row_mean_sq must have shape"):
        call(row_mean_sq=torch.zeros(groups.rows.numel() + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"update_rows: row_mean_sq must be float64"):
        call(row_mean_sq=torch.zeros(groups.rows.numel()))
    with pytest.raises(IndexError, match=r"row_sq_norms: positions must lie in \[0, 18\)"):
        row_sq_norms(grad_out, weights, groups._replace(positions=groups.positions + 1))
    recorder = recorder_of(table)
    with pytest.raises(ValueError, match=r"record_value_grads: grad_out must have T = "):
        torch.ops.memlayer.record_value_grads(
            grad_out[:2], groups.positions.reshape(6, 3) % 12, weights, recorder.recorded_tokens,
            recorder.key,
        )  # fmt: skip
    with pytest.raises(IndexError, match=r"record_value_grads: indices must lie in \[0, 12\)"):
        torch.ops.memlayer.record_value_grads(
            grad_out, groups.positions.reshape(6, 3), weights, recorder.recorded_tokens,
            recorder.key,
        )  # fmt: skip
    assert table.grad is None  # the bad rows were refused when recorded, not at the step


@pytest.mark.parametrize("op", ["row_sq_norms", "update_rows"])
def test_bad_pieces_raise_an_error_naming_them(op):
    table, state, grad_out, weights, groups = update_args("adam")
    starts, partials = hot_row_pieces(grad_out, weights, groups)

    def call(piece_starts, piece_partials):
        pieces = (piece_starts, piece_partials)
        if op == "row_sq_norms":
            torch.ops.memlayer.row_sq_norms(grad_out, weights, *groups[1:], *pieces)
        else:
            rule = TableRule("adam", lr=0.1).packed()
            torch.ops.memlayer.update_rows(
                table, state, grad_out, weights, *groups, None, *rule, 1.0, *pieces
            )

    before = [t.clone() for t in (table, *state)]
    with pytest.raises(ValueError, match=rf"^{op}: piece_starts was given without partials"):
        call(starts, None)
    with pytest.raises(ValueError, match=rf"^{op}: partials was given without piece_starts"):
        call(None, partials)
    with pytest.raises(TypeError, match=rf"^{op}: piece_starts must be int64"):
        call(starts.int(), partials)
    with pytest.raises(ValueError, match=rf"^{op}: piece_starts must have shape"):
        call(starts[1:], partials)
    with pytest.raises(TypeError, match=rf"^{op}: partials must be float32"):
        call(starts, partials.double())
    with pytest.raises(ValueError, match=rf"^{op}: partials must have shape \(0, 5\)"):
        call(starts, torch.zeros(0, 4))
    with pytest.raises(IndexError, match=rf"^{op}: piece_starts must lie in \[0, 1\)"):
        call(starts + 1, partials)
    decreasing = torch.zeros(starts.shape[0], dtype=torch.int64)
    decreasing[0] = 2
    with pytest.raises(ValueError, match=rf"^{op}: piece_starts must be non-decreasing"):
        call(decreasing, torch.zeros(2, 5))
    for tensor, old in zip((table, *state), before):
        assert_bitwise_equal(tensor, old)


@pytest.mark.parametrize("step", [0, -1])
def test_adam_rejects_a_step_count_below_one(step):
    """Adam's bias corrections divide by 1 - beta1**step: zero at step 0 (the table would turn
    to inf/NaN), negative below."""
    with pytest.raises(ValueError, match=r"^TableRule: step must be an int >= 1"):
        TableRule("adam", lr=0.1, step=step)


@pytest.mark.parametrize("argument", ["grad_out", "weights", "positions", "rows", "row_starts"])
def test_non_contiguous_inputs_are_read_correctly_or_rejected(argument):
    """A strided view of an input (the lookup ops accept them) must give the same update as a
    contiguous copy, or a clear error naming it: never a silently wrong one."""
    table, state, grad_out, weights, groups = update_args("adam")
    inputs = dict(grad_out=grad_out, weights=weights, **groups._asdict())
    value = inputs[argument]
    inputs[argument] = torch.stack([value, torch.zeros_like(value)], dim=-1)[..., 0]
    assert not inputs[argument].is_contiguous() and torch.equal(inputs[argument], value)
    expected_table, expected_state = table.clone(), [s.clone() for s in state]
    update_rows(
        expected_table, expected_state, grad_out, weights, groups, TableRule("adam", lr=0.1)
    )
    expected_norms = row_sq_norms(grad_out, weights, groups)

    strided_groups = groups._replace(**{k: inputs[k] for k in groups._fields})
    try:
        update_rows(
            table, state, inputs["grad_out"], inputs["weights"], strided_groups,
            TableRule("adam", lr=0.1),
        )  # fmt: skip
        norms = row_sq_norms(inputs["grad_out"], inputs["weights"], strided_groups)
    except ValueError as error:
        assert argument in str(error) and str(error).startswith(("update_rows:", "row_sq_norms:"))
        return
    assert_bitwise_equal(table, expected_table, "table")
    assert_bitwise_equal(state[0], expected_state[0], "exp_avg")
    assert_bitwise_equal(norms, expected_norms, "row_sq_norms")


def test_row_starts_out_of_range_raise_instead_of_reading_out_of_bounds():
    """Run in a subprocess: a kernel that trusts row_starts reads outside positions (and then
    anywhere), which may crash the interpreter."""
    script = textwrap.dedent(
        """
        import torch
        from ops.row_sparse import group_by_row, row_sq_norms, update_rows
        from ops.table_rule import TableRule

        groups = group_by_row(torch.tensor([[0, 3, 3], [5, 0, 7]]))
        grad_out, weights = torch.randn(2, 4), torch.rand(2, 3)
        accepted = 0
        for bad in (7, 2**40, -(2**40)):  # one past the end, far past, far before
            row_starts = groups.row_starts.clone()
            row_starts[-2] = bad
            bad_groups = groups._replace(row_starts=row_starts)
            for op in ("row_sq_norms", "update_rows"):
                print(op, row_starts.tolist(), end=": ", flush=True)
                try:
                    if op == "row_sq_norms":
                        row_sq_norms(grad_out, weights, bad_groups)
                    else:
                        table = torch.randn(8, 4)
                        sgd = TableRule("sgd", lr=1)
                        update_rows(table, [], grad_out, weights, bad_groups, sgd)
                except (IndexError, ValueError) as error:
                    assert str(error).startswith(op + ":") and "row_starts" in str(error), error
                    print("clear error", flush=True)
                else:
                    accepted += 1
                    print("ACCEPTED", flush=True)
        print("accepted", accepted)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    report = (result.stdout + result.stderr)[-3000:]
    assert result.returncode == 0 and "accepted 0" in result.stdout, (
        f"exit status {result.returncode}:\n{report}"
    )
