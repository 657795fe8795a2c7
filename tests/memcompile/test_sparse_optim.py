"""RowSparseOptimizer on CPU: against dense training of the same table (gradient norm, SGD,
clipping, AdamW), gradient accumulation, torch.compile, checkpoints and bad arguments."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memcompile.memory import ValueLookup
from memcompile.model import Transformer
from memcompile.sparse_optim import RowSparseOptimizer
from tests.memcompile.test_model import debug_config


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(debug_config()).to(dtype)


def batch(seed: int, num_sequences: int = 2, seq_len: int = 9) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    vocab_size = debug_config().vocab_size
    return torch.randint(0, vocab_size, (num_sequences, seq_len), generator=generator)


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token loss summed over tokens: micro-batches add up to their whole batch."""
    logits = model(tokens[:, :-1]).float()
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")


def train_step(model: nn.Module, optimizer: RowSparseOptimizer, tokens: torch.Tensor) -> None:
    loss_of(model, tokens).backward()
    optimizer.step()
    optimizer.zero_grad()


def sparse_and_dense(
    rule: str = "sgd", **hyper
) -> tuple[Transformer, RowSparseOptimizer, nn.Module]:
    """A model with a row-sparse optimizer, and a copy of it (made first) trained densely."""
    model = tiny_model()
    dense = copy.deepcopy(model)
    return model, RowSparseOptimizer(model, rule, **hyper), dense


def untouched_rows(optimizer: RowSparseOptimizer) -> torch.Tensor:
    mask = torch.ones(optimizer.table.shape[0], dtype=torch.bool)
    mask[optimizer.log.row_groups().rows] = False
    return mask


# --------------------------------------------------------------------------- against dense


def test_grad_norm_equals_the_dense_gradients_norm():
    model, optimizer, dense = sparse_and_dense()
    tokens = batch(0)
    loss_of(model, tokens).backward()
    loss_of(dense, tokens).backward()

    assert model.memory_values.grad is None and not model.memory_values.requires_grad
    dense_norm = dense.memory_values.grad.norm()
    torch.testing.assert_close(optimizer.grad_norm(), dense_norm, rtol=1e-5, atol=0)
    # The other parameters train as before: the recording lookup still differentiates the
    # weights (scores, queries).
    for (name, param), dense_param in zip(model.named_parameters(), dense.parameters()):
        if name != "memory_values":
            torch.testing.assert_close(param.grad, dense_param.grad, msg=name)


def test_sgd_step_and_clipping_equal_dense_sgd_on_the_table():
    """One step equals torch.optim.SGD on the dense gradient; clip_grad_norm_ scales it as
    torch.nn.utils.clip_grad_norm_ does (for that step only), whether it clips or not."""
    model, optimizer, dense = sparse_and_dense("sgd", lr=0.5)
    dense_optimizer = torch.optim.SGD([dense.memory_values], lr=0.5)
    tokens = batch(1)
    loss_of(model, tokens).backward()
    loss_of(dense, tokens).backward()
    untouched = untouched_rows(optimizer)
    assert untouched.any() and not untouched.all()
    before, dense_grad = model.memory_values.detach().clone(), dense.memory_values.grad.clone()

    for max_norm in (None, 0.05, 1e3, None):  # the last: no scale left over from clipping
        with torch.no_grad():  # the same gradients, from the same table, every time
            model.memory_values.copy_(before)
            dense.memory_values.copy_(before)
            dense.memory_values.grad.copy_(dense_grad)
        if max_norm is not None:
            norm = optimizer.clip_grad_norm_(max_norm)
            dense_norm = torch.nn.utils.clip_grad_norm_([dense.memory_values], max_norm)
            torch.testing.assert_close(norm, dense_norm, rtol=1e-5, atol=0)
            assert (dense_norm > max_norm) == (max_norm < 1)  # clipped, or not
        optimizer.step()
        dense_optimizer.step()
        torch.testing.assert_close(model.memory_values, dense.memory_values, rtol=1e-6, atol=1e-7)
        assert torch.equal(model.memory_values[untouched], before[untouched])


class Reader(nn.Module):
    """The smallest model RowSparseOptimizer trains: a ``memory_values`` table read through a
    ``ValueLookup`` with learned weights."""

    def __init__(self, num_rows: int = 50, dim: int = 7, bag_size: int = 4) -> None:
        super().__init__()
        self.memory_values = nn.Parameter(torch.randn(num_rows, dim))
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, bag_size))
        self.read = ValueLookup()

    def forward(self, indices: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.read(self.memory_values, indices, logits * self.gate)


def reader_batch(seed: int, num_tokens: int = 12, num_rows: int = 50, bag_size: int = 4):
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, num_rows, (num_tokens, bag_size), generator=generator)
    logits = torch.randn(num_tokens, bag_size, generator=generator)
    target = torch.randn(num_tokens, 7, generator=generator)
    return indices, logits, target


