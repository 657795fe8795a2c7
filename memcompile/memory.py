"""Product-key memory layers ("Memory Layers at Scale", Berges et al. 2024).

A memory layer reads a huge trainable value table ``V [N, value_dim]`` sparsely: for each token,
each of ``heads`` queries picks its ``topk`` best keys out of ``N = n_keys²`` product keys
(Lample et al. 2019), and the output is the softmax-weighted sum of those rows::

    scores, idx = top-k over (i1, i2) of  q1·K1[i1] + q2·K2[i2]     (per head, never all N keys)
    y           = Σ_heads Σ_k softmax(scores)_k · V[idx_k]          (one bag of heads·topk rows)

:class:`ProductKeyMemory` is that read; :class:`MemoryPlus` wraps it in the paper's SwiGLU-like
block ``W2(y ⊙ silu(W1 x))``. The search and the bag are the custom ops
``torch.ops.memlayer.product_key_topk`` and ``torch.ops.memlayer.lookup``.

The value table is *not* a parameter of these modules: the model owns one table shared by all
its memory layers and passes it to ``forward``. So it is one parameter (one optimizer state, one
checkpoint entry) whatever the number of layers, per-block FSDP wrapping never captures it, and
replacing it (``to_empty``, ``load_state_dict(assign=True)``, a DTensor for column sharding)
cannot leave a layer holding a stale reference. For torch.compile it is an ordinary graph input.
The read itself is a small module, :class:`ValueLookup`, so that a parallel style can wrap it:
memory parallelism (``recipes/memory_parallel.py``) shards the table by columns around it.

Initialisation (the paper gives none; these follow its reference code): sub-keys
U(±1/√key_dim), query weight Xavier-uniform, W1 and W2 N(0, 1/√dim); every bias starts at 0 and
qk-norm gains at 1. The table itself is N(0, 1/√value_dim) (see ``Transformer.init_weights``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ops  # noqa: F401  (registers torch.ops.memlayer.*)
from memcompile.config import MemoryConfig, MemoryKind
from memcompile.telemetry import UsageCounter
from ops.lookup_quantized import QUANTIZED_DTYPES, quantize_rows
from ops.row_sparse import GradRecorder, lookup_recording_grads


class ValueLookup(nn.Module):
    """The read of a value table: ``out[t] = Σ_b weights[t, b] · values[indices[t, b]]``.

    ``forward(values [N, D], indices [T, B], weights [T, B]) -> [T, D]`` is the op
    ``torch.ops.memlayer.lookup``; this module holds no parameters. It is a module so that a
    parallel style can be applied to the read and seen in ``print(model)``.

    While a row-sparse optimizer trains the table (``grad_recorder.recording``, see
    ``memcompile.sparse_optim.RowSparseOptimizer``), the backward records the value gradient's
    inputs into the table's ``.grad`` (``ops.row_sparse.RowSparseGrad``) instead of forming a
    ``[N, D]`` gradient. The lookups of one table share its ``grad_recorder``, which the model
    gives them (``memcompile.model.Transformer`` does); by default a lookup has its own.

    A :class:`QuantizedTable` is read by ``torch.ops.memlayer.lookup_quantized`` instead, which
    dequantizes the rows it gathers inside the kernel (inference only).
    """

    def __init__(self, grad_recorder: GradRecorder | None = None) -> None:
        super().__init__()
        self.grad_recorder = GradRecorder() if grad_recorder is None else grad_recorder

    def forward(self, values: Tensor | QuantizedTable, indices: Tensor, weights: Tensor) -> Tensor:
        if isinstance(values, QuantizedTable):
            return values.lookup(indices, weights)
        recorder = self.grad_recorder
        if recorder.recording and torch.is_grad_enabled():
            if values.is_leaf and values.requires_grad:  # the table itself, read directly
                recorder.reads(values)
            table = recorder.table
            if table is not None and table.requires_grad:
                return lookup_recording_grads(values, indices, weights, recorder)
        return torch.ops.memlayer.lookup(values, indices, weights)


class QuantizedTable(nn.Module):
    """A value table stored quantized, for inference: ``rows [N, D]`` int8 or fp8 e4m3 and one
    ``scale [N]`` per row, standing for ``scale[:, None] * rows``. It takes the place of the
    model's ``memory_values`` parameter (:func:`quantize_table`), and :class:`ValueLookup` reads
    it with ``torch.ops.memlayer.lookup_quantized``: no dequantized copy is ever made.

    ``dtype`` is the dtype it reads as, the scale's: ``model.to(torch.bfloat16)`` casts the
    scales, so lookups return bf16, while the rows stay int8 / fp8 (a cast never dequantizes
    them; a move to another device moves them). Training through it is refused (train in full
    precision, quantize at export).
    """

    def __init__(self, rows: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("rows", rows)
        self.register_buffer("scale", scale)

    @classmethod
    def quantize(cls, values: Tensor, dtype: str) -> QuantizedTable:
        """``values [N, D]`` quantized per row to ``dtype`` (``"int8"`` or ``"fp8"``) by
        torchao's primitives (``ops.lookup_quantized.quantize_rows``; needs ``torchao``)."""
        rows, scale = quantize_rows(values, _quantized_dtype(dtype))
        return cls(rows, scale)

    @classmethod
    def empty(cls, num_rows: int, dim: int, dtype: str, scale_dtype: torch.dtype) -> QuantizedTable:
        """An uninitialised table of the shape and dtypes a saved one loads into."""
        rows = torch.empty(num_rows, dim, dtype=_quantized_dtype(dtype))
        return cls(rows, torch.empty(num_rows, dtype=scale_dtype))

    @property
    def shape(self) -> torch.Size:
        return self.rows.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def table_dtype(self) -> str:
        """``"int8"`` or ``"fp8"``: the name of the rows' dtype."""
        return next(name for name, dtype in QUANTIZED_DTYPES.items() if dtype == self.rows.dtype)

    def lookup(self, indices: Tensor, weights: Tensor) -> Tensor:
        """``out[t] = Σ_b weights[t, b] · scale[i] · rows[i]`` in ``self.dtype``."""
        return torch.ops.memlayer.lookup_quantized(
            self.rows, self.scale, indices, weights, self.dtype
        )

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating buffer, and fp8 is floating: seen as bytes the
        # rows only move between devices, never turn into a dequantized copy.
        dtype = self.rows.dtype
        self.rows = self.rows.view(torch.uint8)
        try:
            return super()._apply(fn, recurse)
        finally:
            self.rows = self.rows.view(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.shape)}, {self.table_dtype}, scale {self.scale.dtype}"


