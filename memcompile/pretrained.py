"""Hugging Face-style model folders: ``save_pretrained`` and ``from_pretrained``.

A folder holds the weights as safetensors (``model.safetensors``, or shards
``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json`` past
``max_shard_bytes``; the shared value table is one tensor, stored once), ``config.json`` with
the whole ``TransformerConfig`` under ``"memcompile"``, and ``modeling_memcompile.py``, through
which ``transformers`` loads it (``memcompile/hf.py``)::

    save_pretrained(model, "my-model")            # or: python -m recipes.export ...
    model = from_pretrained("my-model")           # the same weights, bitwise
    AutoModelForCausalLM.from_pretrained("my-model", trust_remote_code=True)

Weights are stored under ``model.<name>`` (the HF model's ``model`` is the ``Transformer``).
Only ``torch`` and ``safetensors`` are needed here: no ``transformers``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from memcompile.config import MemoryConfig, TransformerConfig
from memcompile.model import Transformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
#: The key of ``config.json`` holding the architecture.
CONFIG_KEY = "memcompile"
#: The prefix of every weight's name in the folder: ``MemcompileForCausalLM.model``.
PREFIX = "model."
REMOTE_CODE_NAME = "modeling_memcompile.py"
_REMOTE_CODE = '''"""transformers' entry to this folder (trust_remote_code=True): memcompile's own
classes, from the installed package (pip install memcompile). See memcompile/hf.py."""

from memcompile.hf import MemcompileConfig, MemcompileForCausalLM  # noqa: F401
'''


def config_to_dict(config: TransformerConfig) -> dict[str, Any]:
    """``config`` as JSON-serialisable values (:func:`config_from_dict` inverts it)."""
    values = asdict(config)
    if config.memory is not None:
        values["memory"]["kind"] = config.memory.kind.value
        values["memory"]["layers"] = list(config.memory.layers)
    return values


def config_from_dict(values: dict[str, Any]) -> TransformerConfig:
    memory = values.get("memory")
    return TransformerConfig(
        **{**values, "memory": None if memory is None else MemoryConfig(**memory)}
    )


def save_pretrained(
    model: Transformer,
    directory: str | Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    config_extra: dict[str, Any] | None = None,
) -> None:
    """Write ``model``'s weights and config into ``directory`` (created; files it holds are
    overwritten). ``config_extra`` entries are added to ``config.json`` (e.g. the flavor)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {PREFIX + name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS_NAME, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    module = REMOTE_CODE_NAME.removesuffix(".py")
    config = {
        "model_type": "memcompile",
        "architectures": ["MemcompileForCausalLM"],
        "auto_map": {
            "AutoConfig": f"{module}.MemcompileConfig",
            "AutoModelForCausalLM": f"{module}.MemcompileForCausalLM",
        },
        CONFIG_KEY: config_to_dict(model.config),
        "torch_dtype": dtype,
        **(config_extra or {}),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    (directory / REMOTE_CODE_NAME).write_text(_REMOTE_CODE)


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive tensors grouped into shards of at most ``max_bytes`` (a larger tensor gets a
    shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def load_config(directory: str | Path) -> TransformerConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} (not a save_pretrained folder)")
    values = json.loads(path.read_text())
    if CONFIG_KEY not in values:
        raise ValueError(f"{path}: no {CONFIG_KEY!r} entry (not a memcompile model folder)")
    return config_from_dict(values[CONFIG_KEY])


def from_pretrained(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """The model saved in ``directory`` by :func:`save_pretrained`, in eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = load_config(directory)
    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [WEIGHTS_NAME]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: missing weights file {name}")
        stored = load_file(directory / name, device=str(device))
        state.update({key.removeprefix(PREFIX): tensor for key, tensor in stored.items()})
    with torch.device("meta"):
        model = Transformer(config)
    # Buffers (RoPE tables) are not saved: the load's post hook computes them for the config.
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
