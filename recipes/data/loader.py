"""Pretraining data: a corpus tokenised once into a memory-mapped token stream, served as
shuffled fixed-length windows.

Sources: the built-in synthetic knowledge corpus (``--dataloader.dataset knowledge``, the
default: no network), or any Hugging Face dataset: a hub id (streamed), a local dataset
directory, or a local ``.json``/``.jsonl``/``.parquet``/``.csv``/``.txt`` file.

Every document is encoded as ``BOS text EOS`` and the documents are concatenated into one int32
stream, written once under ``cache_dir`` (keyed by the source and the tokenizer) and opened as
a ``tensordict.MemoryMappedTensor``: a restart, another rank or another run with the same data
maps the file instead of re-tokenising. The cache directory appears atomically (written to a
temporary directory, then renamed), so a killed run never leaves a half-written cache behind.

Sample ``i`` of an epoch is the window ``stream[w*seq_len : (w+1)*seq_len + 1]`` for the
``i``-th entry ``w`` of a permutation drawn from ``(seed, epoch)``; data-parallel rank ``r``
takes entries ``r, r + dp_world_size, ...``. The state (epoch, position) is two integers, so
resuming is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import MemoryMappedTensor
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer, HuggingFaceTokenizer
from torchtitan.tools.logging import logger

from recipes.data.knowledge import KnowledgeCorpus

BUILTIN_DATASET = "knowledge"
_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
}
# Part of every cache key: bump when the tokens of a source change (2: the knowledge corpus
# shuffles its documents).
_CACHE_FORMAT_VERSION = 2


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "memcompile", "tokens")


def _looks_like_path(location: str) -> bool:
    return location.startswith(("/", "./", "../", "~")) or Path(location).suffix in _FILE_BUILDERS


def check_dataset_location(dataset: str, dataset_path: str | None) -> None:
    """Raise a clear error for a local dataset path that does not exist (hub ids pass)."""
    location = dataset_path or dataset
    if location == BUILTIN_DATASET:
        return
    path = Path(location).expanduser()
    if path.exists():
        if path.is_file() and path.suffix not in _FILE_BUILDERS:
            raise ValueError(
                f"dataset file {location!r} has an unsupported extension {path.suffix!r}; "
                f"expected one of {sorted(_FILE_BUILDERS)}"
            )
        return
    if dataset_path is not None or _looks_like_path(location):
        raise FileNotFoundError(f"dataset path {location!r} does not exist ({path.resolve()})")


def _hf_documents(location: str, split: str, text_column: str) -> Iterable[str]:
    from datasets import load_dataset

    path = Path(location).expanduser()
    if path.is_file():
        ds = load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path), split=split)
    elif path.is_dir():
        ds = load_dataset(str(path), split=split)
    else:
        # Hub ids are streamed so that max_documents does not download the whole dataset.
        ds = load_dataset(location, split=split, streaming=True)
    columns = ds.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(
            f"dataset {location!r} has no column {text_column!r} (--dataloader.text_column); "
            f"its columns are {columns}"
        )
    return (sample[text_column] for sample in ds)


def knowledge_source(corpus: KnowledgeCorpus) -> dict[str, Any]:
    """The source (see :func:`cache_key`) of the built-in knowledge corpus ``corpus``."""
    return {"dataset": BUILTIN_DATASET, **asdict(corpus)}


def cache_key(source: dict[str, Any], tokenizer: BaseTokenizer) -> str:
    """The name of the token cache entry of ``source`` (JSON-serialisable: what identifies
    the documents) tokenised by ``tokenizer``."""
    fingerprint = _tokenizer_fingerprint(tokenizer)
    payload = json.dumps(
        {"source": source, "tokenizer": fingerprint, "v": _CACHE_FORMAT_VERSION}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _tokenizer_fingerprint(tokenizer: BaseTokenizer) -> str:
    if isinstance(tokenizer, HuggingFaceTokenizer):
        payload = tokenizer.tokenizer.to_str() + f"|{tokenizer.bos_id}|{tokenizer.eos_id}"
    else:
        payload = f"{type(tokenizer).__qualname__}|{tokenizer.get_vocab_size()}"
    return hashlib.sha256(payload.encode()).hexdigest()


def _write_token_stream(
    documents: Iterable[str], tokenizer: BaseTokenizer, path: Path
) -> dict[str, int]:
    num_tokens, max_token_id = 0, -1
    with open(path, "wb") as f:
        for text in documents:
            ids = np.asarray(tokenizer.encode(text, add_bos=True, add_eos=True), dtype=np.int32)
            f.write(ids.tobytes())
            num_tokens += ids.size
            max_token_id = max(max_token_id, int(ids.max(initial=-1)))
    return {"num_tokens": num_tokens, "max_token_id": max_token_id}


def load_token_stream(
    source: dict[str, Any],
    documents: Callable[[], Iterable[str]],
    tokenizer: BaseTokenizer,
    cache_dir: str,
) -> torch.Tensor:
    """The 1-D int32 token stream of ``documents()``, tokenised at most once per
    ``(source, tokenizer)`` (:func:`cache_key`) and memory-mapped from ``cache_dir``."""
    key = cache_key(source, tokenizer)
    entry = Path(cache_dir) / key
    if not (entry / "meta.json").exists():
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=entry.parent))
        try:
            logger.info(f"Tokenising {source} into {entry} (once; later runs reuse it)")
            meta = _write_token_stream(documents(), tokenizer, staging / "tokens.bin")
            meta["source"] = source
            (staging / "meta.json").write_text(json.dumps(meta, indent=2))
            try:
                staging.rename(entry)  # atomic: readers see all of it or nothing
            except OSError:
                if not (entry / "meta.json").exists():  # not a concurrent writer winning
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    meta = json.loads((entry / "meta.json").read_text())
    if meta["max_token_id"] >= tokenizer.get_vocab_size():
        raise ValueError(
            f"cached token id {meta['max_token_id']} >= tokenizer vocab size "
            f"{tokenizer.get_vocab_size()} ({entry})"
        )
    return MemoryMappedTensor.from_filename(
        entry / "tokens.bin", dtype=torch.int32, shape=(meta["num_tokens"],)
    )


class PackedWindows(IterableDataset, Stateful):
    """Shuffled ``seq_len``-token windows of a token stream, split over data-parallel ranks.

    Each epoch cuts the stream into windows on a grid shifted by a random offset (none in the
    first epoch), so that from epoch to epoch a document is cut at other places and read after
    a different amount of context: a small corpus trained for many epochs is then learnt as
    documents, not as a fixed set of windows.
    """

    def __init__(
        self, tokens: torch.Tensor, *, seq_len: int, seed: int, dp_rank: int, dp_world_size: int
    ):
        # The fewest windows of any epoch (the grid shifted by seq_len - 1).
        min_windows = (tokens.numel() - seq_len) // seq_len
        if min_windows < dp_world_size:
            raise ValueError(
                f"the corpus has {tokens.numel()} tokens: {min_windows} windows of "
                f"seq_len={seq_len}, fewer than the {dp_world_size} data-parallel ranks"
            )
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.epoch = 0
        self.position = 0  # index into this rank's share of the epoch's windows

    def _epoch_windows(self) -> torch.Tensor:
        """The start of each window this rank reads this epoch, in order. Every rank reads as
        many windows (the epoch's last few are dropped), so ranks change epoch together."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        offset = int(torch.randint(self.seq_len, (1,), generator=generator)) if self.epoch else 0
        num_windows = (self.tokens.numel() - 1 - offset) // self.seq_len
        # One permutation whatever the world size, so that any number of ranks reads the
        # windows of a single process, in the same order.
        order = torch.randperm(num_windows, generator=generator)
        order = order[: num_windows - num_windows % self.dp_world_size]
        return offset + order[self.dp_rank :: self.dp_world_size] * self.seq_len

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            starts = self._epoch_windows()
            while self.position < len(starts):
                start = int(starts[self.position])
                self.position += 1
                window = self.tokens[start : start + self.seq_len + 1].to(torch.int64)
                yield {"input": window[:-1]}, window[1:]
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.epoch, self.position = state_dict["epoch"], state_dict["position"]


class CorpusDataLoader(ParallelAwareDataloader):
    """Data loader for the built-in knowledge corpus or any Hugging Face text dataset."""

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        dataset: str = BUILTIN_DATASET
        """'knowledge' (the built-in synthetic corpus, no network), a Hugging Face hub id,
        a local dataset directory, or a local .json/.jsonl/.parquet/.csv/.txt file"""

        dataset_path: str | None = None
        """Local copy of a hub dataset to load instead of downloading it"""

        split: str = "train"
        """Dataset split (Hugging Face datasets only)"""

        text_column: str = "text"
        """Column holding the text (Hugging Face datasets only)"""

        max_documents: int | None = None
        """Tokenise at most this many documents (Hugging Face datasets only; None: all)"""

        knowledge: KnowledgeCorpus = field(default_factory=KnowledgeCorpus)
        """The built-in synthetic corpus (used when dataset is 'knowledge')"""

        seed: int = 0
        """Seed of the window order (a new permutation every epoch)"""

        cache_dir: str = field(default_factory=default_cache_dir)
        """Where tokenised corpora are cached (memory-mapped int32 token streams)"""

        def __post_init__(self) -> None:
            check_dataset_location(self.dataset, self.dataset_path)

        def source(self) -> dict[str, Any]:
            """What identifies the tokenised corpus (the cache key, with the tokenizer)."""
            if self.dataset == BUILTIN_DATASET:
                return knowledge_source(self.knowledge)
            location = self.dataset_path or self.dataset
            path = Path(location).expanduser()
            source = {
                "dataset": self.dataset,
                "location": str(path.resolve()) if path.exists() else location,
                "split": self.split,
                "text_column": self.text_column,
                "max_documents": self.max_documents,
            }
            if path.is_file():  # a changed file gets a new cache entry
                stat = path.stat()
                source["file"] = [stat.st_size, stat.st_mtime_ns]
            return source

        def documents(self) -> Iterable[str]:
            if self.dataset == BUILTIN_DATASET:
                return self.knowledge.train_documents()
            documents = _hf_documents(
                self.dataset_path or self.dataset, self.split, self.text_column
            )
            if self.max_documents is not None:
                documents = (d for _, d in zip(range(self.max_documents), documents))
            return documents

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: BaseTokenizer,
        seq_len: int,
        local_batch_size: int,
        snapshot_every_n_steps: int | None = 1,
        **kwargs,
    ):
        tokens = load_token_stream(config.source(), config.documents, tokenizer, config.cache_dir)
        logger.info(f"Corpus {config.dataset!r}: {tokens.numel():,} tokens")
        dataset = PackedWindows(
            tokens, seq_len=seq_len, seed=config.seed, dp_rank=dp_rank, dp_world_size=dp_world_size
        )
        super().__init__(
            dataset,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            batch_size=local_batch_size,
            num_workers=config.num_workers,
            persistent_workers=config.persistent_workers,
            pin_memory=config.pin_memory,
            prefetch_factor=config.prefetch_factor,
            snapshot_every_n_steps=snapshot_every_n_steps,
        )
