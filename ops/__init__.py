"""memcompile's custom ops: ``torch.ops.memlayer.*``.

Importing this package registers the ops: ``lookup`` (the weighted bag over a value table),
``lookup_quantized`` (the same over an int8 / fp8 table with per-row scales, for inference),
``product_key_topk`` (the product-key search), their backward ops, the row-sparse table update
(``record_value_grads``, ``hot_row_pieces``, ``row_sq_norms``, ``update_rows``), and
``checked_indices`` (the index-range check of model inputs), with their CPU, CUDA (Triton) and
fake kernels, autograd and DTensor sharding rules.
"""

from ops.checks import checked_indices
from ops.lookup import lookup, reference_lookup
from ops.lookup_quantized import lookup_quantized, reference_lookup_quantized
from ops.product_key import product_key_topk, reference_product_key_topk
from ops.row_sparse import GradRecorder, RowSparseGrad, lookup_recording_grads

__all__ = [
    "checked_indices",
    "lookup",
    "reference_lookup",
    "lookup_quantized",
    "reference_lookup_quantized",
    "product_key_topk",
    "reference_product_key_topk",
    "GradRecorder",
    "RowSparseGrad",
    "lookup_recording_grads",
]
