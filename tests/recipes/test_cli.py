"""Every command refuses a value out of its range before any work: one line ``error: ...`` on
stderr, exit code 2 (argparse's and tyro's for a bad command line), nothing written.

One subprocess per command (the real entry point, its exit code and whole stderr); the other
bad values run ``main(argv)`` in-process. Checkpoints need not exist: the values are checked
first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("torchtitan", reason="the recipes need the 'recipes' extra")

from memcompile.cli import (  # noqa: E402
    UsageError,
    check_at_least,
    check_finite,
    check_fraction,
    check_positive,
)
from recipes import evaluate, export, finetune, generate, lm_eval_task, pretrain  # noqa: E402
from tests.recipes.test_pretrain import run_recipe  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_checks_name_the_flag_and_refuse_nan():
    check_at_least("--batch-size", 1, 1)
    check_at_least("--max-people", None, 1)  # an unset optional flag
    with pytest.raises(UsageError, match=r"^--batch-size must be >= 1, got 0$"):
        check_at_least("--batch-size", 0, 1)
    for check in (
        lambda v: check_at_least("--x", v, 0),
        lambda v: check_finite("--x", v),
        lambda v: check_fraction("--x", v),
        lambda v: check_positive("--x", v),
    ):
        with pytest.raises(UsageError, match=r"^--x must .*, got nan$"):
            check(math.nan)
    check_positive("--max-norm", math.inf)  # no clipping
    with pytest.raises(UsageError, match=r"^--lr must be a finite number, got inf$"):
        check_finite("--lr", math.inf, minimum=0)
    with pytest.raises(UsageError, match=r"^--dropout must be in \[0, 1\), got 1$"):
        check_fraction("--dropout", 1, below_one=True)


@pytest.mark.parametrize(
    "module, args, message",
    [
        (
            "recipes.generate",
            ["--checkpoint", "{tmp}/none", "--question", "Who?", "--temperature", "nan"],
            "--temperature must be a finite number, got nan",
        ),
        (
            "recipes.evaluate",
            ["--checkpoint", "{tmp}/none", "--batch-size", "0", "--output", "{tmp}/eval.json"],
            "--batch-size must be >= 1, got 0",
        ),
        (
            "recipes.export",
            ["--checkpoint", "{tmp}/none", "--out", "{tmp}/exported", "--max-shard-mb", "0"],
            "--max-shard-mb must be >= 1, got 0",
        ),
        (
            "recipes.lm_eval_task",
            ["--out", "{tmp}/tasks", "--split", "trained", "--knowledge.qa-train-fraction", "0"],
            "the corpus has no trained questions (see --knowledge.qa-train-fraction)",
        ),
        (
            "recipes.pretrain",
            ["--dump_folder", "{tmp}/run", "--training.steps", "0"],
            "--training.steps must be >= 1, got 0",
        ),
        (
            "recipes.finetune",
            ["--checkpoint", "{tmp}/none", "--dump_folder", "{tmp}/run", "--optimizer.lr", "nan"],
            "--optimizer.lr must be a finite number, got nan",
        ),
    ],
)
def test_a_command_with_a_bad_value_says_one_line_exits_2_and_writes_nothing(
    module: str, args: list[str], message: str, tmp_path: Path
):
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = run_recipe(module, args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def exit_2(main: Callable[[list[str]], None], args: list[str], capsys) -> str:
    """Run ``main(args)``, which must exit with code 2; returns what it wrote on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2, exit_info.value.code
    return capsys.readouterr().err


def assert_one_error_line(err: str, message: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--temperature", "-0.5"], "--temperature must be >= 0, got -0.5"),
        (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
        (["--seed", str(2**64)], "--seed must be in [-9223372036854775808, 1844674407370955"),
        (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
        (["--device", "gpu0"], "--device must be a torch device such as cpu or cuda, got 'gpu0'"),
        (["--device", "cuda:99"], "--device cuda:99: this machine has no such CUDA device"),
    ],
)
def test_generate_refuses(args, message, tmp_path: Path, capsys):
    args = ["--checkpoint", str(tmp_path), "--question", "Who?", *args]
    err = exit_2(generate.main, args, capsys)
    assert_one_error_line(err, message)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-people", "0"], "--max-people must be >= 1, got 0"),
        (["--max-people", "-1"], "--max-people must be >= 1, got -1"),
        (["--lm-eval-limit", "0"], "--lm-eval-limit must be >= 1, got 0"),
        (["--seq-len", "-5"], "--seq-len must be >= 1, got -5"),
    ],
)
def test_evaluate_refuses(args, message, tmp_path: Path, capsys):
    output = tmp_path / "eval.json"
    err = exit_2(
        evaluate.main, ["--checkpoint", str(tmp_path), "--output", str(output), *args], capsys
    )
    assert err == f"error: {message}\n"
    assert not output.exists()


@pytest.mark.parametrize(
    "main, args",
    [
        (evaluate.main, ["--checkpoint", "none", "--knowledge.num-people", "30000000"]),
        (lm_eval_task.main, ["--out", "none", "--knowledge.first-person", "30000000"]),
    ],
)
def test_a_corpus_larger_than_its_name_space_is_refused_while_parsing(main, args, capsys):
    # tyro reports the corpus's own check, in a box of a few lines.
    assert "first_person + num_people = 30000" in exit_2(main, args, capsys)


