"""CPU kernel builds (``ops/_cpu_build.py``) are safe to share: the cache key follows the source
and the CPU, and processes loading at once after a source change all get the new build, which
only one of them compiles.

A tiny C++ file without torch headers stands in for a kernel file (it compiles in about a second);
its exported function tells which version a process actually loaded.
"""

import ctypes
import os
import subprocess
import sys
import threading
from pathlib import Path

from ops._cpu_build import build_folder, build_key, build_library, native_target

_ROOT = Path(__file__).resolve().parents[2]
_SOURCE = 'extern "C" int memcompile_build_test_version() {{ return {}; }}\n'
_LOAD = (
    "import ctypes, sys; from pathlib import Path; from ops._cpu_build import build_library; "
    "library = build_library(Path(sys.argv[1]), 'the build test'); "
    "print(library, ctypes.CDLL(str(library)).memcompile_build_test_version())"
)


def _loaded_version(library: Path) -> int:
    return ctypes.CDLL(str(library)).memcompile_build_test_version()


def test_processes_loading_after_a_source_change_get_the_new_build_compiled_once(
    tmp_path, monkeypatch
):
    extensions = tmp_path / "extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    source = tmp_path / "build_test.cpp"
    source.write_text(_SOURCE.format(1))
    assert _loaded_version(build_library(source, "the build test")) == 1

    # Version 2 keeps version 1's mtime, as a checkout keeping file times or an NFS client whose
    # clock is behind would: ninja's mtime check alone would call the old build current.
    times = source.stat()
    source.write_text(_SOURCE.format(2))
    os.utime(source, ns=(times.st_atime_ns, times.st_mtime_ns))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(_ROOT)}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _LOAD, str(source)],
            cwd=_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    for rank, (_, stderr) in zip(ranks, outputs):
        assert rank.returncode == 0, stderr
    (library, first), (same_library, second) = [stdout.split() for stdout, _ in outputs]
    assert (first, second) == ("2", "2")
    assert library == same_library
    assert build_library(source, "the build test") == Path(library)  # this process's key too
    assert len(list(extensions.iterdir())) == 2  # one build per source version
    ninja_log = (Path(library).parent / ".ninja_log").read_text()
    linked = [line for line in ninja_log.splitlines()[1:] if line.split("\t")[3].endswith(".so")]
    assert len(linked) == 1, linked  # the second process found the first one's build


def test_a_lock_left_by_a_killed_build_does_not_block_the_next(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    source = tmp_path / "build_test.cpp"
    source.write_text(_SOURCE.format(3))
    folder = build_folder(source)
    folder.mkdir(parents=True)
    (folder / "lock").touch()  # torch's lock file, which a build killed mid-way leaves behind
    loaded = []
    # In a thread, so that a regression (waiting for the lock forever) fails instead of hanging.
    loader = threading.Thread(
        target=lambda: loaded.append(build_library(source, "the build test")), daemon=True
    )
    loader.start()
    loader.join(timeout=120)
    assert loaded, "build_library waited for a lock file that no process holds"
    assert _loaded_version(loaded[0]) == 3


def test_build_key_follows_the_source_and_the_cpu():
    source, target = b"int f() { return 1; }", native_target()
    assert build_key(source, target) == build_key(source, target)
    assert build_key(source + b" ", target) != build_key(source, target)
    assert build_key(source, f"{target} -mavx512f") != build_key(source, target)
    assert build_key(source, "flags : fpu sse2") != build_key(source, "flags : fpu sse2 avx512f")


def test_build_folder_follows_the_headers_next_to_the_source(tmp_path, monkeypatch):
    # The kernels include ops/csrc/*.h (bag.h): editing a header must name a new build.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    source = tmp_path / "build_test.cpp"
    source.write_text('#include "shared.h"\n' + _SOURCE.format(4))
    header = tmp_path / "shared.h"
    header.write_text("constexpr int kShared = 1;\n")
    before = build_folder(source)
    header.write_text("constexpr int kShared = 2;\n")
    assert build_folder(source) != before


def test_native_target_names_what_march_native_resolved_to():
    target = native_target()
    assert target and "-march=native" not in target
