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
A quantized table (:func:`memcompile.memory.quantize_table`, ``recipes.export
--quantize-table int8``) is stored as ``model.memory_values.rows`` (int8 or fp8 e4m3) and
``model.memory_values.scale`` (one per row), and ``config.json``'s ``"quantized_table"`` records
their dtypes; loading rebuilds the table as a ``QuantizedTable`` (never dequantized).
A folder is written whole or not at all (:func:`staged_folder`: staged next to it, then swapped
in), so a save over an older one keeps none of its files; only a model folder (or an empty
one) is ever replaced. Loading checks what it reads: a damaged file gives an error naming it.
Only ``torch`` and ``safetensors`` are needed here: no ``transformers``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import mmap as mmap_module
import secrets
import shutil
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from memcompile.config import EngramConfig, MemoryConfig, PEERConfig, TransformerConfig
from memcompile.memory import QuantizedTable, use_quantized_table
from memcompile.model import Transformer
from ops.lookup_quantized import QUANTIZED_DTYPES

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
#: The key of ``config.json`` holding the architecture.
CONFIG_KEY = "memcompile"
#: The prefix of every weight's name in the folder: ``MemcompileForCausalLM.model``.
PREFIX = "model."
REMOTE_CODE_NAME = "modeling_memcompile.py"
#: The key of ``config.json`` describing a quantized value table (absent for a full-precision
#: one): ``{"dtype": "int8" | "fp8", "scale_dtype": "float32" | "bfloat16" | "float16"}``.
TABLE_KEY = "quantized_table"
_SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REMOTE_CODE = '''"""transformers' entry to this folder (trust_remote_code=True): memcompile's own
classes, from the installed package (pip install memcompile). See memcompile/hf.py."""

from memcompile.hf import MemcompileConfig, MemcompileForCausalLM  # noqa: F401
'''


def config_to_dict(config: TransformerConfig) -> dict[str, Any]:
    """``config`` as JSON-serialisable values (:func:`config_from_dict` inverts it)."""
    values = asdict(config)
    if config.memory is not None:
        values["memory"]["kind"] = config.memory.kind.value
    for family in ("memory", "engram", "peer"):
        if values[family] is not None:
            values[family]["layers"] = list(values[family]["layers"])
    return values


def config_from_dict(values: Any) -> TransformerConfig:
    """The config :func:`config_to_dict` wrote. Every field must be there, with a value of its
    type: a ``ValueError`` names the field otherwise (a default would silently change the
    model)."""
    values = _checked_fields(TransformerConfig, values, prefix="")
    families = {"memory": MemoryConfig, "engram": EngramConfig, "peer": PEERConfig}
    for name, cls in families.items():
        if values[name] is not None:
            values = {**values, name: cls(**_checked_fields(cls, values[name], prefix=f"{name}."))}
    return TransformerConfig(**values)


