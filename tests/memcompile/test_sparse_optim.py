"""RowSparseOptimizer keeps torch's promises, tested as torch tests its own optimizers
(``test/test_optim.py``): the table's recorded gradient behaves as a gradient under every idiom a
user drives a parameter and an optimizer with, for every rule.

- zero_grad of the model and of the optimizer, ``set_to_none`` both ways;
- ``torch.autograd.grad`` and ``backward(inputs=...)`` of other tensors leave the table alone;
- ``step(closure)``; gradient accumulation; ``torch.compile``;
- ``state_dict`` round trips, and state of another rule or table refused;
- ``copy.deepcopy`` / pickling of the model, of the optimizer, of both together;
- one optimizer per table, and ``del`` of it;
- a table read without recording is refused, never silently frozen;
- equality with the dense optimizer where the rule allows (SGD; lazy Adam when every row is
  touched).
"""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memcompile.memory import ValueLookup
from memcompile.model import Transformer
from memcompile.optim import torch_param_groups
from memcompile.sparse_optim import RowSparseOptimizer
from ops.row_sparse import RowSparseGrad
from tests.memcompile.test_model import debug_config

RULES = ("sgd", "rowwise_adagrad", "adam")


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


def reader_loss(model: nn.Module, indices, logits, target) -> torch.Tensor:
    return (model(indices, logits) - target).square().sum()


def reader(seed: int = 0) -> Reader:
    torch.manual_seed(seed)
    return Reader()


