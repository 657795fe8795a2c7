"""The memory layers against a plain float64 PyTorch implementation (no custom ops).

The reference scores all n² product keys of every head by brute force, keeps the top k, and sums
the softmax-weighted value rows; its gradients come from plain autograd.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from memcompile.config import MemoryConfig, MemoryKind
from memcompile.memory import MemoryPlus, ProductKeyMemory, build_memory_layer
from memcompile.telemetry import MemoryUsage

NORM_EPS = 1e-5


def _rms_norm(x: Tensor, gain: Tensor) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS) * gain


def reference_read(p: dict[str, Tensor], x: Tensor, values: Tensor, memory: MemoryConfig):
    """float64 product-key read; returns the output [T, value_dim] and the row indices [T, H, k]."""
    heads, half = memory.heads, memory.key_dim // 2
    query = (x @ p["query.weight"].T + p["query.bias"]).view(-1, heads, 2, half)
    keys = p["keys"]  # [heads, 2, n, half]
    if memory.qk_norm:
        query = _rms_norm(query, p["query_norm.weight"]) / math.sqrt(half)
        keys = _rms_norm(keys, p["key_norm.weight"])
    half_scores = torch.einsum("thcd,hcnd->thcn", query, keys)
    all_scores = half_scores[:, :, 0, :, None] + half_scores[:, :, 1, None, :]  # [T, H, n, n]
    scores, indices = all_scores.flatten(-2).topk(memory.topk, dim=-1)  # flat index i1 * n + i2
    weights = scores.softmax(dim=-1)
    out = torch.einsum("thk,thkv->tv", weights, values[indices])
    return out, indices


def reference_layer(p: dict[str, Tensor], x: Tensor, values: Tensor, memory: MemoryConfig):
    if memory.kind is MemoryKind.MEMORY:
        return reference_read(p, x, values, memory)[0]
    read_params = {name.removeprefix("memory."): t for name, t in p.items()}
    read = reference_read(read_params, x, values, memory)[0]
    gate = F.silu(F.linear(x, p["w1.weight"], p["w1.bias"]))
    return F.linear(read * gate, p["w2.weight"], p["w2.bias"])


@st.composite
def memory_cases(draw):
    n_keys = draw(st.integers(1, 7))
    kind = draw(st.sampled_from(MemoryKind))
    dim = draw(st.integers(1, 7))
    memory = MemoryConfig(
        num_values=n_keys**2,
        layers=(0,),
        kind=kind,
        heads=draw(st.integers(1, 3)),
        topk=draw(st.integers(1, n_keys)),
        key_dim=2 * draw(st.integers(1, 4)),
        value_dim=dim if kind is MemoryKind.MEMORY else draw(st.integers(1, 6)),
        qk_norm=draw(st.booleans()),
    )
    num_tokens = draw(st.integers(0, 9))
    # Repeated tokens read the same rows: colliding indices in the value gradient.
    distinct = draw(st.integers(1, max(num_tokens, 1)))
    leading = draw(st.sampled_from([(num_tokens,), (1, num_tokens)]))
    return dim, memory, num_tokens, distinct, leading, draw(st.integers(0, 2**16))


@given(memory_cases())
def test_layer_matches_float64_reference_with_gradients(case):
    dim, memory, num_tokens, distinct, leading, seed = case
    torch.manual_seed(seed)
    layer = build_memory_layer(dim, memory, NORM_EPS).double()
    with torch.no_grad():
        for param in layer.parameters():  # random biases and norm gains too, not just the init
            param.normal_()
    x = torch.randn(distinct, dim, dtype=torch.float64)[torch.arange(num_tokens) % distinct]
    x = x.view(*leading, dim).requires_grad_()
    values = torch.randn(memory.num_values, memory.value_dim, dtype=torch.float64)
    values.requires_grad_()

    out = layer(x, values)
    expected_dim = dim if memory.kind is MemoryKind.MEMORY_PLUS else memory.value_dim
    assert out.shape == (*leading, expected_dim)
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad((out * cotangent).sum(), [x, values, *layer.parameters()])

    ref_params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    ref_x = x.detach().clone().requires_grad_()
    ref_values = values.detach().clone().requires_grad_()
    ref_out = reference_layer(ref_params, ref_x.reshape(-1, dim), ref_values, memory)
    ref_grads = torch.autograd.grad(
        (ref_out.view_as(out) * cotangent).sum(), [ref_x, ref_values, *ref_params.values()]
    )

    torch.testing.assert_close(out, ref_out.view_as(out), rtol=1e-10, atol=1e-10)
    names = ["x", "values", *ref_params]
    for name, grad, ref_grad in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(
            grad, ref_grad, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_telemetry_counts_every_row_read():
    memory = MemoryConfig(num_values=25, layers=(0,), heads=3, topk=4, key_dim=6, telemetry=True)
    layer = ProductKeyMemory(8, memory).double()
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    values = torch.randn(25, 8, dtype=torch.float64)
    layer(x, values)
    layer(x[:, :3], values)  # counts accumulate over calls

    params = dict(layer.named_parameters())
    _, first = reference_read(params, x.view(-1, 8), values, memory)
    _, second = reference_read(params, x[:, :3].reshape(-1, 8), values, memory)
    expected = torch.bincount(torch.cat([first.flatten(), second.flatten()]), minlength=25)
    assert torch.equal(layer.usage.counts, expected)
    assert layer.usage.counts.sum() == (22 + 6) * 3 * 4


@pytest.mark.parametrize(
    ("counts", "fraction", "normalized_entropy"),
    [
        ([2, 2, 0, 0], 0.5, 0.5),
        ([3, 3, 3, 3], 1.0, 1.0),
        ([5, 0, 0, 0], 0.25, 0.0),
        ([0, 0], 0.0, 0.0),
    ],
)
def test_memory_usage_statistics(counts, fraction, normalized_entropy):
    usage = MemoryUsage.from_counts(torch.tensor(counts))
    assert usage.reads == sum(counts)
    assert usage.fraction_used == pytest.approx(fraction)
    assert usage.normalized_entropy == pytest.approx(normalized_entropy)
    assert usage.entropy == pytest.approx(normalized_entropy * math.log(len(counts)))


def test_wrong_value_table_shape_is_rejected():
    memory = MemoryConfig(num_values=16, layers=(0,), heads=2, topk=2, key_dim=4, value_dim=6)
    layer = MemoryPlus(8, memory)
    with pytest.raises(ValueError, match=r"values must have shape \(16, 6\), got \(16, 8\)"):
        layer(torch.randn(3, 8), torch.randn(16, 8))


@torch.no_grad()
def test_init_follows_the_reference_code():
    dim, memory = 256, MemoryConfig(num_values=64**2, layers=(0,), key_dim=128, value_dim=256)
    torch.manual_seed(0)
    layer = MemoryPlus(dim, memory)
    read = layer.memory
    bound = 1 / math.sqrt(memory.key_dim)
    assert read.keys.abs().max() <= bound
    assert float(read.keys.std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)  # uniform
    xavier_bound = math.sqrt(6 / (dim + memory.heads * memory.key_dim))
    assert read.query.weight.abs().max() <= xavier_bound
    for linear in (layer.w1, layer.w2):
        assert float(linear.weight.std()) == pytest.approx(dim**-0.5, rel=0.02)
    for bias in (read.query.bias, layer.w1.bias, layer.w2.bias):
        assert torch.count_nonzero(bias) == 0
