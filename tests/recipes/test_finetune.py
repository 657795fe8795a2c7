"""``python -m recipes.finetune``: each method on a real pretrained checkpoint, exact resume,
and the errors it gives before any work.

Runs the real entry point in subprocesses on ``finetune_smoke`` (8 new people, 2 x 32 tokens)
from a ``mem_debug_64k`` checkpoint pretrained for a few steps by ``recipes.pretrain``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchtitan", reason="the recipes need the 'recipes' extra")

import torch.distributed.checkpoint as dcp  # noqa: E402

from recipes.checkpoints import load_checkpoint  # noqa: E402
from recipes.finetune import main, parse_args  # noqa: E402
from recipes.finetune_trainer import DEFAULT_LEARNING_RATES  # noqa: E402
from recipes.model import is_adapter, pretrained_name  # noqa: E402
from tests.recipes.test_pretrain import losses, run_pretrain, run_recipe  # noqa: E402

MODEL = "mem_debug_64k"


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    """``recipes.pretrain --config smoke`` (40 people) of ``mem_debug_64k``, 8 steps."""
    dump = tmp_path_factory.mktemp("base")
    result = run_pretrain(
        [
            "--config",
            "smoke",
            "--model",
            MODEL,
            "--dump_folder",
            str(dump),
            "--dataloader.cache_dir",
            str(dump / "cache"),
            "--metrics.no-enable-tensorboard",
            "--debug.seed",
            "0",
        ]  # fmt: skip
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dump / "checkpoint" / "step-8"


def finetune_args(
    base: Path, dump: Path, method: str, steps: int, *extra: str, token_cache: Path | None = None
) -> list[str]:
    """``finetune_smoke`` from ``base``; tokens cached next to ``base``'s run unless given."""
    token_cache = token_cache or base.parents[2] / "cache"
    return [
        "--config", "finetune_smoke",
        "--checkpoint", str(base),
        "--model", MODEL,
        "--finetune.method", method,
        "--dump_folder", str(dump),
        "--dataloader.cache_dir", str(token_cache),
        "--finetune.pretraining.cache_dir", str(token_cache),
        "--training.steps", str(steps),
        "--metrics.no-enable-tensorboard",
        "--debug.seed", "0",
        *extra,
    ]  # fmt: skip


