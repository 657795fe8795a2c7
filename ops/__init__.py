"""memcompile's custom ops: ``torch.ops.memlayer.*``.

Importing this package registers the ops: ``lookup`` (the weighted bag over a value table) and
``product_key_topk`` (the product-key search), with their CPU, CUDA (Triton) and fake kernels,
autograd and DTensor sharding rules.
"""

from ops.lookup import lookup, reference_lookup
from ops.product_key import product_key_topk, reference_product_key_topk

__all__ = ["lookup", "reference_lookup", "product_key_topk", "reference_product_key_topk"]
