"""memlayer::lookup on CPU: against a float64 reference, opcheck, gradcheck, compile, errors."""

import functools

import pytest
import torch
import torch._lazy.ts_backend
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import ops
from ops.lookup import lookup_values_grad, lookup_weights_grad

# Error bound per element relative to sum_b |w| * max|v| (the scale of one output element).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_inputs(N, D, T, B, dtype, index_dtype, collisions, seed, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(N, D, generator=gen).to(dtype)
    if collisions == "all_equal":
        indices = torch.full((T, B), N // 2, dtype=index_dtype)
    elif collisions == "few_rows":
        rows = torch.randint(0, N, (2,), generator=gen)
        indices = rows[torch.randint(0, 2, (T, B), generator=gen)].to(index_dtype)
    else:
        indices = torch.randint(0, N, (T, B), generator=gen, dtype=index_dtype)
    weights = torch.rand(T, B, generator=gen)
    return values.requires_grad_(requires_grad), indices, weights.requires_grad_(requires_grad)


def assert_close_scaled(actual, expected, scale, dtype):
    assert actual.shape == expected.shape
    error = (actual.double() - expected).abs().max().item() if actual.numel() else 0.0
    assert error <= TOLERANCE[dtype] * max(scale, 1.0), f"max error {error} (scale {scale})"


lookup_cases = st.fixed_dictionaries(
    {
        "N": st.integers(1, 70),
        "D": st.sampled_from([1, 3, 7, 16, 33, 100]),
        "T": st.integers(0, 24),
        "B": st.integers(0, 9),
        "dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
        "index_dtype": st.sampled_from([torch.int64, torch.int32]),
        "collisions": st.sampled_from(["uniform", "all_equal", "few_rows"]),
        "seed": st.integers(0, 2**31 - 1),
    }
)


@given(case=lookup_cases)
def test_lookup_matches_float64_reference(case):
    values, indices, weights = make_inputs(**case)
    T, B, D = case["T"], case["B"], case["D"]
    out = torch.ops.memlayer.lookup(values, indices, weights)
    assert out.dtype == values.dtype and out.shape == (T, D)

    values64 = values.detach().double().requires_grad_()
    weights64 = weights.detach().double().requires_grad_()
    expected = ops.reference_lookup(values64, indices, weights64)
    scale = B * values.detach().abs().max().item() if values.numel() else 1.0
    assert_close_scaled(out, expected, scale, case["dtype"])

    grad_out = torch.randn(T, D, generator=torch.Generator().manual_seed(case["seed"] + 1))
    out.backward(grad_out.to(out.dtype))
    expected.backward(grad_out.to(out.dtype).double())
    assert values.grad.dtype == values.dtype and weights.grad.dtype == weights.dtype
    # A hot row sums up to T * B contributions of |w * dY| <= max|dY|.
    grad_scale = T * B * grad_out.abs().max().item() if grad_out.numel() else 1.0
    assert_close_scaled(values.grad, values64.grad, grad_scale, case["dtype"])
    dot_scale = D * grad_out.abs().max().item() * values.detach().abs().max().item() if T else 1.0
    # The weight gradient is returned in the weights' dtype (fp32 here).
    weights_grad_dtype = torch.float32 if case["dtype"] == torch.float64 else case["dtype"]
    assert_close_scaled(weights.grad, weights64.grad, dot_scale, weights_grad_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_half_precision_table_is_fp32_embedding_bag_rounded_once(dtype, index_dtype, layout):
    """bf16/fp16 tables run our CPU kernel (fp32 tables run F.embedding_bag itself): fp32
    weights and fp32 sums over the table's values, rounded once to its dtype at the end. So it
    equals fp32 F.embedding_bag on the same table, up to the summation order: at most one ulp,
    in at most 1% of the outputs. (Rounding the weights to the table's dtype first, as ATen's
    half-precision embedding_bag does, changes about a third of them here.)"""
    generator = torch.Generator().manual_seed(0)
    num_rows, dim, num_tokens, bag_size = 300, 24, 40, 12
    values = torch.randn(num_rows, 2 * dim, generator=generator).to(dtype)
    indices = torch.randint(0, num_rows, (bag_size, num_tokens), generator=generator)
    weights = torch.rand(bag_size, num_tokens, generator=generator)
    indices, weights = indices.to(index_dtype).t(), weights.t()  # [T, B] views of [B, T]
    values = values[:, ::2]  # every other column: a strided table
    if layout == "contiguous":
        values, indices, weights = values.contiguous(), indices.contiguous(), weights.contiguous()

    out = torch.ops.memlayer.lookup(values, indices, weights)
    fp32 = F.embedding_bag(indices.long(), values.float(), per_sample_weights=weights, mode="sum")
    expected = fp32.to(dtype)
    assert out.dtype == dtype
    assert (out != expected).float().mean() <= 0.01
    torch.testing.assert_close(out, expected, rtol=torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("values_grad, weights_grad", [(True, True), (True, False), (False, True)])
def test_opcheck(values_grad, weights_grad):
    values, indices, weights = make_inputs(40, 9, 6, 5, torch.float32, torch.int64, "uniform", 1)
    values.requires_grad_(values_grad)
    weights.requires_grad_(weights_grad)
    torch.library.opcheck(torch.ops.memlayer.lookup.default, (values, indices, weights))
    grad_out = torch.randn(6, 9)
    torch.library.opcheck(lookup_values_grad, (grad_out, indices, weights.detach(), 40, True))
    torch.library.opcheck(lookup_weights_grad, (grad_out, values.detach(), indices))


def test_gradcheck_float64():
    values, indices, weights = make_inputs(12, 5, 7, 4, torch.float64, torch.int64, "few_rows", 2)
    weights = weights.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(torch.ops.memlayer.lookup, (values, indices, weights))


def test_backward_is_bitwise_deterministic():
    values, indices, weights = make_inputs(
        50, 33, 64, 16, torch.float32, torch.int64, "few_rows", 3
    )
    grad_out = torch.randn(64, 33)
    grads = []
    for _ in range(2):
        values.grad = weights.grad = None
        torch.ops.memlayer.lookup(values, indices, weights).backward(grad_out)
        grads.append((values.grad.clone(), weights.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("values_grad, weights_grad", [(True, False), (False, True)])
def test_backward_skips_gradients_nobody_needs(values_grad, weights_grad):
    values, indices, weights = make_inputs(30, 8, 5, 3, torch.float32, torch.int64, "uniform", 4)
    values.requires_grad_(values_grad)
    weights.requires_grad_(weights_grad)
    out = torch.ops.memlayer.lookup(values, indices, weights)
    with CountOps() as counter:
        out.sum().backward()
    assert ("memlayer::lookup_values_grad" in counter.calls) == values_grad
    assert ("memlayer::lookup_weights_grad" in counter.calls) == weights_grad


def test_compiled_matches_eager_with_dynamic_tokens():
    def loss_fn(values, indices, weights):
        return torch.ops.memlayer.lookup(values, indices, weights).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True)
    for T in (5, 11):
        values, indices, weights = make_inputs(
            40, 6, T, 4, torch.float32, torch.int64, "uniform", T
        )
        eager_inputs = [
            t.detach().clone().requires_grad_(t.requires_grad) for t in (values, indices, weights)
        ]
        loss = compiled(values, indices, weights)
        loss.backward()
        eager_loss = loss_fn(*eager_inputs)
        eager_loss.backward()
        torch.testing.assert_close(loss, eager_loss)
        torch.testing.assert_close(values.grad, eager_inputs[0].grad)
        torch.testing.assert_close(weights.grad, eager_inputs[2].grad)


def test_meta_device():
    values = torch.empty(1 << 20, 2048, device="meta", dtype=torch.bfloat16)
    indices = torch.empty(4096, 128, device="meta", dtype=torch.int64)
    weights = torch.empty(4096, 128, device="meta")
    out = torch.ops.memlayer.lookup(values, indices, weights)
    assert out.shape == (4096, 2048) and out.dtype == torch.bfloat16 and out.device.type == "meta"


@functools.cache  # the backend registers once per process
def lazy_device() -> torch.device:
    """A device type every torch build has and no memlayer op has a kernel for (the lazy tensor
    device, TorchScript backend)."""
    torch._lazy.ts_backend.init()
    return torch.device("lazy")


def test_a_device_without_a_kernel_gets_an_error_naming_it():
    """Kernels are registered per device type (CPU, CUDA); any other device gets the op's
    checks, then an error naming the op and the device type."""
    device = lazy_device()
    values, indices, weights = make_inputs(6, 4, 3, 2, torch.float32, torch.int64, "none", 0)
    values, indices, weights = (t.detach().to(device) for t in (values, indices, weights))
    grad_out = torch.randn(3, 4).to(device)
    calls = {
        "lookup": lambda: ops.lookup(values, indices, weights),
        "lookup_values_grad": lambda: lookup_values_grad(grad_out, indices, weights, 6, True),
        "lookup_weights_grad": lambda: lookup_weights_grad(grad_out, values, indices),
    }
    for name, call in calls.items():
        with pytest.raises(
            NotImplementedError, match=rf"^{name}: no kernel for device type 'lazy'"
        ):
            call()
    with pytest.raises(ValueError, match=r"^lookup: weights must have shape \(3, 2\)"):
        ops.lookup(values, indices, weights[:2])  # checked first


@pytest.mark.parametrize(
    "values, indices, weights, error, match",
    [
        (
            torch.randn(4),
            torch.zeros(2, 2, dtype=torch.long),
            torch.ones(2, 2),
            ValueError,
            r"values must be 2-D \[N, D\], got shape \(4,\)",
        ),
        (
            torch.randn(4, 3),
            torch.zeros(2, dtype=torch.long),
            torch.ones(2),
            ValueError,
            r"indices must be 2-D \[T, B\]",
        ),
        (
            torch.randn(4, 3),
            torch.zeros(2, 2),
            torch.ones(2, 2),
            TypeError,
            r"indices must be int64 or int32, got torch.float32",
        ),
        (
            torch.randn(4, 3),
            torch.zeros(2, 2, dtype=torch.long),
            torch.ones(2, 3),
            ValueError,
            r"weights must have shape \(2, 2\) \(the shape of indices\), got \(2, 3\)",
        ),
        (
            torch.randn(4, 3),
            torch.zeros(2, 2, dtype=torch.long),
            torch.ones(2, 2, dtype=torch.long),
            TypeError,
            r"weights must be floating point",
        ),
        (
            torch.ones(4, 3, dtype=torch.long),
            torch.zeros(2, 2, dtype=torch.long),
            torch.ones(2, 2),
            TypeError,
            r"values must be float32, bfloat16, float16 or float64",
        ),
        (
            torch.randn(4, 3),
            torch.tensor([[0, 4]]),
            torch.ones(1, 2),
            IndexError,
            r"indices must lie in \[0, 4\) .*found 4",
        ),
        (
            torch.randn(4, 3),
            torch.tensor([[-1, 0]]),
            torch.ones(1, 2),
            IndexError,
            r"indices must lie in \[0, 4\) .*found -1",
        ),
        (
            torch.randn(4, 3),
            torch.zeros(2, 2, dtype=torch.long),
            torch.ones(2, 2, device="meta"),
            ValueError,
            r"must be on one device",
        ),
    ],
)
def test_bad_input_raises_clear_error(values, indices, weights, error, match):
    with pytest.raises(error, match=match):
        torch.ops.memlayer.lookup(values, indices, weights)


@pytest.mark.parametrize(
    "op, args, error, match",
    [
        # An unchecked row here used to segfault (too large) or write outside the gradient
        # (negative); short weights or grad_out were read past their end.
        (
            lookup_values_grad,
            (torch.randn(2, 3), torch.tensor([[0, 9], [1, 2]]), torch.ones(2, 2), 4, True),
            IndexError,
            r"lookup_values_grad: indices must lie in \[0, 4\) .*found 9",
        ),
        (
            lookup_values_grad,
            (torch.randn(2, 3), torch.tensor([[0, -2], [1, 2]]), torch.ones(2, 2), 4, True),
            IndexError,
            r"lookup_values_grad: indices must lie in \[0, 4\) .*found -2",
        ),
        (
            lookup_values_grad,
            (torch.randn(2, 3), torch.zeros(2, 2, dtype=torch.long), torch.ones(1, 2), 4, True),
            ValueError,
            r"lookup_values_grad: weights must have shape \(2, 2\)",
        ),
        (
            lookup_values_grad,
            (torch.randn(1, 3), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), 4, True),
            ValueError,
            r"lookup_values_grad: grad_out must have T = indices.shape\[0\] = 2 rows",
        ),
        (
            lookup_values_grad,
            (torch.randn(2, 3), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2), -1, True),
            ValueError,
            r"lookup_values_grad: num_rows must be >= 0, got -1",
        ),
        (
            lookup_weights_grad,
            (torch.randn(2, 3), torch.randn(4, 3), torch.tensor([[0, 4], [1, 2]])),
            IndexError,
            r"lookup_weights_grad: indices must lie in \[0, 4\) .*found 4",
        ),
        (
            lookup_weights_grad,
            (torch.randn(1, 3), torch.randn(4, 3), torch.zeros(2, 2, dtype=torch.long)),
            ValueError,
            r"lookup_weights_grad: grad_out must have shape \(2, 3\)",
        ),
        (
            lookup_weights_grad,
            (torch.randn(2, 5), torch.randn(4, 3), torch.zeros(2, 2, dtype=torch.long)),
            ValueError,
            r"grad_out must have shape \(2, 3\) \(T of indices, D of values\), got \(2, 5\)",
        ),
        (
            torch.ops.memlayer.lookup,
            (torch.randn(4, 3).to_sparse(), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2)),
            TypeError,
            r"lookup: values must be a dense \(strided\) tensor, got layout torch.sparse_coo",
        ),
        (
            torch.ops.memlayer.lookup,
            (torch.randn(4, 3), torch.zeros(2, 2, dtype=torch.long).to_sparse(), torch.ones(2, 2)),
            TypeError,
            r"lookup: indices must be a dense \(strided\) tensor",
        ),
    ],
)
def test_backward_ops_and_layouts_reject_bad_input(op, args, error, match):
    with pytest.raises(error, match=match):
        op(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_zero_width_table(dtype):
    values = torch.randn(4, 0, dtype=dtype, requires_grad=True)
    weights = torch.ones(2, 3, requires_grad=True)
    out = torch.ops.memlayer.lookup(values, torch.zeros(2, 3, dtype=torch.long), weights)
    assert out.shape == (2, 0) and out.dtype == dtype
    out.sum().backward()
    assert values.grad.shape == (4, 0) and torch.equal(weights.grad, torch.zeros(2, 3))


# --------------------------------------------------------------------------- torch.func, forward AD


def float64_inputs(seed=5):
    values, indices, weights = make_inputs(9, 4, 6, 3, torch.float64, torch.int64, "few_rows", seed)
    return values, indices, weights.detach().double().requires_grad_()


def test_forward_mode_ad_matches_the_reference():
    values, indices, weights = (t.detach() for t in float64_inputs())
    tangents = torch.randn_like(values), torch.randn_like(weights)

    def op(values, weights):
        return torch.ops.memlayer.lookup(values, indices, weights)

    def reference(values, weights):
        return ops.reference_lookup(values, indices, weights)

    _, expected = torch.func.jvp(reference, (values, weights), tangents)
    _, actual = torch.func.jvp(op, (values, weights), tangents)
    torch.testing.assert_close(actual, expected)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(values, tangents[0])
        tangent = torch.autograd.forward_ad.unpack_dual(op(dual, weights)).tangent
    torch.testing.assert_close(tangent, reference(tangents[0], weights))


@pytest.mark.filterwarnings("error:There is a performance drop")  # no vmap loop fallback
def test_torch_func_transforms_match_autograd():
    values, indices, weights = float64_inputs()

    def loss(values, weights, indices=indices):
        return torch.ops.memlayer.lookup(values, indices, weights).square().sum()

    expected = torch.autograd.grad(loss(values, weights), (values, weights))
    actual = torch.func.grad(loss, argnums=(0, 1))(values.detach(), weights.detach())
    torch.testing.assert_close(actual, expected)
    # Per-sample gradients: vmap over tokens of grad w.r.t. the weights.
    per_token = torch.func.vmap(torch.func.grad(loss, argnums=1), in_dims=(None, 0, 0))(
        values.detach(), weights.detach().unsqueeze(1), indices.unsqueeze(1)
    )
    torch.testing.assert_close(per_token.squeeze(1), expected[1])


def _batch_of(tensor: torch.Tensor, batched: bool, size: int, seed: int) -> torch.Tensor:
    """``size`` different copies of ``tensor`` stacked on dim 1 (or ``tensor`` itself)."""
    if not batched:
        return tensor
    generator = torch.Generator().manual_seed(seed)
    if tensor.is_floating_point():
        copies = [tensor + torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)]
    else:
        copies = [torch.randint(0, 9, tensor.shape, generator=generator)]
    return torch.stack([tensor, *copies * (size - 1)], dim=1)


@pytest.mark.filterwarnings("error:There is a performance drop")  # a real batching rule
@pytest.mark.parametrize("batched", [(1, 1, 1), (0, 1, 1), (1, 0, 0), (1, 1, 0), (0, 0, 1)])
@pytest.mark.parametrize("op", ["lookup", "lookup_values_grad", "lookup_weights_grad"])
def test_vmap_of_each_op_equals_one_call_per_batch_element(op, batched):
    """Batched over dim 1, on any subset of the tensor arguments (the table included)."""
    values, indices, weights = (t.detach() for t in float64_inputs())
    grad_out = torch.randn(6, 4, dtype=torch.float64)
    function, tensors = {
        "lookup": (torch.ops.memlayer.lookup, (values, indices, weights)),
        "lookup_values_grad": (
            lambda g, i, w: lookup_values_grad(g, i, w, 9, True),
            (grad_out, indices, weights),
        ),
        "lookup_weights_grad": (lookup_weights_grad, (grad_out, values, indices)),
    }[op]
    args = [_batch_of(t, b, 3, seed) for seed, (t, b) in enumerate(zip(tensors, batched))]
    in_dims = tuple(1 if b else None for b in batched)
    actual = torch.func.vmap(function, in_dims=in_dims)(*args)
    expected = torch.stack(
        [function(*(a.select(1, k) if b else a for a, b in zip(args, batched))) for k in range(3)]
    )
    torch.testing.assert_close(actual, expected)


def test_vmap_over_tables_checks_indices_against_one_table():
    """A batch of tables is read as one tall table: row N of batch 0 would be row 0 of batch 1,
    so indices are checked against N first."""
    values, indices, weights = (t.detach() for t in float64_inputs())
    tables = torch.stack([values, values])
    bad = indices.clone()
    bad[0, 0] = values.shape[0]
    with pytest.raises(IndexError, match=r"lookup: indices must lie in \[0, 9\)"):
        torch.func.vmap(torch.ops.memlayer.lookup, in_dims=(0, None, None))(tables, bad, weights)


def test_every_lookup_op_is_twice_differentiable():
    values, indices, weights = float64_inputs()
    grad_out = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    cases = [
        (lambda v, w: torch.ops.memlayer.lookup(v, indices, w), (values, weights)),
        (lambda g, w: lookup_values_grad(g, indices, w, 9, True), (grad_out, weights)),
        (lambda g, v: lookup_weights_grad(g, v, indices), (grad_out, values)),
    ]
    for function, inputs in cases:
        assert torch.autograd.gradcheck(function, inputs, check_forward_ad=True)
        assert torch.autograd.gradgradcheck(function, inputs, check_fwd_over_rev=True)
