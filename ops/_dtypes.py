"""The accumulation dtype shared by every memlayer kernel."""

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums run in fp32, or in fp64 for fp64 inputs (so gradcheck through the kernels works)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
