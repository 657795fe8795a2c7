"""PEER against a direct float64 evaluation of its formula (no custom ops).

The reference scores all n² experts of every head by brute force, keeps the top k, and sums
``softmax(scores)_i · gelu(u_i · x) · v_i``; its gradients come from plain autograd.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from memcompile.memory import ValueTable
from memcompile.peer import PEER, PEERConfig, init_expert_table_
from memcompile.sparse_optim import RowSparseOptimizer
from ops.row_sparse import GradRecorder

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_peer(p: dict[str, Tensor], x: Tensor, down: Tensor, up: Tensor, config: PEERConfig):
    heads, half = config.heads, config.key_dim // 2
    query = (x @ p["query.weight"].T + p["query.bias"]).view(-1, heads, 2, half)
    half_scores = torch.einsum("thcd,hcnd->thcn", query, p["keys"])
    all_scores = half_scores[:, :, 0, :, None] + half_scores[:, :, 1, None, :]  # [T, H, n, n]
    scores, experts = all_scores.flatten(-2).topk(config.topk, dim=-1)  # flat i1 * n + i2
    gates = scores.softmax(dim=-1)
    hidden = F.gelu(torch.einsum("td,thkd->thk", x, down[experts]))
    return torch.einsum("thk,thkv->tv", gates * hidden, up[experts])


@pytest.mark.parametrize(
    "dim, num_experts, heads, topk, leading, seed",
    [
        (4, 9, 1, 1, (5,), 0),
        (12, 16, 2, 3, (2, 3), 1),
        (8, 25, 4, 5, (1, 7), 2),
        (4, 16, 3, 2, (0,), 3),  # no tokens
    ],
)
def test_layer_matches_float64_formula_with_gradients(dim, num_experts, heads, topk, leading, seed):
    torch.manual_seed(seed)
    config = PEERConfig(num_experts=num_experts, layers=(0,), heads=heads, topk=topk)
    layer = PEER(dim, config).double()
    with torch.no_grad():
        for param in layer.parameters():  # random biases too, not just the init
            param.normal_()
    x = torch.randn(*leading, dim, dtype=torch.float64, requires_grad=True)
    table = torch.randn(2 * num_experts, dim, dtype=torch.float64, requires_grad=True)

    out = layer(x, table)  # down rows [0, N), up rows [N, 2N)
    assert out.shape == (*leading, dim)
    cotangent = torch.randn_like(out)
    inputs = [x, table, *layer.parameters()]
    grads = torch.autograd.grad((out * cotangent).sum(), inputs, allow_unused=True)

    ref_params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    ref_inputs = [t.detach().clone().requires_grad_() for t in (x, table)]
    ref_config = config.for_model_dim(dim)
    down, up = ref_inputs[1].split(num_experts)
    ref_out = reference_peer(ref_params, ref_inputs[0].reshape(-1, dim), down, up, ref_config)
    ref_grads = torch.autograd.grad(
        (ref_out.view_as(out) * cotangent).sum(),
        [*ref_inputs, *ref_params.values()],
        allow_unused=True,
    )

    torch.testing.assert_close(out, ref_out.view_as(out), rtol=1e-10, atol=1e-10)
    names = ["x", "table", *ref_params]
    for name, grad, ref_grad in zip(names, grads, ref_grads, strict=True):
        if ref_grad is None:  # no tokens: nothing reaches the parameters
            ref_grad = torch.zeros_like(grad) if grad is not None else None
        if grad is None:
            grad = None if ref_grad is None else torch.zeros_like(ref_grad)
        torch.testing.assert_close(
            grad, ref_grad, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_gradients_float64_gradcheck():
    torch.manual_seed(4)
    config = PEERConfig(num_experts=16, layers=(0,), heads=2, topk=3)
    layer = PEER(4, config).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    table = torch.randn(32, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x, table))
    assert torch.autograd.gradgradcheck(layer, (x, table))


def test_compiled_fullgraph_matches_eager():
    torch.manual_seed(5)
    config = PEERConfig(num_experts=64, layers=(0,), heads=2, topk=4)
    layer = PEER(16, config)
    table = init_expert_table_(torch.empty(128, 16), config).requires_grad_()
    x = torch.randn(2, 9, 16)
    inputs = [table, *layer.parameters()]

    eager = layer(x, table)
    eager_grads = torch.autograd.grad(eager.square().sum(), inputs)
    compiled = torch.compile(layer, fullgraph=True)(x, table)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), inputs)
    torch.testing.assert_close(compiled, eager)
    for grad, eager_grad in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-5)


def test_init_scales():
    config = PEERConfig(num_experts=1024, layers=(0,), heads=4, topk=8)
    down, up = init_expert_table_(torch.empty(2048, 256), config).split(1024)
    assert abs(down.std().item() - 256**-0.5) < 0.05 * 256**-0.5
    assert abs(up.std().item() - 32**-0.5) < 0.05 * 32**-0.5


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_experts": 10}, r"peer.num_experts must be a positive perfect square"),
        ({"layers": ()}, r"peer.layers must name at least one block"),
        ({"layers": (2, 2)}, r"peer.layers must be distinct"),
        ({"heads": 0}, r"peer.heads must be >= 1"),
        ({"topk": 0}, r"peer.topk must be >= 1"),
        ({"topk": 5}, r"peer.topk \(5\) must be <= n_keys = sqrt\(num_experts\) = 4"),
    ],
)
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PEERConfig(**{"num_experts": 16, "layers": (0,), **kwargs})


def test_odd_key_dim_is_rejected():
    with pytest.raises(ValueError, match=r"peer.key_dim must be even and >= 2"):
        PEER(6, PEERConfig(num_experts=16, layers=(0,), topk=2, key_dim=3))


def test_bad_inputs_are_rejected():
    config = PEERConfig(num_experts=16, layers=(0,), heads=2, topk=2)
    layer = PEER(4, config)
    x, table = torch.randn(3, 4), torch.randn(32, 4)
    with pytest.raises(ValueError, match=r"PEER: x must be \[\.\.\., dim\] with dim = 4"):
        layer(torch.randn(3, 5), table)
    with pytest.raises(ValueError, match=r"PEER: table must have shape \(32, 4\)"):
        layer(x, table[:16])
    with pytest.raises(ValueError, match=r"PEER: table must have shape \(32, 4\)"):
        layer(x, torch.randn(32, 6))
    with pytest.raises(ValueError, match=r"PEER: table must have shape \(32, 4\)"):
        layer(x, table[0])


class _TwoPEERLayers(torch.nn.Module):
    """What a model does: two PEER layers reading one table it owns as ``memory_values``,
    passed through a ``ValueTable`` sharing the layers' recorder."""

    def __init__(self, dim: int, config: PEERConfig) -> None:
        super().__init__()
        table = init_expert_table_(torch.empty(2 * config.num_experts, dim), config)
        self.memory_values = torch.nn.Parameter(table)
        recorder = GradRecorder()
        self.memory_table = ValueTable(recorder)
        self.layers = torch.nn.ModuleList(PEER(dim, config, recorder) for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        table = self.memory_table(self.memory_values)
        for layer in self.layers:
            x = x + layer(x, table)
        return x


def test_row_sparse_optimizer_trains_both_halves_of_the_table_as_dense_sgd():
    """The down rows (recording dot) and the up rows (recording lookup) both train row-sparsely:
    one step equals dense SGD, and rows no token read stay as they were."""
    torch.manual_seed(6)
    config = PEERConfig(num_experts=64, layers=(0,), heads=2, topk=2)
    sparse_model = _TwoPEERLayers(8, config)
    dense_model = copy.deepcopy(sparse_model)
    before = sparse_model.memory_values.detach().clone()
    x = torch.randn(2, 3, 8)
    optimizer = RowSparseOptimizer(sparse_model, "sgd", lr=0.5)
    sparse_model(x).square().sum().backward()
    optimizer.step()
    dense_model(x).square().sum().backward()
    with torch.no_grad():
        dense_model.memory_values -= 0.5 * dense_model.memory_values.grad
    torch.testing.assert_close(sparse_model.memory_values, dense_model.memory_values)
    changed = (sparse_model.memory_values != before).any(dim=1)
    assert changed[:64].any() and changed[64:].any()  # down and up rows both trained
    assert not changed.all()  # ... and only the rows read