def test_export_refuses_a_bad_seq_len(tmp_path: Path, capsys):
    out = tmp_path / "exported"
    args = ["--checkpoint", str(tmp_path), "--out", str(out), "--seq-len", "0"]
    assert exit_2(export.main, args, capsys) == "error: --seq-len must be >= 1, got 0\n"
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--training.local_batch_size", "0"], "--training.local_batch_size must be >= 1, got 0"),
        (["--training.seq_len", "0"], "--training.seq_len must be >= 1, got 0"),
        (
            ["--training.global_batch_size", "12"],
            "--training.global_batch_size must be -1 (one local batch per rank) or a multiple "
            "of --training.local_batch_size x data-parallel ranks = 8, got 12",
        ),
        (["--training.max_norm", "nan"], "--training.max_norm must be > 0, got nan"),
        (["--training.max_norm", "0"], "--training.max_norm must be > 0, got 0.0"),
        (["--optimizer.lr", "-1"], "--optimizer.lr must be >= 0, got -1.0"),
        (["--optimizer.weight_decay", "nan"], "--optimizer.weight_decay must be a finite"),
        (["--optimizer.memory_lr_multiplier", "inf"], "--optimizer.memory_lr_multiplier must"),
        (["--optimizer.betas", "1", "0.9"], "--optimizer.betas must be in [0, 1), got 1.0"),
        (["--optimizer.memory_max_norm", "-1"], "--optimizer.memory_max_norm must be > 0"),
        (["--lr_scheduler.warmup_steps", "-1"], "--lr_scheduler.warmup_steps must be >= 0"),
        (["--lr_scheduler.decay_ratio", "2"], "--lr_scheduler.decay_ratio must be in [0, 1]"),
        (["--lr_scheduler.min_lr_factor", "nan"], "--lr_scheduler.min_lr_factor must be in"),
        (["--metrics.log_freq", "0"], "--metrics.log_freq must be >= 1, got 0"),
        (["--dataloader.num_workers", "-1"], "--dataloader.num_workers must be >= 0, got -1"),
        (["--parallelism.data_parallel_shard_degree", "0"], "data_parallel_shard_degree (or -1)"),
        (
            ["--parallelism.data_parallel_replicate_degree", "2"],
            "--parallelism.data_parallel_replicate_degree 2 x "
            "--parallelism.data_parallel_shard_degree -1 must be the world size 1",
        ),
        (["--parallelism.memory_parallel_degree", "2"], "must be >= 1 and divide the world"),
        (["--parallelism.tensor_parallel_degree", "2"], "support data parallelism"),
        (
            ["--model", "dense_debug", "--optimizer.memory_optimizer", "sgd"],
            "--optimizer.memory_optimizer sgd: model 'dense_debug' has no memory layers",
        ),
    ],
)
def test_pretrain_refuses(args, message, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # A missing tokenizer folder fails later (exit 1), should a value ever pass: no training.
    guard = ["--dump_folder", str(tmp_path), "--hf_assets_path", str(tmp_path / "none")]
    err = exit_2(pretrain.main, [*guard, *args], capsys)
    assert_one_error_line(err, message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--finetune.trainable_slots", "0"], "--finetune.trainable_slots must be >= 1, got 0"),
        (["--finetune.eval_every", "-1"], "--finetune.eval_every must be >= 0, got -1"),
        (["--finetune.lora_dropout", "1"], "--finetune.lora_dropout must be in [0, 1), got 1.0"),
        (["--finetune.lora_alpha", "nan"], "--finetune.lora_alpha must be a finite number"),
        (["--training.local_batch_size", "0"], "--training.local_batch_size must be >= 1"),
        (["--model", "dense_debug"], "model 'dense_debug' has no memory layers"),
        (["--checkpoint", ""], "--checkpoint PATH is required"),
        (["--optimizer.name", "SGD"], "--optimizer.name SGD: sparse_memory trains only the"),
        (
            ["--optimizer.memory_optimizer", "adamw"],
            "--optimizer.memory_optimizer adamw trains the whole table densely; sparse_memory",
        ),
        (
            ["--finetune.method", "full", "--optimizer.memory_optimizer", "sgd"],
            "--optimizer.memory_optimizer sgd trains the table row-sparsely, which only",
        ),
        (
            ["--optimizer.memory_optimizer", "rowwise_adagrad"],
            "sparse_memory with rowwise_adagrad has no default learning rate: pass --optimizer.lr",
        ),
        (
            ["--dataloader.knowledge.first_person", "30"],
            "overlap the pretraining's (--finetune.pretraining.knowledge: 0 to 39)",
        ),
    ],
)
def test_finetune_refuses(args, message, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    base = ["--config", "finetune_smoke", "--model", "mem_debug_64k"]
    missing = ["--checkpoint", str(tmp_path / "none"), "--dump_folder", str(tmp_path)]
    err = exit_2(finetune.main, [*base, *missing, *args], capsys)
    assert_one_error_line(err, message)
    assert list(tmp_path.iterdir()) == []