def _quantized_dtype(name: str) -> torch.dtype:
    if name not in QUANTIZED_DTYPES:
        raise ValueError(f"a quantized table is {' or '.join(QUANTIZED_DTYPES)}, got {name!r}")
    return QUANTIZED_DTYPES[name]


def quantize_table(model: nn.Module, dtype: str) -> QuantizedTable:
    """Replace ``model.memory_values`` (the table parameter of a ``memcompile.model.Transformer``)
    by a :class:`QuantizedTable` of it, in place, and return it. For inference: the model can no
    longer train its table."""
    table = getattr(model, "memory_values", None)
    if not isinstance(table, Tensor):
        raise ValueError("quantize_table: the model has no full-precision memory_values table")
    quantized = QuantizedTable.quantize(table, dtype)
    use_quantized_table(model, quantized)
    return quantized


def use_quantized_table(model: nn.Module, table: QuantizedTable) -> None:
    """Make ``table`` the model's ``memory_values`` in place of its parameter (also how a saved
    quantized model is rebuilt before its weights load: an empty table on the meta device)."""
    if table.shape != model.memory_values.shape:
        raise ValueError(
            f"a quantized table of shape {tuple(table.shape)} cannot replace memory_values of "
            f"shape {tuple(model.memory_values.shape)}"
        )
    del model.memory_values  # a parameter slot takes no module
    model.memory_values = table


class ValueTable(nn.Module):
    """The shared value table as the memory layers read it in one forward: the identity.

    The model passes its table through this module once per forward and hands the result to
    every memory block, so that a parallel style can prepare the table there once for all of
    them (memory parallelism: this rank's column shard, in the compute dtype). It tells the
    blocks' lookups, through their shared ``grad_recorder``, which table they read: the one
    whose gradient they record when a row-sparse optimizer trains it (and then hands them the
    table detached: the recording backward alone reaches the table).
    """

    def __init__(self, grad_recorder: GradRecorder | None = None) -> None:
        super().__init__()
        self.grad_recorder = GradRecorder() if grad_recorder is None else grad_recorder

    def forward(self, values: Tensor) -> Tensor:
        recorder = self.grad_recorder
        recorder.reads(values)
        if recorder.recording:
            # The lookups record the table's gradient straight into it: nothing on the way to
            # them (FSDP's hooks on block inputs, a cast, a column shard) may hold the table's
            # autograd history, or its backward would form a dense [N, D] gradient of zeros.
            return values.detach()
        return values


