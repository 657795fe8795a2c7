"""Configuration validation: a bad configuration fails at construction with a clear message."""

from __future__ import annotations

from dataclasses import replace

import pytest

from memcompile.config import (
    MemoryConfig,
    MemoryKind,
    TransformerConfig,
    centred_layers,
    llama_ffn_hidden_dim,
)
from memcompile.flavors import get_flavor

DENSE = dict(vocab_size=64, dim=32, n_layers=4, n_heads=4, ffn_hidden_dim=48)
MEMORY = dict(num_values=16, layers=(1, 3), heads=2, topk=2)


def test_memory_dims_default_to_half_and_full_model_dim():
    config = TransformerConfig(**DENSE, memory=MemoryConfig(**MEMORY))
    assert (config.memory.key_dim, config.memory.value_dim, config.memory.n_keys) == (16, 32, 4)
    assert config.n_kv_heads == config.n_heads


@pytest.mark.parametrize(
    ("dense", "memory", "message"),
    [
        ({"n_heads": 5}, None, r"n_heads \(5\) must divide dim \(32\)"),
        ({"n_kv_heads": 3}, None, r"n_kv_heads \(3\) must divide n_heads \(4\)"),
        ({"dim": 36, "n_heads": 4}, None, r"head_dim = dim / n_heads = 9 must be even"),
        ({"vocab_size": 0}, None, r"vocab_size must be >= 1, got 0"),
        ({}, {"layers": (1, 4)}, r"memory.layers \[4\] out of range: the model has blocks 0..3"),
        ({}, {"layers": (-1,)}, r"memory.layers \[-1\] out of range"),
        ({}, {"layers": (1, 1)}, r"memory.layers must be distinct"),
        ({}, {"layers": ()}, r"memory.layers must name at least one block"),
        (
            {},
            {"num_values": 1_000_001},
            r"perfect square .* got 1000001; nearest squares: "
            r"1000\^2 = 1000000 and 1001\^2 = 1002001",
        ),
        ({}, {"num_values": 0}, r"num_values must be a positive perfect square"),
        ({}, {"topk": 5}, r"memory.topk \(5\) must be <= n_keys = sqrt\(num_values\) = 4"),
        ({}, {"heads": 0}, r"memory.heads must be >= 1, got 0"),
        ({}, {"key_dim": 7}, r"memory.key_dim must be even and >= 2 .* got 7"),
        ({}, {"value_dim": 0}, r"memory.value_dim must be >= 1, got 0"),
        (
            {},
            {"kind": "memory", "value_dim": 16},
            r"memory.value_dim \(16\) must equal dim \(32\)",
        ),
        ({}, {"kind": "moe"}, r"'moe' is not a valid MemoryKind"),
    ],
)
def test_bad_configuration_fails_at_construction(dense, memory, message):
    with pytest.raises(ValueError, match=message):
        memory_config = None if memory is None else MemoryConfig(**{**MEMORY, **memory})
        TransformerConfig(**{**DENSE, **dense}, memory=memory_config)


def test_unknown_flavor_lists_the_known_ones():
    with pytest.raises(
        ValueError, match=r"unknown flavor .mem_2b.; choose one of: dense_134m, mem_134m"
    ):
        get_flavor("mem_2b")


def test_plain_memory_kind_accepts_its_string_name():
    memory = MemoryConfig(**MEMORY, kind="memory")
    assert memory.kind is MemoryKind.MEMORY
    assert replace(memory, kind="memory_plus").kind is MemoryKind.MEMORY_PLUS


@pytest.mark.parametrize(
    ("n_layers", "count", "stride", "expected"),
    [(12, 3, 4, (2, 6, 10)), (24, 3, 8, (4, 12, 20)), (22, 3, 8, (3, 11, 19)), (4, 2, 2, (1, 3))],
)
def test_centred_layers_match_the_paper_placement(n_layers, count, stride, expected):
    assert centred_layers(n_layers, count, stride) == expected


@pytest.mark.parametrize(
    ("dim", "kwargs", "expected"),
    [
        (768, {}, 2048),
        (1024, {}, 2816),
        (2048, {}, 5632),
        (4096, {"multiple_of": 1024, "multiplier": 1.3}, 14336),  # Llama3 8B
    ],
)
def test_llama_ffn_hidden_dim(dim, kwargs, expected):
    assert llama_ffn_hidden_dim(dim, **kwargs) == expected
