"""Each shim of ``recipes/shims.py`` is still needed, and does what it says.

The reasons are checked against unpatched torch and torchtitan in a fresh interpreter: when an
upgrade fixes one upstream, its test here fails, and the shim should go.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchtitan", reason="the recipes need the 'recipes' extra")

REPO = Path(__file__).resolve().parents[2]

# Runs without any shim applied; prints one JSON object: reason -> what was observed.
_OBSERVE_UPSTREAM = """
import inspect, json, os, socket
import torch, torch.distributed as dist

def raises(function):
    try:
        function()
    except Exception as error:
        return type(error).__name__
    return None

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
dist.init_process_group("gloo", rank=0, world_size=1)

import torchtitan.components.metrics as metrics
import torchtitan.distributed.utils as dist_utils
import torchtitan.tools.utils as titan_utils
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torchtitan.trainer import Trainer

def on_mesh(mesh, placements):
    parameter = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, placements))
    parameter.grad = distribute_tensor(torch.ones(4, 4), mesh, placements)
    return parameter

fsdp_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",))
memory_mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replica", "memory"))
two_meshes = [on_mesh(fsdp_mesh, [Shard(0)]), on_mesh(memory_mesh, [Replicate(), Shard(1)])]
set_pg_timeouts = inspect.getsource(dist_utils.set_pg_timeouts)

import logging
from torchtitan.components.checkpoint import CheckpointManager

class Collect(logging.Handler):
    messages = []
    def emit(self, record):
        self.messages.append(record.getMessage())

logging.getLogger().addHandler(Collect())
CheckpointManager.Config()  # torchtitan's own defaults
titan_utils.get_peak_flops("cpu")
def logged(prefix):
    return any(message.startswith(prefix) for message in Collect.messages)

print(json.dumps({
    "own_default_warning": logged("initial_load_model_only=True has no effect"),
    "cpu_peak_flops_warning": logged("Peak flops undefined for: cpu"),
    "device_type": titan_utils.device_type,
    "memory_monitor": raises(metrics.build_device_memory_monitor),
    "barrier_device_ids": "barrier(device_ids=" in set_pg_timeouts and raises(
        lambda: dist.barrier(device_ids=[torch.cpu.current_device()])),
    "set_timeout": "set_timeout(" in set_pg_timeouts and not hasattr(dist, "set_timeout"),
    "premul_sum": raises(
        lambda: dist.all_reduce(torch.ones(2), op=dist._make_nccl_premul_sum(0.5))
    ),
    "one_clip_for_all": "dist_utils.clip_grad_norm_(" in inspect.getsource(Trainer.train_step),
    "clip_across_meshes": raises(lambda: dist_utils.clip_grad_norm_(two_meshes, 1.0)),
}))
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def upstream() -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _OBSERVE_UPSTREAM], cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shims apply without CUDA only")
def test_cpu_shims_are_still_needed(upstream):
    assert upstream["device_type"] == "cuda", "_use_cpu_device: torchtitan now finds the CPU"
    assert upstream["memory_monitor"], "_use_cpu_memory_monitor: the CUDA monitor now runs on CPU"
    assert upstream["barrier_device_ids"], "_barrier_without_device_ids: gloo barrier now works"


def test_set_timeout_polyfill_is_still_needed(upstream):
    assert upstream["set_timeout"], "_polyfill_set_timeout: torch.distributed.set_timeout exists"


def test_gloo_still_rejects_premul_sum(upstream):
    assert upstream["premul_sum"], "allow_fsdp_on_gloo: gloo now supports PREMUL_SUM"


def test_log_noise_is_still_emitted_upstream(upstream):
    assert upstream["own_default_warning"], "torchtitan no longer warns about its own default"
    assert upstream["cpu_peak_flops_warning"], "torchtitan no longer warns about a CPU's FLOPS"


def test_quiet_log_drops_listed_messages_and_repeats_of_a_warning():
    from recipes.shims import _DropMessages

    drop = _DropMessages(("Peak flops",), contains=("Enum subclass",))
    logger = logging.getLogger("test_quiet_log")

    def kept(level: int, message: str) -> bool:
        return drop.filter(logger.makeRecord(logger.name, level, __file__, 0, message, (), None))

    assert not kept(logging.WARNING, "Peak flops undefined for: cpu")
    assert not kept(logging.WARNING, "<enum 'X'> is an Enum subclass and is now ...")
    assert kept(logging.WARNING, "Ran out of data") and not kept(logging.WARNING, "Ran out of data")
    assert kept(logging.INFO, "step 1") and kept(logging.INFO, "step 1")  # info is never deduped


def test_a_resumed_lr_scheduler_still_warns_upstream():
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer

    from recipes.shims import _TITAN_LR_SCHEDULER_LOAD

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=1.0)
    schedulers = LRSchedulersContainer([optimizer], lambda step: 1.0)
    with pytest.warns(UserWarning, match=_TITAN_LR_SCHEDULER_LOAD):
        schedulers.load_state_dict({"last_epoch": 3})  # what a resume does


def test_per_group_clipping_is_still_needed(upstream):
    assert upstream["one_clip_for_all"], "Trainer.train_step no longer clips through dist_utils"
    assert upstream["clip_across_meshes"], "clip_grad_norm_ now handles several meshes"


def test_the_table_is_clipped_on_its_own():
    from recipes.trainer import clip_table_apart

    dense, table = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    dense.grad, table.grad = torch.full((3,), 4.0), torch.full((4,), 3.0)
    total = clip_table_apart([dense], 1.0, table=table, table_max_norm=0.5, foreach=True)
    # Gradient norms before clipping: dense 4 * sqrt(3), table 3 * 2 = 6.
    assert total.item() == pytest.approx((48 + 36) ** 0.5)
    assert dense.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert table.grad.norm().item() == pytest.approx(0.5, rel=1e-5)


def test_the_train_steps_clipping_is_replaced_only_inside_the_block():
    import torchtitan.distributed.utils as dist_utils

    from recipes import shims

    titan = dist_utils.clip_grad_norm_

    def mine(parameters, max_norm, **kwargs):
        return torch.tensor(7.0)

    with shims.gradients_clipped_by(mine):
        assert dist_utils.clip_grad_norm_ is mine
    assert dist_utils.clip_grad_norm_ is titan
    with pytest.raises(RuntimeError), shims.gradients_clipped_by(mine):
        raise RuntimeError("a failed step")
    assert dist_utils.clip_grad_norm_ is titan
