"""save_pretrained / from_pretrained: safetensors folders that give back the same model."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")

import memcompile  # noqa: E402
from memcompile.flavors import get_flavor  # noqa: E402
from memcompile.model import Transformer  # noqa: E402
from memcompile.pretrained import config_from_dict, config_to_dict, save_pretrained  # noqa: E402


@pytest.mark.parametrize(
    "flavor", ["mem_debug", "memplain_debug", "dense_debug", "engram_debug", "peer_debug"]
)
def test_a_saved_model_loads_back_bitwise(tmp_path: Path, flavor: str):
    torch.manual_seed(0)
    model = Transformer(get_flavor(flavor)).eval()
    save_pretrained(model, tmp_path, config_extra={"flavor": flavor})
    loaded = memcompile.from_pretrained(tmp_path)
    assert loaded.config == model.config
    tokens = torch.randint(0, model.config.vocab_size, (2, 17))
    assert torch.equal(loaded(tokens), model(tokens))
    assert json.loads((tmp_path / "config.json").read_text())["flavor"] == flavor


def test_large_models_are_sharded_and_the_table_is_stored_once(tmp_path: Path):
    torch.manual_seed(0)
    model = Transformer(get_flavor("mem_debug")).eval()
    table_bytes = model.memory_values.numel() * 4
    save_pretrained(model, tmp_path, max_shard_bytes=table_bytes)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / f).is_file() for f in files)
    assert list(index["weight_map"]).count("model.memory_values") == 1
    sizes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert index["metadata"]["total_size"] == sizes
    loaded = memcompile.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("flavor", ["mem_1b_4m", "engram_1b", "peer_1b"])
def test_config_round_trips_through_json(flavor: str):
    config = get_flavor(flavor)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def test_engram_hash_multipliers_are_not_saved_and_the_token_map_is(tmp_path: Path):
    """The multipliers are derived from the config (rebuilt at load); the tokenizer
    compression is data (a buffer in the weights file)."""
    torch.manual_seed(0)
    model = Transformer(get_flavor("engram_debug")).eval()
    with torch.no_grad():  # a compression that differs from the default identity map
        model.hasher.token_map.copy_(torch.arange(256) // 2)
    save_pretrained(model, tmp_path)
    loaded = memcompile.from_pretrained(tmp_path)
    saved = set(loaded.state_dict())
    assert "hasher.token_map" in saved and "hasher.multipliers" not in saved
    assert torch.equal(loaded.hasher.token_map, model.hasher.token_map)
    assert torch.equal(loaded.hasher.multipliers, model.hasher.multipliers)
    tokens = torch.randint(0, 256, (2, 9))
    assert torch.equal(loaded(tokens), model(tokens))


def test_a_folder_without_a_memcompile_config_is_refused(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        memcompile.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a memcompile model folder"):
        memcompile.from_pretrained(tmp_path)


def _model(flavor: str, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(get_flavor(flavor)).eval()


def test_a_resave_over_a_sharded_folder_leaves_nothing_of_the_old_save(tmp_path: Path):
    folder = tmp_path / "model"
    save_pretrained(_model("mem_debug", seed=0), folder, max_shard_bytes=4000)
    assert (folder / "model.safetensors.index.json").is_file()
    new = _model("mem_debug", seed=1)
    save_pretrained(new, folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "model.safetensors",
        "modeling_memcompile.py",
    ]
    loaded = memcompile.from_pretrained(folder)
    for name, tensor in new.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left


def test_a_failed_save_leaves_the_previous_folder(tmp_path: Path):
    old = _model("dense_debug", seed=0)
    save_pretrained(old, tmp_path / "model", max_shard_bytes=300_000)

    def fail(folder: Path) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(_model("dense_debug", seed=1), tmp_path / "model", add_files=fail)
    loaded = memcompile.from_pretrained(tmp_path / "model")
    assert torch.equal(loaded.output.weight, old.output.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def _a_file(path: Path) -> None:
    path.write_text("my notes")


def _a_user_folder(path: Path) -> None:
    path.mkdir()
    (path / "notes.txt").write_text("my notes")


def _a_dcp_checkpoint(path: Path) -> None:
    path.mkdir()
    (path / ".metadata").write_bytes(b"\x80")
    (path / "__0_0.distcp").write_bytes(b"weights")


@pytest.mark.parametrize(
    "make, message",
    [(_a_file, "is a file"), (_a_user_folder, "not a model folder"), (_a_dcp_checkpoint, "not a")],
)
def test_a_save_never_replaces_what_is_not_a_model_folder(tmp_path: Path, make, message: str):
    target = tmp_path / "target"
    make(target)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=message):
        save_pretrained(_model("dense_debug", seed=0), target)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A dense model saved in 4 shards."""
    folder = tmp_path_factory.mktemp("sharded") / "model"
    save_pretrained(_model("dense_debug", seed=0), folder, max_shard_bytes=300_000)
    return folder


