"""Refuse a training run that cannot fit in memory, before anything is built.

Without this, a too-large run builds the model, data and process group, then dies in an FSDP
all-gather with "can't allocate memory". The estimate uses the config alone
(``memcompile.stats.model_stats``); it is rough, and errs on the large side for what it counts.
Per rank, with ``W`` ranks (FSDP shards over ``S`` of them) and memory parallel degree ``G``:

- dense parameters: fp32 master weights, fp32 gradients, 2 fp32 AdamW states; sharded over ``S``.
- memory value table: the same 16 bytes per value, sharded over ``S`` by FSDP when ``G == 1``,
  else column-sharded over ``G`` ranks (and replicated ``W / G`` times, not sharded by FSDP).
  Trained row-sparsely (``--optimizer.memory_optimizer``): no gradient but what the lookups
  record (twice, with the step's copy: per token and memory layer ``D`` fp32 output-gradient
  values and ``G * heads * topk`` int64 indices + fp32 weights), and the rule's state: none
  (sgd), one fp32 per row (rowwise_adagrad), two fp32 per value (adam).
- FSDP transients: twice the largest unit in the compute dtype (its all-gathered parameters and,
  in backward, their unsharded gradient). With ``G == 1`` the table is a unit of its own (the
  root's); with ``G > 1`` its local slice is cast to the compute dtype if that is not fp32.
- a densely trained table's step transients: ``TABLE_GRAD_COPIES`` more fp32 copies of the
  rank's table (its slice with ``G > 1``) at the peak than the gradient counted above (measured
  with ``recipes.plan``, whose peaks ``benchmarks.plan_check`` checks against real runs; this
  formula stays within ``tests/recipes/test_preflight.py``'s bound of the plan).
- activations: ``ACTIVATION_VALUES`` values of the compute dtype per token, model dim and layer
  (halved for the dense blocks under activation checkpointing), plus fp32 logits and their
  gradient (``tokens * vocab * 4 * 2`` bytes). Tokens per rank: local batch size * seq len.

A run is refused when this exceeds ``USABLE_FRACTION`` of what the rank's device has free;
``--no-preflight-memory-check`` skips the check.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.tools.logging import logger

from memcompile.config import TransformerConfig
from memcompile.flavors import FLAVORS, get_flavor
from memcompile.stats import memory_layer_params, model_stats

GiB = 1024**3
#: Bytes per parameter: fp32 weight + fp32 gradient + two fp32 AdamW states.
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 4, 4, 8
#: Saved activations per token, model dim and layer, in values of the compute dtype. Measured
#: 19-21 on memcompile flavors (fp32 eager, saved-tensor hooks, logits excluded); Korthikanti et
#: al. 2022 give 17 (34 bytes in 16-bit) for a GeLU MLP without the attention scores.
ACTIVATION_VALUES = 20
#: Table-sized fp32 buffers of a dense table's step beyond its gradient (autograd's gradient of
#: the rank's table before it is reduced or sharded, and the optimizer's), as recipes.plan
#: measures them: without them this formula was 26-41% under the plan with a 1M-row table.
TABLE_GRAD_COPIES = 2
#: Share of the device that the estimate may use: the rest is for what it does not count (CUDA
#: context, allocator fragmentation, the Python process, the data loader) and for its error.
USABLE_FRACTION = 0.9
MAX_SUGGESTED_RANKS = 64


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs, by kind."""

    params: int
    grads: int
    optimizer: int
    fsdp_transient: int
    table_transient: int
    activations: int

    @property
    def total(self) -> int:
        return (
            self.params
            + self.grads
            + self.optimizer
            + self.fsdp_transient
            + self.table_transient
            + self.activations
        )

    def breakdown(self) -> str:
        return (
            f"params {self.params / GiB:.1f} + grads {self.grads / GiB:.1f} + optimizer "
            f"{self.optimizer / GiB:.1f} + FSDP all-gathers {self.fsdp_transient / GiB:.1f} "
            f"+ table step {self.table_transient / GiB:.1f} "
            f"+ activations {self.activations / GiB:.1f} GiB"
        )


