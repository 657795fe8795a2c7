"""memcompile models in the Hugging Face stack: ``AutoModelForCausalLM`` and ``generate()``.

A folder written by :func:`memcompile.pretrained.save_pretrained` (``recipes.export``) carries
``modeling_memcompile.py``, which imports these classes, and ``config.json`` points
``auto_map`` at it, so with memcompile installed::

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    model.generate(input_ids, max_new_tokens=16, do_sample=False)

(and lm-eval's ``hf`` backend, ``pretrained=folder,trust_remote_code=True``). Remote code rather
than a registration: a registered class needs an ``import memcompile.hf`` before every load,
which lm-eval's command line and HF pipelines cannot do; the two lines of remote code only
import the installed package, so what runs is memcompile's own tested model.

``MemcompileForCausalLM.model`` is the plain ``memcompile.model.Transformer``, and generation
runs through the same attention code as :mod:`memcompile.generate`: transformers' caches
(``DynamicCache`` by default, ``cache_implementation="static"``, a ``Cache`` passed as ``cache``
or, deprecated, ``past_key_values``) are handed to ``Transformer.forward`` through a thin view
(:class:`_CacheView`), and ``attention_mask`` / ``position_ids`` make a left-padded batch one
batched forward, so greedy and sampled ``generate()``, beam search included, decode one token
per step. Needs a ``transformers`` whose models take ``cache`` (5.x; tested with 5.24), which
is not a core dependency.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Cache, DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from memcompile.engram import NgramHasher
from memcompile.generate import RecentInputs
from memcompile.memory import use_quantized_table
from memcompile.model import Transformer
from memcompile.pretrained import CONFIG_KEY, TABLE_KEY, config_from_dict, empty_quantized_table


class MemcompileConfig(PretrainedConfig):
    """The HF config: the whole ``TransformerConfig`` under ``memcompile`` (as ``config.json``
    holds it), and the usual HF names derived from it."""

    model_type = "memcompile"

    def __init__(self, memcompile: dict[str, Any] | None = None, **kwargs: Any) -> None:
        setattr(self, CONFIG_KEY, memcompile)
        if memcompile is not None:
            config = config_from_dict(memcompile)
            kwargs.setdefault("vocab_size", config.vocab_size)
            kwargs.setdefault("hidden_size", config.dim)
            kwargs.setdefault("num_hidden_layers", config.n_layers)
            kwargs.setdefault("num_attention_heads", config.n_heads)
            kwargs.setdefault("num_key_value_heads", config.n_kv_heads)
            kwargs.setdefault("head_dim", config.head_dim)
            kwargs.setdefault("max_position_embeddings", config.max_seq_len)
        super().__init__(**kwargs)


class _LayerCacheView:
    """One layer of a transformers cache as ``Attention`` reads a cache layer: ``update(k, v)``
    with memcompile's ``[B, S, heads, head_dim]`` layout (transformers keeps ``[B, heads, S,
    head_dim]``: the transposes are views)."""

    def __init__(self, view: _CacheView, layer_id: int) -> None:
        self._view = view
        self._layer_id = layer_id

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = self._view.cache.update(k.transpose(1, 2), v.transpose(1, 2), self._layer_id)
        # A static cache returns all its slots; the mask covers the filled ones.
        end = self._view.length + k.shape[1]
        return keys[:, :, :end].transpose(1, 2), values[:, :, :end].transpose(1, 2)


class _CacheView:
    """A transformers ``Cache`` as ``Transformer.forward`` reads a KV cache (the interface of
    :class:`memcompile.generate.KVCache`): ``length``, ``next_positions``, ``layer(i)``,
    ``advance`` and ``recent``. The cache counts what it stores itself, so ``advance`` has
    nothing to do."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.length = int(cache.get_seq_length())
        # Engram layers' last few inputs live beside the keys and values, on the cache itself.
        recent = getattr(cache, "memcompile_recent", None)
        if recent is None or self.length == 0:
            recent = cache.memcompile_recent = RecentInputs()
        self.recent = recent

    def next_positions(self, seq_len: int, device: torch.device) -> Tensor:
        room = self.cache.get_max_length()  # -1: grows without bound
        if room >= 0 and self.length + seq_len > room:
            raise ValueError(
                f"MemcompileForCausalLM: cache overflow: {self.length} cached + {seq_len} new "
                f"positions > the cache's {room} (a larger max_cache_len, or max_new_tokens)"
            )
        return torch.arange(self.length, self.length + seq_len, device=device)

    def layer(self, layer_id: int) -> _LayerCacheView:
        return _LayerCacheView(self, layer_id)

    def advance(self, seq_len: int) -> None:
        pass


class MemcompileForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MemcompileConfig
    base_model_prefix = "model"
    _no_split_modules = ["TransformerBlock"]

    def __init__(self, config: MemcompileConfig) -> None:
        super().__init__(config)
        self.model = Transformer(config_from_dict(getattr(config, CONFIG_KEY)))
        # A quantized table (config.json's quantized_table) loads into a QuantizedTable.
        table = empty_quantized_table(getattr(config, TABLE_KEY, None), self.model.config, "config")
        if table is not None:
            use_quantized_table(self.model, table)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Loading fills every parameter; the RoPE tables and the Engram hasher's multipliers
        # and table offsets are derived from the config, never stored.
        if isinstance(module, Transformer) and not module.rope_cos.is_meta:
            module.init_rope_tables()
        if isinstance(module, NgramHasher) and not module.multipliers.is_meta:
            module.init_buffers()

    @staticmethod
    def create_masks_for_generate(attention_mask: Tensor | None, **_: Any) -> Tensor | None:
        """The 2-D padding mask as it is: ``generate()`` would turn it into transformers' 4-D
        mask for a static cache, but ``Transformer.forward`` builds its own from the 2-D one."""
        return attention_mask

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.tok_embeddings

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.output

    def _reorder_cache(self, cache: Cache, beam_idx: torch.Tensor) -> Cache:
        """Beam search: move the cache's rows with their beams, Engram's recent inputs too
        (transformers reorders only the keys and values it knows of)."""
        cache.reorder_cache(beam_idx)
        recent = getattr(cache, "memcompile_recent", None)
        if recent is not None:
            recent.reorder(beam_idx)
        return cache

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> CausalLMOutputWithPast | tuple[Any, ...]:
        """Logits of ``input_ids`` (and the loss of ``labels``, shifted inside), as HF causal
        LMs give them: a ``CausalLMOutputWithPast``, or with ``return_dict=False`` the tuple
        ``(loss, logits, cache, hidden_states)`` without the ``None`` entries.

        ``cache`` (a transformers ``Cache``; ``past_key_values`` is its deprecated name) holds
        the keys and values of the positions before ``input_ids``, which continue them; with
        ``use_cache=True`` and no ``cache`` a ``DynamicCache`` is
        started (``generate()`` asks for one unless told ``use_cache=False``), and the output
        carries the cache. ``attention_mask`` (``[B, cached + S]``, 0 at
        padding) hides padded positions; ``position_ids`` (``[B, S]``) default to each row's
        count of real tokens before each token, so a left-padded row gets the logits it has
        unpadded (up to rounding; its padded positions' outputs are meaningless).
        ``output_hidden_states`` gives the ``n_layers + 1`` hidden states as
        ``LlamaForCausalLM`` does (embeddings, every block's output, the last one after the
        final norm). Not available: attention weights (attention runs in SDPA, which never
        materialises them: ``output_attentions=True`` is refused)."""
        if output_attentions:
            raise ValueError(
                "MemcompileForCausalLM: output_attentions=True is not available: attention runs "
                "in torch's scaled_dot_product_attention, which does not return the weights"
            )
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(
                f"MemcompileForCausalLM: cache (past_key_values) must be a transformers Cache "
                f"such as DynamicCache(), got {type(cache).__name__} (transformers 5 dropped "
                f"the legacy tuples of tensors)"
            )
        config = self.config
        output_hidden_states = (
            config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = config.return_dict if return_dict is None else return_dict
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        view = None if cache is None else _CacheView(cache)
        if position_ids is None and attention_mask is not None:
            # Each token's position is the number of real tokens before it in its row.
            counted = attention_mask.long().cumsum(-1) - 1
            position_ids = counted[:, -input_ids.shape[1] :].clamp(min=0)
        elif position_ids is not None and position_ids.shape[0] == 1:
            position_ids = position_ids[0]  # one row of positions for every row
        hidden_states: list[Tensor] | None = [] if output_hidden_states else None
        logits = self.model(
            input_ids,
            position_ids,
            view,
            attention_mask=attention_mask,
            hidden_states=hidden_states,
        )
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=cache,
            hidden_states=None if hidden_states is None else tuple(hidden_states),
        )
        return output if return_dict else output.to_tuple()
