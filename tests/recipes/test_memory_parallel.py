"""Column-sharded memory values on real gloo process groups.

One spawn per world size runs every check (process start-up dominates): each rank builds the same
model, shards the table, runs forward/backward on its own tokens, and compares with the
single-process model on the concatenation of all ranks' tokens.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("torchtitan", reason="the recipes need the 'recipes' extra")

VOCAB, SEQ_LEN, BATCH_PER_RANK = 97, 11, 2  # odd sizes on purpose


def _worker(rank: int, world_size: int, degree: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        queue.put((rank, _check(rank, world_size, degree)))
    except Exception as error:  # report instead of hanging the other ranks' queue reads
        queue.put((rank, repr(error)))
    finally:
        dist.destroy_process_group()


def _check(rank: int, world_size: int, degree: int) -> dict:
    import ops  # noqa: F401
    from memcompile.flavors import FLAVORS
    from memcompile.model import Transformer
    from recipes.memory_parallel import (
        apply_memory_parallel,
        build_memory_mesh,
        sum_table_grad_over_replicas,
    )

    config = replace(FLAVORS["mem_debug"], vocab_size=VOCAB)
    torch.manual_seed(0)
    reference = Transformer(config).double()
    sharded = Transformer(config).double()
    sharded.load_state_dict(reference.state_dict())
    tokens = torch.randint(
        0, VOCAB, (world_size * BATCH_PER_RANK, SEQ_LEN), generator=torch.Generator().manual_seed(1)
    )

    reference(tokens).square().mean().backward()
    apply_memory_parallel(sharded, build_memory_mesh("cpu", degree), compute_dtype=torch.float64)
    mine = tokens[rank * BATCH_PER_RANK : (rank + 1) * BATCH_PER_RANK]
    logits = sharded(mine)
    # The global mean, as the trainer normalises by the global token count.
    (logits.square().sum() / (tokens.numel() * VOCAB)).backward()
    for p in sharded.parameters():  # what FSDP would do for the dense parameters
        if p is not sharded.memory_values:
            dist.all_reduce(p.grad)
    sum_table_grad_over_replicas(sharded)  # what the trainer does once per step

    values = sharded.memory_values
    column = values.device_mesh.get_local_rank("memory")
    width = config.memory.value_dim // degree
    columns = slice(column * width, (column + 1) * width)
    expected_logits = reference(mine)
    return {
        "local_shape": tuple(values.to_local().shape),
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


def _spawn(world_size: int, degree: int) -> dict[int, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=_worker, args=(r, world_size, degree, port, queue))
        for r in range(world_size)
    ]
    for p in processes:
        p.start()
    results = dict(queue.get(timeout=240) for _ in processes)
    for p in processes:
        p.join(timeout=60)
    return results


@pytest.mark.parametrize("world_size, degree", [(2, 2), (4, 2)])
def test_sharded_table_matches_single_process(world_size, degree):
    """(2, 2): one group; (4, 2): two replicas of the table, whose gradients are summed (by
    sum_table_grad_over_replicas, as the trainer does after the last micro-batch)."""
    results = _spawn(world_size, degree)
    from memcompile.flavors import FLAVORS

    memory = FLAVORS["mem_debug"].memory
    for rank, result in results.items():
        assert isinstance(result, dict), f"rank {rank}: {result}"
        assert result["local_shape"] == (memory.num_values, memory.value_dim // degree)
        assert result["logits_error"] < 1e-12
        assert result["values_grad_error"] < 1e-15
        assert result["dense_grad_error"] < 1e-15