def run_finetune(
    base: Path, dump: Path, method: str, steps: int, *extra: str
) -> subprocess.CompletedProcess:
    result = run_recipe("recipes.finetune", finetune_args(base, dump, method, steps, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def evaluations(dump: Path) -> dict[int, dict[str, float]]:
    lines = (dump / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["eval"] for r in map(json.loads, lines) if "eval" in r}


def stored_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a DCP checkpoint, under its stored names."""
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    model_names = [n for n in metadata if not n.startswith(("optimizer", "lr_scheduler"))]
    state = {
        name: torch.empty(tuple(metadata[name].size), dtype=metadata[name].properties.dtype)
        for name in model_names
        if isinstance(metadata[name], dcp.metadata.TensorStorageMetadata)
    }
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return state


def test_sparse_memory_finetuning_writes_only_a_few_slots_and_measures(
    base_checkpoint: Path, tmp_path: Path
):
    result = run_finetune(
        base_checkpoint, tmp_path, "sparse_memory", 6, "--finetune.trainable_slots", "4",
        "--optimizer.lr", "20",
    )  # fmt: skip
    # The rate the table's optimizer holds: the flag's, times the table's multiplier.
    assert (
        "Finetuning (sparse_memory): the value table trains with sgd (row-sparse: each step's "
        "top 4 slots) at lr 200 (--optimizer.lr 20 x --optimizer.memory_lr_multiplier 10)"
    ) in result.stdout
    base = load_checkpoint(base_checkpoint, MODEL).state_dict()
    tuned = load_checkpoint(tmp_path / "checkpoint" / "step-6", MODEL).state_dict()
    for name, tensor in base.items():
        if name != "memory_values":
            assert torch.equal(tuned[name], tensor), name
    changed = (tuned["memory_values"] != base["memory_values"]).any(dim=1).sum()
    assert 0 < changed <= 6 * 4  # at most 4 slots a step
    measured = evaluations(tmp_path)
    assert sorted(measured) == [0, 6]  # the base model, and the finetuned one
    assert {"new_recall", "old_recall", "old_heldout_recall", "old_nll"} <= set(measured[6])
    # The background frequencies were cached in the base checkpoint for the next run.
    assert list(base_checkpoint.glob("slot_frequency-*.pt"))


def test_a_damaged_slot_frequency_cache_is_measured_again(
    base_checkpoint: Path, tmp_path: Path, capfd, in_process_run
):
    """The background frequencies are only a cache: a damaged one is measured again and
    replaced, with a warning naming the file, and the run goes on."""
    base = tmp_path / "base"
    shutil.copytree(base_checkpoint, base, ignore=shutil.ignore_patterns("slot_frequency-*"))

    def finetune(dump: str) -> None:
        quick = ["--no-final-eval", "--checkpoint.no-enable"]
        token_cache = base_checkpoint.parents[2] / "cache"
        main(
            finetune_args(
                base, tmp_path / dump, "sparse_memory", 1, *quick, token_cache=token_cache
            )
        )

    finetune("first")
    [cache] = base.glob("slot_frequency-*.pt")
    measured = torch.load(cache, weights_only=True)
    cache.write_bytes(cache.read_bytes()[:64])  # truncated, as by a full disk
    capfd.readouterr()
    finetune("second")
    log = capfd.readouterr().out  # torchtitan logs to stdout
    assert f"{cache}: not a readable slot-frequency cache" in log
    assert "measuring the background slot frequencies again" in log
    remeasured = torch.load(cache, weights_only=True)  # replaced by a whole one
    assert remeasured["batches"] == measured["batches"]
    assert torch.equal(remeasured["document_frequency"], measured["document_frequency"])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_full_and_lora_finetuning_train(base_checkpoint: Path, tmp_path: Path, method: str):
    if method == "lora":
        pytest.importorskip("peft")
    result = run_finetune(base_checkpoint, tmp_path, method, 12, "--optimizer.lr", "1e-2")
    trains = {
        "full": "every parameter trains with AdamW at lr 0.01, the value table at lr 0.1",
        "lora": "the LoRA adapters train with AdamW at lr 0.01; every pretrained weight is frozen",
    }
    assert f"Finetuning ({method}): {trains[method]}" in result.stdout
    loss = losses(tmp_path)
    assert sum(loss[s] for s in (10, 11, 12)) < sum(loss[s] for s in (1, 2, 3))
    base = stored_state(base_checkpoint)
    tuned = stored_state(tmp_path / "checkpoint" / "step-12")
    if method == "lora":
        adapters = [name for name in tuned if is_adapter(name)]
        assert any(".attention.wq.lora_B." in name for name in adapters)
        for name, tensor in tuned.items():  # LoRA leaves every pretrained weight as it was
            if not is_adapter(name):
                assert torch.equal(tensor, base[pretrained_name(name)]), name
        # The final report merged the adapters: W + (alpha / rank) B A, as the plain flavor.
        merged = stored_state(tmp_path / "merged" / "step-12")
        assert merged.keys() == base.keys()
        prefix = "layers.0.attention.wq"
        delta = tuned[f"{prefix}.lora_B.default.weight"] @ tuned[f"{prefix}.lora_A.default.weight"]
        expected = base[f"{prefix}.weight"] + 16.0 / 8 * delta  # the default alpha and rank
        torch.testing.assert_close(merged[f"{prefix}.weight"], expected)
        assert torch.equal(merged["memory_values"], base["memory_values"])
        load_checkpoint(tmp_path / "merged" / "step-12", MODEL)  # loads as the plain flavor
    else:
        assert not torch.equal(tuned["tok_embeddings.weight"], base["tok_embeddings.weight"])
        assert not torch.equal(tuned["memory_values"], base["memory_values"])


def test_finetuning_on_a_local_jsonl_file_measures_forgetting_only(
    base_checkpoint: Path, tmp_path: Path
):
    data = tmp_path / "news.jsonl"
    lines = [{"text": f"Bulletin {i}: the harbour of Quillon opened gate {i}."} for i in range(40)]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run_finetune(base_checkpoint, tmp_path / "run", "full", 2, "--dataloader.dataset", str(data))
    measured = evaluations(tmp_path / "run")
    assert sorted(measured) == [0, 2]
    assert set(measured[2]) == {"old_recall", "old_heldout_recall", "old_nll"}  # no new facts


def test_a_resumed_finetuning_equals_an_uninterrupted_one(base_checkpoint: Path, tmp_path: Path):
    # sparse_memory: the slot choice (cached background frequencies) must resume exactly too.
    method = "sparse_memory"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_finetune(base_checkpoint, straight, method, 6, "--no-final-eval")
    run_finetune(base_checkpoint, resumed, method, 4, "--no-final-eval")
    run_finetune(base_checkpoint, resumed, method, 6, "--no-final-eval")  # from step 4
    assert losses(resumed) == losses(straight)
    final = [stored_state(run / "checkpoint" / "step-6") for run in (straight, resumed)]
    assert final[0].keys() == final[1].keys()
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), name


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "/no/such/step-1"], "is not a DCP checkpoint folder"),
        (["--model", "mem_debug"], "holds memory_values of shape (65536, 64)"),
        (["--model", "dense_debug", "--finetune.method", "full"], "was not trained as"),
    ],
)
def test_bad_configuration_fails_before_any_work(
    base_checkpoint: Path, args: list[str], message: str, monkeypatch
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    defaults = [
        "--config",
        "finetune_smoke",
        "--checkpoint",
        str(base_checkpoint),
        "--model",
        MODEL,
    ]
    with pytest.raises(SystemExit, match=re.escape(message)):
        main([*defaults, *args])  # the last --checkpoint / --model wins


@pytest.mark.parametrize(
    "args, table_optimizer, dense_optimizer, lr",
    [
        ([], "sgd", None, None),
        (["--optimizer.lr", "0.5"], "sgd", None, 0.5),
        (["--optimizer.memory_optimizer", "adam"], "adam", None, None),
        (["--optimizer.memory_optimizer", "rowwise_adagrad", "--optimizer.lr", "0.3"],
         "rowwise_adagrad", None, 0.3),
        (["--finetune.method", "full"], "adamw", "AdamW", None),
        (["--finetune.method", "full", "--optimizer.name", "SGD"], "adamw", "SGD", None),
        (["--finetune.method", "lora", "--optimizer.name", "SGD", "--optimizer.lr", "2e-3"],
         "adamw", "SGD", 2e-3),
    ],
)  # fmt: skip
def test_optimizer_flags_are_honoured(args, table_optimizer, dense_optimizer, lr):
    """An --optimizer.* flag a user gives is the run's; what no flag gives follows the method."""
    config = parse_args(["--checkpoint", "unused", *args])
    method = config.finetune.method
    optimizer = config.optimizer
    assert optimizer.memory_optimizer == table_optimizer
    assert config.parallelism.row_sparse_table == (table_optimizer != "adamw")
    if dense_optimizer is not None:
        assert optimizer.name == dense_optimizer
    if lr is None:  # the method's default for its optimizer
        lr = DEFAULT_LEARNING_RATES[method, dense_optimizer or table_optimizer]
    assert optimizer.lr == lr


def test_help_lists_the_finetuning_flags():
    result = run_recipe("recipes.finetune", ["--help"])
    assert result.returncode == 0, result.stderr
    for flag in (
        "--finetune.method",
        "--finetune.trainable-slots",
        "--optimizer.memory-optimizer",
        "--optimizer.name",
        "--finetune.lora-rank",
        "--finetune.eval-every",
        "--finetune.pretraining.knowledge.num-people",
    ):
        assert flag in result.stdout, flag
