"""Which memory slots a batch is about: TF-IDF ranking for sparse memory finetuning.

"Continual Learning via Sparse Memory Finetuning" (Lin et al., 2025, arXiv 2510.15103) teaches a
memory model new facts by training only the value-table rows (slots) that are specific to the new
data: read often by the finetuning batch, rarely by the pretraining data. Per batch, slot ``i``
scores

    tfidf(i) = c(i) / sum_j c(j)  *  log((|B| + 1) / (df(i) + 1))

with ``c(i)`` the reads of slot ``i`` by the batch (over all memory layers), ``B`` a set of
background documents of pretraining data (batches of token ids; the recipe uses single
sequences) and ``df(i)`` how many of them read slot ``i`` at least once. The top ``t`` slots of
a batch are the only rows its step trains; every other row stays bitwise unchanged::

    background = BackgroundFrequency.measure(model, pretraining_batches)
    optimizer = RowSparseOptimizer(model, "sgd", lr=1.0)   # every other parameter frozen
    optimizer.trainable_rows = TfidfSlotSelector(background, count=500)

:class:`SlotAccessCounter` counts reads while a model runs (hooks on its ``ValueLookup`` modules,
no telemetry config needed); :class:`BackgroundFrequency` is the ``df`` of a background sample,
computed once and saved next to the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from memcompile.memory import ValueLookup


class SlotAccessCounter:
    """Counts the value-table rows every memory layer of ``model`` reads while it is active::

    with SlotAccessCounter(model) as counter:
        model(tokens)
    counter.counts  # [num_rows] int64, reads per row over the block

    Entering it again inside its own block (nested ``with``) changes nothing: each read is
    counted once, and the hooks go when the outermost block ends.
    """

    def __init__(self, model: nn.Module) -> None:
        table = getattr(model, "memory_values", None)
        if table is None:
            raise ValueError("SlotAccessCounter: the model has no memory value table")
        self.counts = torch.zeros(table.shape[0], dtype=torch.int64, device=table.device)
        self._lookups = [m for m in model.modules() if isinstance(m, ValueLookup)]
        self._handles: list = []
        self._depth = 0

    def _count(self, module: nn.Module, args: tuple) -> None:
        indices = args[1]
        if hasattr(indices, "to_local"):  # memory parallelism: the group's gathered reads
            indices = indices.to_local()
        flat = indices.reshape(-1).to(self.counts.device)
        self.counts.index_add_(0, flat, torch.ones_like(flat, dtype=self.counts.dtype))

    def __enter__(self) -> SlotAccessCounter:
        if self._depth == 0:
            self._handles = [m.register_forward_pre_hook(self._count) for m in self._lookups]
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            for handle in self._handles:
                handle.remove()
            self._handles = []


@dataclass
class BackgroundFrequency:
    """``document_frequency[i]``: of ``num_batches`` background batches, how many read slot
    ``i`` at least once."""

    document_frequency: Tensor  # [num_rows] int64
    num_batches: int

    @classmethod
    @torch.no_grad()
    def measure(cls, model: nn.Module, batches: Iterable[Tensor]) -> BackgroundFrequency:
        """Run ``model`` (in eval mode, no gradients) on each batch of token ids."""
        was_training = model.training
        model.eval()
        frequency, num_batches = None, 0
        try:
            for tokens in batches:
                with SlotAccessCounter(model) as counter:
                    model(tokens)
                read = (counter.counts > 0).long()
                frequency = read if frequency is None else frequency + read
                num_batches += 1
        finally:
            model.train(was_training)
        if frequency is None:
            raise ValueError("BackgroundFrequency.measure: no background batches were given")
        return cls(frequency, num_batches)

    def inverse(self) -> Tensor:
        """``log((|B| + 1) / (df + 1))`` per slot, fp32."""
        df = self.document_frequency.double()
        return torch.log((self.num_batches + 1) / (df + 1)).float()

    def save(self, path: str | Path) -> None:
        saved = {"document_frequency": self.document_frequency.cpu(), "batches": self.num_batches}
        torch.save(saved, path)

    @classmethod
    def load(cls, path: str | Path, num_rows: int) -> BackgroundFrequency:
        """The frequencies :meth:`save` wrote to ``path``, for a table of ``num_rows`` rows.
        A file that is not such a cache (damaged, truncated, another model's) raises a
        ``ValueError`` naming it and what is wrong."""
        try:
            saved = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as error:  # a damaged file fails in many ways (EOF, zip, pickle)
            raise ValueError(
                f"{path}: not a readable slot-frequency cache ({type(error).__name__}: {error})"
            ) from error
        if not isinstance(saved, dict) or not {"document_frequency", "batches"} <= saved.keys():
            raise ValueError(
                f"{path}: not a slot-frequency cache (expected a dict with 'document_frequency' "
                f"and 'batches', got {type(saved).__name__}"
                + (f" with keys {sorted(saved)})" if isinstance(saved, dict) else ")")
            )
        background = cls(saved["document_frequency"], saved["batches"])
        _check_frequencies(background, num_rows, path)
        return background


def _check_frequencies(background: BackgroundFrequency, num_rows: int, path: str | Path) -> None:
    """Counts a background sample can have: ``num_rows`` integers in ``[0, num_batches]``,
    ``num_batches`` an int >= 1."""
    frequency, batches = background.document_frequency, background.num_batches
    if not isinstance(frequency, Tensor) or frequency.dtype != torch.int64:
        found = frequency.dtype if isinstance(frequency, Tensor) else type(frequency).__name__
        raise ValueError(f"{path}: document frequencies must be an int64 tensor, got {found}")
    if frequency.shape != (num_rows,):
        raise ValueError(
            f"{path}: background frequencies of shape {tuple(frequency.shape)}, but the model's "
            f"table has {num_rows} rows (computed for another model?)"
        )
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
        raise ValueError(
            f"{path}: the number of background batches must be an int >= 1, got {batches!r}"
        )
    low, high = int(frequency.min()), int(frequency.max())
    if low < 0 or high > batches:
        raise ValueError(
            f"{path}: document frequencies must lie in [0, {batches}] (the number of background "
            f"batches), found {low if low < 0 else high}"
        )


def tfidf_scores(batch_counts: Tensor, background: BackgroundFrequency) -> Tensor:
    """The TF-IDF score of every slot for one batch's read counts (see the module doc)."""
    if batch_counts.shape != background.document_frequency.shape:
        raise ValueError(
            f"tfidf_scores: batch_counts must have shape "
            f"{tuple(background.document_frequency.shape)} (one count per slot), got "
            f"{tuple(batch_counts.shape)}"
        )
    total = int(batch_counts.sum())
    term = batch_counts.float() / max(total, 1)
    return term * background.inverse().to(term.device)


def top_slots(scores: Tensor, count: int) -> Tensor:
    """The ``count`` best-scoring slots with a positive score, sorted by row (int64). Ties are
    broken by the lower row, so the choice is deterministic."""
    _check_count("top_slots", count)
    candidates = (scores > 0).nonzero().squeeze(1)
    if candidates.numel() > count:
        # A stable sort of the negated scores: equal scores keep row order.
        order = torch.sort(-scores[candidates], stable=True).indices[:count]
        candidates = candidates[order]
    return torch.sort(candidates).values


class TfidfSlotSelector:
    """Sparse memory finetuning's choice of rows, as ``RowSparseOptimizer.trainable_rows``:
    called with a step's reads (the recorded indices, any shape), it returns the ``count`` slots
    with the highest TF-IDF against ``background`` (:func:`top_slots`)."""

    def __init__(self, background: BackgroundFrequency, count: int) -> None:
        _check_count("TfidfSlotSelector", count)
        self.background, self.count = background, count

    def __call__(self, reads: Tensor) -> Tensor:
        num_rows = self.background.document_frequency.shape[0]
        counts = torch.bincount(reads.reshape(-1), minlength=num_rows)
        if counts.shape[0] != num_rows:
            raise IndexError(
                f"TfidfSlotSelector: a read of row {int(reads.max())}, but the background "
                f"frequencies cover {num_rows} rows"
            )
        return top_slots(tfidf_scores(counts, self.background), self.count)


def _check_count(owner: str, count: object) -> None:
    """A number of slots: an int >= 0 (0 trains none); a bool or a float is a mistake."""
    if not isinstance(count, int) or isinstance(count, bool):
        raise TypeError(f"{owner}: count must be an int >= 0, got {count!r}")
    if count < 0:
        raise ValueError(f"{owner}: count must be an int >= 0, got {count}")