def _edit_config(folder: Path, edit) -> str:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return "config.json"


def _drop(values: dict, key: str) -> None:
    del values[key]


def _first_shard(folder: Path) -> Path:
    return folder / "model-00001-of-00004.safetensors"


def _rewrite_first_shard(folder: Path, edit) -> str:
    from safetensors.torch import load_file, save_file

    tensors = load_file(_first_shard(folder))
    edit(tensors)
    save_file(tensors, _first_shard(folder))
    return _first_shard(folder).name


def _truncate(path: Path) -> str:
    path.write_bytes(path.read_bytes()[:1000])
    return path.name


def _write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(text)
    return name


def _remove_first_shard(folder: Path) -> str:
    _first_shard(folder).unlink()
    return "model.safetensors.index.json"


DAMAGES = {
    "config not JSON": (
        lambda f: _write(f, "config.json", "{not json"),
        "is not valid JSON",
    ),
    "config entry null": (
        lambda f: _edit_config(f, lambda c: c.update(memcompile=None)),
        "the config is None, expected an object of TransformerConfig fields",
    ),
    "config entry a list": (
        lambda f: _edit_config(f, lambda c: c.update(memcompile=[64])),
        "the config is [64], expected an object",
    ),
    "unknown field": (
        lambda f: _edit_config(f, lambda c: c["memcompile"].update(heads=4)),
        "unknown ['heads']",
    ),
    "missing field": (
        lambda f: _edit_config(f, lambda c: _drop(c["memcompile"], "dim")),
        "missing ['dim']",
    ),
    "ill-typed field": (
        lambda f: _edit_config(f, lambda c: c["memcompile"].update(n_layers="2")),
        "n_layers is '2', expected int",
    ),
    "index not JSON": (
        lambda f: _write(f, "model.safetensors.index.json", '{"weight_map": '),
        "is not valid JSON",
    ),
    "index without weight_map": (
        lambda f: _write(f, "model.safetensors.index.json", "{}"),
        "no 'weight_map' object",
    ),
    "index naming a missing shard": (
        _remove_first_shard,
        "lists model-00001-of-00004.safetensors, which is not in the folder",
    ),
    "truncated shard": (
        lambda f: _truncate(_first_shard(f)),
        "not a readable safetensors file",
    ),
    "shard missing a tensor": (
        lambda f: _rewrite_first_shard(f, lambda t: t.pop("model.tok_embeddings.weight")),
        "lacks the tensor model.tok_embeddings.weight",
    ),
    "tensor of the wrong shape": (
        lambda f: _rewrite_first_shard(
            f, lambda t: t.update({"model.tok_embeddings.weight": torch.zeros(256, 32)})
        ),
        "model.tok_embeddings.weight has shape (256, 32), but",
    ),
    "unexpected tensor": (
        lambda f: _rewrite_first_shard(f, lambda t: t.update({"model.extra": torch.zeros(1)})),
        "holds ['model.extra'], which the model has not",
    ),
}


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_folder_gives_an_error_naming_the_file(
    sharded: Path, tmp_path: Path, damage: str, mmap: bool
):
    folder = tmp_path / "model"
    shutil.copytree(sharded, folder)
    do, message = DAMAGES[damage]
    damaged = do(folder)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        memcompile.from_pretrained(folder, mmap=mmap)
    assert str(folder / damaged) in str(error.value)
    assert message in str(error.value)


