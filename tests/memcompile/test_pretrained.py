"""save_pretrained / from_pretrained: safetensors folders that give back the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")

import memcompile  # noqa: E402
from memcompile.flavors import get_flavor  # noqa: E402
from memcompile.model import Transformer  # noqa: E402
from memcompile.pretrained import config_from_dict, config_to_dict, save_pretrained  # noqa: E402


@pytest.mark.parametrize("flavor", ["mem_debug", "memplain_debug", "dense_debug"])
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


def test_config_round_trips_through_json():
    config = get_flavor("mem_1b_4m")
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def test_a_folder_without_a_memcompile_config_is_refused(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        memcompile.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a memcompile model folder"):
        memcompile.from_pretrained(tmp_path)