def transformer(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(debug_config())


def tokens(seed: int, num_sequences: int = 2, seq_len: int = 9) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(
        0, debug_config().vocab_size, (num_sequences, seq_len), generator=generator
    )


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token loss summed over tokens: micro-batches add up to their whole batch."""
    logits = model(batch[:, :-1]).float()
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")


def table_after_step(optimizer: RowSparseOptimizer) -> torch.Tensor:
    optimizer.step()
    return optimizer.table.detach().clone()


# --------------------------------------------------------------------------- zero_grad


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("clear", ["model", "optimizer"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_clears_the_recorded_gradient(rule, clear, set_to_none):
    """After zero_grad (of the model or of the optimizer, either way), a step has nothing to
    apply: the table stays as it is (the old design applied the same gradient again)."""
    model = transformer()
    optimizer = RowSparseOptimizer(model, rule, lr=0.1)
    lm_loss(model, tokens(0)).backward()
    optimizer.step()
    trained = model.memory_values.detach().clone()
    (model if clear == "model" else optimizer).zero_grad(set_to_none=set_to_none)
    grad = model.memory_values.grad
    assert (
        grad is None if set_to_none else (isinstance(grad, RowSparseGrad) and grad.num_tokens == 0)
    )
    optimizer.step()
    assert torch.equal(model.memory_values, trained)
    # The next backward records afresh: only its own tokens.
    lm_loss(model, tokens(1, num_sequences=1)).backward()
    assert model.memory_values.grad.num_tokens == 8 * len(model.config.memory.layers)


def test_a_dense_optimizers_zero_grad_leaves_the_table_to_its_own():
    """torch_param_groups leaves the table out of the dense optimizer: its zero_grad and step
    do not touch the table's gradient, as with any parameter it does not hold."""
    model = transformer()
    values_optimizer = RowSparseOptimizer(model, "sgd", lr=0.1)
    optimizer = torch.optim.AdamW(torch_param_groups(model, lr=1e-3, weight_decay=0.1))
    assert all(p is not model.memory_values for g in optimizer.param_groups for p in g["params"])
    lm_loss(model, tokens(0)).backward()
    optimizer.step()
    optimizer.zero_grad()
    assert model.memory_values.grad.num_tokens > 0
    before = model.memory_values.detach().clone()
    values_optimizer.step()
    assert not torch.equal(model.memory_values, before)


# --------------------------------------------------------------------------- backward flavours


@pytest.mark.parametrize("rule", RULES)
def test_autograd_grad_of_other_tensors_records_nothing(rule):
    model = reader()
    optimizer = RowSparseOptimizer(model, rule, lr=0.1)
    before = model.memory_values.detach().clone()
    loss = reader_loss(model, *reader_batch(0))
    (gate_grad,) = torch.autograd.grad(loss, model.gate)
    assert gate_grad.abs().sum() > 0
    reader_loss(model, *reader_batch(1)).backward(inputs=[model.gate])
    assert model.memory_values.grad is None
    optimizer.step()
    assert torch.equal(model.memory_values, before)
    # The table's gradient is what backward() records into .grad: asking autograd.grad for it
    # is a clear error, not a silent None (or a side effect).
    with pytest.raises(RuntimeError, match=r"autograd.grad with the memory table as an input"):
        torch.autograd.grad(reader_loss(model, *reader_batch(2)), [model.memory_values])
    assert model.memory_values.grad is None


@pytest.mark.parametrize("rule", RULES)
def test_step_with_a_closure_equals_backward_then_step(rule):
    """step(closure) runs the closure with gradients enabled (torch.optim's contract) and
    returns its loss."""
    batch = reader_batch(3)
    plain, with_closure = reader(), reader()
    plain_optimizer = RowSparseOptimizer(plain, rule, lr=0.1)
    closure_optimizer = RowSparseOptimizer(with_closure, rule, lr=0.1)

    def closure() -> torch.Tensor:
        closure_optimizer.zero_grad()
        loss = reader_loss(with_closure, *batch)
        loss.backward()
        return loss

    for _ in range(2):
        plain_optimizer.zero_grad()
        expected = reader_loss(plain, *batch)
        expected.backward()
        plain_optimizer.step()
        loss = closure_optimizer.step(closure)
        assert torch.equal(loss, expected)
        assert torch.equal(with_closure.memory_values, plain.memory_values)


@pytest.mark.parametrize("rule", RULES)
def test_gradient_accumulation_equals_one_batch(rule):
    """Two micro-batches recorded into one step equal one batch holding both (the losses are
    sums over tokens, so the micro-batch gradients add up to the batch's)."""
    batch = tokens(4, num_sequences=4)
    micro, whole = transformer(), transformer()
    micro_optimizer = RowSparseOptimizer(micro, rule, lr=0.1, weight_decay=0.01)
    whole_optimizer = RowSparseOptimizer(whole, rule, lr=0.1, weight_decay=0.01)
    lm_loss(micro, batch[:2]).backward()
    lm_loss(micro, batch[2:]).backward()
    lm_loss(whole, batch).backward()

    assert micro.memory_values.grad.num_tokens == whole.memory_values.grad.num_tokens > 0
    norms = micro_optimizer.grad_norm(), whole_optimizer.grad_norm()
    torch.testing.assert_close(*norms, rtol=1e-5, atol=0)
    micro_optimizer.step()
    whole_optimizer.step()
    torch.testing.assert_close(micro.memory_values, whole.memory_values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend, rule", [("aot_eager", "rowwise_adagrad"), ("inductor", "adam")])
def test_compiled_model_trains_the_table_like_eager(backend, rule, monkeypatch):
    """Compiled with fullgraph=True, the backward still records every step (the graph is
    reused), and a compiled torch.autograd.grad of another tensor records nothing; the tiny
    Reader keeps inductor's CPU compile to seconds."""
    # Inductor's caches would not notice an edited Python backward of a custom op.
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    monkeypatch.setenv("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
    torch._dynamo.reset()
    eager = reader()
    compiled_model = copy.deepcopy(eager)
    optimizers = [RowSparseOptimizer(m, rule, lr=0.05) for m in (eager, compiled_model)]
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    for seed in range(3):
        indices, logits, target = reader_batch(seed)
        for model, optimizer in zip((eager, compiled), optimizers):
            torch.autograd.grad(reader_loss(model, indices, logits, target), model.gate)
            assert optimizer.table.grad is None
            reader_loss(model, indices, logits, target).backward()
            assert optimizer.table.grad.num_tokens == 12
            assert int(optimizer.recorders[0].recorded_tokens) == 12 * (seed + 1)
        torch.testing.assert_close(compiled_model.gate.grad, eager.gate.grad)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        eager.gate.grad = compiled_model.gate.grad = None
        torch.testing.assert_close(
            compiled_model.memory_values, eager.memory_values, rtol=1e-5, atol=1e-6
        )


# --------------------------------------------------------------------------- against dense


def test_grad_norm_and_the_other_gradients_equal_dense_trainings():
    model = transformer()
    dense = copy.deepcopy(model)
    optimizer = RowSparseOptimizer(model, "sgd", lr=0.1)
    lm_loss(model, tokens(0)).backward()
    lm_loss(dense, tokens(0)).backward()

    assert isinstance(model.memory_values.grad, RowSparseGrad)
    dense_norm = dense.memory_values.grad.norm()
    torch.testing.assert_close(optimizer.grad_norm(), dense_norm, rtol=1e-5, atol=0)
    # The other parameters train as before: the recording lookup still differentiates the
    # weights (scores, queries).
    for (name, param), dense_param in zip(model.named_parameters(), dense.parameters()):
        if name != "memory_values":
            torch.testing.assert_close(param.grad, dense_param.grad, msg=name)


def test_a_gradient_norm_read_between_micro_batches_does_not_freeze_the_gradient():
    """Reading the norm (say, to log it) after one micro-batch must not make the step forget
    the next: as with dense gradients, all that was recorded since zero_grad counts."""
    model = reader()
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


def test_sgd_step_and_clipping_equal_dense_sgd_on_the_table():
    """One step equals torch.optim.SGD on the dense gradient; clip_grad_norm_ scales the
    gradient as torch.nn.utils.clip_grad_norm_ does, whether it clips or not."""
    model = transformer()
    dense = copy.deepcopy(model)
    optimizer = RowSparseOptimizer(model, "sgd", lr=0.5)
    dense_optimizer = torch.optim.SGD([dense.memory_values], lr=0.5)
    lm_loss(model, tokens(1)).backward()
    lm_loss(dense, tokens(1)).backward()
    before, dense_grad = model.memory_values.detach().clone(), dense.memory_values.grad.clone()
    recorded = model.memory_values.grad.clone()
    torch.testing.assert_close(recorded.to_dense(), dense_grad, rtol=1e-5, atol=1e-7)

    for max_norm in (None, 0.05, 1e3):
        with torch.no_grad():  # the same gradients, from the same table, every time
            model.memory_values.copy_(before)
            model.memory_values.grad = recorded.clone()
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


def test_clipping_and_the_step_group_the_recorded_reads_once(monkeypatch):
    """Grouping the reads by row (a sort) and their norms are the step's largest costs after
    the lookup: clipping computes them, scaling the gradient keeps them, the step reuses them;
    a new backward makes them stale."""
    import memcompile.sparse_optim as sparse_optim

    calls = []
    grouping = sparse_optim.group_by_row
    monkeypatch.setattr(
        sparse_optim, "group_by_row", lambda *a, **k: calls.append(1) or grouping(*a, **k)
    )
    model = reader()
    optimizer = RowSparseOptimizer(model, "rowwise_adagrad", lr=0.1)
    reader_loss(model, *reader_batch(0)).backward()
    optimizer.clip_grad_norm_(1e-3)
    optimizer.step()
    assert len(calls) == 1
    reader_loss(model, *reader_batch(1)).backward()
    optimizer.clip_grad_norm_(1e-3)
    assert len(calls) == 2


def test_torch_clip_grad_norm_clips_the_table_with_the_rest():
    """torch.nn.utils.clip_grad_norm_ over all of a model's parameters (the table's recorded
    gradient among them) clips as it would the dense gradients."""
    model = transformer()
    dense = copy.deepcopy(model)
    RowSparseOptimizer(model, "sgd", lr=0.5)
    lm_loss(model, tokens(2)).backward()
    lm_loss(dense, tokens(2)).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    dense_norm = torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.1)
    torch.testing.assert_close(norm, dense_norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        model.memory_values.grad.to_dense(), dense.memory_values.grad, rtol=1e-5, atol=1e-9
    )


def test_adam_equals_adamw_when_every_row_is_touched():
    """Lazy Adam differs from AdamW only on rows a step does not touch."""
    model = reader()
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


# --------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("rule", RULES)
def test_state_dict_round_trip_resumes_exactly(rule):
    model = reader()
    optimizer = RowSparseOptimizer(model, rule, lr=0.05, weight_decay=0.01)
    reader_loss(model, *reader_batch(6)).backward()
    optimizer.step()
    optimizer.zero_grad()
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())

    resumed = reader(seed=1)  # other weights, other hyperparameters: all replaced
    resumed_optimizer = RowSparseOptimizer(resumed, rule, lr=1.0)
    resumed.load_state_dict(saved_model)
    resumed_optimizer.load_state_dict(saved_optimizer)
    assert resumed_optimizer.param_groups[0]["lr"] == 0.05
    for m, o in ((model, optimizer), (resumed, resumed_optimizer)):
        reader_loss(m, *reader_batch(7)).backward()
        o.step()
    assert torch.equal(resumed.memory_values, model.memory_values)
    state, resumed_state = (o.state[o.table] for o in (optimizer, resumed_optimizer))
    assert state.keys() == resumed_state.keys() and int(resumed_state["step"]) == 2
    for name in state:
        assert torch.equal(resumed_state[name], state[name]), name


def test_bf16_table_keeps_fp32_state_through_load_state_dict():
    model = transformer().to(torch.bfloat16)
    optimizer = RowSparseOptimizer(model, "adam", lr=0.01)
    lm_loss(model, tokens(10)).backward()
    optimizer.step()
    optimizer.zero_grad()
    state = optimizer.state[model.memory_values]
    assert model.memory_values.dtype == torch.bfloat16
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert not torch.equal(state["exp_avg_sq"], state["exp_avg_sq"].bfloat16().float())

    resumed = transformer(seed=1).to(torch.bfloat16)
    resumed.load_state_dict(model.state_dict())
    resumed_optimizer = RowSparseOptimizer(resumed, "adam", lr=0.01)
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    resumed_state = resumed_optimizer.state[resumed.memory_values]
    for name in ("exp_avg", "exp_avg_sq"):
        assert resumed_state[name].dtype == torch.float32
        assert torch.equal(resumed_state[name], state[name]), f"{name} was rounded"
    for m, o in ((model, optimizer), (resumed, resumed_optimizer)):
        lm_loss(m, tokens(11)).backward()
        o.step()
    assert torch.equal(resumed.memory_values, model.memory_values)


@pytest.mark.parametrize(
    "saved_rule, rule, match",
    [
        ("adam", "rowwise_adagrad", r"the state is of rule 'adam', .* rule is 'rowwise_adagrad'"),
        ("rowwise_adagrad", "adam", r"the state is of rule 'rowwise_adagrad'"),
        ("sgd", "adam", r"the state is of rule 'sgd'"),
        ("adam", "sgd", r"the state is of rule 'adam'"),
    ],
)
def test_state_of_another_rule_is_refused(saved_rule, rule, match):
    saved = RowSparseOptimizer(reader(), saved_rule, lr=0.1).state_dict()
    model = reader()
    optimizer = RowSparseOptimizer(model, rule, lr=0.1)
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=rf"^RowSparseOptimizer.load_state_dict: {match}"):
        optimizer.load_state_dict(saved)
    assert optimizer.state_dict()["param_groups"] == before["param_groups"]
    reader_loss(model, *reader_batch(0)).backward()
    optimizer.step()  # still works