def test_a_truncated_single_weights_file_names_itself(tmp_path: Path):
    save_pretrained(_model("dense_debug", seed=0), tmp_path)
    _truncate(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"{tmp_path}/model.safetensors: not a readable"):
        memcompile.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- mmap=True


def _mapped_files(tensor: torch.Tensor) -> set[str]:
    """The files whose mappings (``/proc/self/maps``) hold ``tensor``'s first byte."""
    address = tensor.data_ptr()
    files = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)  # address range, mode, offset, device, inode[, path]
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        if start <= address < end and len(fields) == 6:
            files.add(fields[5].strip())
    return files


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 40_000], ids=["one file", "sharded"])
def test_mmap_keeps_the_table_in_the_file_and_generates_the_same(
    tmp_path: Path, max_shard_bytes: int
):
    from memcompile.generate import generate

    save_pretrained(_model("mem_debug", seed=0), tmp_path, max_shard_bytes=max_shard_bytes)
    mapped = memcompile.from_pretrained(tmp_path, mmap=True)
    read = memcompile.from_pretrained(tmp_path)
    table_files = _mapped_files(mapped.memory_values)
    assert len(table_files) == 1 and table_files.pop().startswith(str(tmp_path.resolve()))
    assert not any(f.endswith(".safetensors") for f in _mapped_files(read.memory_values))
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(generate(mapped, prompt, 12), generate(read, prompt, 12))


def test_mmap_refuses_a_move_or_a_cast(tmp_path: Path):
    save_pretrained(_model("mem_debug", seed=0), tmp_path)
    for kwargs in ({"device": "meta"}, {"dtype": torch.bfloat16}):
        with pytest.raises(ValueError, match="mmap=True.*needs device='cpu' and no dtype"):
            memcompile.from_pretrained(tmp_path, mmap=True, **kwargs)


_MEASURE_RSS = """
import gc, json, os, sys
import torch
from memcompile.generate import generate
from memcompile.pretrained import from_pretrained

def resident_mb():  # anonymous and file-backed pages of this process
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return sum(int(status[key].split()[0]) for key in ("RssAnon", "RssFile")) / 1024

folder = sys.argv[1]
prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
generate(from_pretrained(folder, mmap=True), prompt, 2)  # first-call allocations, code pages
results = {}
for mode in ("mmap", "read"):
    gc.collect()
    fd = os.open(os.path.join(folder, "model.safetensors"), os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # a cold page cache: rows on disk only
    os.close(fd)
    before = resident_mb()
    model = from_pretrained(folder, mmap=mode == "mmap")
    loaded = resident_mb()
    tokens = generate(model, prompt, 8)
    results[mode] = {"load_mb": loaded - before, "generate_mb": resident_mb() - before,
                     "tokens": tokens.tolist()}
    del model
print(json.dumps(results))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's RSS")
def test_a_mapped_table_stays_out_of_memory_until_its_rows_are_read(tmp_path: Path):
    """A table 50x the rest of the model: mapped, loading and decoding a few tokens keep the
    process's resident memory far below its size; read, it is all resident."""
    config = get_flavor("mem_debug")
    memory = dataclasses.replace(config.memory, num_values=512**2)
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(config, memory=memory)).eval()
    table_mb = model.memory_values.nbytes / 2**20
    assert table_mb > 50 * (sum(t.nbytes for t in model.state_dict().values()) / 2**20 - table_mb)
    save_pretrained(model, tmp_path)
    del model
    with (tmp_path / "model.safetensors").open("rb+") as file:
        os.fsync(file.fileno())  # dirty pages cannot be dropped from the page cache
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE_RSS, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    measured = json.loads(result.stdout.splitlines()[-1])
    mapped, read = measured["mmap"], measured["read"]
    assert mapped["load_mb"] < table_mb / 20, measured
    assert mapped["generate_mb"] < table_mb / 4, measured
    assert read["load_mb"] > 0.9 * table_mb, measured  # the measurement sees a resident table
    assert mapped["tokens"] == read["tokens"]


# --------------------------------------------------------------------------- quantized tables


