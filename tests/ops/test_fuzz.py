"""Every registered memlayer op keeps its contract under fuzzing (see ``tests/ops/fuzz_ops.py``).

The fuzzer runs in a subprocess: a segfault, an abort or an out-of-bounds write there fails
this test with the fuzzer's report instead of taking the test run down.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_fuzzer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.ops.fuzz_ops", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_every_op_gives_a_correct_result_or_a_clear_error():
    fuzzer = run_fuzzer("--examples", "120")
    report = fuzzer.stdout + fuzzer.stderr
    if fuzzer.returncode < 0:
        pytest.fail(f"the fuzzer crashed with signal {-fuzzer.returncode}:\n{report[-6000:]}")
    assert fuzzer.returncode == 0, report[-6000:]
    assert report.count("calls kept the contract") >= 9, report[-6000:]
