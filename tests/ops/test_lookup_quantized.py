"""memlayer::lookup_quantized: against dequantize-then-lookup in float64 (the C++ CPU kernel, and
the Triton kernel under ``TRITON_INTERPRET=1`` or on a GPU), opcheck, compile, torchao
quantization, the refusal to train, bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ops
from ops.lookup_quantized import (
    TRAINING_ERROR,
    dequantize_rows,
    lookup_quantized,
    quantize_rows,
    reference_lookup_quantized,
)

QUANTIZED = [torch.int8, torch.float8_e4m3fn]
# The Triton kernel runs on the GPU where there is one, else in the interpreter on CPU tensors.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Error bound per element relative to the same sum over magnitudes (sum |w| |scale| |q|): fp32
# accumulation of up to ~100 terms, then one rounding to the output dtype.
RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float64: 1e-5}


@st.composite
def quantized_cases(draw):
    """Tiny random problems: odd D, empty batches, duplicated rows, both index dtypes."""
    num_rows = draw(st.integers(1, 64))
    dim = draw(st.sampled_from([1, 3, 7, 16, 33, 100]))
    num_tokens = draw(st.integers(0, 16))
    bag_size = draw(st.integers(0, 8))
    rows_dtype = draw(st.sampled_from(QUANTIZED))
    scale_dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    index_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    out_dtype = draw(st.sampled_from([None, torch.bfloat16]))
    rows_used = draw(st.sampled_from(["all", "one", "few"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    rows, scale = quantize_rows(torch.randn(num_rows, dim, generator=gen), rows_dtype)
    pool = torch.randint(0, num_rows, (num_rows,), generator=gen)
    pool = {"all": pool, "one": pool[:1], "few": pool[:3]}[rows_used]
    indices = pool[torch.randint(0, len(pool), (num_tokens, bag_size), generator=gen)]
    weights = torch.randn(num_tokens, bag_size, generator=gen)
    return rows, scale.to(scale_dtype), indices.to(index_dtype), weights, out_dtype


def assert_matches_reference(out, rows, scale, indices, weights, out_dtype):
    expected = reference_lookup_quantized(rows, scale, indices, weights)
    magnitude = reference_lookup_quantized(
        rows.float().abs().to(rows.dtype), scale.abs(), indices, weights.abs()
    )
    dtype = out_dtype or weights.dtype
    assert out.dtype == dtype and out.shape == expected.shape
    error = (out.double() - expected).abs()
    assert torch.all(error <= RELATIVE_TOLERANCE[dtype] * magnitude), error.max()


@given(quantized_cases())
def test_cpu_kernel_matches_dequantize_then_lookup(case):
    rows, scale, indices, weights, out_dtype = case
    out = lookup_quantized(rows, scale, indices, weights, out_dtype)
    assert_matches_reference(out, rows, scale, indices, weights, out_dtype)


@settings(max_examples=12)  # ~13 ms per program in the interpreter
@given(quantized_cases())
def test_triton_kernel_matches_dequantize_then_lookup(case):
    pytest.importorskip("triton", reason="the Triton kernel needs triton (Linux)")
    from ops import lookup_quantized_triton

    rows, scale, indices, weights, out_dtype = case
    args = [t.to(TRITON_DEVICE) for t in (rows, scale, indices, weights)]
    out = lookup_quantized_triton.lookup_forward(*args, out_dtype or weights.dtype)
    assert_matches_reference(out.cpu(), rows, scale, indices, weights, out_dtype)


def test_triton_kernel_masks_out_of_range_rows():
    """On CUDA index ranges are checked only in debug mode: the kernel itself never reads an
    index outside [0, N) (NaN rows around the table would poison the sum) and adds nothing."""
    pytest.importorskip("triton", reason="the Triton kernel needs triton (Linux)")
    from ops import lookup_quantized_triton

    rows, scale = quantize_rows(torch.randn(8, 5), torch.float8_e4m3fn)
    padded = torch.full((24, 5), float("nan")).to(torch.float8_e4m3fn)
    padded[8:16] = rows
    padded_scale = torch.full((24,), float("nan"))
    padded_scale[8:16] = scale
    indices = torch.tensor([[0, -1, 7, 8], [-8, 3, 15, 2]])
    weights = torch.rand(2, 4)
    args = [t.to(TRITON_DEVICE) for t in (padded, padded_scale, indices, weights)]
    padded, padded_scale, indices_on_device, weights_on_device = args
    out = lookup_quantized_triton.lookup_forward(
        padded[8:16], padded_scale[8:16], indices_on_device, weights_on_device, torch.float32
    ).cpu()
    in_range = (indices >= 0) & (indices < 8)
    expected = reference_lookup_quantized(
        rows, scale, torch.where(in_range, indices, 0), weights * in_range
    )
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", ["cpu", "triton"])
def test_every_fp8_and_int8_byte_decodes_as_torch_does(kernel):
    """Each of the 256 bytes of a row, read alone with weight and scale 1, is torch's value of
    it (fp8: subnormals, both zeros, NaN), so no element is decoded wrong by either kernel."""
    if kernel == "triton":
        pytest.importorskip("triton", reason="the Triton kernel needs triton (Linux)")
        from ops.lookup_quantized_triton import lookup_forward as read
    else:
        from ops.lookup_quantized_cpu import lookup_forward as read
    every_byte = torch.arange(256, dtype=torch.uint8).view(1, 256)
    for rows in (every_byte.view(torch.int8), every_byte.view(torch.float8_e4m3fn)):
        indices, weights = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
        device = TRITON_DEVICE if kernel == "triton" else "cpu"
        args = [t.to(device) for t in (rows, torch.ones(1), indices, weights)]
        out, expected = read(*args, torch.float32).cpu(), rows.float()
        if kernel == "triton" and not torch.cuda.is_available():
            # The interpreter decodes fp8's NaN bytes (0x7f, 0xff) as numbers, the GPU does not;
            # quantize_rows never writes them.
            out, expected = out[expected.isfinite()], expected[expected.isfinite()]
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("rows_dtype", QUANTIZED, ids=str)
def test_opcheck(rows_dtype):
    rows, scale = quantize_rows(torch.randn(40, 9), rows_dtype)
    indices = torch.randint(0, 40, (6, 5))
    weights = torch.rand(6, 5)
    # opcheck's schema test compares inputs with arithmetic that CPU fp8 lacks ("mul not
    # implemented for Float8_e4m3fn"): a gap of the checker, so fp8 runs the other three.
    tests = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if rows_dtype == torch.int8:
        tests += ("test_schema",)
    for args in [
        (rows, scale, indices, weights),
        (rows, scale.bfloat16(), indices.int(), weights, torch.bfloat16),
    ]:
        torch.library.opcheck(lookup_quantized.default, args, test_utils=tests)


def test_compiled_matches_eager_fullgraph_dynamic():
    rows, scale = quantize_rows(torch.randn(40, 6), torch.int8)

    def read(indices, weights):
        return lookup_quantized(rows, scale, indices, weights, torch.float32).square().sum(-1)

    compiled = torch.compile(read, fullgraph=True, dynamic=True)
    for num_tokens in (5, 11):
        indices = torch.randint(0, 40, (num_tokens, 4))
        weights = torch.rand(num_tokens, 4)
        torch.testing.assert_close(compiled(indices, weights), read(indices, weights))


def test_meta_device_reads_no_data():
    rows = torch.empty(1 << 20, 2048, device="meta", dtype=torch.int8)
    scale = torch.empty(1 << 20, device="meta")
    indices = torch.empty(4096, 128, device="meta", dtype=torch.int64)
    weights = torch.empty(4096, 128, device="meta", dtype=torch.bfloat16)
    out = lookup_quantized(rows, scale, indices, weights)
    assert out.shape == (4096, 2048) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("rows_dtype", QUANTIZED, ids=str)
def test_quantize_rows_is_torchao_per_row_symmetric(rows_dtype):
    values = torch.randn(30, 17) * torch.logspace(-3, 3, 30)[:, None]  # rows of every scale
    values[4] = 0  # an all-zero row: zero rows, no NaN
    rows, scale = quantize_rows(values, rows_dtype)
    assert rows.dtype == rows_dtype and scale.shape == (30,) and scale.dtype == torch.float32
    dequantized = dequantize_rows(rows, scale)
    assert torch.equal(dequantized[4], torch.zeros(17, dtype=torch.float64))
    peak = values.abs().amax(dim=1)
    top = 127 if rows_dtype == torch.int8 else 448  # the row's largest magnitude maps there
    torch.testing.assert_close(scale[peak > 0], peak[peak > 0] / top)
    # int8: half a step per element; fp8 e4m3: 3 mantissa bits, half an ulp (2^-4) relative,
    # or half of the smallest subnormal step (2^-10 of the scale)
    error = (dequantized - values.double()).abs()
    if rows_dtype == torch.int8:
        bound = scale.double()[:, None] / 2 * (1 + 1e-6)
    else:
        bound = values.double().abs() * 2**-4 + scale.double()[:, None] * 2**-10
    assert torch.all(error <= bound)


def test_training_through_a_quantized_table_is_refused():
    rows, scale = quantize_rows(torch.randn(10, 4), torch.int8)
    weights = torch.rand(3, 2, requires_grad=True)
    out = lookup_quantized(rows, scale, torch.randint(0, 10, (3, 2)), weights)
    with pytest.raises(RuntimeError, match="train in full precision, quantize at export"):
        out.sum().backward()
    assert TRAINING_ERROR.startswith("lookup_quantized: quantized tables are for inference")


def _args(**changes):
    rows, scale = quantize_rows(torch.randn(4, 3), torch.int8)
    args = dict(
        rows=rows,
        scale=scale,
        indices=torch.zeros(2, 2, dtype=torch.long),
        weights=torch.ones(2, 2),
    )
    return {**args, **changes}


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"rows": torch.randn(4, 3)}, TypeError, "rows must be int8 or float8_e4m3fn"),
        ({"scale": torch.ones(5)}, ValueError, r"scale must have shape \(4,\) \(one scale per"),
        ({"scale": torch.ones(4, dtype=torch.int32)}, TypeError, "scale must be float32"),
        ({"indices": torch.full((2, 2), 4)}, IndexError, r"indices must lie in \[0, 4\)"),
        ({"weights": torch.ones(2, 3)}, ValueError, "weights must have shape"),
        ({"out_dtype": torch.int32}, TypeError, "out_dtype must be float32"),
    ],
)
def test_bad_input_raises_clear_error(changes, error, match):
    args = _args(**changes)
    with pytest.raises(error, match=f"lookup_quantized: {match}"):
        lookup_quantized(
            args["rows"], args["scale"], args["indices"], args["weights"], args.get("out_dtype")
        )


def test_registered_with_the_package():
    assert ops.lookup_quantized is lookup_quantized
