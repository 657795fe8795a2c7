"""Replicated tables train one table, in the recipe, at every combination a user can reach.

With ``--parallelism.memory_parallel_degree 2`` on 4 ranks each column shard of the value table
has two replicas, which see different tokens: their gradients must be summed exactly once per
optimizer step (dense table), or what they recorded gathered (row-sparse table). Each run below
trains 3 steps of the recipe's smoke configuration on one global batch of 8 sequences from the
same seed, and must log, step by step, the losses and gradient norms of the reference: 2 ranks
with degree 2 (one group, no replica), 1 micro-batch. The 4-rank runs must also end with the
replicas of each shard bitwise equal (the trainer checks it; the test reads the shards too).

- 4 ranks, 1 and 2 micro-batches (accumulation), dense table and row-wise AdaGrad;
- 4 ranks, 2 micro-batches, blocks compiled (dense table);
- 2 ranks, the table FSDP-sharded (degree 1, dense), 1 and 2 micro-batches;
- 1 process, dense table and row-wise AdaGrad: with no seed checkpoint, every layout starts
  from the weights one process draws (DTensor's RNG does not shard random init on CPU meshes,
  so the recipe initialises an unsharded copy).

The trainers run in-process in spawned gloo workers, several per spawn, one after another
(starting processes dominates the time).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.recipes.gloo import on_gloo_ranks

pytest.importorskip("torchtitan", reason="the recipes need the 'recipes' extra")

STEPS, GLOBAL_BATCH = 3, 8


def _args(folder: Path, *, degree: int, table: str, micro_batches: int, ranks: int) -> list[str]:
    local_batch = GLOBAL_BATCH // (ranks * micro_batches)
    return [
        "--config", "smoke",
        "--dump_folder", str(folder),
        "--dataloader.cache_dir", str(folder.parent / "token-cache"),
        "--training.steps", str(STEPS),
        "--training.global_batch_size", str(GLOBAL_BATCH),
        "--training.local_batch_size", str(local_batch),
        "--parallelism.memory_parallel_degree", str(degree),
        "--optimizer.memory_optimizer", table,
        "--metrics.no-enable-tensorboard",
        "--checkpoint.no-enable",
        "--no-final-eval",
        "--debug.seed", "0",
    ]  # fmt: skip


def _train_each(runs: dict[str, list[str]]) -> dict[str, dict]:
    return {name: _train(argv) for name, argv in runs.items()}


def _train(argv: list[str]) -> dict:
    """One recipe run in this process (its process group already up); what it logged and
    whether the table's replicas agree at the end."""
    from recipes import shims
    from recipes.memory_parallel import REPLICA_DIM
    from recipes.pretrain import parse_args, validate

    shims.apply()
    config = parse_args(argv)
    validate(config, dist.get_world_size())
    trainer = config.build()
    try:
        trainer.train()
        table = trainer.model_parts[0].memory_values
        result = {"replicas_equal": None}
        mesh = getattr(table, "device_mesh", None)
        replicated = mesh is not None and REPLICA_DIM in (mesh.mesh_dim_names or ())
        if replicated and mesh[REPLICA_DIM].size() > 1:
            shard = table.to_local().detach()
            shards = [torch.empty_like(shard) for _ in range(mesh[REPLICA_DIM].size())]
            dist.all_gather(shards, shard, group=mesh.get_group(REPLICA_DIM))
            result["replicas_equal"] = all(torch.equal(s, shards[0]) for s in shards)
        if dist.get_rank() == 0:
            lines = Path(config.dump_folder, "metrics.jsonl").read_text().splitlines()
            result["log"] = [json.loads(line) for line in lines]
        return result
    finally:
        trainer.close()


def _spawn(world_size: int, runs: dict[str, list[str]]) -> dict[str, dict]:
    """Every run on ``world_size`` ranks: rank 0's log, every rank's replica check."""
    results = on_gloo_ranks(world_size, _train_each, runs, timeout_s=600)
    merged = {}
    for name in runs:
        replicas = [result[name]["replicas_equal"] for result in results.values()]
        merged[name] = {**results[0][name], "replicas": replicas}
    return merged


def _assert_same_training(run: dict, reference: dict, name: str) -> None:
    """Equal up to fp32 reduction order (a few 1e-6 relative): a replica reduce that is
    missing, or counts a micro-batch twice, moves the first step's norm by ~7e-4."""
    assert [r["step"] for r in run["log"]] == list(range(1, STEPS + 1)), name
    for got, expected in zip(run["log"], reference["log"]):
        for metric in ("loss", "grad_norm"):
            assert got[metric] == pytest.approx(expected[metric], rel=5e-5, abs=1e-6), (
                name, got["step"], metric,
            )  # fmt: skip


def test_replicated_tables_train_as_one_table(tmp_path: Path):
    one = {
        f"one-process-{table}": _args(
            tmp_path / f"one-process-{table}", degree=1, table=table, micro_batches=1, ranks=1
        )
        for table in ("adamw", "rowwise_adagrad")
    }
    two = {
        f"reference-{table}": _args(
            tmp_path / f"reference-{table}", degree=2, table=table, micro_batches=1, ranks=2
        )
        for table in ("adamw", "rowwise_adagrad")
    }
    for micro_batches in (1, 2):
        name = f"fsdp-table-{micro_batches}mb"
        two[name] = _args(
            tmp_path / name, degree=1, table="adamw", micro_batches=micro_batches, ranks=2
        )
    four = {}
    for table in ("adamw", "rowwise_adagrad"):
        for micro_batches in (1, 2):
            name = f"replicas-{table}-{micro_batches}mb"
            four[name] = _args(
                tmp_path / name, degree=2, table=table, micro_batches=micro_batches, ranks=4
            )
    compiled = _args(tmp_path / "compiled", degree=2, table="adamw", micro_batches=2, ranks=4)
    four["replicas-adamw-2mb-compiled"] = [
        *compiled, "--compile.enable", "--compile.backend", "aot_eager",
    ]  # fmt: skip

    results = _spawn(1, one) | _spawn(2, two) | _spawn(4, four)

    for name, run in results.items():
        table = "rowwise_adagrad" if "rowwise_adagrad" in name else "adamw"
        _assert_same_training(run, results[f"reference-{table}"], name)
        if name.startswith("replicas"):
            assert run["replicas"] == [True] * 4, name  # every rank's shard equals its replica's
        else:
            assert set(run["replicas"]) == {None}, name