def _quantized_model(dtype: str) -> tuple[Transformer, Transformer]:
    """(a mem_debug model, its copy whose table is quantized to ``dtype``)."""
    from memcompile.memory import quantize_table

    model = _model("mem_debug", 0)
    quantized = _model("mem_debug", 0)
    quantize_table(quantized, dtype)
    return model, quantized


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_a_quantized_table_is_read_quantized_close_to_the_full_one(dtype: str):
    from memcompile.memory import QuantizedTable

    model, quantized = _quantized_model(dtype)
    table = quantized.memory_values
    assert isinstance(table, QuantizedTable) and not list(quantized.parameters()).count(table)
    assert table.rows.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[dtype]
    # A quarter of the fp32 table's bytes, plus a 4-byte scale per row.
    assert table.rows.nbytes + table.scale.nbytes == model.memory_values.nbytes // 4 + 4 * 1024
    tokens = torch.randint(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        exact, read = model(tokens), quantized(tokens)
        # No graph break (Inductor itself compiles the op in tests/ops/test_lookup_quantized).
        compiled = torch.compile(quantized, fullgraph=True, backend="eager")(tokens)
    assert 0 < (read - exact).abs().max() < 0.05 * exact.abs().max()
    torch.testing.assert_close(compiled, read)
    # A cast of the model casts the scales (the dtype lookups return), never the rows.
    quantized.to(torch.bfloat16)
    assert table.rows.dtype != torch.bfloat16 and table.dtype == torch.bfloat16
    with torch.no_grad():
        assert quantized(tokens).dtype == torch.bfloat16


def test_training_a_quantized_table_is_refused():
    _, quantized = _quantized_model("int8")
    loss = quantized(torch.randint(0, 256, (2, 9))).sum()
    with pytest.raises(RuntimeError, match="train in full precision, quantize at export"):
        loss.backward()


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
@pytest.mark.parametrize("mmap", [False, True])
def test_a_saved_quantized_table_loads_back_quantized_bitwise(
    tmp_path: Path, dtype: str, mmap: bool
):
    from safetensors import safe_open

    from memcompile.memory import QuantizedTable

    _, quantized = _quantized_model(dtype)
    save_pretrained(quantized, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantized_table"] == {"dtype": dtype, "scale_dtype": "float32"}
    with safe_open(tmp_path / "model.safetensors", "pt") as stored:
        assert "model.memory_values" not in stored.keys()
        assert (
            stored.get_tensor("model.memory_values.rows").dtype
            == quantized.memory_values.rows.dtype
        )
        assert stored.get_tensor("model.memory_values.scale").shape == (1024,)
    loaded = memcompile.from_pretrained(tmp_path, mmap=mmap)
    assert isinstance(loaded.memory_values, QuantizedTable)
    tokens = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), quantized(tokens))


def _retype_table(folder: Path, name: str, dtype: torch.dtype) -> str:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    state[f"model.memory_values.{name}"] = state[f"model.memory_values.{name}"].to(dtype)
    save_file(state, path, metadata={"format": "pt"})
    return str(path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda folder: _retype_table(folder, "rows", torch.float8_e4m3fn),
            "model.memory_values.rows is torch.float8_e4m3fn, but {folder}/config.json's "
            "'quantized_table' makes it torch.int8",
        ),
        (
            lambda folder: _retype_table(folder, "scale", torch.bfloat16),
            "model.memory_values.scale is torch.bfloat16, but",
        ),
        (
            lambda folder: _edit_config(
                folder, lambda values: values.update(quantized_table={"dtype": "int4"})
            ),
            "config.json: bad 'quantized_table' entry {'dtype': 'int4'}",
        ),
        (
            lambda folder: _edit_config(folder, lambda values: values.pop("quantized_table")),
            "holds ['model.memory_values.rows', 'model.memory_values.scale'], which the model",
        ),
    ],
    ids=["rows-dtype", "scale-dtype", "bad-entry", "no-entry"],
)
def test_a_quantized_folder_whose_table_and_config_disagree_names_the_file(
    tmp_path: Path, damage, message: str
):
    _, quantized = _quantized_model("int8")
    save_pretrained(quantized, tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError) as refused:
        memcompile.from_pretrained(tmp_path)
    assert message.replace("{folder}", str(tmp_path)) in str(refused.value)
