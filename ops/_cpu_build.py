"""Builds a C++ kernel file of ``ops/csrc`` with ``torch.utils.cpp_extension`` on first use.

A build takes about 30 s, once per machine (cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``); a cached build loads in well under a second, so only a real
compile is announced.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

_CSRC = Path(__file__).with_name("csrc")


def build(source: str, what: str) -> None:
    """Compile and load ``ops/csrc/<source>.cpp``, which registers its ``torch.ops`` library;
    ``what`` names its kernels in the build notice."""
    from torch.utils.cpp_extension import load

    notice = (
        f"memcompile: compiling the CPU kernels of {what} (once per machine, about 30 s; "
        "cached in ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR)..."
    )
    timer = threading.Timer(2.0, lambda: print(notice, file=sys.stderr, flush=True))
    timer.start()
    try:
        load(
            name=f"memcompile_{source}",
            sources=[str(_CSRC / f"{source}.cpp")],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    finally:
        timer.cancel()