def reader_loss(model, indices, logits, target):
    return (model(indices, logits) - target).square().sum()


def test_adam_equals_adamw_when_every_row_is_touched():
    """Lazy Adam differs from AdamW only on rows a step does not touch."""
    torch.manual_seed(0)
    model = Reader()
    dense = copy.deepcopy(model)
    optimizer = RowSparseOptimizer(model, "adam", lr=0.01, weight_decay=0.1)
    dense_optimizer = torch.optim.AdamW([dense.memory_values], lr=0.01, weight_decay=0.1)
    for seed in range(3):
        indices, logits, target = reader_batch(seed, num_tokens=60)
        indices[:50, 0] = torch.arange(50)  # every row
        reader_loss(model, indices, logits, target).backward()
        reader_loss(dense, indices, logits, target).backward()
        optimizer.step()
        dense_optimizer.step()
        optimizer.zero_grad()
        dense_optimizer.zero_grad()
    # 1 - beta2 = 0.001 in fp32 arithmetic is 1.3e-5 (relative) off: far below 1e-3 of a step.
    torch.testing.assert_close(model.memory_values, dense.memory_values, rtol=0, atol=3e-5)
    state = optimizer.state[model.memory_values]
    dense_state = dense_optimizer.state[dense.memory_values]
    assert int(state["step"]) == int(dense_state["step"]) == 3
    torch.testing.assert_close(state["exp_avg"], dense_state["exp_avg"], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- accumulation


def test_gradient_accumulation_equals_one_batch():
    """Two micro-batches recorded into one step equal one batch holding both (the losses are
    sums over tokens, so the micro-batch gradients add up to the batch's)."""
    tokens = batch(4, num_sequences=4)
    micro, whole = tiny_model(), tiny_model()
    micro_optimizer = RowSparseOptimizer(micro, "rowwise_adagrad", lr=0.1)
    whole_optimizer = RowSparseOptimizer(whole, "rowwise_adagrad", lr=0.1)
    loss_of(micro, tokens[:2]).backward()
    loss_of(micro, tokens[2:]).backward()
    loss_of(whole, tokens).backward()

    assert len(micro_optimizer.log) == len(whole_optimizer.log) > 0
    norms = micro_optimizer.grad_norm(), whole_optimizer.grad_norm()
    torch.testing.assert_close(*norms, rtol=1e-5, atol=0)
    micro_optimizer.step()
    whole_optimizer.step()
    torch.testing.assert_close(micro.memory_values, whole.memory_values, rtol=1e-5, atol=1e-6)
    sums = [o.state[o.table]["sum"] for o in (micro_optimizer, whole_optimizer)]
    torch.testing.assert_close(*sums, rtol=1e-4, atol=1e-9)


def test_a_gradient_norm_read_between_micro_batches_does_not_freeze_the_gradient():
    """Reading the norm (say, to log it) after one micro-batch must not make the step forget
    the next: as with dense gradients, all that was recorded since zero_grad counts."""
    torch.manual_seed(0)
    model = Reader()
    dense = copy.deepcopy(model)
    optimizer = RowSparseOptimizer(model, "sgd", lr=0.5)
    dense_optimizer = torch.optim.SGD([dense.memory_values], lr=0.5)
    for seed in range(2):
        for m in (model, dense):
            reader_loss(m, *reader_batch(seed)).backward()
        dense_norm = dense.memory_values.grad.norm()
        torch.testing.assert_close(optimizer.grad_norm(), dense_norm, rtol=1e-5, atol=0)
    optimizer.step()
    dense_optimizer.step()
    torch.testing.assert_close(model.memory_values, dense.memory_values, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend, rule", [("aot_eager", "rowwise_adagrad"), ("inductor", "adam")])
def test_compiled_model_trains_the_table_like_eager(backend, rule, monkeypatch):
    """Compiled with fullgraph=True, the backward still records every step (the graph is
    reused); the tiny Reader keeps inductor's CPU compile to seconds."""
    # Inductor's caches would not notice an edited Python backward of a custom op.
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    monkeypatch.setenv("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Reader()
    compiled_model = copy.deepcopy(eager)
    optimizers = [RowSparseOptimizer(m, rule, lr=0.05) for m in (eager, compiled_model)]
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    for seed in range(3):
        indices, logits, target = reader_batch(seed)
        for model, optimizer in zip((eager, compiled), optimizers):
            reader_loss(model, indices, logits, target).backward()
            assert len(optimizer.log) == int(optimizer.log.recorded_tokens) == 12
        torch.testing.assert_close(compiled_model.gate.grad, eager.gate.grad)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        eager.gate.grad = compiled_model.gate.grad = None
        torch.testing.assert_close(
            compiled_model.memory_values, eager.memory_values, rtol=1e-5, atol=1e-6
        )


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("rule", ["rowwise_adagrad", "adam"])
def test_state_dict_round_trip_resumes_exactly(rule):
    model = tiny_model()
    optimizer = RowSparseOptimizer(model, rule, lr=0.05, weight_decay=0.01)
    train_step(model, optimizer, batch(6))
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())

    resumed = tiny_model(seed=1)  # other weights, other hyperparameters: all replaced
    resumed_optimizer = RowSparseOptimizer(resumed, rule, lr=1.0)
    resumed.load_state_dict(saved_model)
    resumed_optimizer.load_state_dict(saved_optimizer)
    assert resumed_optimizer.param_groups[0]["lr"] == 0.05
    train_step(model, optimizer, batch(7))
    train_step(resumed, resumed_optimizer, batch(7))

    assert torch.equal(resumed.memory_values, model.memory_values)
    state, resumed_state = (o.state[o.table] for o in (optimizer, resumed_optimizer))
    assert state.keys() == resumed_state.keys() and int(resumed_state["step"]) == 2
    for name in state:
        assert torch.equal(resumed_state[name], state[name]), name


def test_bf16_table_keeps_fp32_state_through_load_state_dict():
    model = tiny_model(dtype=torch.bfloat16)
    optimizer = RowSparseOptimizer(model, "adam", lr=0.01)
    train_step(model, optimizer, batch(10))
    state = optimizer.state[model.memory_values]
    assert model.memory_values.dtype == torch.bfloat16
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert not torch.equal(state["exp_avg_sq"], state["exp_avg_sq"].bfloat16().float())

    resumed = tiny_model(seed=1, dtype=torch.bfloat16)
    resumed.load_state_dict(model.state_dict())
    resumed_optimizer = RowSparseOptimizer(resumed, "adam", lr=0.01)
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    resumed_state = resumed_optimizer.state[resumed.memory_values]
    for name in ("exp_avg", "exp_avg_sq"):
        assert resumed_state[name].dtype == torch.float32
        assert torch.equal(resumed_state[name], state[name]), f"{name} was rounded"
    train_step(model, optimizer, batch(11))
    train_step(resumed, resumed_optimizer, batch(11))
    assert torch.equal(resumed.memory_values, model.memory_values)


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "rule, hyper, match",
    [
        ("adamw", {}, r"rule must be one of sgd, rowwise_adagrad, adam, got 'adamw' \(a dense"),
        ("AdaGrad", {}, r"rule must be one of .*, got 'AdaGrad' \(a dense optimizer"),
        ("lamb", {}, r"rule must be one of sgd, rowwise_adagrad, adam, got 'lamb'$"),
        ("sgd", {"lr": -1e-3}, r"lr must be a finite number >= 0, got -0.001"),
        ("sgd", {"lr": float("inf")}, r"lr must be a finite number >= 0, got inf"),
        ("adam", {"lr": float("nan")}, r"lr must be a finite number >= 0, got nan"),
        ("adam", {"betas": (1.0, 0.999)}, r"betas must lie in \[0, 1\)"),
        ("adam", {"eps": -1.0}, r"eps must be >= 0"),
        ("rowwise_adagrad", {"weight_decay": -0.1}, r"weight_decay must be >= 0"),
    ],
)
def test_bad_arguments_raise_value_error(rule, hyper, match):
    torch.manual_seed(0)
    model = Reader()
    with pytest.raises(ValueError, match=rf"^RowSparseOptimizer: {match}"):
        RowSparseOptimizer(model, rule, **hyper)
    assert model.memory_values.requires_grad  # nothing was switched over


def test_a_model_without_a_table_is_refused():
    with pytest.raises(ValueError, match="RowSparseOptimizer: model has no memory_values"):
        RowSparseOptimizer(nn.Linear(3, 3), "sgd")