@pytest.mark.parametrize("rule", ["rowwise_adagrad", "adam"])
def test_state_of_another_table_size_or_garbage_is_refused(rule):
    optimizer = RowSparseOptimizer(reader(), rule, lr=0.1)
    other = RowSparseOptimizer(Reader(num_rows=60), rule, lr=0.1).state_dict()
    with pytest.raises(ValueError, match=r"has shape \(60.*expected \(50.*another table"):
        optimizer.load_state_dict(other)
    garbage = copy.deepcopy(optimizer.state_dict())
    name = "sum" if rule == "rowwise_adagrad" else "exp_avg"
    garbage["state"][0][name] = "not a tensor"
    with pytest.raises(ValueError, match=rf"state '{name}' must be a floating point tensor"):
        optimizer.load_state_dict(garbage)
    garbage["state"][0] = {"momentum_buffer": torch.zeros(50, 7)}
    with pytest.raises(ValueError, match=r"no row-sparse rule's state"):
        optimizer.load_state_dict(garbage)


# --------------------------------------------------------------------------- copies


@pytest.mark.parametrize("rule", RULES)
def test_a_deepcopied_or_pickled_model_has_no_link_to_the_optimizer(rule):
    """An EMA, teacher or evaluation copy: its backward never reaches the original's gradient
    (the old design's copies recorded into the original optimizer's next step); it trains
    densely until an optimizer of its own takes it."""
    model = transformer()
    optimizer = RowSparseOptimizer(model, rule, lr=0.1)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        lm_loss(copied, tokens(5)).backward()
        assert model.memory_values.grad is None
        assert type(copied.memory_values.grad) is torch.Tensor  # an ordinary dense gradient
        copied.zero_grad()
        own = RowSparseOptimizer(copied, rule, lr=0.1)  # not already taken by the original's
        lm_loss(copied, tokens(5)).backward()
        assert isinstance(copied.memory_values.grad, RowSparseGrad)
        assert model.memory_values.grad is None
        del own
    before = model.memory_values.detach().clone()
    optimizer.step()
    assert torch.equal(model.memory_values, before)