def _checked_fields(cls: type, values: Any, *, prefix: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        where = prefix.rstrip(".") or "the config"
        raise ValueError(f"{where} is {values!r}, expected an object of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [prefix + name for name in values if name not in hints]
    missing = [prefix + name for name in names if name not in values]
    if unknown or missing:
        raise ValueError(f"{cls.__name__} fields: unknown {unknown}, missing {missing}")
    for name in names:
        hint = hints[name]
        if not _is_json_of(values[name], hint):
            expected = hint.__name__ if isinstance(hint, type) else hint
            raise ValueError(f"{prefix}{name} is {values[name]!r}, expected {expected}")
    return values


def _is_json_of(value: Any, hint: Any) -> bool:
    """Whether the JSON ``value`` holds a value of the annotation ``hint``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_json_of(value, option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, list) and all(_is_json_of(v, item) for v in value)
    if hint is type(None):
        return value is None
    if isinstance(value, bool):  # JSON's true is no number
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    if isinstance(hint, type) and issubclass(hint, Enum):
        return value in {member.value for member in hint}
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    return isinstance(value, hint)


# --------------------------------------------------------------------------- writing


def save_pretrained(
    model: Transformer,
    directory: str | Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    config_extra: dict[str, Any] | None = None,
    add_files: Callable[[Path], None] | None = None,
) -> None:
    """Write ``model``'s weights and config as the folder ``directory``, whole or not at all.

    Like Hugging Face's ``save_pretrained``, a save replaces an existing model folder (or an
    empty folder) without asking; it refuses (``FileExistsError``, nothing touched) anything
    else, such as a file or a folder that was not written by a save: see
    :func:`staged_folder`. ``config_extra`` entries are added to ``config.json`` (e.g. the
    flavor); ``add_files(folder)`` may write more files (a tokenizer, a model card) into the
    folder before it takes ``directory``'s place.
    """
    with staged_folder(directory) as staging:
        _write_model(model, staging, max_shard_bytes, config_extra or {})
        if add_files is not None:
            add_files(staging)


def _write_model(
    model: Transformer, directory: Path, max_shard_bytes: int, config_extra: dict[str, Any]
) -> None:
    from safetensors.torch import save_file

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
        **config_extra,
    }
    if isinstance(model.memory_values, QuantizedTable):
        scale_dtype = str(model.memory_values.scale.dtype).removeprefix("torch.")
        config[TABLE_KEY] = {"dtype": model.memory_values.table_dtype, "scale_dtype": scale_dtype}
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


def is_model_folder(directory: str | Path) -> bool:
    """Whether ``directory`` holds a ``config.json`` with the ``"memcompile"`` entry (a folder
    written by :func:`save_pretrained` or ``recipes.export``)."""
    try:
        values = json.loads((Path(directory) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and CONFIG_KEY in values


def check_replaceable(directory: str | Path) -> None:
    """Raise ``FileExistsError`` unless a save may take ``directory``'s place: it is absent, an
    empty folder or a model folder (:func:`is_model_folder`). A folder that is not ours is
    never deleted."""
    directory = Path(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise FileExistsError(f"{str(directory)!r} is a file, not a model folder: not replaced")
    if any(directory.iterdir()) and not is_model_folder(directory):
        raise FileExistsError(
            f"{str(directory)!r} is a folder with no {CONFIG_NAME} holding a {CONFIG_KEY!r} "
            f"entry (not a model folder): not replaced; pass a new or empty folder"
        )


@contextmanager
def staged_folder(directory: str | Path) -> Iterator[Path]:
    """An empty folder next to ``directory`` to write into; when the block ends without error
    it becomes ``directory`` (an old ``directory`` is removed only once the new one is in
    place), otherwise it is removed. So ``directory`` never mixes the files of two saves.

    An existing ``directory`` must pass :func:`check_replaceable` (checked first, before
    anything is written); a symbolic link to a folder is followed (the folder is replaced).
    """
    check_replaceable(directory)
    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0o700 mode would become the folder's.
    staging = target.with_name(f".{target.name}-{secrets.token_hex(4)}")
    staging.mkdir()
    old = staging.with_name(f"{staging.name}-old")
    try:
        yield staging
        if target.exists():
            target.rename(old)
        staging.rename(target)
    except BaseException:
        if old.exists() and not target.exists():
            old.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- reading


def load_config(directory: str | Path) -> TransformerConfig:
    """The ``TransformerConfig`` of a model folder; a ``ValueError`` naming ``config.json`` and
    what is wrong if it is damaged."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} (not a save_pretrained folder)")
    values = _read_json(path)
    if not isinstance(values, dict) or CONFIG_KEY not in values:
        raise ValueError(f"{path}: no {CONFIG_KEY!r} entry (not a memcompile model folder)")
    try:
        return config_from_dict(values[CONFIG_KEY])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: bad {CONFIG_KEY!r} entry: {error}") from None


