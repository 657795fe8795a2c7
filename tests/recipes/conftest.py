"""Fixtures shared by the recipes tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _create_seed_checkpoint(dump: Path, model: str) -> Path:
    """Step 0 of ``model``, as ``recipes.pretrain --checkpoint.create_seed_checkpoint`` saves it."""
    args = [
        "--model",
        model,
        "--dump_folder",
        str(dump),
        "--dataloader.cache_dir",
        str(dump / "cache"),
        "--dataloader.knowledge.num_people",
        "8",
        "--training.seq_len",
        "32",
        "--training.local_batch_size",
        "2",
        "--metrics.no-enable-tensorboard",
        "--checkpoint.create_seed_checkpoint",
        "--debug.seed",
        "0",
    ]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "recipes.pretrain", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dump / "checkpoint" / "step-0"


@pytest.fixture(scope="session")
def seed_checkpoint(tmp_path_factory) -> Path:
    """A real ``recipes.pretrain`` checkpoint (step 0 of a memory model)."""
    return _create_seed_checkpoint(tmp_path_factory.mktemp("pretrain"), "mem_debug")


@pytest.fixture(scope="session", params=["engram_debug", "peer_debug"])
def family_seed_checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    """``(flavor, checkpoint)``: step 0 of an Engram and of a PEER model (one each per session)."""
    model = request.param
    return model, _create_seed_checkpoint(tmp_path_factory.mktemp(model), model)


@pytest.fixture
def in_process_run():
    """For a test that trains with a recipe's ``main`` in its own process: ``main`` sets the
    single-process rendezvous variables (``RANK``, ``MASTER_PORT``, ...), which go after it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
