"""Argument checks shared by every memlayer op, and ``memlayer::checked_indices``.

Every public op checks its arguments before a kernel runs and raises a ``ValueError`` (shape,
device, value), ``TypeError`` (dtype, layout) or ``IndexError`` (an index out of range) whose
message starts with the op's name and names the argument. Shape, dtype, device and layout checks
read no data, so the fake kernels run them too (meta device, ``torch.compile``).

Each op's kernels are registered per device type (``torch.library.impl(op, "CPU")``,
``"CUDA"``); :func:`refuse_other_devices` gives every other device a kernel that says so.

Index ranges need the data. On the CPU they are always checked. On CUDA the check costs a
device-to-host sync, so it runs only with ``MEMCOMPILE_CHECK_INDICES=1`` (read at every call);
the CUDA kernels mask indices outside the range either way, so a bad index is never read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    names = [str(dtype).removeprefix("torch.") for dtype in dtypes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_tensor(
    op: str, name: str, tensor: Tensor, shape: str, dtypes: Sequence[torch.dtype] | None = None
) -> None:
    """A dense (strided) tensor with as many dims as ``shape`` names (e.g. ``"[N, D]"``), of one
    of ``dtypes`` (any floating dtype when ``None``)."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor {shape}, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(
            f"{op}: {name} must be a dense (strided) tensor, got layout {tensor.layout}"
        )
    num_dims = shape.count(",") + 1
    if tensor.dim() != num_dims:
        raise ValueError(
            f"{op}: {name} must be {num_dims}-D {shape}, got shape {tuple(tensor.shape)}"
        )
    if dtypes is None:
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be floating point, got {tensor.dtype}")
    elif tensor.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be {_dtype_names(dtypes)}, got {tensor.dtype}")


def check_shape(op: str, name: str, tensor: Tensor, shape: Sequence[int], meaning: str) -> None:
    """``tensor`` has exactly ``shape``; ``meaning`` says where that shape comes from."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"{op}: {name} must have shape {tuple(shape)} ({meaning}), got {tuple(tensor.shape)}"
        )


def check_same_device(op: str, **tensors: Tensor) -> None:
    devices = {tensor.device for tensor in tensors.values()}
    if len(devices) > 1:
        found = ", ".join(f"{name} on {tensor.device}" for name, tensor in tensors.items())
        raise ValueError(f"{op}: {' and '.join(tensors)} must be on one device, got {found}")


def index_checks_enabled(device: torch.device) -> bool:
    """Whether indices on ``device`` are range-checked: always on the CPU, on CUDA only in
    debug mode (``MEMCOMPILE_CHECK_INDICES=1``), never on the meta device (no data)."""
    if device.type == "meta":
        return False
    return device.type == "cpu" or os.environ.get("MEMCOMPILE_CHECK_INDICES") == "1"


def check_indices_in_range(indices: Tensor, size: int, argument: str, what: str = "") -> None:
    """Raise ``IndexError`` if an entry of ``indices`` lies outside ``[0, size)``, where
    :func:`index_checks_enabled` says so. ``argument`` names them (``"lookup: indices"``),
    ``what`` says what they index."""
    if indices.numel() == 0 or not index_checks_enabled(indices.device):
        return
    low, high = (int(bound) for bound in torch.aminmax(indices))
    if low < 0 or high >= size:
        what = f" ({what})" if what else ""
        raise IndexError(
            f"{argument} must lie in [0, {size}){what}, found {low if low < 0 else high}"
        )


#: The device types memlayer ops have kernels for.
KERNEL_DEVICE_TYPES = ("cpu", "cuda")


def refuse_other_devices(op: str, check: Callable[..., object]) -> None:
    """Register for ``op`` (``"memlayer::name"``) a kernel for every device type and layout
    without one of its own: it runs ``check`` on the op's arguments (the op's fake kernel, so a
    sparse tensor gets the layout error) and raises a ``NotImplementedError`` naming the op and
    the device type (the dispatcher's own error would list dispatch keys). The meta device runs
    the fake kernel."""
    name = op.split("::")[-1]

    def no_kernel(*args, **kwargs):
        check(*args, **kwargs)
        device = next(arg.device for arg in args if isinstance(arg, Tensor))
        raise NotImplementedError(
            f"{name}: no kernel for device type {device.type!r} ({', '.join(KERNEL_DEVICE_TYPES)})"
        )

    torch.library.impl(op, "default", no_kernel)


# --------------------------------------------------------------------------- checked_indices
#
# A compiled model cannot raise from inside its kernels: Inductor's own bounds check throws
# inside an OpenMP loop on the CPU and aborts the process. Model inputs that index tables (token
# ids, positions) therefore pass through this op first; Inductor calls it as an extern kernel,
# which raises a normal Python IndexError. Its output is a copy, as a custom op may not return
# its input, and the copy is what keeps the check in the graph (an unused result would be
# dead code). Token ids are small next to anything the model computes from them.

torch.library.define(
    "memlayer::checked_indices",
    "(Tensor indices, SymInt size, str name, str what='') -> Tensor",
    tags=(torch.Tag.pt2_compliant_tag,),
)


def checked_indices(indices: Tensor, size: int, name: str, what: str = "") -> Tensor:
    """A copy of integer ``indices`` after checking every entry lies in ``[0, size)`` (see the
    module doc for when the data is read); the ``IndexError`` names them ``name`` and says
    ``what`` they index."""
    return torch.ops.memlayer.checked_indices(indices, size, name, what)


def _check_index_tensor(indices: Tensor, size: int, name: str) -> None:
    if indices.layout != torch.strided or indices.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"{name} must be a dense int64 or int32 tensor, got {indices.dtype} ({indices.layout})"
        )
    if size < 0:
        raise ValueError(f"{name}: the index range size must be >= 0, got {size}")


@torch.library.register_fake("memlayer::checked_indices")
def _checked_indices_fake(indices, size, name, what=""):
    _check_index_tensor(indices, size, name)
    return torch.empty_like(indices)


@torch.library.impl("memlayer::checked_indices", "default")
def _checked_indices_kernel(indices, size, name, what=""):
    _check_index_tensor(indices, size, name)
    check_indices_in_range(indices, size, name, what)
    return indices.clone()