@pytest.mark.parametrize("rule", RULES)
def test_a_model_and_its_optimizer_copied_together_train_alike_and_apart(rule):
    """copy.deepcopy((model, optimizer)) gives a pair that trains the copied table (bitwise as
    the original pair), without touching the original; a deep-copied optimizer alone keeps its
    state and leaves the original working."""
    model = reader()
    optimizer = RowSparseOptimizer(model, rule, lr=0.1)
    reader_loss(model, *reader_batch(0)).backward()
    optimizer.step()
    optimizer.zero_grad()
    copied_model, copied_optimizer = copy.deepcopy((model, optimizer))
    assert copied_optimizer.table is copied_model.memory_values
    alone = copy.deepcopy(optimizer)
    assert alone.rule == rule and alone.state_dict()["state"].keys() == {0}
    for m, o in ((model, optimizer), (copied_model, copied_optimizer)):
        reader_loss(m, *reader_batch(1)).backward()
        o.step()
    assert torch.equal(copied_model.memory_values, model.memory_values)
    assert copied_model.memory_values is not model.memory_values
    for name, value in optimizer.state[model.memory_values].items():
        assert torch.equal(copied_optimizer.state[copied_model.memory_values][name], value), name


# --------------------------------------------------------------------------- one optimizer


def test_a_second_optimizer_over_one_table_is_refused_until_the_first_is_gone():
    """The old design silently made the first optimizer's step a no-op."""
    model = transformer()
    first = RowSparseOptimizer(model, "sgd", lr=0.1)
    with pytest.raises(ValueError, match=r"already trained by RowSparseOptimizer\(rule='sgd'"):
        RowSparseOptimizer(model, "adam", lr=0.1)
    lm_loss(model, tokens(0)).backward()
    before = model.memory_values.detach().clone()
    first.step()
    assert not torch.equal(model.memory_values, before)  # the first one still trains it
    del first
    gc.collect()
    second = RowSparseOptimizer(model, "adam", lr=0.1)
    lm_loss(model, tokens(1)).backward()
    before = model.memory_values.detach().clone()
    second.step()
    assert not torch.equal(model.memory_values, before)


