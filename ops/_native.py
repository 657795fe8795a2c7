"""CPU kernels of the lookup ops (temporary ATen composite; replaced by ops/csrc)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lookup_forward(values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    T, B = indices.shape
    if T == 0 or B == 0:
        return values.new_zeros((T, values.shape[1]))
    return F.embedding_bag(
        indices, values, per_sample_weights=weights.to(values.dtype), mode="sum"
    )


def lookup_values_grad(grad_out: Tensor, indices: Tensor, weights: Tensor, num_rows: int) -> Tensor:
    grad = grad_out.new_zeros((num_rows, grad_out.shape[1]))
    if indices.numel():
        B = indices.shape[1]
        tokens = torch.arange(indices.numel(), device=indices.device) // B
        contrib = grad_out.float()[tokens] * weights.reshape(-1, 1).float()
        grad.index_add_(0, indices.reshape(-1).long(), contrib.to(grad.dtype))
    return grad


def lookup_weights_grad(grad_out: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    return torch.einsum("tbd,td->tb", values.to(acc)[indices.long()], grad_out.to(acc))
