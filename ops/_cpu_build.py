"""Builds a C++ kernel file of ``ops/csrc`` with ``torch.utils.cpp_extension`` on first use.

A build takes about 30 s and is cached under ``TORCH_EXTENSIONS_DIR`` (by default
``~/.cache/torch_extensions``) in a folder named by a hash of all the ``.so`` depends on: the
bytes of the source and of the headers next to it (``ops/csrc/*.h``), the compiler flags, what
``-march=native`` resolves to on this CPU, and the torch and Python versions. So a home folder
shared by machines with different CPUs, or by checkouts with different sources, holds one build
for each, and a process can only find its own.

Why torch's ``load`` alone is not enough: it names the folder by the extension's name alone and
keeps its version counter in the process, so a new process leaves "is the cached ``.so`` current?"
to ninja's mtimes. Those never see another CPU (SIGILL on an NFS home), nor a source that is not
newer than its object (a checkout keeping file times, NFS clients' clock skew); and a checkout with
another source rebuilds the same folder in place while torch loads the ``.so`` after releasing its
lock, so a process can load the other's (or a half-linked) build. Here the processes that use a
folder hold an exclusive ``flock`` across the compile *and* the load.

A cached build loads in well under a second, so only a real compile (or a wait for another
process's) is announced.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

_CSRC = Path(__file__).with_name("csrc")
_CFLAGS = ("-O3", "-march=native", "-fopenmp")
_LDFLAGS = ("-fopenmp",)


def build(source: str, what: str) -> None:
    """Compile and load ``ops/csrc/<source>.cpp``, which registers its ``torch.ops`` library;
    ``what`` names its kernels in the build notice."""
    build_library(_CSRC / f"{source}.cpp", what)


def build_library(source: Path, what: str) -> Path:
    """Compile (or find cached) and load the C++ file ``source``; returns the loaded ``.so``."""
    from torch.utils.cpp_extension import load

    folder = build_folder(source)
    folder.mkdir(parents=True, exist_ok=True)
    notice = (
        f"memcompile: compiling the CPU kernels of {what} (once per source version and CPU type, "
        f"about 30 s; cached in {folder})..."
    )
    timer = threading.Timer(2.0, lambda: print(notice, file=sys.stderr, flush=True))
    timer.start()
    try:
        with open(folder / "memcompile.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel even if this process dies
            # torch's own lock is a file that exists while held: one left by a killed build would
            # make every later load wait forever. Holding the flock, nobody else is building here.
            (folder / "lock").unlink(missing_ok=True)
            library = load(
                name=folder.name,
                sources=[str(source)],
                extra_cflags=list(_CFLAGS),  # torch appends to the lists it is given
                extra_ldflags=list(_LDFLAGS),
                build_directory=str(folder),
                is_python_module=False,
            )
    finally:
        timer.cancel()
    return Path(library)


def build_folder(source: Path) -> Path:
    """The cache folder of the build of the C++ file ``source`` on this machine."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    key = build_key(source_bytes(source), native_target())
    return Path(root) / f"memcompile_{source.stem}_{key[:16]}"


def source_bytes(source: Path) -> bytes:
    """What a build of the C++ file ``source`` compiles: its bytes and those of every header in its
    folder (the kernels include ``ops/csrc/*.h``), each header after its name."""
    parts = [source.read_bytes()]
    for header in sorted(source.parent.glob("*.h")):
        parts += [header.name.encode(), header.read_bytes()]
    return b"\0".join(parts)


def build_key(source: bytes, target: str) -> str:
    """Hex digest naming a build of ``source`` for the CPU described by ``target``
    (``native_target()``) with this module's flags, torch and Python."""
    import torch

    digest = hashlib.sha256(source)
    for part in (*_CFLAGS, *_LDFLAGS, target, torch.__version__, sys.implementation.cache_tag):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()


@functools.cache
def native_target() -> str:
    """What ``-march=native`` means here: the compiler's internal command line with the CPU and
    instruction sets it resolved (gcc's ``cc1 -march=znver3 -mavx2 ...``, clang's ``-target-cpu``),
    else the CPU flags of ``/proc/cpuinfo``."""
    compiler = os.environ.get("CXX", "c++")  # the compiler torch builds with
    try:
        probe = subprocess.run(
            [compiler, "-march=native", "-x", "c++", "-E", "-v", "-"],
            input="", capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        resolved = [
            line.strip()
            for line in probe.stderr.splitlines()
            if ("-march=" in line or "-target-cpu" in line) and "-march=native" not in line
        ]
    except (OSError, subprocess.SubprocessError):
        resolved = []  # no compiler: torch's build reports that
    if resolved:
        return "\n".join(resolved)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    return next((line for line in cpuinfo if line.startswith("flags")), os.uname().machine)
