"""``python -m recipes.finetune``: each method on a real pretrained checkpoint, exact resume,
and the errors it gives before any work.

Runs the real entry point in subprocesses on ``finetune_smoke`` (8 new people, 2 x 32 tokens)
from a ``mem_debug_64k`` checkpoint pretrained for a few steps by ``recipes.pretrain``.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchtitan", reason="the recipes need the 'recipes' extra")

import torch.distributed.checkpoint as dcp  # noqa: E402

from recipes.checkpoints import load_checkpoint  # noqa: E402
from recipes.finetune import main  # noqa: E402
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


def run_finetune(
    base: Path, dump: Path, method: str, steps: int, *extra: str
) -> subprocess.CompletedProcess:
    args = [
        "--config", "finetune_smoke",
        "--checkpoint", str(base),
        "--model", MODEL,
        "--finetune.method", method,
        "--dump_folder", str(dump),
        "--dataloader.cache_dir", str(base.parents[2] / "cache"),
        "--finetune.pretraining.cache_dir", str(base.parents[2] / "cache"),
        "--training.steps", str(steps),
        "--metrics.no-enable-tensorboard",
        "--debug.seed", "0",
        *extra,
    ]  # fmt: skip
    result = run_recipe("recipes.finetune", args)
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
    run_finetune(base_checkpoint, tmp_path, "sparse_memory", 6, "--finetune.trainable_slots", "4")
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


@pytest.mark.parametrize("method", ["full", "lora"])
def test_full_and_lora_finetuning_train(base_checkpoint: Path, tmp_path: Path, method: str):
    if method == "lora":
        pytest.importorskip("peft")
    run_finetune(base_checkpoint, tmp_path, method, 12, "--finetune.lr", "1e-2")
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
        (["--checkpoint", ""], "--checkpoint PATH is required"),
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


def test_help_lists_the_finetuning_flags():
    result = run_recipe("recipes.finetune", ["--help"])
    assert result.returncode == 0, result.stderr
    for flag in (
        "--finetune.method",
        "--finetune.trainable-slots",
        "--finetune.optimizer",
        "--finetune.lora-rank",
        "--finetune.eval-every",
        "--finetune.pretraining.knowledge.num-people",
    ):
        assert flag in result.stdout, flag
