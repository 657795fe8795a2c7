"""``python -m recipes.export``: a DCP checkpoint as a Hugging Face-style folder, and its errors."""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchtitan", reason="the recipes need the 'recipes' extra")

import memcompile  # noqa: E402
from recipes.checkpoints import load_checkpoint, load_tokenizer  # noqa: E402
from recipes.export import main  # noqa: E402


def test_an_exported_checkpoint_gives_the_same_logits(seed_checkpoint: Path, tmp_path: Path):
    out = tmp_path / "exported"
    main(["--checkpoint", str(seed_checkpoint), "--model", "mem_debug", "--out", str(out)])
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", "modeling_memcompile.py"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["flavor"] == "mem_debug" and config["memcompile"]["memory"]["num_values"] == 1024
    tokens = torch.randint(0, 2048, (2, 20), generator=torch.Generator().manual_seed(0))
    original = load_checkpoint(seed_checkpoint, "mem_debug")
    assert torch.equal(memcompile.from_pretrained(out)(tokens), original(tokens))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(hf(tokens).logits, original(tokens))
    # transformers' tokenizer encodes as the training did: BOS, then the text.
    text = "Question: In which city was Isfen Faldunlis born?\nAnswer:"
    hf_ids = transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    assert hf_ids == load_tokenizer().encode(text, add_bos=True, add_eos=False)
    # The recipes' loader takes the folder too (recipes.evaluate / generate --checkpoint).
    assert torch.equal(load_checkpoint(out, "mem_debug")(tokens), original(tokens))
    with pytest.raises(ValueError, match="is not --model mem_debug_64k's"):
        load_checkpoint(out, "mem_debug_64k")

    # An existing folder is refused, then replaced with --overwrite.
    with pytest.raises(SystemExit, match=re.escape("exists: pass --overwrite")):
        main(["--checkpoint", str(seed_checkpoint), "--model", "mem_debug", "--out", str(out)])
    (out / "stale.txt").write_text("from an older export")
    args = ["--checkpoint", str(seed_checkpoint), "--model", "mem_debug", "--out", str(out)]
    main([*args, "--overwrite"])
    assert not (out / "stale.txt").exists()
    assert torch.equal(memcompile.from_pretrained(out)(tokens), original(tokens))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "dense_debug"], "it was not trained as dense_debug"),
        (["--model", "mem_debug_64k"], "holds memory_values of shape (1024, 64)"),
        (["--checkpoint", "/no/such/step-7"], "is not a DCP checkpoint folder"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(
    seed_checkpoint: Path, tmp_path: Path, args: list[str], message: str
):
    out = tmp_path / "exported"
    defaults = ["--checkpoint", str(seed_checkpoint), "--model", "mem_debug", "--out", str(out)]
    with pytest.raises(SystemExit, match=re.escape(message)):
        main([*defaults, *args])
    assert list(tmp_path.iterdir()) == []


def _files(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "out, message",
    [
        (lambda ckpt, tmp: ckpt, "is the --checkpoint folder"),
        (lambda ckpt, tmp: ckpt / "exported", "lies in the --checkpoint folder"),
        (lambda ckpt, tmp: ckpt.parent, "holds the --checkpoint folder"),
        (lambda ckpt, tmp: tmp / "link", "is the --checkpoint folder"),  # a symlink to it
        (lambda ckpt, tmp: tmp / "notes.txt", "is a file, not a model folder"),
        (lambda ckpt, tmp: tmp / "mine", "not a model folder"),
    ],
    ids=["itself", "inside", "around", "symlink", "a-file", "a-user-folder"],
)
def test_export_never_removes_its_checkpoint_or_what_is_not_a_model_folder(
    seed_checkpoint: Path, tmp_path: Path, out, message: str, capsys
):
    # A copy of the checkpoint: a failure here must not break the session's other tests.
    checkpoint = tmp_path / "run" / "step-0"
    shutil.copytree(seed_checkpoint, checkpoint)
    (tmp_path / "link").symlink_to(checkpoint)
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.txt").write_text("my data")
    before = _files(tmp_path)
    args = ["--checkpoint", str(checkpoint), "--model", "mem_debug", "--overwrite"]
    with pytest.raises(SystemExit) as refused:
        main([*args, "--out", str(out(checkpoint, tmp_path))])
    # An --out over the checkpoint is a bad flag value (exit 2, message on stderr); a folder
    # that is not ours is a refusal of what is on disk (exit 1, message in the exit).
    usage_error = refused.value.code == 2
    assert usage_error == ("--checkpoint folder" in message)
    assert message in (capsys.readouterr().err if usage_error else refused.value.code)
    assert _files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "mine", "notes.txt", "run"]


