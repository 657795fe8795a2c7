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

``MemcompileForCausalLM.model`` is the plain ``memcompile.model.Transformer``. Generation
recomputes the whole sequence each step (no KV cache in the HF path: exact, not fast; use
``memcompile.generate`` for speed). Needs ``transformers`` (not a core dependency).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from memcompile.model import Transformer
from memcompile.pretrained import CONFIG_KEY, config_from_dict


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
            kwargs.setdefault("max_position_embeddings", config.max_seq_len)
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)


class MemcompileForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MemcompileConfig
    base_model_prefix = "model"
    _no_split_modules = ["TransformerBlock"]

    def __init__(self, config: MemcompileConfig) -> None:
        super().__init__(config)
        self.model = Transformer(config_from_dict(getattr(config, CONFIG_KEY)))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Loading fills every parameter; the RoPE tables are derived, never stored.
        if isinstance(module, Transformer) and not module.rope_cos.is_meta:
            module.init_rope_tables()

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        # No HF KV cache: every step reads the whole sequence, even when the caller asks for
        # use_cache=True (lm-eval does), which would otherwise feed only the newest token.
        # What the caller asked to see (generate(output_hidden_states=True)) still goes in.
        asked = {k: kwargs[k] for k in ("output_hidden_states", "output_attentions") if k in kwargs}
        return {"input_ids": input_ids, "attention_mask": attention_mask, **asked}

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.tok_embeddings

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.output

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> CausalLMOutput | tuple[torch.Tensor, ...]:
        """Logits of ``input_ids`` (and the loss of ``labels``, shifted inside), as HF causal
        LMs give them: a ``CausalLMOutput``, or with ``return_dict=False`` the tuple ``(loss,
        logits, hidden_states)`` without the ``None`` entries. ``output_hidden_states`` gives the
        ``n_layers + 1`` hidden states as ``LlamaForCausalLM`` does (embeddings, every block's
        output, the last one after the final norm). Not available: a KV cache (``use_cache``
        returns none, ``past_key_values`` is refused) and attention weights (attention runs in
        SDPA, which never materialises them: ``output_attentions=True`` is refused).

        The model takes no attention mask: right padding cannot change the positions before it
        (causal attention), and the rows of a left-padded batch (``generate()`` and lm-eval pad
        on the left) are run one by one without their padding, so every row gets exactly its
        unpadded logits and hidden states (0 at padding)."""
        if output_attentions:
            raise ValueError(
                "MemcompileForCausalLM: output_attentions=True is not available: attention runs "
                "in torch's scaled_dot_product_attention, which does not return the weights"
            )
        if past_key_values is not None:
            raise ValueError(
                "MemcompileForCausalLM keeps no KV cache: pass the whole sequence as input_ids, "
                "without past_key_values"
            )
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.return_dict
        hidden_states: list[torch.Tensor] | None = [] if output_hidden_states else None
        if attention_mask is None or bool(attention_mask[:, 0].all()):
            logits = self.model(input_ids, hidden_states=hidden_states)
        else:
            logits = self._rows_without_left_padding(input_ids, attention_mask, hidden_states)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        output = CausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=None if hidden_states is None else tuple(hidden_states),
        )
        return output if return_dict else output.to_tuple()

    def _rows_without_left_padding(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        hidden_states: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        """The logits of every row run alone from its first real token; ``hidden_states``, if
        a list, receives theirs, each padded back to the batch's shape."""
        starts = attention_mask.int().argmax(dim=1).tolist()  # each row's first real token
        rows_hidden = [None if hidden_states is None else [] for _ in starts]
        rows = [
            self.model(input_ids[i : i + 1, start:], hidden_states=rows_hidden[i])
            for i, start in enumerate(starts)
        ]
        if hidden_states is not None:
            for layer_states in zip(*rows_hidden):
                hidden_states.append(_left_padded(layer_states, starts, input_ids.shape[1]))
        return _left_padded(rows, starts, input_ids.shape[1])


def _left_padded(rows: Sequence[torch.Tensor], starts: list[int], seq_len: int) -> torch.Tensor:
    """Rows ``[1, seq_len - start, D]`` stacked into ``[B, seq_len, D]``, 0 before each start."""
    batch = rows[0].new_zeros(len(rows), seq_len, rows[0].shape[-1])
    for i, (start, row) in enumerate(zip(starts, rows)):
        batch[i, start:] = row[0]
    return batch
