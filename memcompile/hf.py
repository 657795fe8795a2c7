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
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.tok_embeddings

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.output

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput:
        """Logits of ``input_ids``. The model takes no attention mask: right padding cannot
        change the positions before it (causal attention), and the rows of a left-padded batch
        (``generate()`` and lm-eval pad on the left) are run one by one without their padding,
        so every row gets exactly its unpadded logits (0 at padding)."""
        if attention_mask is None or bool(attention_mask[:, 0].all()):
            logits = self.model(input_ids)
        else:
            logits = self._rows_without_left_padding(input_ids, attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)

    def _rows_without_left_padding(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        starts = attention_mask.int().argmax(dim=1).tolist()  # each row's first real token
        rows = [self.model(input_ids[i : i + 1, start:]) for i, start in enumerate(starts)]
        logits = rows[0].new_zeros(*input_ids.shape, rows[0].shape[-1])
        for i, (start, row) in enumerate(zip(starts, rows)):
            logits[i, start:] = row[0]
        return logits
