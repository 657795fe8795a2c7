"""Run a function on every rank of a real gloo process group, in spawned processes.

``on_gloo_ranks(world_size, fn, *args)`` starts ``world_size`` processes, each with the usual
``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` / ``MASTER_*`` variables (torchtitan reads them) and
the default process group up, calls ``fn(*args)`` in each and returns ``{rank: result}``. A rank
that raises reports its error (a failing test then names it) instead of leaving the others
waiting. ``fn`` must be importable (a module-level function) and its result picklable.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def on_gloo_ranks(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 300
) -> dict[int, Any]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=_worker, args=(rank, world_size, port, fn, args, queue))
        for rank in range(world_size)
    ]
    for worker in workers:
        worker.start()
    results = dict(queue.get(timeout=timeout_s) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    for rank, result in results.items():
        assert not isinstance(result, _Failure), f"rank {rank}: {result.error}"
    return results


class _Failure:
    def __init__(self, error: str) -> None:
        self.error = error


def _worker(rank: int, world_size: int, port: int, fn, args: tuple, queue) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        queue.put((rank, fn(*args)))
    except Exception as error:  # report instead of hanging the other ranks' queue reads
        queue.put((rank, _Failure(repr(error))))
    finally:
        dist.destroy_process_group()
