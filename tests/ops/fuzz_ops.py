"""Fuzz every registered ``memlayer`` op on the CPU: random shapes, dtypes, layouts, devices,
index ranges and scalar arguments, valid or not.

The contract for every call: a result that matches the float64 reference, or a ``ValueError``,
``TypeError`` or ``IndexError`` whose message starts with the op's name and names one of its
arguments. Anything else (another exception, a wrong or silently accepted result, a crash) fails.
An op that writes its arguments in place (and returns nothing) is held to the same contract for
what it writes, and must write nothing when it raises. A call that succeeds must not mix devices.

    python -m tests.ops.fuzz_ops [--examples N]

``tests/ops/test_fuzz.py`` runs it in a subprocess, so that a segfault or an abort fails that
test instead of killing the test run. Exit status 0 when every op kept the contract.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import ops
from ops.checks import FLOAT_DTYPES
from ops.lookup_quantized import dequantize_rows
from ops.row_sparse import GradRecorder, RowSparseGrad, group_by_row
from ops.table_rule import RULES, Hyper, Rule, TableRule

CLEAR_ERRORS = (ValueError, TypeError, IndexError)
# Error bound per output element, relative to the same sum over absolute values.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
ANY_DTYPES = (*FLOAT_DTYPES, torch.int64, torch.int32, torch.bool)


def _tensor(generator: torch.Generator, shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def _rows(generator: torch.Generator, shape, num_rows: int, dtype=torch.int64) -> torch.Tensor:
    if num_rows == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.randint(0, num_rows, shape, generator=generator).to(dtype)


def _dyadic(generator: torch.Generator, shape, denominator: int) -> torch.Tensor:
    """fp32 multiples of ``1 / denominator`` in [-8, 8] / denominator: their products and sums
    of a few hundred are exact in fp32, so a kernel's gradient sums are exact in any order."""
    return torch.randint(-8, 9, shape, generator=generator).float() / denominator


# --------------------------------------------------------------------------- float64 references


def _ref_lookup(values, indices, weights, deterministic=True):
    return ops.reference_lookup(values, indices, weights)


def _ref_values_grad(grad_out, indices, weights, num_rows, deterministic):
    (num_tokens, bag_size), dim = indices.shape, grad_out.shape[1]
    contributions = weights.double().unsqueeze(-1) * grad_out.double().unsqueeze(1)
    grad = torch.zeros(num_rows, dim, dtype=torch.float64)
    flat = contributions.reshape(num_tokens * bag_size, dim)
    return grad.index_add_(0, indices.reshape(-1).long(), flat)


def _ref_weights_grad(grad_out, values, indices):
    return (values.double()[indices.long()] * grad_out.double().unsqueeze(1)).sum(-1)


