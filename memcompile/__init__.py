"""memcompile: Llama-style language models with product-key memory layers.

- :mod:`memcompile.config`: ``TransformerConfig`` and ``MemoryConfig`` (validated).
- :mod:`memcompile.flavors`: the named configurations (``get_flavor("mem_1b")``).
- :mod:`memcompile.model`: the ``Transformer``.
- :mod:`memcompile.memory`: ``ProductKeyMemory`` and ``MemoryPlus``.
- :mod:`memcompile.stats`: parameter and FLOP counts from a config.
- :mod:`memcompile.telemetry`: which table rows the memory layers read.
"""

from memcompile.config import MemoryConfig, MemoryKind, TransformerConfig
from memcompile.flavors import FLAVORS, get_flavor
from memcompile.model import Transformer
from memcompile.stats import ModelStats, model_stats
from memcompile.telemetry import MemoryUsage, memory_usage

__all__ = [
    "FLAVORS",
    "MemoryConfig",
    "MemoryKind",
    "MemoryUsage",
    "ModelStats",
    "Transformer",
    "TransformerConfig",
    "get_flavor",
    "memory_usage",
    "model_stats",
]
