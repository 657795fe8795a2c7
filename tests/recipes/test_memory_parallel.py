"""Column-sharded memory tables on real gloo process groups, for every family (Memory+, Engram,
PEER).

One spawn per case runs every check (process start-up dominates): each rank builds the same
model, shards the table, runs forward/backward on its own tokens, and compares with the
single-process model on the concatenation of all ranks' tokens.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from tests.recipes.gloo import on_gloo_ranks

pytest.importorskip("torchtitan", reason="the recipes need the 'recipes' extra")

VOCAB, SEQ_LEN, BATCH_PER_RANK = 97, 11, 2  # odd sizes on purpose


def _check(flavor: str, world_size: int, degree: int) -> dict:
    import ops  # noqa: F401
    from memcompile.flavors import FLAVORS

    rank = dist.get_rank()
    from memcompile.model import Transformer
    from recipes.memory_parallel import (
        apply_memory_parallel,
        build_memory_mesh,
        sum_table_grad_over_replicas,
    )

    config = replace(FLAVORS[flavor], vocab_size=VOCAB)
    torch.manual_seed(0)
    reference = Transformer(config).double()
    sharded = Transformer(config).double()
    sharded.load_state_dict(reference.state_dict())
    tokens = torch.randint(
        0, VOCAB, (world_size * BATCH_PER_RANK, SEQ_LEN), generator=torch.Generator().manual_seed(1)
    )

    reference_loss = reference(tokens).square().mean()
    reference_loss.backward()
    apply_memory_parallel(sharded, build_memory_mesh("cpu", degree), compute_dtype=torch.float64)
    mine = tokens[rank * BATCH_PER_RANK : (rank + 1) * BATCH_PER_RANK]
    logits = sharded(mine)
    # The global mean, as the trainer normalises by the global token count.
    loss = logits.square().sum() / (tokens.numel() * VOCAB)
    loss.backward()
    dist.all_reduce(loss := loss.detach())
    for p in sharded.parameters():  # what FSDP would do for the dense parameters
        if p is not sharded.memory_values:
            dist.all_reduce(p.grad)
    sum_table_grad_over_replicas(sharded)  # what the trainer does once per step

    values = sharded.memory_values
    column = values.device_mesh.get_local_rank("memory")
    width = config.table_shape[1] // degree
    columns = slice(column * width, (column + 1) * width)
    expected_logits = reference(mine)
    return {
        "local_shape": tuple(values.to_local().shape),
        "loss_error": abs(loss.item() - reference_loss.item()),
        "logits_error": (logits - expected_logits).abs().max().item(),
        "values_grad_error": (values.grad.to_local() - reference.memory_values.grad[:, columns])
        .abs()
        .max()
        .item(),
        "dense_grad_error": max(
            (p.grad - q.grad).abs().max().item()
            for (n, p), q in zip(sharded.named_parameters(), reference.parameters())
            if n != "memory_values"
        ),
    }


@pytest.mark.parametrize(
    "flavor, world_size, degree",
    [("mem_debug", 2, 2), ("mem_debug", 4, 2), ("engram_debug", 2, 2), ("peer_debug", 2, 2)],
)
def test_sharded_table_matches_single_process(flavor, world_size, degree):
    """(2, 2): one group; (4, 2): two replicas of the table, whose gradients are summed (by
    sum_table_grad_over_replicas, as the trainer does after the last micro-batch). Engram reads
    its hashed rows through the same lookup style; PEER's down dots ``u_i · x`` are partial
    sums over each rank's columns, summed over the group before its GELU."""
    results = on_gloo_ranks(world_size, _check, flavor, world_size, degree, timeout_s=240)
    from memcompile.flavors import FLAVORS

    rows, width = FLAVORS[flavor].table_shape
    for result in results.values():
        assert result["local_shape"] == (rows, width // degree)
        assert result["loss_error"] < 1e-12
        assert result["logits_error"] < 1e-12
        assert result["values_grad_error"] < 1e-15
        assert result["dense_grad_error"] < 1e-15
