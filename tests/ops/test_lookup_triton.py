"""The Triton lookup kernels against the float64 reference.

Property tests call the launchers of ``ops/lookup_triton.py`` directly on tiny shapes: on CPU
tensors under ``TRITON_INTERPRET=1`` without a GPU (the custom op would dispatch CPU tensors to
the CPU kernel), on the GPU where there is one. The CUDA tests at the bottom run
``torch.ops.memlayer.lookup`` end to end at realistic sizes.
"""

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the Triton kernels need triton (Linux)")

import ops  # noqa: E402  (registers torch.ops.memlayer.*)
from ops import lookup_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Error bound per element, relative to the same sum over absolute values (sum |w| |v|): covers
# fp32 accumulation over up to ~100 terms plus the final conversion to the output dtype (one bf16
# ulp: the interpreter truncates fp32 to bf16 where the GPU rounds to nearest).
_RELATIVE_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2**-10,
    torch.bfloat16: 2**-7,
}


def assert_within_bound(
    actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype
) -> None:
    error = (actual.double() - expected).abs()
    bound = _RELATIVE_TOLERANCE[dtype] * magnitude
    worst = (error - bound).argmax() if error.numel() else None
    assert torch.all(error <= bound), (
        f"error {error.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} "
        f"(expected {expected.flatten()[worst]:.6g}, got {actual.flatten()[worst].item():.6g})"
    )


def reference(values, indices, weights, grad_out):
    """float64 (out, grad_values, grad_weights); indices outside [0, N) contribute nothing."""
    num_rows = values.shape[0]
    in_range = (indices >= 0) & (indices < num_rows)
    values = values.to(torch.float64, copy=True).requires_grad_()
    weights = weights.to(torch.float64, copy=True).requires_grad_()
    safe_indices = torch.where(in_range, indices, 0).long()
    out = ops.reference_lookup(values, safe_indices, weights * in_range)
    out.backward(grad_out.double())
    return out.detach(), values.grad, weights.grad


def reference_and_bound(values, indices, weights, grad_out):
    """The reference and its error scale: the same sums over absolute values."""
    expected = reference(values, indices, weights, grad_out)
    magnitude = reference(values.abs(), indices, weights.abs(), grad_out.abs())
    return expected, magnitude