def estimate(
    transformer: TransformerConfig,
    *,
    local_batch_size: int,
    seq_len: int,
    world_size: int = 1,
    dp_replicate_degree: int = 1,
    memory_parallel_degree: int = 1,
    compute_dtype: torch.dtype = torch.bfloat16,
    activation_checkpointing: bool = False,
    table_optimizer: str = "adamw",
) -> MemoryEstimate:
    """The bytes one rank needs to train ``transformer`` (see the module docstring)."""
    stats = model_stats(transformer, seq_len)
    shards = world_size // dp_replicate_degree  # FSDP (HSDP: per replica); no TP/PP/CP here
    degree = memory_parallel_degree
    table_per_rank = stats.memory_params / (shards if degree == 1 else degree)
    dense_per_rank = stats.dense_params / shards
    stored = dense_per_rank + table_per_rank

    dim, memory, compute = transformer.dim, transformer.memory, compute_dtype.itemsize
    attention = 2 * dim * transformer.head_dim * (transformer.n_heads + transformer.n_kv_heads)
    units = [
        transformer.vocab_size * dim,
        transformer.vocab_size * dim + dim,
        attention + 2 * dim + 3 * dim * transformer.ffn_hidden_dim,
    ]
    if memory is not None:
        units.append(attention + 2 * dim + memory_layer_params(dim, memory))
        units.append(
            stats.memory_params
            if degree == 1
            else 0
            if compute_dtype == torch.float32
            else stats.memory_params // degree
        )

    tokens = local_batch_size * seq_len
    n_memory = 0 if memory is None else len(memory.layers)
    grads, optimizer = stored * GRAD_BYTES, stored * OPTIMIZER_BYTES
    unsharded_table = stats.memory_params / (1 if degree == 1 else degree)
    table_transient = TABLE_GRAD_COPIES * unsharded_table * GRAD_BYTES
    if memory is not None and table_optimizer != "adamw":
        bag = degree * memory.heads * memory.topk
        recorded = 2 * tokens * n_memory * (memory.value_dim * 4 + bag * 12)
        grads = dense_per_rank * GRAD_BYTES + recorded
        table_state = {
            "sgd": 0,
            "rowwise_adagrad": memory.num_values * 4,
            "adam": table_per_rank * OPTIMIZER_BYTES,
        }[table_optimizer]
        optimizer = dense_per_rank * OPTIMIZER_BYTES + table_state
        table_transient = 0
    dense_layers = (transformer.n_layers - n_memory) / (2 if activation_checkpointing else 1)
    per_layer = tokens * dim * ACTIVATION_VALUES * compute
    activations = per_layer * (dense_layers + n_memory) + tokens * transformer.vocab_size * 4 * 2
    return MemoryEstimate(
        params=int(stored * WEIGHT_BYTES),
        grads=int(grads),
        optimizer=int(optimizer),
        fsdp_transient=2 * max(units) * compute,
        table_transient=int(table_transient),
        activations=int(activations),
    )


def available_bytes() -> int:
    """What this rank's device can hold: free CUDA memory of the local device, or on the CPU
    the host's available memory shared by the ranks of this host (``LOCAL_WORLD_SIZE``)."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")))[0]
    try:
        with open("/proc/meminfo") as meminfo:
            kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
        host = kib * 1024
    except (OSError, StopIteration):
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _run_arguments(config: Any, world_size: int) -> dict[str, Any]:
    """``estimate``'s arguments (but the model) for a ``PretrainTrainer.Config``."""
    parallelism, training = config.parallelism, config.training
    return dict(
        local_batch_size=training.local_batch_size,
        seq_len=training.seq_len,
        world_size=world_size,
        dp_replicate_degree=parallelism.data_parallel_replicate_degree,
        memory_parallel_degree=parallelism.memory_parallel_degree,
        compute_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
        activation_checkpointing=config.activation_checkpoint is not None,
        table_optimizer=config.optimizer.memory_optimizer,
    )


def check_memory(config: Any, world_size: int, available: int | None = None) -> None:
    """Raise ``ValueError`` (with what would fit) if the run cannot fit on this rank's device;
    ``config`` is a ``PretrainTrainer.Config``, ``available`` defaults to ``available_bytes()``."""
    available = available_bytes() if available is None else available
    usable = int(available * USABLE_FRACTION)
    # As TitanTransformer.Config.update_from_config: the vocabulary is the tokenizer's.
    vocab = HuggingFaceTokenizer(tokenizer_path=config.hf_assets_path).get_vocab_size()
    fitted = {name: get_flavor(name, vocab_size=vocab) for name in FLAVORS}
    run = _run_arguments(config, world_size)
    need = estimate(fitted[config.model], **run)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if need.total <= usable:
        logger.info(
            f"Memory preflight: {config.model} needs about {need.total / GiB:.1f} GiB per "
            f"rank, {available / GiB:.1f} GiB available on {device}"
        )
        return

    def fits(transformer: TransformerConfig = fitted[config.model], **overrides: int) -> bool:
        return estimate(transformer, **{**run, **overrides}).total <= usable

    suggestions = []
    family = config.model.split("_")[0]
    degree = config.parallelism.memory_parallel_degree
    smaller = [
        name
        for name, flavor in fitted.items()
        if name.split("_")[0] == family
        and (flavor.table_shape is None or flavor.table_shape[1] % degree == 0)
        and fits(transformer=flavor)
    ]
    if smaller:
        best = max(smaller, key=lambda name: model_stats(fitted[name]).total_params)
        suggestions.append(f"--model {best}")
    table = fitted[config.model].table_shape
    value_dim = 0 if table is None else table[1]
    for ranks in range(world_size, MAX_SUGGESTED_RANKS + 1):
        group = math.gcd(ranks, value_dim) if value_dim else 1
        if fits(world_size=ranks, dp_replicate_degree=1, memory_parallel_degree=group):
            table = f" and --parallelism.memory_parallel_degree {group}" if group > 1 else ""
            suggestions.append(f"{ranks} ranks with {available / GiB:.1f} GiB each{table}")
            break
    if 2 * need.activations >= need.total:
        batch, seq_len = config.training.local_batch_size, config.training.seq_len
        while (batch, seq_len) != (1, 1) and not fits(local_batch_size=batch, seq_len=seq_len):
            batch, seq_len = (batch // 2, seq_len) if batch > 1 else (1, seq_len // 2)
        if fits(local_batch_size=batch, seq_len=seq_len):
            suggestions.append(f"--training.local_batch_size {batch} --training.seq_len {seq_len}")
    raise ValueError(
        f"model {config.model!r} needs about {need.total / GiB:.1f} GiB per rank "
        f"({need.breakdown()}; rough), but this rank has {available / GiB:.1f} GiB available on "
        f"{device} ({USABLE_FRACTION:.0%} usable).\n"
        f"  What would fit: {'; or '.join(suggestions) or 'nothing this check knows of'}.\n"
        f"  To run anyway: --no-preflight-memory-check"
    )
