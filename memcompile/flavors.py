"""Named configurations: the paper's dense bases and their memory twins, plus small CPU models.

Names read ``<architecture>_<base>[_<memory size>]``:

- ``dense_<base>``: the Llama-style base model.
- ``mem_<base>``: Memory+ (3 memory layers sharing 1M = 1024² values), the paper's default.
- ``mem_<base>_<4m|16m|64m>``: Memory+ with a larger table (memory scaling study);
  ``mem_debug_64k``: ``mem_debug`` with 64K values, few enough reads per sequence that most
  slots are specific to some text (sparse memory finetuning on a CPU); ``mem_debug_1m``: the
  paper's 1M-row table at debug width (a real-size table that a CPU can train, for checks
  such as ``benchmarks.plan_check``).
- ``memplain_<base>``: one plain memory layer (no W1/W2) in the middle block, 1M values.
- ``engram_<base>`` (debug, tiny, 134m, 1b): Engram (hashed 2- and 3-grams, 4 heads each) at
  the start of an early and the middle block (the paper's placement), rows of width dim / 8
  (so the memory vector is dim wide), each of the 16 tables ``values / 2`` rows: the table has
  the parameters of ``mem_<base>``'s. The dense blocks stay, so it adds the gate's two
  projections: FLOP-matched to ``dense_<base>`` within a few percent (the table's column).
- ``peer_<base>`` (debug, tiny, 134m, 1b): PEER replacing the feed-forwards of ``mem_<base>``'s
  blocks, on its product-key grid (``n_keys²`` experts; the table, down and up vectors, is
  twice its values), 8 heads × top-16 experts (the paper's; debug 2 × 8): FLOP-matched like
  Memory+ (within a few percent of ``dense_<base>``).

Bases: ``134m``, ``373m``, ``720m``, ``1b`` (the paper's 1.3B) with the Llama2 tokenizer
(32000) and ``8b`` (Llama3 8B, 128256). ``tiny`` (Llama2 vocabulary, trains on a CPU in
minutes) and ``debug`` (byte vocabulary, a few seconds; for tests and smoke runs) are ours.

The paper gives the sizes, not the shapes; these are inferred (see ``FLAVORS.md``): the 1.3B
shape reproduces the paper's 4M/16M/64M totals to the last reported digit. Attention head
counts are not reported (head_dim 64 up to dim 1024, 128 above; they change no counts).

``python -m memcompile.flavors`` prints every flavor's parameters and FLOPs per token, and the
FLOPs of each memory flavor against its dense twin's: every family is matched by FLOPs per
token, as the paper matched Memory+ (not by parameters: the tables add billions).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from memcompile.config import (
    EngramConfig,
    MemoryConfig,
    MemoryKind,
    PEERConfig,
    TransformerConfig,
    centred_layers,
    llama_ffn_hidden_dim,
)
from memcompile.stats import model_stats

LLAMA2_VOCAB = 32_000
LLAMA3_VOCAB = 128_256
BYTE_VOCAB = 256


def _llama(dim: int, n_layers: int, n_heads: int, **overrides) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=overrides.pop("vocab_size", LLAMA2_VOCAB),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        ffn_hidden_dim=overrides.pop("ffn_hidden_dim", llama_ffn_hidden_dim(dim)),
        **overrides,
    )


def _base(config: TransformerConfig, stride: int, count: int = 3):
    """A dense base and the blocks of its Memory+ layers: ``count`` centred, ``stride`` apart."""
    return config, centred_layers(config.n_layers, count, stride)


#: The dense bases and their Memory+ blocks (paper: 3 layers, stride 4 for 134M, 8 above).
_BASES: dict[str, tuple[TransformerConfig, tuple[int, ...]]] = {
    "134m": _base(_llama(768, 12, 12), stride=4),
    "373m": _base(_llama(1024, 24, 16), stride=8),
    "720m": _base(_llama(1536, 22, 12), stride=8),
    "1b": _base(_llama(2048, 22, 16), stride=8),
    "8b": _base(
        _llama(
            4096,
            32,
            32,
            n_kv_heads=8,
            vocab_size=LLAMA3_VOCAB,
            ffn_hidden_dim=llama_ffn_hidden_dim(4096, multiple_of=1024, multiplier=1.3),
            rope_theta=500_000.0,
            max_seq_len=8192,
        ),
        stride=8,
    ),
    "tiny": _base(_llama(256, 6, 4, max_seq_len=1024), stride=2),
    "debug": _base(
        _llama(
            64,
            4,
            4,
            n_kv_heads=2,
            vocab_size=BYTE_VOCAB,
            ffn_hidden_dim=llama_ffn_hidden_dim(64, multiple_of=32),
            max_seq_len=256,
        ),
        stride=2,
        count=2,
    ),
}

#: Memory sizes by name suffix, as sub-keys per half (values = n_keys²).
_MEMORY_SIZES = {"64k": 256, "1m": 1024, "4m": 2048, "16m": 4096, "64m": 8192}

#: The memory scaling study (1.3B), the 4096² table of the paper's 8B memory model, and a
#: debug model whose table is large next to its reads (sparse memory finetuning), and one with
#: the paper's 1M rows (checks of the parallel plan against real runs on a CPU).
_LARGER_MEMORIES = {"1b": ("4m", "16m", "64m"), "8b": ("16m",), "debug": ("64k", "1m")}

#: Smaller tables (and reads) for the CPU flavors: n_keys and MemoryConfig overrides.
_SMALL_MEMORY = {"tiny": (128, {}), "debug": (32, {"heads": 2, "topk": 8})}


def _memory_plus(
    base: TransformerConfig, layers: tuple[int, ...], n_keys: int, **memory
) -> TransformerConfig:
    return replace(base, memory=MemoryConfig(num_values=n_keys**2, layers=layers, **memory))


def _memory_plain(base: TransformerConfig, n_keys: int, **memory) -> TransformerConfig:
    config = MemoryConfig(
        num_values=n_keys**2, layers=(base.n_layers // 2,), kind=MemoryKind.MEMORY, **memory
    )
    return replace(base, memory=config)


#: Bases with Engram and PEER twins, and PEER's heads and top-k (the paper's 8 × 16 above debug).
_OTHER_FAMILIES = {"debug": (2, 8), "tiny": (8, 16), "134m": (8, 16), "1b": (8, 16)}


def _engram(base: TransformerConfig, n_keys: int) -> TransformerConfig:
    """Engram in an early and the middle block; 16 tables of ``n_keys² / 2`` rows of width
    dim / 8: the parameters of a ``n_keys²``-value Memory+ table, a dim-wide memory vector."""
    engram = EngramConfig(
        layers=(1, base.n_layers // 2),
        max_ngram=3,
        heads=4,
        table_rows=n_keys**2 // 2,
        row_dim=base.dim // 8,
    )
    return replace(base, engram=engram)


def _peer(
    base: TransformerConfig, layers: tuple[int, ...], n_keys: int, heads: int, topk: int
) -> TransformerConfig:
    return replace(
        base, peer=PEERConfig(num_experts=n_keys**2, layers=layers, heads=heads, topk=topk)
    )


def _build_flavors() -> dict[str, TransformerConfig]:
    flavors: dict[str, TransformerConfig] = {}
    for base_name, (base, memory_layers) in _BASES.items():
        n_keys, overrides = _SMALL_MEMORY.get(base_name, (_MEMORY_SIZES["1m"], {}))
        flavors[f"dense_{base_name}"] = base
        flavors[f"mem_{base_name}"] = _memory_plus(base, memory_layers, n_keys, **overrides)
        for size in _LARGER_MEMORIES.get(base_name, ()):
            flavors[f"mem_{base_name}_{size}"] = _memory_plus(
                base, memory_layers, _MEMORY_SIZES[size], **overrides
            )
        flavors[f"memplain_{base_name}"] = _memory_plain(base, n_keys, **overrides)
        if base_name in _OTHER_FAMILIES:
            flavors[f"engram_{base_name}"] = _engram(base, n_keys)
            heads, topk = _OTHER_FAMILIES[base_name]
            flavors[f"peer_{base_name}"] = _peer(base, memory_layers, n_keys, heads, topk)
    return flavors


FLAVORS: dict[str, TransformerConfig] = _build_flavors()

#: A flavor name as a type: command lines (tyro) list the choices and reject other names.
FlavorName = Literal[tuple(FLAVORS)]  # type: ignore[valid-type]


def get_flavor(
    name: str, *, vocab_size: int | None = None, seq_len: int | None = None
) -> TransformerConfig:
    """The configuration named ``name`` (see :data:`FLAVORS`), fitted to a run with
    :func:`fit_to_run`. Unknown names raise ``ValueError`` listing the known ones."""
    if name not in FLAVORS:
        raise ValueError(f"unknown flavor {name!r}; choose one of: {', '.join(FLAVORS)}")
    return fit_to_run(FLAVORS[name], vocab_size=vocab_size, seq_len=seq_len)


def fit_to_run(
    config: TransformerConfig, *, vocab_size: int | None = None, seq_len: int | None = None
) -> TransformerConfig:
    """``config`` as a run trains it, and as its checkpoints must be loaded.

    The flavors assume the Llama tokenizers: ``vocab_size`` replaces theirs with the run's
    tokenizer's. ``seq_len`` makes the RoPE tables at least that long (they are not in the
    checkpoint, so this changes no weight). Training, evaluation and export all fit here.
    """
    if vocab_size is not None:
        config = replace(config, vocab_size=vocab_size)
    if seq_len is not None and seq_len > config.max_seq_len:
        config = replace(config, max_seq_len=seq_len)
    return config


def flavor_table() -> str:
    """A markdown table of every flavor: parameters and training FLOPs per token."""
    rows = [
        "| flavor | dim × layers | memory layers | table | total | dense | memory | active "
        "| train FLOPs/token (seq len) | FLOPs vs dense twin |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, config in FLAVORS.items():
        stats = model_stats(config)
        dense_twin = FLAVORS.get("dense_" + name.split("_")[1])
        ratio = "-"
        if config.family is not None and dense_twin is not None:
            dense_flops = model_stats(dense_twin).train_flops_per_token
            ratio = f"{stats.train_flops_per_token / dense_flops - 1:+.1%}"
        rows.append(
            f"| {name} | {config.dim} × {config.n_layers} | {_layers(config)} | {_table(config)} "
            f"| {_human(stats.total_params)} | {_human(stats.dense_params)} "
            f"| {_human(stats.memory_params)} | {_human(stats.active_params)} "
            f"| {stats.train_flops_per_token / 1e9:.4g}G ({stats.seq_len}) | {ratio} |"
        )
    return "\n".join(rows)


def _layers(config: TransformerConfig) -> str:
    if config.memory is not None:
        return f"{config.memory.kind.value} {list(config.memory.layers)}"
    if config.engram is not None:
        return f"engram {list(config.engram.layers)}"
    if config.peer is not None:
        return f"peer {list(config.peer.layers)}"
    return "-"


def _table(config: TransformerConfig) -> str:
    """The table's size: product-key values or PEER experts as ``n_keys²``, Engram's rows."""
    if config.memory is not None:
        return f"{config.memory.n_keys}² values"
    if config.engram is not None:
        return f"{_human(config.engram.num_rows)} rows"
    if config.peer is not None:
        return f"{config.peer.n_keys}² experts"
    return "-"


def _human(count: int) -> str:
    if count == 0:
        return "0"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3f}{unit}"
    return str(count)


if __name__ == "__main__":
    print(flavor_table())