def from_pretrained(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    mmap: bool = False,
) -> Transformer:
    """The model saved in ``directory`` by :func:`save_pretrained`, in eval mode. A damaged
    folder (bad JSON, a missing or truncated weights file, a missing, extra or misshapen tensor)
    gives an error naming the file.

    By default the weights are read into memory. ``mmap=True`` leaves them in the folder's
    files, mapped into memory (CPU only, in the stored dtype: a move or a cast would copy
    them): loading reads nothing, and a table row comes from disk the first time a lookup
    reads it, then stays in the OS page cache, which may drop it again under memory pressure.
    For tables larger than RAM, or one table shared by several processes. The table's mapping
    is marked random-access, so a read brings in its page, not the rows around it. Changing a
    mapped weight (training) copies its page and never writes the file.
    """
    directory = Path(directory)
    if mmap and (torch.device(device).type != "cpu" or dtype is not None):
        raise ValueError(
            f"from_pretrained(mmap=True) maps the stored weights as they are: it needs "
            f"device='cpu' and no dtype, got device={str(device)!r}, dtype={dtype}"
        )
    config = load_config(directory)
    with torch.device("meta"):
        model = Transformer(config)
        config_path = directory / CONFIG_NAME
        table = empty_quantized_table(_read_json(config_path).get(TABLE_KEY), config, config_path)
    if table is not None:
        use_quantized_table(model, table)
    state = _read_weights(directory, device, model.state_dict())
    if mmap:
        if model.memory_values is not None:
            _advise_random_access(state["memory_values.rows" if table else "memory_values"])
    elif torch.device(device).type == "cpu":
        # safetensors maps the file; a copy makes the model independent of it.
        state = {name: tensor.clone() for name, tensor in state.items()}
    # Buffers (RoPE tables) are not saved: the load's post hook computes them for the config.
    # assign=True keeps the loaded tensors themselves (no copy into fresh parameters).
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def empty_quantized_table(
    entry: Any, config: TransformerConfig, where: str | Path
) -> QuantizedTable | None:
    """An empty :class:`QuantizedTable` (on the current default device) for ``config.json``'s
    ``quantized_table`` ``entry``, or ``None`` when there is none (a full-precision table); a
    ``ValueError`` naming ``where`` (the ``config.json``) if the entry is malformed."""
    if entry is None:
        return None
    names = " or ".join(QUANTIZED_DTYPES), " or ".join(_SCALE_DTYPES)
    if (
        not isinstance(entry, dict)
        or entry.get("dtype") not in QUANTIZED_DTYPES
        or entry.get("scale_dtype") not in _SCALE_DTYPES
        or config.memory is None
    ):
        raise ValueError(
            f"{where}: bad {TABLE_KEY!r} entry {entry!r}: expected "
            f'{{"dtype": {names[0]}, "scale_dtype": {names[1]}}} for a model with memory layers'
        )
    scale_dtype = _SCALE_DTYPES[entry["scale_dtype"]]
    memory = config.memory
    return QuantizedTable.empty(memory.num_values, memory.value_dim, entry["dtype"], scale_dtype)


def _advise_random_access(tensor: torch.Tensor) -> None:
    """``madvise(MADV_RANDOM)`` on the pages of a file-mapped ``tensor``: without it a page
    fault reads ahead and maps the pages around it, and a few decode steps' scattered row
    reads bring most of a table into memory. Best effort: a no-op where it is unsupported."""
    advice = getattr(mmap_module, "MADV_RANDOM", None)
    if advice is None or tensor.numel() == 0:
        return
    page = mmap_module.PAGESIZE
    start = tensor.data_ptr() // page * page
    length = tensor.data_ptr() + tensor.nbytes - start
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as error:  # also a UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _read_weights(
    directory: Path, device: str | torch.device, expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The folder's tensors under the model's names, each checked against ``expected`` (the
    model's state on the meta device): the same names, the same shapes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = _read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) for f in weight_map.values()
        ):
            raise ValueError(f"{index}: no 'weight_map' object (tensor name -> shard file)")
        files = sorted(set(weight_map.values()))
    else:
        weight_map = {}
        files = [WEIGHTS_NAME]
    state: dict[str, torch.Tensor] = {}
    source: dict[str, Path] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            if weight_map:
                raise FileNotFoundError(f"{index} lists {name}, which is not in the folder")
            raise FileNotFoundError(f"{directory}: missing weights file {name}")
        try:
            stored = load_file(path, device=str(device))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
        state.update(stored)
        source.update(dict.fromkeys(stored, path))
    expected = {PREFIX + name: tensor for name, tensor in expected.items()}
    unexpected = sorted(state.keys() - expected.keys())
    if unexpected:
        raise ValueError(f"{source[unexpected[0]]} holds {unexpected}, which the model has not")
    for key, meta in expected.items():
        if key not in state:
            # the shard the index puts it in, or the file that should list it
            where = directory / weight_map.get(key, WEIGHTS_INDEX_NAME if weight_map else files[0])
            raise ValueError(f"{where} lacks the tensor {key}")
        if state[key].shape != meta.shape:
            raise ValueError(
                f"{source[key]}: {key} has shape {tuple(state[key].shape)}, but "
                f"{directory / CONFIG_NAME} makes it {tuple(meta.shape)}"
            )
        # A quantized table's rows and scales are read as the dtypes config.json records.
        if key.startswith(PREFIX + "memory_values.") and state[key].dtype != meta.dtype:
            raise ValueError(
                f"{source[key]}: {key} is {state[key].dtype}, but {directory / CONFIG_NAME}'s "
                f"{TABLE_KEY!r} makes it {meta.dtype}"
            )
    return {key.removeprefix(PREFIX): tensor for key, tensor in state.items()}
