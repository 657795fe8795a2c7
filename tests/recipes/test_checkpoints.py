"""``recipes.checkpoints``: loading a DCP checkpoint or an exported folder refuses a wrong
``--model`` or a damaged file with an error naming it. (Loading itself is tested where the
commands use it: ``test_evaluate.py``, ``test_export.py``.)"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torchtitan", reason="the recipes need the 'recipes' extra")

from memcompile.flavors import get_flavor  # noqa: E402
from memcompile.model import Transformer  # noqa: E402
from memcompile.pretrained import save_pretrained  # noqa: E402
from recipes.checkpoints import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_dcp_checkpoint_of_another_flavor_is_refused_before_loading(seed_checkpoint: Path):
    with pytest.raises(ValueError, match=re.escape("holds memory_values of shape (1024, 64)")):
        load_checkpoint(seed_checkpoint, "mem_debug_64k")
    with pytest.raises(ValueError, match="it was not trained as dense_debug"):
        load_checkpoint(seed_checkpoint, "dense_debug")


def test_damaged_dcp_metadata_names_the_file(seed_checkpoint: Path, tmp_path: Path):
    checkpoint = shutil.copytree(seed_checkpoint, tmp_path / "step-0")
    (checkpoint / ".metadata").write_bytes(b"{not a pickle")
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint}/.metadata: not a readable")):
        load_checkpoint(checkpoint, "mem_debug")


def test_a_truncated_dcp_data_file_names_itself(seed_checkpoint: Path, tmp_path: Path):
    checkpoint = shutil.copytree(seed_checkpoint, tmp_path / "step-0")
    data = checkpoint / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ValueError, match=re.escape("data files ['__0_0.distcp'] cannot be read")):
        load_checkpoint(checkpoint, "mem_debug")


def test_an_exported_folder_of_another_flavor_or_damaged_names_its_config(tmp_path: Path):
    folder = tmp_path / "exported"
    save_pretrained(Transformer(get_flavor("mem_debug", vocab_size=2048)), folder)
    with pytest.raises(ValueError, match=re.escape(f"{folder}/config.json holds a model whose")):
        load_checkpoint(folder, "mem_debug_64k", vocab_size=2048)
    config = json.loads((folder / "config.json").read_text())
    config["memcompile"]["memory"] = "big"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(f"{folder}/config.json: bad 'memcompile'")):
        load_checkpoint(folder, "mem_debug", vocab_size=2048)