def _selected_half_scores(query, subkeys, indices):
    """[T, H, 2, k] half scores of the rows ``indices``, in float64."""
    num_tokens, num_heads, key_dim = query.shape
    num_subkeys = subkeys.shape[2]
    halves = query.double().reshape(num_tokens, num_heads, 2, key_dim // 2)
    half_scores = torch.einsum("thcd,hcnd->thcn", halves, subkeys.double())
    rows = torch.stack((indices // num_subkeys, indices % num_subkeys), dim=2)
    return half_scores.gather(-1, rows)


def _ref_product_key_topk(query, subkeys, k):
    expected_scores, _ = ops.reference_product_key_topk(query, subkeys, k)
    return expected_scores


def _ref_product_key_backward(grad_scores, query, subkeys, indices):
    query64 = query.double().requires_grad_()
    subkeys64 = subkeys.double().requires_grad_()
    scores = _selected_half_scores(query64, subkeys64, indices).sum(dim=2)
    return torch.autograd.grad(scores, (query64, subkeys64), grad_scores.double())


def _group_gradients(grad_out, weights, row_starts, positions):
    """float64 ``[U, D]``: group ``u``'s gradient, the sum over ``positions[row_starts[u]:
    row_starts[u + 1]]`` (empty if reversed) of ``weights[p] * grad_out[p // B]``."""
    num_groups, dim, bag_size = row_starts.numel() - 1, grad_out.shape[1], weights.shape[1]
    if bag_size == 0:
        return torch.zeros(num_groups, dim, dtype=torch.float64)
    positions = positions.long()
    contributions = (
        weights.double().reshape(-1, 1)[positions] * grad_out.double()[positions // bag_size]
    )
    bounds = row_starts.tolist()
    sums = [contributions[bounds[u] : bounds[u + 1]].sum(0) for u in range(num_groups)]
    return torch.stack(sums) if sums else torch.zeros(0, dim, dtype=torch.float64)


def _ref_hot_row_pieces(grad_out, weights, row_starts, positions):
    """The CPU kernels sum each row serially: no row is split, every row's pieces are none."""
    no_pieces = torch.zeros(row_starts.shape[0], dtype=torch.int64)
    return no_pieces, torch.zeros(0, grad_out.shape[1])


def _ref_row_sq_norms(grad_out, weights, row_starts, positions, piece_starts=None, partials=None):
    """(``piece_starts``, ``partials``: the CPU's pieces, none, which change no sum.)"""
    return _group_gradients(grad_out, weights, row_starts, positions).square().sum(1)


def _ref_update_rows(
    table, state, grad_out, weights, rows, row_starts, positions, row_mean_sq,
    rule, hyperparameters, grad_scale, piece_starts=None, partials=None,
):  # fmt: skip
    """The packed rule (``ops/table_rule.py``) applied to the rows in order (a repeated row is
    updated once per occurrence), in float64; returns the new table and state. (The pieces are
    the CPU's, none, as in ``_ref_row_sq_norms``.)"""
    h = hyperparameters
    lr, eps, beta1, beta2 = h[Hyper.LR], h[Hyper.EPS], h[Hyper.BETA1], h[Hyper.BETA2]
    weight_decay = h[Hyper.WEIGHT_DECAY]
    bias1, bias2_sqrt = h[Hyper.BIAS_CORRECTION1], h[Hyper.BIAS_CORRECTION2_SQRT]
    w, state = table.double().clone(), [s.double().clone() for s in state]
    if w.shape[1] == 0:
        return (w, *state)
    grads = _group_gradients(grad_out, weights, row_starts, positions) * grad_scale
    for u, row in enumerate(rows.tolist()):
        g, old = grads[u], w[row].clone()
        if rule == Rule.SGD:
            w[row] = old - lr * (g + weight_decay * old)
        elif rule == Rule.ROWWISE_ADAGRAD:
            if row_mean_sq is not None and weight_decay == 0:
                mean_sq = row_mean_sq[u].double() * grad_scale**2
            else:
                mean_sq = (g + weight_decay * old).square().mean()
            state[0][row] += mean_sq
            multiplier = lr / (state[0][row].sqrt() + eps)
            w[row] = (1 - multiplier * weight_decay) * old - multiplier * g
        else:
            exp_avg, exp_avg_sq = state[0][row], state[1][row]
            exp_avg.mul_(beta1).add_((1 - beta1) * g)
            exp_avg_sq.mul_(beta2).add_((1 - beta2) * g.square())
            denom = exp_avg_sq.sqrt() / bias2_sqrt + eps
            w[row] = old * (1 - lr * weight_decay) - lr / bias1 * exp_avg / denom
    return (w, *state)


def _ref_record_value_grads(grad_out, indices, weights, recorded_tokens, recorder):
    """The counter moves by T; the table's gradient holds the bags, in fp32 / int64."""
    counted = recorded_tokens + indices.shape[0]
    return counted, grad_out.float(), indices.long(), weights.float()


# --------------------------------------------------------------------------- valid cases


@dataclass(frozen=True)
class OpSpec:
    """How to draw a valid call of one op, its float64 reference and how to compare."""

    draw_args: Callable[[st.DataObject, torch.Generator], dict]
    reference: Callable[..., object]
    #: float arguments whose absolute values give the error scale (None: exact comparison)
    magnitude_args: tuple[str, ...] | None
    #: (argument, size) pairs of index tensors and the range they must lie in
    index_ranges: Callable[[dict], list[tuple[str, int]]]
    #: For an op that writes in place and returns nothing: what it writes, read from its
    #: arguments; the reference returns those values as they should be after the call.
    written: Callable[[dict], tuple[torch.Tensor, ...]] | None = None
    #: The error scale of each written value (default: the reference on absolute values).
    write_magnitudes: Callable[[dict, tuple], tuple[torch.Tensor, ...]] | None = None


def _bag_shapes(data):
    return (
        data.draw(st.integers(0, 40), label="N"),
        data.draw(st.sampled_from([0, 1, 3, 7, 16, 33]), label="D"),
        data.draw(st.integers(0, 12), label="T"),
        data.draw(st.integers(0, 6), label="B"),
    )


def _index_dtype(data):
    return data.draw(st.sampled_from([torch.int64, torch.int32]), label="index dtype")


def _float_dtype(data, label):
    return data.draw(st.sampled_from(FLOAT_DTYPES), label=label)


def _lookup_args(data, gen):
    N, D, T, B = _bag_shapes(data)
    N = max(N, 1) if T * B else N
    return dict(
        values=_tensor(gen, (N, D), _float_dtype(data, "values dtype")),
        indices=_rows(gen, (T, B), N, _index_dtype(data)),
        weights=_tensor(gen, (T, B), _float_dtype(data, "weights dtype")),
        deterministic=data.draw(st.booleans(), label="deterministic"),
    )


def _lookup_quantized_args(data, gen):
    N, D, T, B = _bag_shapes(data)
    N = max(N, 1) if T * B else N
    rows_dtype = data.draw(st.sampled_from([torch.int8, torch.float8_e4m3fn]), label="rows dtype")
    rows = torch.randint(-127, 128, (N, D), generator=gen).to(rows_dtype)
    return dict(
        rows=rows,
        scale=torch.rand(N, generator=gen).to(_float_dtype(data, "scale dtype")),
        indices=_rows(gen, (T, B), N, _index_dtype(data)),
        weights=_tensor(gen, (T, B), _float_dtype(data, "weights dtype")),
    )


def _ref_lookup_quantized(rows, scale, indices, weights, out_dtype=None):
    return ops.reference_lookup_quantized(rows, scale, indices, weights)


def _lookup_quantized_magnitudes(args, expected):
    """The sum over absolute values, from the dequantized table (fp8 has no CPU abs)."""
    table = dequantize_rows(args["rows"], args["scale"]).abs()
    weights = args["weights"].double().abs().unsqueeze(-1)
    return ((weights * table[args["indices"].long()]).sum(1),)


def _values_grad_args(data, gen):
    N, D, T, B = _bag_shapes(data)
    N = max(N, 1) if T * B else N
    return dict(
        grad_out=_tensor(gen, (T, D), _float_dtype(data, "grad_out dtype")),
        indices=_rows(gen, (T, B), N, _index_dtype(data)),
        weights=_tensor(gen, (T, B), _float_dtype(data, "weights dtype")),
        num_rows=N,
        deterministic=data.draw(st.booleans(), label="deterministic"),
    )


def _weights_grad_args(data, gen):
    N, D, T, B = _bag_shapes(data)
    N = max(N, 1) if T * B else N
    dtype = _float_dtype(data, "values dtype")
    return dict(
        grad_out=_tensor(gen, (T, D), data.draw(st.sampled_from([dtype, torch.float32]))),
        values=_tensor(gen, (N, D), dtype),
        indices=_rows(gen, (T, B), N, _index_dtype(data)),
    )


def _product_key_shapes(data):
    n = data.draw(st.integers(1, 7), label="n")
    return (
        data.draw(st.integers(0, 6), label="T"),
        data.draw(st.integers(1, 3), label="H"),
        n,
        2 * data.draw(st.integers(1, 4), label="Kd / 2"),
        data.draw(st.integers(1, n), label="k"),
    )


def _product_key_args(data, gen):
    T, H, n, Kd, k = _product_key_shapes(data)
    dtype = _float_dtype(data, "dtype")
    return dict(
        query=_tensor(gen, (T, H, Kd), dtype),
        subkeys=_tensor(gen, (H, 2, n, Kd // 2), dtype),
        k=k,
    )


def _product_key_backward_args(data, gen):
    T, H, n, Kd, k = _product_key_shapes(data)
    dtype = _float_dtype(data, "dtype")
    return dict(
        grad_scores=_tensor(gen, (T, H, k), _float_dtype(data, "grad_scores dtype")),
        query=_tensor(gen, (T, H, Kd), dtype),
        subkeys=_tensor(gen, (H, 2, n, Kd // 2), dtype),
        indices=_rows(gen, (T, H, k), n * n),
    )


def _checked_indices_args(data, gen):
    size = data.draw(st.integers(0, 50), label="size")
    shape = data.draw(st.lists(st.integers(0, 5), max_size=3), label="shape")
    return dict(indices=_rows(gen, shape, size, _index_dtype(data)), size=size, name="fuzz: ids")


#: The recorder of the current record_value_grads call (the op finds it by its key), whose
#: table's gradient it records into.
_LIVE_RECORDER: list[GradRecorder] = []


def _record_args(data, gen):
    N, D, T, B = _bag_shapes(data)
    recorder = GradRecorder()
    recorder.reads(torch.zeros(max(N, 1), D))
    recorder.table.grad = RowSparseGrad.like(recorder.table)
    _LIVE_RECORDER[:] = [recorder]
    return dict(
        grad_out=_tensor(gen, (T, D), _float_dtype(data, "grad_out dtype")),
        indices=_rows(gen, (T, B), max(N, 1), _index_dtype(data)),
        weights=_tensor(gen, (T, B), _float_dtype(data, "weights dtype")),
        recorded_tokens=recorder.recorded_tokens,
        recorder=recorder.key,
    )


def _recorded(args):
    return (args["recorded_tokens"], *_LIVE_RECORDER[0].table.grad.bags())


def _groups_args(data, gen):
    """Bags of dyadic gradients (exact sums, see _dyadic) and their groups by row."""
    N, D, T, B = _bag_shapes(data)
    N = max(N, 1)
    groups = group_by_row(_rows(gen, (T, B), N, _index_dtype(data)))
    grad_out, weights = _dyadic(gen, (T, D), 4), _dyadic(gen, (T, B), 8)
    return N, grad_out, weights, groups


def _hot_row_pieces_args(data, gen):
    _, grad_out, weights, groups = _groups_args(data, gen)
    return dict(
        grad_out=grad_out,
        weights=weights,
        row_starts=groups.row_starts,
        positions=groups.positions,
    )


def _pieces_args(data, args: dict) -> dict:
    """The hot rows' pieces of a call's groups (as a step passes them), or none (the op's
    default)."""
    if not data.draw(st.booleans(), label="pieces"):
        return {}
    groups = {name: args[name] for name in ("grad_out", "weights", "row_starts", "positions")}
    piece_starts, partials = torch.ops.memlayer.hot_row_pieces(**groups)
    return dict(piece_starts=piece_starts, partials=partials)


def _row_sq_norms_args(data, gen):
    args = _hot_row_pieces_args(data, gen)
    return args | _pieces_args(data, args)


def _update_rows_args(data, gen):
    N, grad_out, weights, groups = _groups_args(data, gen)
    D = grad_out.shape[1]
    rule = data.draw(st.sampled_from(RULES), label="rule")
    table_dtype = data.draw(st.sampled_from(FLOAT_DTYPES[:3]), label="table dtype")
    warm = {  # warm state; Adam's second moment bounded away from 0 (a well-conditioned step)
        "sgd": [],
        "rowwise_adagrad": [torch.rand(N, generator=gen)],
        "adam": [torch.randn(N, D, generator=gen) / 4, torch.rand(N, D, generator=gen) + 0.05],
    }[rule]
    weight_decay = data.draw(st.sampled_from([0.0, 0.25]), label="weight_decay")
    mean_sq = None
    if rule == "rowwise_adagrad" and data.draw(st.booleans(), label="row_mean_sq"):
        # As over a column-sharded table's full width: here twice the local mean.
        norms = _ref_row_sq_norms(grad_out, weights, groups.row_starts, groups.positions)
        mean_sq = 2 * norms / max(D, 1)
    beta1, beta2 = data.draw(st.sampled_from([(0.875, 0.9921875), (0.5, 0.75)]), label="betas")
    args = dict(
        table=_tensor(gen, (N, D), table_dtype),
        state=warm,
        grad_out=grad_out,
        weights=weights,
        rows=groups.rows,
        row_starts=groups.row_starts,
        positions=groups.positions,
        row_mean_sq=mean_sq,
        **_packed_rule(
            TableRule(
                rule,
                lr=data.draw(st.sampled_from([1e-3, 0.125, 1.0]), label="lr"),
                eps=data.draw(st.sampled_from([1e-8, 1e-3]), label="eps"),
                betas=(beta1, beta2),  # fp32-exact: the fp32 kernel rounds no hyperparameter
                weight_decay=weight_decay,
                step=data.draw(st.integers(1, 5), label="step"),
            )
        ),
        grad_scale=data.draw(st.sampled_from([1.0, 0.375, 3.0]), label="grad_scale"),
    )
    return args | _pieces_args(data, args)


def _packed_rule(rule: TableRule) -> dict:
    code, hyperparameters = rule.packed()
    return dict(rule=code, hyperparameters=hyperparameters)


def _written_rows(args):
    return (args["table"], *args["state"])


def _update_magnitudes(args, expected):
    """A row's error scale: its old value plus the size of its update."""
    before = _written_rows(args)
    return tuple(
        old.double().abs() + (new - old.double()).abs() for old, new in zip(before, expected)
    )


def _group_ranges(args):
    bags = args["weights"].numel()
    ranges = [("positions", bags), ("row_starts", bags + 1)]
    if args.get("partials") is not None:
        ranges.append(("piece_starts", args["partials"].shape[0] + 1))
    return ranges


def _rows_of(name: str, size: Callable[[dict], int]):
    return lambda args: [(name, size(args))]


SPECS: dict[str, OpSpec] = {
    "lookup": OpSpec(
        _lookup_args, _ref_lookup, ("values", "weights"),
        _rows_of("indices", lambda a: a["values"].shape[0]),
    ),
    "lookup_quantized": OpSpec(
        _lookup_quantized_args, _ref_lookup_quantized, ("scale", "weights"),
        _rows_of("indices", lambda a: a["rows"].shape[0]),
        write_magnitudes=_lookup_quantized_magnitudes,
    ),
    "lookup_values_grad": OpSpec(
        _values_grad_args, _ref_values_grad, ("grad_out", "weights"),
        _rows_of("indices", lambda a: a["num_rows"]),
    ),
    "lookup_weights_grad": OpSpec(
        _weights_grad_args, _ref_weights_grad, ("grad_out", "values"),
        _rows_of("indices", lambda a: a["values"].shape[0]),
    ),
    "product_key_topk": OpSpec(
        _product_key_args, _ref_product_key_topk, ("query", "subkeys"), lambda args: [],
    ),
    "product_key_topk_backward": OpSpec(
        _product_key_backward_args, _ref_product_key_backward, ("grad_scores", "query", "subkeys"),
        _rows_of("indices", lambda a: a["subkeys"].shape[2] ** 2),
    ),
    "checked_indices": OpSpec(
        _checked_indices_args, lambda indices, size, name: indices, None,
        _rows_of("indices", lambda a: a["size"]),
    ),
    "record_value_grads": OpSpec(
        _record_args, _ref_record_value_grads, None,
        _rows_of("indices", lambda a: _LIVE_RECORDER[0].table.shape[0]), written=_recorded,
    ),
    "hot_row_pieces": OpSpec(
        _hot_row_pieces_args, _ref_hot_row_pieces, None, _group_ranges,
    ),
    "row_sq_norms": OpSpec(
        _row_sq_norms_args, _ref_row_sq_norms, ("grad_out", "weights"), _group_ranges,
    ),
    "update_rows": OpSpec(
        _update_rows_args, _ref_update_rows, ("table", "grad_out", "weights"),
        lambda args: [("rows", args["table"].shape[0]), *_group_ranges(args)],
        written=_written_rows, write_magnitudes=_update_magnitudes,
    ),
}  # fmt: skip


# --------------------------------------------------------------------------- mutations


def _mutate(data, args: dict, index_ranges: list[tuple[str, int]]) -> None:
    """Break (or only reshape, when the op should still accept it) one argument."""
    name = data.draw(st.sampled_from(sorted(args)), label="mutated argument")
    args[name] = _mutated(data, name, args[name], index_ranges)


def _mutated(data, name: str, value, index_ranges: list[tuple[str, int]]):
    if value is None or isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, int):
        return data.draw(st.sampled_from([-5, -1, 0, 1, value + 1, 1000]), label=name)
    if isinstance(value, float):
        return data.draw(st.sampled_from([-1.0, 0.0, float("nan")]), label=name)
    if isinstance(value, list):  # a list of tensors: one fewer, one more, or one broken
        kind = data.draw(st.sampled_from(["drop", "add", "element"]), label=f"{name} mutation")
        if kind == "drop" and value:
            return value[1:]
        if kind == "add":
            return [*value, value[0] if value else torch.zeros(3)]
        if value:
            at = data.draw(st.integers(0, len(value) - 1), label=f"{name} element")
            return [*value[:at], _mutated(data, name, value[at], index_ranges), *value[at + 1 :]]
        return value
    if value.is_meta or value.layout != torch.strided:  # already broken
        return value
    kind = data.draw(
        st.sampled_from(["dtype", "rank", "size", "sparse", "strided", "meta", "range"]),
        label=f"{name} mutation",
    )
    if kind == "dtype":
        return value.to(data.draw(st.sampled_from(ANY_DTYPES), label=f"{name} dtype"))
    if kind == "rank":
        drop = value.dim() > 0 and value.shape[0] > 0 and data.draw(st.booleans(), label="drop")
        return value[0] if drop else value.unsqueeze(0)
    if kind == "size" and value.dim() > 0:
        dim = data.draw(st.integers(0, value.dim() - 1), label=f"{name} dim")
        size = data.draw(st.integers(0, 8), label=f"{name} size")
        shape = list(value.shape)
        shape[dim] = size
        return torch.zeros(shape, dtype=value.dtype)
    if kind == "sparse":
        return value.to_sparse()
    if kind == "strided" and value.dim() >= 1:  # valid: a non-contiguous view
        return torch.cat([value, value], dim=-1)[..., : value.shape[-1]]
    if kind == "meta":
        return value.to("meta")
    if kind == "range" and value.numel() and value.dtype in (torch.int64, torch.int32):
        size = dict(index_ranges).get(name, 1)
        info = torch.iinfo(value.dtype)
        bad = data.draw(
            st.sampled_from([-1, info.min, size, size + 7, info.max]), label="bad index"
        )
        flat = value.clone().reshape(-1)
        flat[data.draw(st.integers(0, flat.numel() - 1), label="position")] = bad
        return flat.reshape(value.shape)
    return value


# --------------------------------------------------------------------------- the contract


class ContractBroken(AssertionError):
    pass


def _check_error(op: str, args: dict, error: Exception) -> None:
    message = str(error)
    prefix = args["name"] if op == "checked_indices" else f"{op}:"
    if not isinstance(error, CLEAR_ERRORS):
        raise ContractBroken(f"{op} raised {type(error).__name__}: {message}") from error
    if not message.startswith(prefix) or not any(name in message for name in (*args, prefix)):
        raise ContractBroken(f"{op}: unclear {type(error).__name__}: {message}") from error


def _outputs(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def _tensors(args: dict) -> list[torch.Tensor]:
    """The tensor arguments, those in lists included."""
    values = [v for value in args.values() for v in (value if isinstance(value, list) else [value])]
    return [value for value in values if isinstance(value, torch.Tensor)]


def _snapshot(args: dict) -> dict:
    """A copy of ``args`` whose tensors the call cannot write."""

    def copy(value):
        if isinstance(value, list):
            return [copy(v) for v in value]
        return value.clone() if isinstance(value, torch.Tensor) else value

    return {name: copy(value) for name, value in args.items()}


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN payloads included), as dense tensors."""
    a, b = (t.to_dense() if t.layout != torch.strided else t for t in (a, b))
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_meta:
        return True
    if a.is_floating_point():
        a, b = (t.contiguous().view(_SAME_WIDTH_INT[t.element_size()]) for t in (a, b))
    return torch.equal(a, b)


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _check_result(op: str, spec: OpSpec, args: dict, result) -> None:
    tensors = _tensors(args)
    if len({t.device for t in tensors}) > 1:
        raise ContractBroken(
            f"{op} accepted tensors on several devices: {sorted({str(t.device) for t in tensors})}"
        )
    if any(t.is_meta for t in tensors):
        if not all(out is None or out.is_meta for out in _outputs(result)):
            raise ContractBroken(f"{op}: meta inputs gave a non-meta output")
        return
    try:
        expected = _outputs(spec.reference(**args))
    except Exception as error:  # the reference cannot make sense of the input: the op should not
        raise ContractBroken(
            f"{op} accepted input the reference rejects ({type(error).__name__}: {error})"
        ) from error
    if spec.magnitude_args is None:
        if not all(torch.equal(out, exp) for out, exp in zip(_outputs(result), expected)):
            raise ContractBroken(f"{op}: result differs from its reference")
        return
    if spec.write_magnitudes is not None:
        magnitudes = spec.write_magnitudes(args, expected)
    else:
        absolute = {k: v.abs() if k in spec.magnitude_args else v for k, v in args.items()}
        magnitudes = _outputs(spec.reference(**absolute))
    if op == "product_key_topk":  # indices may differ where scores tie: compare scores only
        result = result[:1]
    for out, exp, magnitude in zip(_outputs(result), expected, magnitudes):
        if out.shape != exp.shape:
            raise ContractBroken(f"{op}: shape {tuple(out.shape)}, expected {tuple(exp.shape)}")
        dtypes = [args[name].dtype for name in spec.magnitude_args] + [out.dtype]
        tolerance = max(TOLERANCE[dtype] for dtype in dtypes)
        error = (out.double() - exp.double()).abs()
        bound = tolerance * (magnitude.double().abs() + 1)
        # Garbage in, the same garbage out: where the reference is inf or NaN, so must be the op.
        same = (out.double() == exp.double()) | (out.isnan() & exp.isnan())
        if not bool(((error <= bound) | same).all()):
            worst = torch.where(same, 0, error).max().item()
            raise ContractBroken(f"{op}: max error {worst:.3g} over the bound")


def check_call(op: str, spec: OpSpec, args: dict) -> None:
    before = _snapshot(args) if spec.written is not None else args
    written_before = _snapshot({"w": list(spec.written(args))}) if spec.written else None
    try:
        result = getattr(torch.ops.memlayer, op)(**args)
    except ContractBroken:
        raise
    except Exception as error:
        _check_error(op, args, error)
        if spec.written is not None:
            written = spec.written(args)
            if not all(map(_bitwise_equal, written, written_before["w"])) or len(written) != len(
                written_before["w"]
            ):
                raise ContractBroken(f"{op} wrote its arguments, then raised: {error}") from error
        return
    if spec.written is not None:
        if result is not None:
            raise ContractBroken(f"{op} returned {type(result).__name__}, expected nothing")
        result = spec.written(args)
    _check_result(op, spec, before, result)


def registered_ops() -> list[str]:
    return sorted(
        name.split("::")[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("memlayer::")
    )


def fuzz(op: str, examples: int, random_seed: int | None = None) -> None:
    """Derandomized (the same calls every run) unless ``random_seed`` is given."""
    spec = SPECS[op]

    @seed(random_seed)
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=random_seed is None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def one_call(data):
        generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
        args = spec.draw_args(data, generator)
        for _ in range(data.draw(st.integers(0, 2), label="mutations")):
            _mutate(data, args, spec.index_ranges(args))
        check_call(op, spec, args)

    one_call()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=60, help="calls per op")
    parser.add_argument("--seed", type=int, help="explore new calls from this seed")
    options = parser.parse_args()
    missing = sorted(set(registered_ops()) - set(SPECS))
    if missing:
        print(f"no fuzz spec for the registered ops {missing}: add them to SPECS", flush=True)
        return 1
    failed = []
    for op in SPECS:
        try:
            fuzz(op, options.examples, options.seed)
            print(f"{op}: {options.examples} calls kept the contract", flush=True)
        except Exception as error:  # report every op, then fail
            failed.append(op)
            print(f"{op}: FAILED", flush=True)
            traceback.print_exception(error, file=sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
