"""TF-IDF slot ranking and the sparse-memory-finetuning step it drives."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

from memcompile.model import Transformer
from memcompile.slot_ranking import (
    BackgroundFrequency,
    SlotAccessCounter,
    TfidfSlotSelector,
    tfidf_scores,
    top_slots,
)
from memcompile.sparse_optim import RowSparseOptimizer
from ops.row_sparse import group_by_row
from tests.memcompile.test_model import debug_config


def test_tfidf_matches_a_hand_computed_example():
    counts = torch.tensor([3, 1, 0, 2])  # reads by the batch: 6 in all
    background = BackgroundFrequency(torch.tensor([2, 0, 1, 4]), num_batches=4)
    expected = [3 / 6 * math.log(5 / 3), 1 / 6 * math.log(5 / 1), 0.0, 2 / 6 * math.log(5 / 5)]
    assert tfidf_scores(counts, background).tolist() == pytest.approx(expected)
    # Slot 1 is read once but never in the background: it outranks the busier slot 0.
    assert top_slots(tfidf_scores(counts, background), 1).tolist() == [1]
    # Slot 3 is read by every background batch: its score is 0 and it is never chosen.
    assert top_slots(tfidf_scores(counts, background), 3).tolist() == [0, 1]


def test_ties_are_broken_by_the_lower_row():
    assert top_slots(torch.tensor([0.5, 1.0, 1.0, 1.0]), 2).tolist() == [1, 2]


@pytest.mark.parametrize(
    "count, error", [(2.5, TypeError), (True, TypeError), ("3", TypeError), (-1, ValueError)]
)
def test_a_slot_count_must_be_an_int_of_at_least_zero(count, error):
    background = BackgroundFrequency(torch.tensor([2, 0, 1, 4]), num_batches=4)
    for make in (
        lambda: top_slots(torch.ones(4), count),
        lambda: TfidfSlotSelector(background, count),
    ):
        with pytest.raises(error, match=r"count must be an int >= 0"):
            make()
    assert top_slots(torch.ones(4), 0).tolist() == []  # zero slots: a step trains none


def _model_and_batches(seed: int = 0) -> tuple[Transformer, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = Transformer(debug_config())
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 256, (2, 16), generator=generator) for _ in range(3)]
    return model, batches


def test_background_frequency_counts_batches_that_read_each_slot(tmp_path):
    model, batches = _model_and_batches()
    background = BackgroundFrequency.measure(model, batches)
    read_by = []
    for tokens in batches:
        with SlotAccessCounter(model) as counter:
            model(tokens)
        # Every token reads heads * topk rows in each memory layer.
        memory = model.config.memory
        expected_reads = tokens.numel() * memory.heads * memory.topk * len(memory.layers)
        assert int(counter.counts.sum()) == expected_reads
        read_by.append(counter.counts > 0)
    assert background.num_batches == 3
    assert torch.equal(background.document_frequency, torch.stack(read_by).sum(0))

    background.save(tmp_path / "df.pt")
    loaded = BackgroundFrequency.load(tmp_path / "df.pt", model.memory_values.shape[0])
    assert torch.equal(loaded.document_frequency, background.document_frequency)
    with pytest.raises(ValueError, match="computed for another model"):
        BackgroundFrequency.load(tmp_path / "df.pt", 7)


def _damage(path, how: str) -> None:
    """Write the slot-frequency cache of a 4-row table at ``path``, damaged as ``how`` says."""
    if how == "truncated":
        BackgroundFrequency(torch.tensor([1, 0, 2, 0]), num_batches=2).save(path)
        path.write_bytes(path.read_bytes()[:100])
        return
    if how == "not a torch file":
        path.write_text("document_frequency,batches\n")
        return
    frequency, batches = torch.tensor([1, 0, 2, 0]), 2
    saved = {"document_frequency": frequency, "batches": batches}
    if how == "missing key":
        del saved["batches"]
    elif how == "not a dict":
        saved = frequency
    elif how == "wrong shape":
        saved["document_frequency"] = torch.tensor([[1, 0], [2, 0]])
    elif how == "NaN":
        saved["document_frequency"] = torch.tensor([1.0, float("nan"), 2.0, 0.0])
    elif how == "non-integer":
        saved["document_frequency"] = torch.tensor([1.0, 0.5, 2.0, 0.0])
    elif how == "negative":
        saved["document_frequency"] = torch.tensor([1, -1, 2, 0])
    elif how == "batches < max frequency":
        saved["batches"] = 1
    elif how == "no batches":
        saved["batches"] = 0
    torch.save(saved, path)


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "not a readable slot-frequency cache"),
        ("not a torch file", "not a readable slot-frequency cache"),
        ("missing key", "expected a dict with 'document_frequency' and 'batches'"),
        ("not a dict", "expected a dict with 'document_frequency' and 'batches', got Tensor"),
        ("wrong shape", "background frequencies of shape (2, 2), but the model's table has 4"),
        ("NaN", "document frequencies must be an int64 tensor, got torch.float32"),
        ("non-integer", "document frequencies must be an int64 tensor, got torch.float32"),
        ("negative", "document frequencies must lie in [0, 2] (the number of background"),
        ("batches < max frequency", "document frequencies must lie in [0, 1]"),
        ("no batches", "the number of background batches must be an int >= 1, got 0"),
    ],
)
def test_a_damaged_frequency_cache_is_refused_naming_the_file(tmp_path, how, message):
    path = tmp_path / "slot_frequency-abc.pt"
    _damage(path, how)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ")) as error:
        BackgroundFrequency.load(path, num_rows=4)
    assert message in str(error.value)


def test_a_nested_counter_counts_each_read_once_and_leaves_no_hook():
    model, batches = _model_and_batches()
    counter = SlotAccessCounter(model)
    with counter:
        model(batches[0])
    once = counter.counts.clone()
    counter.counts.zero_()
    with counter, counter:  # nested: e.g. a helper that counts inside a counted block
        model(batches[0])
    assert torch.equal(counter.counts, once)
    lookups = [m for m in model.modules() if m.__class__.__name__ == "ValueLookup"]
    assert lookups and all(not m._forward_pre_hooks for m in lookups)
    model(batches[1])
    assert torch.equal(counter.counts, once)  # nothing counted outside the block


def test_a_sparse_memory_step_changes_only_the_chosen_slots():
    model, batches = _model_and_batches()
    background = BackgroundFrequency.measure(model, batches)
    for name, parameter in model.named_parameters():  # sparse memory finetuning: only the
        parameter.requires_grad_(name == "memory_values")  # table trains
    before = copy.deepcopy(model.state_dict())
    optimizer = RowSparseOptimizer(model, "sgd", lr=1.0)

    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(9))
    with SlotAccessCounter(model) as counter:
        logits = model(tokens)
    chosen = top_slots(tfidf_scores(counter.counts, background), 5)
    assert chosen.numel() == 5
    F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    # The selector ranks the reads the backward recorded: the same slots as the hooks' counts.
    optimizer.trainable_rows = TfidfSlotSelector(background, 5)
    optimizer.step()

    after = model.state_dict()
    changed = (after["memory_values"] != before["memory_values"]).any(dim=1).nonzero().squeeze(1)
    assert changed.tolist() == chosen.tolist()
    for name, tensor in after.items():
        if name != "memory_values":
            assert torch.equal(tensor, before[name]), name


def test_the_norm_counts_only_trainable_rows():
    model, _ = _model_and_batches()
    optimizer = RowSparseOptimizer(model, "sgd", lr=1.0)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    model(tokens).square().mean().backward()
    full = optimizer.grad_norm()
    rows = group_by_row(model.memory_values.grad.bags()[1]).rows
    optimizer.trainable_rows = rows[: rows.numel() // 2]
    assert 0 < optimizer.grad_norm() < full
    optimizer.trainable_rows = None
    assert optimizer.grad_norm() == full


@pytest.mark.parametrize(
    "rows, error, match",
    [
        (torch.tensor([0, 1], dtype=torch.int32), TypeError, "1-D int64"),
        (torch.tensor([[0]]), TypeError, "1-D int64"),
        (torch.tensor([-1]), IndexError, "must lie in"),
        (torch.tensor([10**9]), IndexError, "must lie in"),
    ],
)
def test_bad_trainable_rows_raise(rows, error, match):
    model, _ = _model_and_batches()
    optimizer = RowSparseOptimizer(model, "sgd", lr=1.0)
    with pytest.raises(error, match=match):
        optimizer.trainable_rows = rows


@pytest.mark.parametrize("rows", [[1, 2], (1, 2), 3, "1,2"])
def test_trainable_rows_must_be_a_tensor_or_a_function_when_set(rows):
    model, _ = _model_and_batches()
    optimizer = RowSparseOptimizer(model, "sgd", lr=1.0)
    with pytest.raises(TypeError, match=r"trainable_rows must be a 1-D int64 tensor .* function"):
        optimizer.trainable_rows = rows
    assert optimizer.trainable_rows is None


def test_a_selector_returning_bad_rows_is_refused():
    model, batches = _model_and_batches()
    optimizer = RowSparseOptimizer(model, "sgd", lr=1.0)
    model(batches[0]).square().mean().backward()
    optimizer.trainable_rows = lambda reads: torch.tensor([10**9])
    with pytest.raises(IndexError, match="must lie in"):
        optimizer.step()
    with pytest.raises(ValueError, match=r"count must be an int >= 0, got -1"):
        TfidfSlotSelector(BackgroundFrequency.measure(model, batches), -1)
