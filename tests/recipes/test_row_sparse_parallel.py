"""Row-sparse table training on real gloo process groups: a column-sharded table (memory
parallelism, G = 2; of Memory+ and of PEER, whose down rows are recorded by its dots) and a
replicated one (R = 2) match one process on all ranks' tokens after several steps (the same
losses and table), and the 2-rank optimizer state loads (DCP) into a 1-rank optimizer.

One spawn runs every check per layout (process start-up dominates).
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from tests.recipes.gloo import on_gloo_ranks

pytest.importorskip("torchtitan", reason="the recipes need the 'recipes' extra")

VOCAB, SEQ_LEN, BATCH_PER_RANK, STEPS = 97, 11, 2, 3
RULES = ("rowwise_adagrad", "adam")


def _train_every_rule(flavor: str, layout: tuple[int, int], checkpoint: str) -> dict:
    return {rule: _train(dist.get_rank(), flavor, layout, rule, checkpoint) for rule in RULES}


def _model_and_tokens(flavor: str):
    from memcompile.flavors import FLAVORS
    from memcompile.model import Transformer

    torch.manual_seed(0)
    model = Transformer(replace(FLAVORS[flavor], vocab_size=VOCAB))
    tokens = torch.randint(
        0, VOCAB, (STEPS, 2 * BATCH_PER_RANK, SEQ_LEN), generator=torch.Generator().manual_seed(1)
    )
    return model, tokens


def _step(model, optimizer, tokens, num_tokens: int) -> torch.Tensor:
    # Normalised by the global token count, as the trainer does: the ranks' gradients sum.
    loss = model(tokens).square().sum() / (num_tokens * VOCAB)
    loss.backward()
    optimizer.clip_grad_norm_(1e-3)  # small enough to clip: the scale must agree too
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def _train(rank: int, flavor: str, layout: tuple[int, int], rule: str, checkpoint: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    from memcompile.sparse_optim import RowSparseOptimizer
    from recipes.memory_parallel import MEMORY_DIM, REPLICA_DIM, apply_memory_parallel

    reference, tokens = _model_and_tokens(flavor)
    sharded, _ = _model_and_tokens(flavor)
    mesh = init_device_mesh("cpu", layout, mesh_dim_names=(REPLICA_DIM, MEMORY_DIM))
    apply_memory_parallel(sharded, mesh, compute_dtype=torch.float32)
    reference_optimizer = RowSparseOptimizer(reference, rule, lr=0.05)
    optimizer = RowSparseOptimizer(sharded, rule, lr=0.05)
    loss_error = 0.0
    for batch in tokens:
        reference_loss = _step(reference, reference_optimizer, batch, batch.numel())
        # Each rank feeds its half of the batch, as the data loader does (a column shard then
        # reads the tokens of its whole group, a replica only its own).
        loss = _step(sharded, optimizer, batch.chunk(2)[rank], batch.numel())
        dist.all_reduce(loss)
        loss_error = max(loss_error, (loss - reference_loss).abs().item())

    folder = os.path.join(checkpoint, rule)
    dcp.save({"optimizer": optimizer.state_dict()}, checkpoint_id=folder)
    dist.barrier()
    result = {
        "loss_error": loss_error,
        "table_error": (sharded.memory_values.full_tensor() - reference.memory_values),
    }
    if rank == 0:  # reshard 2 -> 1: a plain single-process optimizer loads the 2-rank state
        single, _ = _model_and_tokens(flavor)
        loaded = RowSparseOptimizer(single, rule, lr=0.05)
        state_dict = {"optimizer": loaded.state_dict()}
        dcp.load(state_dict, checkpoint_id=folder, no_dist=True)
        loaded.load_state_dict(state_dict["optimizer"])
        expected = reference_optimizer.state[reference.memory_values]
        actual = loaded.state[single.memory_values]
        result["state_error"] = {name: actual[name] - expected[name] for name in expected}
        result["state_is_fp32_local"] = all(
            type(t) is torch.Tensor and t.dtype == torch.float32 for t in actual.values()
        )
    result["table_error"] = result["table_error"].abs().max().item()
    if "state_error" in result:
        result["state_error"] = {k: v.abs().max().item() for k, v in result["state_error"].items()}
    return result


@pytest.mark.parametrize(
    "flavor, layout, table_tolerance",
    [
        ("mem_debug", (1, 2), 1e-5),  # fp32, lr 0.05
        ("mem_debug", (2, 1), 1e-5),
        # AdaGrad and Adam make each touched row's step about lr, however small its gradient:
        # PEER's up rows of experts deep in GELU's flat tail (weights g·σ(u·x) of ~1e-9, which
        # fp32 rounds coarsely) have gradients ~1e-4 of the others, and their rounding shows.
        ("peer_debug", (1, 2), 1e-4),
    ],
    ids=["column-sharded G=2", "replicated R=2", "PEER column-sharded G=2"],
)
def test_two_ranks_match_one_process_and_reshard_to_one(flavor, layout, table_tolerance, tmp_path):
    results = on_gloo_ranks(2, _train_every_rule, flavor, layout, str(tmp_path))
    for rank, result in results.items():
        for rule, checks in result.items():
            assert checks["loss_error"] < 1e-6, (rank, rule, checks)
            assert checks["table_error"] < table_tolerance, (rank, rule, checks)
    for rule, checks in results[0].items():
        assert checks["state_is_fp32_local"], rule
        for name, error in checks["state_error"].items():
            assert error < 1e-6, (rule, name, error)