class ProductKeyMemory(nn.Module):
    """Multi-head product-key read of a shared value table: ``[..., dim] -> [..., value_dim]``.

    Each head projects the input to a ``key_dim`` query, whose two halves score the head's two
    sets of ``n_keys`` sub-keys; the op keeps the ``topk`` best of the ``n_keys²`` sums. Scores
    get an fp32 softmax per head, and all heads' rows are summed in one weighted lookup (total
    weight per token = ``heads``).

    With ``qk_norm`` the query halves and the sub-keys are RMS-normalised (learnable gains) and
    the query is scaled by ``1/√(key_dim/2)``, as attention scales its logits, so that each
    half-score starts with unit variance instead of growing with the key dim.
    """

    def __init__(
        self,
        dim: int,
        memory: MemoryConfig,
        norm_eps: float = 1e-5,
        grad_recorder: GradRecorder | None = None,
    ) -> None:
        super().__init__()
        memory = memory.for_model_dim(dim)
        self.dim = dim
        self.heads = memory.heads
        self.topk = memory.topk
        self.key_dim = memory.key_dim
        self.value_dim = memory.value_dim
        self.num_values = memory.num_values
        half_key_dim = self.key_dim // 2

        self.query = nn.Linear(dim, self.heads * self.key_dim, bias=True)
        # [heads, 2 halves, n_keys, key_dim / 2]: the layout product_key_topk expects.
        self.keys = nn.Parameter(torch.empty(self.heads, 2, memory.n_keys, half_key_dim))
        if memory.qk_norm:
            self.query_norm = nn.RMSNorm(half_key_dim, eps=norm_eps)
            self.key_norm = nn.RMSNorm(half_key_dim, eps=norm_eps)
            self.query_scale = half_key_dim**-0.5
        else:
            self.query_norm = self.key_norm = None
        self.usage = UsageCounter(memory.num_values) if memory.telemetry else None
        self.lookup = ValueLookup(grad_recorder)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.xavier_uniform_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        bound = 1 / math.sqrt(self.key_dim)
        nn.init.uniform_(self.keys, -bound, bound)
        for norm in (self.query_norm, self.key_norm):
            if norm is not None:
                norm.reset_parameters()
        if self.usage is not None:
            self.usage.init_weights()

    def forward(self, x: Tensor, values: Tensor) -> Tensor:
        """Read ``values [num_values, value_dim]`` for every token of ``x [..., dim]``."""
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(
                f"ProductKeyMemory: x must be [..., dim] with dim = {self.dim}, got shape "
                f"{tuple(x.shape)}"
            )
        if values.shape != (self.num_values, self.value_dim):
            raise ValueError(
                f"ProductKeyMemory: values must have shape ({self.num_values}, {self.value_dim}), "
                f"got {tuple(values.shape)}"
            )
        leading = x.shape[:-1]
        tokens = x.reshape(-1, self.dim)
        num_tokens = tokens.shape[0]  # explicit, not -1: an empty batch must keep its shape
        query = self.query(tokens).view(num_tokens, self.heads, self.key_dim)
        subkeys = self.keys.to(query.dtype)  # under autocast the query may be in bf16
        if self.query_norm is not None:
            halves = query.unflatten(-1, (2, self.key_dim // 2))
            query = (self.query_norm(halves) * self.query_scale).flatten(-2)
            subkeys = self.key_norm(subkeys)

        scores, indices = torch.ops.memlayer.product_key_topk(query, subkeys, self.topk)
        # The op scores in fp32 (fp64 for fp64 inputs) whatever the query dtype: fp32 softmax.
        weights = torch.softmax(scores, dim=-1)  # [T, heads, topk]
        if self.usage is not None:
            self.usage.record(indices)

        # Heads are summed: one bag of heads·topk rows per token.
        bag = self.heads * self.topk
        out = self.lookup(values, indices.view(num_tokens, bag), weights.view(num_tokens, bag))
        return out.view(*leading, self.value_dim)


class MemoryPlus(nn.Module):
    """Memory+ (paper Eq. 2): ``W2(memory(x) ⊙ silu(W1 x))``, ``[..., dim] -> [..., dim]``.

    A SwiGLU feed-forward whose up-projection is the memory read.
    """

    def __init__(
        self,
        dim: int,
        memory: MemoryConfig,
        norm_eps: float = 1e-5,
        grad_recorder: GradRecorder | None = None,
    ) -> None:
        super().__init__()
        memory = memory.for_model_dim(dim)
        self.dim = dim
        self.memory = ProductKeyMemory(dim, memory, norm_eps, grad_recorder)
        self.w1 = nn.Linear(dim, memory.value_dim, bias=True)
        self.w2 = nn.Linear(memory.value_dim, dim, bias=True)
        self.init_weights()

    def init_weights(self) -> None:
        self.memory.init_weights()
        for linear in (self.w1, self.w2):
            nn.init.normal_(linear.weight, std=self.dim**-0.5)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, values: Tensor) -> Tensor:
        return self.w2(self.memory(x, values) * F.silu(self.w1(x)))


def build_memory_layer(
    dim: int,
    memory: MemoryConfig,
    norm_eps: float = 1e-5,
    grad_recorder: GradRecorder | None = None,
) -> nn.Module:
    """The module that replaces a block's feed-forward: called as ``layer(x, values)``; its
    lookup shares ``grad_recorder`` with the other readers of the table."""
    if memory.kind is MemoryKind.MEMORY_PLUS:
        return MemoryPlus(dim, memory, norm_eps, grad_recorder)
    return ProductKeyMemory(dim, memory, norm_eps, grad_recorder)