def test_an_optimizer_that_is_gone_stops_recording():
    """After del, backward no longer records (the old design appended to an orphaned log at
    every backward, without bound): the table gets dense gradients again."""
    model = transformer()
    optimizer = RowSparseOptimizer(model, "rowwise_adagrad", lr=0.1)
    lm_loss(model, tokens(0)).backward()
    assert isinstance(model.memory_values.grad, RowSparseGrad)
    del optimizer
    gc.collect()
    assert model.memory_values.grad is None  # what it recorded went with it
    assert not model.memory_table.grad_recorder.recording
    lm_loss(model, tokens(1)).backward()
    assert type(model.memory_values.grad) is torch.Tensor
    assert model.memory_values.grad.shape == model.memory_values.shape


# --------------------------------------------------------------------------- reads


class DirectReader(Reader):
    """Reads its table with the op itself, not through the ValueLookup, too or only."""

    def __init__(self, also_through_lookup: bool) -> None:
        super().__init__()
        self.also_through_lookup = also_through_lookup

    def forward(self, indices, logits):
        direct = torch.ops.memlayer.lookup(self.memory_values, indices, logits.softmax(-1))
        if not self.also_through_lookup:
            return direct
        return direct + super().forward(indices, logits)


def test_a_table_read_without_recording_is_refused_not_frozen():
    """The old design froze the table: a read with torch.ops.memlayer.lookup got no gradient
    and never trained, silently. Now its dense gradient reaches the table and is refused."""
    model = DirectReader(also_through_lookup=False)
    optimizer = RowSparseOptimizer(model, "sgd", lr=0.1)
    reader_loss(model, *reader_batch(0)).backward()
    with pytest.raises(RuntimeError, match=r"dense gradient .* read without recording"):
        optimizer.step()

    both = DirectReader(also_through_lookup=True)
    both_optimizer = RowSparseOptimizer(both, "sgd", lr=0.1)
    with pytest.raises((TypeError, RuntimeError), match=r"read without recording"):
        reader_loss(both, *reader_batch(0)).backward()
    assert both_optimizer.recorders[0].recording


