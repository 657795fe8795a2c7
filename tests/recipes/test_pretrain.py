"""``python -m recipes.pretrain``: the CLI, its errors, and crash/resume reliability.

The training tests run the real entry point in subprocesses (a fresh process group each) on a
tiny configuration, and compare the exact losses that rank 0 writes to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torchtitan", reason="the recipes need the 'recipes' extra")

from recipes.pretrain import main, parse_args, validate  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 240


def tiny_run_args(dump_folder: Path, steps: int) -> list[str]:
    """The registry's smoke config (mem_debug, 40 people, 2 x 32 tokens, a checkpoint every 2
    steps), in a folder of the test's own."""
    return [
        "--config", "smoke",
        "--dump_folder", str(dump_folder),
        "--dataloader.cache_dir", str(dump_folder.parent / "token-cache"),
        "--training.steps", str(steps),
        "--metrics.no-enable-tensorboard",
        "--debug.seed", "0",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run_pretrain(args: list[str]) -> subprocess.CompletedProcess:
    return run_recipe("recipes.pretrain", args)


def run_recipe(module: str, args: list[str]) -> subprocess.CompletedProcess:
    """``python -m <module> args`` in a fresh process (a process group of its own)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def losses(dump_folder: Path) -> dict[int, float]:
    """step -> loss, the last logged value winning (a restarted run re-logs resumed steps);
    measurement records (a finetuning's "eval") are skipped."""
    lines = (dump_folder / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_help_lists_every_section():
    result = run_pretrain(["--help"])
    assert result.returncode == 0, result.stderr
    for flag in (
        "--model",
        "--training.steps",
        "--parallelism.memory-parallel-degree",
        "--dataloader.dataset",
        "--optimizer.memory-lr-multiplier",
        "--optimizer.memory-optimizer",
        "--checkpoint.interval",
        "--compile.enable",
        "--metrics.enable-tensorboard",
    ):
        assert flag in result.stdout, flag


@pytest.mark.parametrize("model", ["mem_debug", "engram_debug", "peer_debug"])
def test_every_family_trains_a_column_sharded_table_row_sparsely(model):
    """Every read of the table records on a column shard (PEER's dots too: the training itself
    is tests/recipes/test_row_sparse_parallel.py)."""
    sharded = ["--optimizer.memory_optimizer", "rowwise_adagrad"]
    sharded += ["--parallelism.memory_parallel_degree", "2"]
    validate(parse_args(["--model", model, *sharded]), world_size=2)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "huge"], "Config function 'huge' not found in recipes.config_registry"),
        (
            ["--dataloader.dataset", "./no/such/file.jsonl"],
            "dataset path './no/such/file.jsonl' does not exist",
        ),
        (
            ["--hf_assets_path", "/no/such/dir"],
            "--hf_assets_path '/no/such/dir' is not a directory",
        ),
        (["--float8.enable"], "--float8.enable needs an NVIDIA SM89+ or AMD MI300+ GPU"),
    ],
)
def test_bad_configuration_fails_before_any_work(args, message, monkeypatch):
    """Errors other than flag values (those exit with code 2: test_cli.py)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(args)


def test_row_sparse_table_training_on_several_ranks_needs_memory_parallelism():
    config = parse_args(["--optimizer.memory_optimizer", "rowwise_adagrad"])
    with pytest.raises(ValueError, match="needs the table out of FSDP"):
        validate(config, world_size=2)


@pytest.mark.parametrize(
    "args, message",
    [(["--training.stepz", "3"], "--training.stepz"), (["--model", "mem_huge"], "'mem_huge'")],
)
def test_unknown_flag_or_model_is_rejected(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_a_run_reports_what_it_learnt_and_a_rerun_says_it_had_finished(tmp_path: Path):
    """The end of a run on the built-in corpus: the knowledge table, the commands to evaluate
    and to question the checkpoint (which work), a log without the noise of CPU runs; a rerun
    of the finished run says so and how to go on."""
    dump = tmp_path / "run"
    result = run_pretrain(tiny_run_args(dump, 4))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "What the model knows after 4 steps" in log
    assert "| fact recall, trained questions |" in log
    assert "It recalls " in log
    checkpoint = shlex.quote(str(dump / "checkpoint" / "step-4"))
    evaluate = f"python -m recipes.evaluate --checkpoint {checkpoint} --model mem_debug"
    assert f"Evaluate it:  {evaluate} --knowledge.num-people 40" in log
    ask = re.search(r"Ask it: +python -m recipes\.generate (.*)", log).group(1)
    assert ask.startswith(f"--checkpoint {checkpoint} --model mem_debug --question ")
    for noise in ("mfu", "Peak flops", "lspci", "initial_load_model_only", "Failed to load"):
        assert noise not in log, noise
    asked = subprocess.run(
        [sys.executable, "-m", "recipes.generate", *shlex.split(ask), "--max-new-tokens", "4"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert asked.returncode == 0 and "\nAnswer:" in asked.stdout, asked.stderr[-3000:]

    # The rerun loads the last checkpoint (no warning of torch's LR scheduler), trains and
    # measures nothing, and its message is the last line, not scrolled away by a second table.
    rerun = run_pretrain(tiny_run_args(dump, 4))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stderr + rerun.stdout
    assert "Warning" not in log, log[-3000:]
    assert "What the model knows" not in log
    last_line = rerun.stdout.strip().splitlines()[-1]  # torchtitan logs to stdout
    assert "This run had already finished" in last_line
    assert "holds step 4 of 4. To train longer, rerun with --training.steps N" in last_line


def test_the_default_run_is_seeded_and_debug_seed_none_unseeds_it(tmp_path: Path, in_process_run):
    """Without --debug.seed a run is the same run each time (the README's numbers come back);
    --debug.seed None draws a fresh initialisation."""

    def step_losses(name: str, *extra: str) -> dict[int, float]:
        dump = tmp_path / name
        args = ["--config", "smoke", "--dump_folder", str(dump), "--training.steps", "2"]
        cache = ["--dataloader.cache_dir", str(tmp_path / "token-cache")]
        quiet = ["--metrics.no-enable-tensorboard", "--checkpoint.no-enable", "--no-final-eval"]
        main([*args, *cache, *quiet, *extra])
        return losses(dump)

    first, second = step_losses("first"), step_losses("second")
    assert sorted(first) == [1, 2]
    assert first == second  # bitwise: the same floats
    assert step_losses("unseeded", "--debug.seed", "None")[1] != first[1]


# Lazy Adam's state round trip is tested in tests/memcompile/test_sparse_optim.py; here the
# dense default and a row-sparse rule (its state in the DCP checkpoint) keep the suite short.
@pytest.mark.parametrize("table_optimizer", ["adamw", "rowwise_adagrad"])
def test_sigkill_then_restart_resumes_bitwise(tmp_path: Path, table_optimizer: str):
    """A run killed with SIGKILL restarts from its last complete checkpoint (never from a
    half-written one) and then logs bitwise the losses of an uninterrupted run, with the table
    trained densely or row-sparsely (its optimizer state in the checkpoint)."""
    steps = 8
    reference = tmp_path / "reference"
    args = ["--optimizer.memory_optimizer", table_optimizer]
    result = run_pretrain(tiny_run_args(reference, steps) + args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = losses(reference)
    assert sorted(expected) == list(range(1, steps + 1))

    crashed = tmp_path / "crashed"
    process = subprocess.Popen(
        [sys.executable, "-m", "recipes.pretrain", *tiny_run_args(crashed, steps), *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (crashed / "checkpoint" / "step-2" / ".metadata").exists():
        assert process.poll() is None and time.monotonic() < deadline, (
            "run ended before its first checkpoint"
        )
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    completed = sorted(
        int(p.name.split("-")[1])
        for p in (crashed / "checkpoint").glob("step-*")
        if (p / ".metadata").exists()
    )
    assert completed and completed[-1] < steps, "the kill must happen mid-run"
    # What a kill during a save leaves behind: shard files, no .metadata (written last).
    half_written = crashed / "checkpoint" / f"step-{completed[-1] + 1}"
    half_written.mkdir(exist_ok=True)
    (half_written / "__0_0.distcp").write_bytes(b"\0" * 64)

    result = run_pretrain(tiny_run_args(crashed, steps) + args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        f"Loading the checkpoint from {crashed / 'checkpoint' / f'step-{completed[-1]}'}"
        in result.stdout
    )
    assert losses(crashed) == expected


@pytest.mark.parametrize("table_optimizer", ["adamw", "rowwise_adagrad"])
@pytest.mark.parametrize("model", ["engram_debug", "peer_debug"])
def test_engram_and_peer_train_and_resume_bitwise(
    tmp_path: Path, in_process_run, model: str, table_optimizer: str
):
    """The other memory families train (their one table densely or row-sparsely) and resume
    from a DCP checkpoint to bitwise the losses of an uninterrupted run (in process, from the
    uninterrupted run's step-2 checkpoint: the SIGKILL test above covers the crash itself)."""

    def train(name: str) -> dict[int, float]:
        args = ["--model", model, "--optimizer.memory_optimizer", table_optimizer]
        main([*tiny_run_args(tmp_path / name, 4), *args, "--no-final-eval"])
        return losses(tmp_path / name)

    expected = train("reference")
    assert sorted(expected) == [1, 2, 3, 4]
    step_2 = Path("checkpoint", "step-2")
    shutil.copytree(tmp_path / "reference" / step_2, tmp_path / "resumed" / step_2)
    assert train("resumed") == {3: expected[3], 4: expected[4]}


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--standalone",
        "-m",
        "recipes.pretrain",
        *args,
    ]
    return subprocess.run(
        command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )


def _checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("table_optimizer", ["adamw", "rowwise_adagrad"])
def test_memory_parallel_two_ranks_match_one_rank_and_reshard_to_one(
    tmp_path: Path, table_optimizer: str
):
    """From the same seed checkpoint, 2 ranks with the table column-sharded over both (each
    rank half of the global batch; blocks compiled, dense ones checkpointed) log the eager
    1-rank losses, with the table trained densely or row-sparsely; the 2-rank checkpoint then
    loads into a 1-rank model whose first loss is what the checkpointed weights give in
    float64."""
    steps = 3
    seed = tmp_path / "seed"
    _checked(run_pretrain([*tiny_run_args(seed, steps), "--checkpoint.create_seed_checkpoint"]))
    from_seed = [
        "--checkpoint.initial_load_path",
        str(seed / "checkpoint" / "step-0"),
        "--optimizer.memory_optimizer",
        table_optimizer,
    ]

    one, two = tmp_path / "one", tmp_path / "two"
    _checked(
        run_pretrain([*tiny_run_args(one, steps), *from_seed, "--training.local_batch_size", "4"])
    )
    result = _checked(
        _torchrun(
            2,
            [
                *tiny_run_args(two, steps),
                *from_seed,
                "--parallelism.memory_parallel_degree",
                "2",
                "--compile.enable",
                "--compile.backend",
                "aot_eager",
                "activation-checkpoint:selective",
            ],
        )
    )
    assert "Column-sharded the memory values over 2 ranks" in result.stdout
    assert "Compiling each TransformerBlock" in result.stdout
    assert "Applied SelectiveAC activation checkpointing" in result.stdout
    expected, actual = losses(one), losses(two)
    assert sorted(actual) == list(range(1, steps + 1))
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step

    resharded = tmp_path / "resharded"
    checkpoint = two / "checkpoint" / f"step-{steps}"
    result = _checked(
        run_pretrain(
            [
                *tiny_run_args(resharded, 1),
                "--training.local_batch_size",
                "4",
                "--checkpoint.initial_load_path",
                str(checkpoint),
            ]
        )
    )
    assert f"Loading the checkpoint from {checkpoint}" in result.stdout
    assert losses(resharded)[1] == pytest.approx(
        _first_batch_loss(checkpoint, tmp_path, 4), rel=1e-5
    )


def _first_batch_loss(checkpoint: Path, tmp_path: Path, batch_size: int) -> float:
    """The loss of a DCP checkpoint's weights on the first batch of a fresh 1-rank run."""
    import torch

    from recipes.checkpoints import load_checkpoint, load_tokenizer
    from recipes.data.knowledge import KnowledgeCorpus
    from recipes.data.loader import PackedWindows, knowledge_source, load_token_stream

    tokenizer = load_tokenizer()
    model = load_checkpoint(checkpoint, "mem_debug", tokenizer.get_vocab_size()).train().double()
    corpus = KnowledgeCorpus(num_people=40)
    tokens = load_token_stream(
        knowledge_source(corpus), corpus.train_documents, tokenizer, str(tmp_path / "token-cache")
    )
    windows = iter(PackedWindows(tokens, seq_len=32, seed=0, dp_rank=0, dp_world_size=1))
    inputs, labels = zip(*(next(windows) for _ in range(batch_size)))
    logits = model(torch.stack([x["input"] for x in inputs]))
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), torch.stack(labels).flatten()
        ).item()
