"""memcompile: Llama-style language models with product-key memory layers.

- :mod:`memcompile.config`: ``TransformerConfig`` and ``MemoryConfig`` (validated).
- :mod:`memcompile.flavors`: the named configurations (``get_flavor("mem_1b")``);
  ``python -m memcompile.flavors`` prints their parameters and FLOPs per token.
- :mod:`memcompile.model`: the ``Transformer``.
- :mod:`memcompile.memory`: ``ProductKeyMemory`` and ``MemoryPlus``.
- :mod:`memcompile.generate`: ``KVCache``, ``generate`` (greedy or sampled decoding) and
  ``generate_batched`` (prompts of any lengths).
- :mod:`memcompile.scoring`: log-likelihoods, NLL and perplexity of continuations.
- :mod:`memcompile.stats`: parameter and FLOP counts from a config.
- :mod:`memcompile.telemetry`: which table rows the memory layers read.
- :mod:`memcompile.pretrained`: ``save_pretrained`` / ``from_pretrained`` (safetensors folders);
  ``memcompile.from_pretrained(folder)`` for short.
"""


def __getattr__(name: str):
    # Lazy: importing the package stays light (no model, ops or safetensors).
    if name in ("from_pretrained", "save_pretrained"):
        from memcompile import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'memcompile' has no attribute {name!r}")