@pytest.mark.parametrize(
    "rule, hyper, match",
    [
        ("adamw", {}, r"rule must be one of sgd, rowwise_adagrad, adam, got 'adamw' \(a dense"),
        ("AdaGrad", {}, r"rule must be one of .*, got 'AdaGrad' \(a dense optimizer"),
        ("lamb", {}, r"rule must be one of sgd, rowwise_adagrad, adam, got 'lamb'$"),
        ("sgd", {"lr": -1e-3}, r"lr must be a finite number >= 0, got -0.001"),
        ("sgd", {"lr": float("inf")}, r"lr must be a finite number >= 0, got inf"),
        ("adam", {"lr": float("nan")}, r"lr must be a finite number >= 0, got nan"),
        ("sgd", {"lr": True}, r"lr must be a finite number >= 0, got True"),
        ("adam", {"betas": (1.0, 0.999)}, r"betas must be two numbers in \[0, 1\)"),
        ("adam", {"betas": (0.9, 1.5)}, r"betas must be two numbers in \[0, 1\)"),
        ("adam", {"betas": (0.9,)}, r"betas must be two numbers in \[0, 1\)"),
        ("adam", {"eps": -1.0}, r"eps must be a finite number >= 0"),
        ("adam", {"eps": float("inf")}, r"eps must be a finite number >= 0"),
        ("rowwise_adagrad", {"weight_decay": -0.1}, r"weight_decay must be a finite number >= 0"),
        ("sgd", {"weight_decay": float("nan")}, r"weight_decay must be a finite number >= 0"),
    ],
)
def test_bad_arguments_raise_value_error(rule, hyper, match):
    model = reader()
    with pytest.raises(ValueError, match=rf"^RowSparseOptimizer: {match}"):
        RowSparseOptimizer(model, rule, **hyper)
    assert not model.read.grad_recorder.recording  # nothing was switched over


def test_a_frozen_table_or_a_model_without_lookups_is_refused():
    model = reader()
    model.memory_values.requires_grad_(False)
    with pytest.raises(ValueError, match=r"does not require grad.*requires_grad_\(True\)"):
        RowSparseOptimizer(model, "sgd", lr=0.1)
    table_only = nn.Module()
    table_only.memory_values = nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"through no memcompile.memory.ValueLookup"):
        RowSparseOptimizer(table_only, "sgd", lr=0.1)
    with pytest.raises(ValueError, match="RowSparseOptimizer: model has no memory_values"):
        RowSparseOptimizer(nn.Linear(3, 3), "sgd")


def test_a_replaced_table_is_refused_at_the_step():
    model = reader()
    optimizer = RowSparseOptimizer(model, "sgd", lr=0.1)
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    reader_loss(model, *reader_batch(0)).backward()
    with pytest.raises(RuntimeError, match=r"no longer the parameter this optimizer was built"):
        optimizer.step()