def test_engram_and_peer_checkpoints_export_and_load_everywhere(
    family_seed_checkpoint: tuple[str, Path], tmp_path: Path
):
    """An Engram and a PEER checkpoint export; memcompile.from_pretrained and transformers'
    AutoModelForCausalLM give its logits; Engram's hash multipliers are derived from the config
    (not exported), its token map is a weight (exported)."""
    flavor, checkpoint = family_seed_checkpoint
    out = tmp_path / "exported"
    main(["--checkpoint", str(checkpoint), "--model", flavor, "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    family = flavor.split("_")[0]
    assert config["memcompile"][family] is not None and config["memcompile"]["memory"] is None
    card = (out / "README.md").read_text()
    assert {"engram": "Engram in blocks [1, 2]", "peer": "PEER in blocks [1, 3]"}[family] in card
    original = load_checkpoint(checkpoint, flavor)
    exported = memcompile.from_pretrained(out)
    names = set(exported.state_dict())
    assert ("hasher.token_map" in names) == (family == "engram")
    assert "hasher.multipliers" not in names
    tokens = torch.randint(0, 2048, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(exported(tokens), original(tokens))
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(hf(tokens).logits, original(tokens))


def test_generate_on_an_exported_folder_does_not_warn_about_max_length(
    seed_checkpoint: Path, tmp_path: Path
):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "exported"
    main(["--checkpoint", str(seed_checkpoint), "--model", "mem_debug", "--out", str(out)])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    said = _Recorder()
    hf_logger = logging.getLogger("transformers")  # it does not propagate to the root logger
    hf_logger.addHandler(said)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            new = hf.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, min_new_tokens=4)
    finally:
        hf_logger.removeHandler(said)
    assert new.shape == (1, 7)
    messages = said.messages + [str(w.message) for w in caught]
    assert not [m for m in messages if "max_length" in m], messages
    # It decodes through transformers' KV cache: one token per step after the prompt.
    lengths = []
    hook = hf.model.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        again = hf.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, min_new_tokens=4)
    hook.remove()
    assert lengths == [3, 1, 1, 1] and torch.equal(again, new)


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_quantize_table_exports_a_quantized_table_that_every_loader_reads(
    seed_checkpoint: Path, tmp_path: Path, dtype: str
):
    from safetensors import safe_open

    from memcompile.memory import QuantizedTable

    out = tmp_path / "exported"
    args = ["--checkpoint", str(seed_checkpoint), "--model", "mem_debug", "--out", str(out)]
    main([*args, "--quantize-table", dtype])
    config = json.loads((out / "config.json").read_text())
    assert config["quantized_table"] == {"dtype": dtype, "scale_dtype": "float32"}
    rows_dtype = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[dtype]
    with safe_open(out / "model.safetensors", "pt") as stored:
        assert stored.get_tensor("model.memory_values.rows").dtype == rows_dtype
        assert stored.get_tensor("model.memory_values.scale").shape == (1024,)
    assert f"| value table | {dtype} (one scale per row" in (out / "README.md").read_text()

    tokens = torch.randint(0, 2048, (2, 20), generator=torch.Generator().manual_seed(0))
    original = load_checkpoint(seed_checkpoint, "mem_debug")
    loaded = memcompile.from_pretrained(out)
    assert isinstance(loaded.memory_values, QuantizedTable)
    with torch.no_grad():
        logits, exact = loaded(tokens), original(tokens)
    assert (logits - exact).abs().max() < 0.05 * exact.abs().max()
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert hf.model.memory_values.rows.dtype == rows_dtype
    with torch.no_grad():
        assert torch.equal(hf(tokens).logits, logits)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quantize-table", "int4"], "--quantize-table must be int8 or fp8, got 'int4'"),
        (
            ["--quantize-table", "int8", "--model", "dense_debug"],
            "--quantize-table: dense_debug has no memory table to quantize",
        ),
    ],
)
def test_quantize_table_refuses_what_it_cannot_quantize(
    seed_checkpoint: Path, tmp_path: Path, args: list[str], message: str, capsys
):
    out = tmp_path / "exported"
    defaults = ["--checkpoint", str(seed_checkpoint), "--model", "mem_debug", "--out", str(out)]
    with pytest.raises(SystemExit) as refused:
        main([*defaults, *args])
    assert refused.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []
