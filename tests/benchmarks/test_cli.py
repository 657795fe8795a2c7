"""The benchmarks' command-line values are checked before any work, as the recipes' are: a
``memcompile.cli.UsageError`` naming the flag (one line, exit code 2 from the command line)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from memcompile.cli import UsageError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "module, args, message",
    [
        ("lookup", ["--dim", "0"], "--dim must be >= 1, got 0"),
        ("lookup", ["--num-rows", "65536", "-3"], "--num-rows must be >= 1, got -3"),
        ("lookup", ["--repeats", "0"], "--repeats must be >= 1, got 0"),
        ("lookup", ["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        ("value_step", ["--rows", "0"], "--rows must be >= 1, got 0"),
        ("value_step", ["--lr", "nan"], "--lr must be a finite number, got nan"),
        ("value_step", ["--memory-headroom", "1.5"], "--memory-headroom must be in [0, 1]"),
        ("value_step", ["--max-norm", "0"], "--max-norm must be > 0, got 0.0"),
        ("models", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        ("models", ["--seq-len", "-8"], "--seq-len must be >= 1, got -8"),
        ("models", ["--lr", "inf"], "--lr must be a finite number, got inf"),
        ("kernels_static", ["--dims", "0"], "--dims must be >= 1, got 0"),
        ("kernels_static", ["--jobs", "0"], "--jobs must be in [1, "),
    ],
)
def test_a_benchmark_refuses_a_bad_value_naming_the_flag(module: str, args, message: str):
    benchmark = importlib.import_module(f"benchmarks.{module}")
    with pytest.raises(UsageError) as refused:
        benchmark.main([*args, "--device", "cpu"] if module != "kernels_static" else args)
    assert message in str(refused.value)


@pytest.mark.parametrize(
    "module, config, field, value, message",
    [
        ("knowledge", "KnowledgeBenchmarkConfig", "steps", 0, "--steps must be >= 1, got 0"),
        ("knowledge", "KnowledgeBenchmarkConfig", "lr", float("nan"), "--lr must be a finite"),
        ("continual", "ContinualBenchmarkConfig", "batch_size", 0, "--batch-size must be >= 1"),
        ("continual", "ContinualBenchmarkConfig", "seeds", (), "--seeds needs at least one"),
    ],
)
def test_the_training_benchmarks_refuse_a_bad_value_before_any_work(
    module: str, config: str, field: str, value, message: str, tmp_path: Path
):
    pytest.importorskip("torchtitan", reason="these benchmarks run the recipes' code")
    benchmark = importlib.import_module(f"benchmarks.{module}")
    settings = {field: value, "output_dir": tmp_path / "out"}
    with pytest.raises(UsageError, match=message.replace("[", r"\[")):
        benchmark.run(getattr(benchmark, config)(**settings))
    assert not (tmp_path / "out").exists()


def test_a_bad_value_on_the_command_line_is_one_line_and_exit_code_2(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.models", "--batch-size", "0", "--out", tmp_path / "m"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == "error: --batch-size must be >= 1, got 0\n"
    assert list(tmp_path.iterdir()) == []
