"""``torch.ops.memlayer.product_key_topk``: against a brute-force float64 search over all n * n
sums, with heavy ties, gradients (gradcheck and against autograd of the reference),
``torch.compile`` and bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from ops import product_key_topk, reference_product_key_topk
from ops.product_key import product_key_topk_backward

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@st.composite
def problems(draw):
    """(T, H, n, Kd, k) with T = 0, odd n, k == n and Kd == 2 all reachable."""
    num_subkeys = draw(st.integers(1, 9))
    return (
        draw(st.integers(0, 7)),
        draw(st.integers(1, 3)),
        num_subkeys,
        2 * draw(st.integers(1, 4)),
        draw(st.integers(1, num_subkeys)),
    )


def integer_inputs(problem, dtype, seed, high=2):
    """Integer-valued query and subkeys in [-high, high]: every sum is exact in every dtype
    (so the search is exact and comparable to the reference index for index) and ties abound."""
    num_tokens, num_heads, num_subkeys, key_dim, _ = problem
    generator = torch.Generator().manual_seed(seed)
    query = torch.randint(-high, high + 1, (num_tokens, num_heads, key_dim), generator=generator)
    subkeys = torch.randint(
        -high, high + 1, (num_heads, 2, num_subkeys, key_dim // 2), generator=generator
    )
    return query.to(dtype), subkeys.to(dtype)


def expected_score_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@given(problems(), st.sampled_from(DTYPES), st.integers(0, 2**31), st.integers(0, 2))
def test_matches_brute_force_with_ties(problem, dtype, seed, high):
    # high=0 makes every key equal: all n * n sums tie and the indices must be 0, 1, ..., k-1.
    k = problem[-1]
    query, subkeys = integer_inputs(problem, dtype, seed, high)
    scores, indices = product_key_topk(query, subkeys, k)
    expected_scores, expected_indices = reference_product_key_topk(query, subkeys, k)

    assert scores.dtype == expected_score_dtype(dtype) and indices.dtype == torch.int64
    assert scores.shape == indices.shape == (problem[0], problem[1], k)
    assert torch.equal(indices, expected_indices)
    assert torch.equal(scores.double(), expected_scores)


def test_all_equal_keys_give_the_smallest_indices():
    query = torch.ones(3, 2, 4)
    subkeys = torch.ones(2, 2, 6, 2)
    _, indices = product_key_topk(query, subkeys, 5)
    assert torch.equal(indices, torch.arange(5).expand(3, 2, 5))


@given(problems(), st.sampled_from([torch.float32, torch.float64]), st.integers(0, 2**31))
def test_matches_brute_force_with_random_floats(problem, dtype, seed):
    # Rounding may reorder near-equal sums, so compare scores, and check that every returned
    # index really has the returned score.
    num_tokens, num_heads, num_subkeys, key_dim, k = problem
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(num_tokens, num_heads, key_dim, generator=generator, dtype=dtype)
    subkeys = torch.randn(num_heads, 2, num_subkeys, key_dim // 2, generator=generator, dtype=dtype)
    scores, indices = product_key_topk(query, subkeys, k)

    expected_scores, _ = reference_product_key_topk(query, subkeys, k)
    sorted_scores, sorted_indices = reference_product_key_topk(query, subkeys, num_subkeys**2)
    score_of_index = torch.empty_like(sorted_scores).scatter_(-1, sorted_indices, sorted_scores)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(scores.double(), expected_scores, **tolerance)
    torch.testing.assert_close(score_of_index.gather(-1, indices), expected_scores, **tolerance)


@given(problems(), st.sampled_from(DTYPES), st.integers(0, 2**31))
def test_gradients_match_reference(problem, dtype, seed):
    query, subkeys = integer_inputs(problem, dtype, seed)
    k = problem[-1]
    grad_scores = torch.randint(
        -3, 4, (problem[0], problem[1], k), generator=torch.Generator().manual_seed(seed)
    )

    def gradients(search, query, subkeys):
        query, subkeys = query.clone().requires_grad_(), subkeys.clone().requires_grad_()
        scores, _ = search(query, subkeys, k)
        (scores * grad_scores.to(scores.dtype)).sum().backward()
        return query.grad, subkeys.grad

    grad_query, grad_subkeys = gradients(product_key_topk, query, subkeys)
    expected_query, expected_subkeys = gradients(
        reference_product_key_topk, query.double(), subkeys.double()
    )
    assert grad_query.dtype == grad_subkeys.dtype == dtype
    torch.testing.assert_close(grad_query, expected_query.to(dtype))
    torch.testing.assert_close(grad_subkeys, expected_subkeys.to(dtype))


def smallest_gap(values: torch.Tensor) -> float:
    return values.sort(dim=-1).values.diff(dim=-1).min().item()


@pytest.mark.parametrize(
    "num_tokens,num_heads,num_subkeys,key_dim,k", [(4, 2, 5, 6, 3), (3, 1, 3, 2, 3)]
)
def test_gradcheck(num_tokens, num_heads, num_subkeys, key_dim, k):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(num_tokens, num_heads, key_dim, dtype=torch.float64, generator=generator)
    subkeys = torch.randn(
        num_heads, 2, num_subkeys, key_dim // 2, dtype=torch.float64, generator=generator
    )
    # The search is piecewise constant: finite differences (eps=1e-6) must not cross a tie.
    sums, _ = reference_product_key_topk(query, subkeys, num_subkeys**2)
    half_scores = torch.einsum("thcd,hcnd->thcn", query.view(num_tokens, num_heads, 2, -1), subkeys)
    assert min(smallest_gap(sums), smallest_gap(half_scores)) > 1e-4

    torch.autograd.gradcheck(
        lambda query, subkeys: product_key_topk(query, subkeys, k)[0],
        (query.requires_grad_(), subkeys.requires_grad_()),
    )


def opcheck_samples():
    generator = torch.Generator().manual_seed(0)
    samples = [(5, torch.float32, 3), (0, torch.float32, 2), (4, torch.bfloat16, 5)]
    for num_tokens, dtype, k in samples:
        query = torch.randn(num_tokens, 2, 6, generator=generator).to(dtype)
        subkeys = torch.randn(2, 2, 5, 3, generator=generator).to(dtype)
        yield query.requires_grad_(), subkeys.requires_grad_(), k


@pytest.mark.parametrize("query,subkeys,k", list(opcheck_samples()))
def test_opcheck(query, subkeys, k):
    torch.library.opcheck(torch.ops.memlayer.product_key_topk.default, (query, subkeys, k))
    scores, indices = product_key_topk(query.detach(), subkeys.detach(), k)
    torch.library.opcheck(
        torch.ops.memlayer.product_key_topk_backward.default,
        (torch.randn_like(scores), query.detach(), subkeys.detach(), indices),
    )


def test_compiled_matches_eager():
    k = 3

    def loss(query, subkeys, grad_scores):
        scores, indices = product_key_topk(query, subkeys, k)
        return (scores * grad_scores).sum() + indices.sum()

    compiled_loss = torch.compile(loss, fullgraph=True, dynamic=True)
    generator = torch.Generator().manual_seed(0)
    subkeys = torch.randn(2, 2, 7, 4, generator=generator)
    for num_tokens in (5, 11):  # two token counts: one dynamic graph
        query = torch.randn(num_tokens, 2, 8, generator=generator)
        grad_scores = torch.randn(num_tokens, 2, k, generator=generator)
        results = []
        for function in (loss, compiled_loss):
            inputs = (query.clone().requires_grad_(), subkeys.clone().requires_grad_())
            value = function(*inputs, grad_scores)
            value.backward()
            results.append((value, inputs[0].grad, inputs[1].grad))
        torch.testing.assert_close(results[1], results[0])


def bad_inputs():
    query, subkeys = torch.zeros(3, 2, 6), torch.zeros(2, 2, 5, 3)
    yield query[0], subkeys, 2, ValueError, r"query must be 3-D \[T, H, Kd\], got shape \(2, 6\)"
    yield torch.zeros(3, 2, 5), subkeys, 2, ValueError, r"Kd .* must be even, got 5"
    yield (
        query,
        subkeys[0],
        2,
        ValueError,
        r"subkeys must be 4-D \[H, 2, n, Kd // 2\], got shape \(2, 5, 3\)",
    )
    yield query, torch.zeros(2, 2, 5, 4), 2, ValueError, r"\[2, 2, n, 3\] .* got \(2, 2, 5, 4\)"
    yield query, torch.zeros(3, 2, 5, 3), 2, ValueError, r"got \(3, 2, 5, 3\)"
    yield query, subkeys, 6, ValueError, r"k must lie in \[1, n\] = \[1, 5\] .* got k=6"
    yield query, subkeys, 0, ValueError, r"got k=0"
    yield query.long(), subkeys.long(), 2, TypeError, r"query must be float32, .* got torch.int64"
    yield query, subkeys.double(), 2, TypeError, r"query's dtype torch.float32, got torch.float64"


@pytest.mark.parametrize("device", ["cpu", "meta"])  # the real kernel, then the fake one
@pytest.mark.parametrize("query,subkeys,k,error,message", list(bad_inputs()))
def test_bad_input(device, query, subkeys, k, error, message):
    with pytest.raises(error, match=message):
        product_key_topk(query.to(device), subkeys.to(device), k)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_backward_bad_input(device):
    query, subkeys = torch.zeros(3, 2, 6, device=device), torch.zeros(2, 2, 5, 3, device=device)
    indices = torch.zeros(3, 2, 4, dtype=torch.int64, device=device)
    shapes = r"\[T, H\] = \[3, 2\] \(from query\), got \(3, 2, 3\) and \(3, 2, 4\)"
    with pytest.raises(ValueError, match=shapes):
        product_key_topk_backward(torch.zeros(3, 2, 3, device=device), query, subkeys, indices)
    grad_scores = torch.zeros(3, 2, 4, device=device)
    with pytest.raises(TypeError, match="indices must be int64, got torch.int32"):
        product_key_topk_backward(grad_scores, query, subkeys, indices.int())


def test_mismatched_devices():
    with (
        FakeTensorMode(),
        pytest.raises(ValueError, match="one device, got query on cuda:0, subkeys on cpu"),
    ):
        product_key_topk(torch.empty(3, 2, 6, device="cuda"), torch.empty(2, 2, 5, 3), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_paper_sizes(dtype):
    # The paper's search: 4 heads, n = 1024 (1M memory rows), Kd = 1024 (model dim 2048), k = 32.
    num_tokens, num_heads, num_subkeys, key_dim, k = 128, 4, 1024, 1024, 32
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(num_tokens, num_heads, key_dim, generator=generator).to(dtype)
    subkeys = torch.randn(num_heads, 2, num_subkeys, key_dim // 2, generator=generator).to(dtype)
    grad_scores = torch.randn(num_tokens, num_heads, k, generator=generator)

    def run(device):
        inputs = [query.to(device).requires_grad_(), subkeys.to(device).requires_grad_()]
        scores, indices = product_key_topk(*inputs, k)
        (scores * grad_scores.to(device)).sum().backward()
        return [t.cpu() for t in (scores, indices, inputs[0].grad, inputs[1].grad)]

    scores, indices, grad_query, grad_subkeys = run("cuda")
    cpu_scores, cpu_indices, _, _ = run("cpu")
    expected_scores, _ = reference_product_key_topk(query.cuda(), subkeys.cuda(), k)
    torch.testing.assert_close(scores.double(), expected_scores.cpu(), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(scores, cpu_scores, atol=1e-3, rtol=1e-4)
    # Where no near-tie lets rounding reorder the search, CUDA and CPU pick the same rows.
    assert (indices == cpu_indices).float().mean() > 0.99
    # The backward kernel on the same rows agrees with the CPU one, bitwise run to run.
    expected_grads = product_key_topk_backward(grad_scores, query, subkeys, indices)
    torch.testing.assert_close((grad_query, grad_subkeys), expected_grads)
    assert torch.equal(run("cuda")[3], grad_subkeys)


@pytest.mark.parametrize("bad_row", [-1, 25, 2**40])
def test_backward_rejects_rows_outside_the_memory(bad_row):
    query, subkeys = torch.randn(3, 2, 6), torch.randn(2, 2, 5, 3)
    _, indices = product_key_topk(query, subkeys, 4)
    indices[1, 0, 2] = bad_row
    with pytest.raises(IndexError, match=rf"indices must lie in \[0, 25\) .*found {bad_row}"):
        product_key_topk_backward(torch.randn(3, 2, 4), query, subkeys, indices)


def test_forward_ad_torch_func_and_double_backward():
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(5, 2, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    subkeys = torch.randn(2, 2, 4, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    _, indices = product_key_topk(query, subkeys, 3)
    grad_scores = torch.randn(5, 2, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    cases = [
        (lambda q, s: product_key_topk(q, s, 3)[0], (query, subkeys)),
        (
            lambda g, q, s: product_key_topk_backward(g, q, s, indices),
            (grad_scores, query, subkeys),
        ),
    ]
    for function, inputs in cases:
        assert torch.autograd.gradcheck(function, inputs, check_forward_ad=True)
        assert torch.autograd.gradgradcheck(function, inputs, check_fwd_over_rev=True)

    def loss(query, subkeys):
        return product_key_topk(query, subkeys, 3)[0].square().sum()

    expected = torch.autograd.grad(loss(query, subkeys), (query, subkeys))
    actual = torch.func.grad(loss, argnums=(0, 1))(query.detach(), subkeys.detach())
    torch.testing.assert_close(actual, expected)