@st.composite
def lookup_cases(draw, out_of_range: bool = False):
    """Tiny random problems: odd D, empty batches, heavy collisions, every dtype."""
    num_rows = draw(st.integers(1, 64))
    dim = draw(st.sampled_from([1, 3, 7, 16, 33, 100]))
    num_tokens = draw(st.integers(0, 16))
    bag_size = draw(st.integers(0, 8))
    dtype = draw(st.sampled_from(list(_RELATIVE_TOLERANCE)))
    weights_dtype = draw(st.sampled_from([torch.float32, dtype]))
    index_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    rows_used = draw(st.sampled_from(["all", "one", "few"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    if out_of_range:
        low, high = -num_rows - 3, 2 * num_rows + 3
    else:
        low, high = 0, num_rows
    candidates = torch.randint(low, high, (num_rows,), generator=gen)
    pool = {"all": candidates, "one": candidates[:1], "few": candidates[:3]}[rows_used]
    picks = torch.randint(0, len(pool), (num_tokens, bag_size), generator=gen)
    indices = pool[picks].to(index_dtype)

    values = torch.randn(num_rows, dim, generator=gen).to(dtype)
    weights = torch.randn(num_tokens, bag_size, generator=gen).to(weights_dtype)
    grad_out = torch.randn(num_tokens, dim, generator=gen).to(dtype)
    return values, indices, weights, grad_out


def to_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


VALUES_GRAD_MODES = {
    "sorted": dict(deterministic=True),
    "sorted-hot-rows": dict(deterministic=True, hits_per_piece=4),  # splits runs over 4 hits
    "atomic": dict(deterministic=False),
}


@given(lookup_cases())
def test_forward_matches_reference(case):
    values, indices, weights, grad_out = case
    (expected, _, _), (magnitude, _, _) = reference_and_bound(*case)
    out = lookup_triton.lookup_forward(*to_device(values, indices, weights))
    assert out.dtype == values.dtype and out.shape == expected.shape
    assert_within_bound(out.cpu(), expected, magnitude, values.dtype)


@pytest.mark.parametrize("mode", VALUES_GRAD_MODES)
@given(case=lookup_cases())
def test_values_grad_matches_reference(case, mode):
    values, indices, weights, grad_out = case
    (_, expected, _), (_, magnitude, _) = reference_and_bound(*case)
    grad = lookup_triton.lookup_values_grad(
        *to_device(grad_out, indices, weights), values.shape[0], **VALUES_GRAD_MODES[mode]
    )
    assert grad.dtype == values.dtype and grad.shape == values.shape
    assert_within_bound(grad.cpu(), expected, magnitude, values.dtype)


@given(lookup_cases())
def test_weights_grad_matches_reference(case):
    values, indices, weights, grad_out = case
    (_, _, expected), (_, _, magnitude) = reference_and_bound(*case)
    grad = lookup_triton.lookup_weights_grad(*to_device(grad_out, values, indices))
    expected_dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    assert grad.dtype == expected_dtype and grad.shape == indices.shape
    # Exact products of exactly represented inputs, summed in fp32: fp32 accuracy for any dtype.
    assert_within_bound(grad.cpu(), expected, magnitude, expected_dtype)


@given(lookup_cases(out_of_range=True))
def test_out_of_range_indices_contribute_nothing_and_are_never_read(case):
    values, indices, weights, grad_out = case
    (expected_out, expected_grad_values, expected_grad_weights), magnitudes = reference_and_bound(
        *case
    )
    # Surround the table with NaN rows: any read outside [0, N) would poison the results.
    num_rows, guard = values.shape[0], 2 * values.shape[0] + 3
    padded = torch.full((num_rows + 2 * guard, values.shape[1]), float("nan"), dtype=values.dtype)
    padded[guard : guard + num_rows] = values
    values_in_nan, indices, weights, grad_out = to_device(
        padded[guard : guard + num_rows], indices, weights, grad_out
    )

    out = lookup_triton.lookup_forward(values_in_nan, indices, weights)
    grads_values = [  # sorted-hot-rows runs both the plain and the hot-row sorted path
        lookup_triton.lookup_values_grad(grad_out, indices, weights, num_rows, **mode)
        for mode in (VALUES_GRAD_MODES["sorted-hot-rows"], VALUES_GRAD_MODES["atomic"])
    ]
    grad_weights = lookup_triton.lookup_weights_grad(grad_out, values_in_nan, indices)

    dtype = values.dtype
    assert_within_bound(out.cpu(), expected_out, magnitudes[0], dtype)
    for grad in grads_values:
        assert_within_bound(grad.cpu(), expected_grad_values, magnitudes[1], dtype)
    grad_weights = grad_weights.cpu()
    assert_within_bound(grad_weights, expected_grad_weights, magnitudes[2], grad_weights.dtype)


@settings(max_examples=10)  # cheap on a GPU, where it matters; slow in the interpreter
@given(lookup_cases())
def test_sorted_values_grad_is_bitwise_reproducible(case):
    values, indices, weights, grad_out = case
    args = (*to_device(grad_out, indices, weights), values.shape[0])
    mode = VALUES_GRAD_MODES["sorted-hot-rows"]  # both the plain and the hot-row path
    first, second = (lookup_triton.lookup_values_grad(*args, **mode) for _ in range(2))
    assert torch.equal(first, second)


def test_empty_batch_gives_empty_output_and_zero_gradient():
    values = torch.randn(5, 7, device=DEVICE)
    indices = torch.empty(0, 4, dtype=torch.int64, device=DEVICE)
    weights = torch.empty(0, 4, device=DEVICE)
    grad_out = torch.empty(0, 7, device=DEVICE)
    assert lookup_triton.lookup_forward(values, indices, weights).shape == (0, 7)
    for deterministic in (True, False):
        grad = lookup_triton.lookup_values_grad(grad_out, indices, weights, 5, deterministic)
        assert torch.equal(grad, torch.zeros_like(values))
    assert lookup_triton.lookup_weights_grad(grad_out, values, indices).shape == (0, 4)


def test_module_imports_without_triton(monkeypatch):
    """macOS has no Triton: ops/ must still import (and register the CPU kernels)."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    spec = importlib.util.spec_from_file_location("lookup_triton_copy", lookup_triton.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.triton is None and callable(module.lookup_forward)


# --------------------------------------------------------------------------- CUDA, realistic


def realistic_problem(dim: int, dtype: torch.dtype, seed: int = 0):
    """N = 1M rows, T = 4096 tokens, B = 128 rows per token (the paper's scale per layer)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_rows, num_tokens, bag_size = 1 << 20, 4096, 128
    values = torch.randn(num_rows, dim, device="cuda", generator=gen).to(dtype)
    indices = torch.randint(0, num_rows, (num_tokens, bag_size), device="cuda", generator=gen)
    indices[:8] = 7  # a hot row: 1024 hits
    indices[:, 0] = 3  # a hotter one, 4096 hits: summed in pieces by the deterministic kernel
    weights = torch.rand(num_tokens, bag_size, device="cuda", generator=gen).softmax(-1)
    grad_out = torch.randn(num_tokens, dim, device="cuda", generator=gen).to(dtype)
    return values, indices, weights, grad_out


def lookup_with_grads(values, indices, weights, grad_out, deterministic=True):
    values = values.detach().requires_grad_()
    weights = weights.detach().requires_grad_()
    out = torch.ops.memlayer.lookup(values, indices, weights, deterministic)
    out.backward(grad_out)
    return out.detach(), values.grad, weights.grad


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [256, 1024])
def test_cuda_lookup_realistic_sizes(dim, dtype):
    values, indices, weights, grad_out = realistic_problem(dim, dtype)
    out, grad_values, grad_weights = lookup_with_grads(values, indices, weights, grad_out)

    # Forward and weight gradient: float64 reference on a subset of tokens (hot row included).
    tokens = torch.cat([torch.arange(8), torch.randperm(indices.shape[0])[:56]]).cuda()
    rows = values[indices[tokens]].double()  # [64, B, D]
    expected_out = (weights[tokens].double().unsqueeze(-1) * rows).sum(1)
    magnitude_out = (weights[tokens].double().unsqueeze(-1) * rows.abs()).sum(1)
    assert_within_bound(out[tokens], expected_out, magnitude_out, dtype)
    expected_gw = torch.einsum("tbd,td->tb", rows, grad_out[tokens].double())
    magnitude_gw = torch.einsum("tbd,td->tb", rows.abs(), grad_out[tokens].double().abs())
    assert_within_bound(grad_weights[tokens], expected_gw, magnitude_gw, torch.float32)

    # Value gradient: a float32 index_add over all rows (its own error is far below the bound).
    flat_rows = indices.reshape(-1)
    bag_size = indices.shape[1]
    contributions = weights.reshape(-1, 1) * grad_out.float().repeat_interleave(bag_size, dim=0)
    expected_gv = torch.zeros(values.shape, device="cuda").index_add_(0, flat_rows, contributions)
    magnitude_gv = torch.zeros(values.shape, device="cuda").index_add_(
        0, flat_rows, contributions.abs()
    )
    assert_within_bound(grad_values, expected_gv, magnitude_gv, dtype)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_values_grad_deterministic_and_atomic_agree(dtype):
    values, indices, weights, grad_out = realistic_problem(256, dtype, seed=1)
    sorted_runs = [lookup_with_grads(values, indices, weights, grad_out)[1] for _ in range(2)]
    assert torch.equal(sorted_runs[0], sorted_runs[1])
    atomic = lookup_with_grads(values, indices, weights, grad_out, deterministic=False)[1]
    torch.testing.assert_close(atomic, sorted_runs[0])


@requires_cuda
@pytest.mark.gpu
def test_cuda_matches_embedding_bag():
    values, indices, weights, grad_out = realistic_problem(256, torch.float32, seed=2)
    ours = lookup_with_grads(values, indices, weights, grad_out)

    values_ref = values.detach().requires_grad_()
    weights_ref = weights.detach().requires_grad_()
    out_ref = F.embedding_bag(indices, values_ref, per_sample_weights=weights_ref, mode="sum")
    out_ref.backward(grad_out)
    for actual, expected in zip(ours, (out_ref, values_ref.grad, weights_ref.grad)):
        torch.testing.assert_close(actual, expected.detach(), rtol=1e-4, atol=1e-5)


def small_cuda_problem(dtype=torch.float32, num_rows=50, dim=33, num_tokens=6, bag_size=5):
    values = torch.randn(num_rows, dim, device="cuda", dtype=dtype, requires_grad=True)
    indices = torch.randint(0, num_rows, (num_tokens, bag_size), device="cuda")
    weights = torch.randn(num_tokens, bag_size, device="cuda", dtype=dtype, requires_grad=True)
    return values, indices, weights


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False])
def test_cuda_opcheck(deterministic):
    values, indices, weights = small_cuda_problem()
    torch.library.opcheck(torch.ops.memlayer.lookup, (values, indices, weights, deterministic))
    grad_out = torch.randn(6, 33, device="cuda")
    values_grad_args = (grad_out, indices, weights.detach(), 50, deterministic)
    torch.library.opcheck(torch.ops.memlayer.lookup_values_grad, values_grad_args)
    torch.library.opcheck(
        torch.ops.memlayer.lookup_weights_grad, (grad_out, values.detach(), indices)
    )


@requires_cuda
@pytest.mark.gpu
def test_cuda_gradcheck_float64():
    values, indices, weights = small_cuda_problem(torch.float64, num_rows=9, dim=5)
    indices[0] = 3  # a collision
    torch.autograd.gradcheck(
        lambda v, w: torch.ops.memlayer.lookup(v, indices, w), (values, weights)
    )


@requires_cuda
@pytest.mark.gpu
def test_cuda_compile_fullgraph_matches_eager():
    def bag_then_scale(values, indices, weights):
        return torch.ops.memlayer.lookup(values, indices, weights).sigmoid() * 2

    values, indices, weights = small_cuda_problem()
    compiled = torch.compile(bag_then_scale, fullgraph=True)
    eager_out = bag_then_scale(values, indices, weights)
    eager_grads = torch.autograd.grad(eager_out.sum(), (values, weights))
    compiled_out = compiled(values, indices, weights)
    compiled_grads = torch.autograd.grad(compiled_out.sum(), (values, weights))
    torch.testing.assert_close(compiled_out, eager_out)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad)


@requires_cuda
@pytest.mark.gpu
def test_cuda_check_indices_debug_mode(monkeypatch):
    values, indices, weights = small_cuda_problem()
    indices[2, 1] = 50  # one past the last row
    # Default: no sync, the bad index contributes nothing.
    out = torch.ops.memlayer.lookup(values, indices, weights)
    in_range = (indices < 50).to(weights.dtype)
    expected = torch.ops.memlayer.lookup(values, indices.clamp(max=49), weights * in_range)
    torch.testing.assert_close(out, expected)
    monkeypatch.setenv("MEMCOMPILE_CHECK_INDICES", "1")
    with pytest.raises(IndexError, match=r"\[0, 50\).*found 50"):
        torch.ops.memlayer.lookup(values, indices, weights)
