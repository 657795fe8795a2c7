"""Fuzz every registered ``memlayer`` op on the CPU: random shapes, dtypes, layouts, devices,
index ranges and scalar arguments, valid or not.

The contract for every call: a result that matches the float64 reference, or a ``ValueError``,
``TypeError`` or ``IndexError`` whose message starts with the op's name and names one of its
arguments. Anything else (another exception, a wrong or silently accepted result, a crash) fails.

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


def _rows_of(name: str, size: Callable[[dict], int]):
    return lambda args: [(name, size(args))]


SPECS: dict[str, OpSpec] = {
    "lookup": OpSpec(
        _lookup_args, _ref_lookup, ("values", "weights"),
        _rows_of("indices", lambda a: a["values"].shape[0]),
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
}  # fmt: skip


# --------------------------------------------------------------------------- mutations


def _mutate(data, args: dict, index_ranges: list[tuple[str, int]]) -> None:
    """Break (or only reshape, when the op should still accept it) one argument."""
    name = data.draw(st.sampled_from(sorted(args)), label="mutated argument")
    value = args[name]
    if isinstance(value, bool) or isinstance(value, str):
        return
    if isinstance(value, int):
        args[name] = data.draw(st.sampled_from([-5, -1, 0, 1, value + 1, 1000]), label=name)
        return
    if value.is_meta or value.layout != torch.strided:  # already broken
        return
    kind = data.draw(
        st.sampled_from(["dtype", "rank", "size", "sparse", "strided", "meta", "range"]),
        label=f"{name} mutation",
    )
    if kind == "dtype":
        args[name] = value.to(data.draw(st.sampled_from(ANY_DTYPES), label=f"{name} dtype"))
    elif kind == "rank":
        drop = value.dim() > 0 and value.shape[0] > 0 and data.draw(st.booleans(), label="drop")
        args[name] = value[0] if drop else value.unsqueeze(0)
    elif kind == "size" and value.dim() > 0:
        dim = data.draw(st.integers(0, value.dim() - 1), label=f"{name} dim")
        size = data.draw(st.integers(0, 8), label=f"{name} size")
        shape = list(value.shape)
        shape[dim] = size
        args[name] = torch.zeros(shape, dtype=value.dtype)
    elif kind == "sparse":
        args[name] = value.to_sparse()
    elif kind == "strided" and value.dim() >= 1:  # valid: a non-contiguous view
        args[name] = torch.cat([value, value], dim=-1)[..., : value.shape[-1]]
    elif kind == "meta":
        args[name] = value.to("meta")
    elif kind == "range" and value.numel() and value.dtype in (torch.int64, torch.int32):
        size = dict(index_ranges).get(name, 1)
        info = torch.iinfo(value.dtype)
        bad = data.draw(
            st.sampled_from([-1, info.min, size, size + 7, info.max]), label="bad index"
        )
        flat = value.clone().reshape(-1)
        flat[data.draw(st.integers(0, flat.numel() - 1), label="position")] = bad
        args[name] = flat.reshape(value.shape)


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


def _check_result(op: str, spec: OpSpec, args: dict, result) -> None:
    tensors = [value for value in args.values() if isinstance(value, torch.Tensor)]
    if any(t.is_meta for t in tensors):
        if not all(out.is_meta for out in _outputs(result)):
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
        if not bool((error <= bound).all()):
            raise ContractBroken(f"{op}: max error {error.max().item():.3g} over the bound")


def check_call(op: str, spec: OpSpec, args: dict) -> None:
    try:
        result = getattr(torch.ops.memlayer, op)(**args)
    except ContractBroken:
        raise
    except Exception as error:
        _check_error(op, args, error)
        return
    _check_result(op, spec, args, result)


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
