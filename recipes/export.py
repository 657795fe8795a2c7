"""Export a recipes.pretrain / recipes.finetune checkpoint as a Hugging Face-style folder.

    python -m recipes.export --checkpoint outputs/mem_debug/checkpoint/step-400 \\
        --model mem_debug --out exported/mem_debug

The folder holds ``model.safetensors`` (sharded past ``--max-shard-mb``, with
``model.safetensors.index.json``; the shared value table is stored once), ``config.json`` (the
whole model config, see :mod:`memcompile.pretrained`), ``generation_config.json``, the tokenizer
files of ``--hf-assets-path``, a model card (``README.md``) and ``modeling_memcompile.py``. Load
it back with ``memcompile.from_pretrained(folder)`` (the same weights, so the same logits,
bitwise; with ``--quantize-table int8`` or ``fp8`` the table is stored quantized, one scale per
row, and read quantized), with ``transformers.AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` (``memcompile/hf.py``; ``generate()`` works), or pass the folder as
``--checkpoint`` to ``recipes.evaluate`` / ``recipes.generate``.

The folder appears whole or not at all (written next to it, then swapped in: nothing of an older
export survives); an existing one is refused unless ``--overwrite``, and even then replaced only
if it is a model folder. An ``--out`` that is, contains or lies inside ``--checkpoint`` is
refused: nothing is written or removed.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from memcompile.cli import UsageError, check_at_least, reported_errors
from memcompile.flavors import FlavorName, get_flavor
from memcompile.memory import quantize_table
from memcompile.pretrained import check_replaceable, save_pretrained
from memcompile.stats import model_stats
from ops.lookup_quantized import QUANTIZED_DTYPES
from recipes.checkpoints import check_checkpoint, load_checkpoint, load_tokenizer
from recipes.data.tokenizer import BUILTIN_TOKENIZER_DIR

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class ExportConfig:
    """Export a DCP checkpoint as a Hugging Face-style folder (safetensors + config.json)."""

    checkpoint: Path
    """A step-N DCP folder written by recipes.pretrain or recipes.finetune"""

    out: Path
    """The folder to write"""

    model: FlavorName = "mem_debug"
    """The flavor the checkpoint was trained as"""

    seq_len: int | None = None
    """The training's --training.seq_len, if longer than the flavor's max_seq_len"""

    hf_assets_path: Path = BUILTIN_TOKENIZER_DIR
    """The tokenizer of the training (its --hf_assets_path); copied into the folder"""

    max_shard_mb: int = 5000
    """Largest weights file (MB); larger models are sharded"""

    overwrite: bool = False
    """Replace --out if it exists"""

    quantize_table: str | None = None
    """Store the value table quantized for inference: int8 or fp8 (e4m3), one scale per row
    (torchao); read by a lookup that dequantizes inside the kernel. Default: as trained"""


def run(config: ExportConfig) -> Path:
    check_at_least("--seq-len", config.seq_len, 1)
    check_at_least("--max-shard-mb", config.max_shard_mb, 1)
    if config.quantize_table not in (None, *QUANTIZED_DTYPES):
        choices = " or ".join(QUANTIZED_DTYPES)
        raise UsageError(f"--quantize-table must be {choices}, got {config.quantize_table!r}")
    _check_out(config)
    flavor = get_flavor(config.model)
    if config.quantize_table is not None and flavor.memory is None:
        what = "no memory table" if flavor.table_shape is None else "no product-key value table"
        raise UsageError(f"--quantize-table: {config.model} has {what} to quantize")
    tokenizer = load_tokenizer(config.hf_assets_path)
    transformer = get_flavor(
        config.model, vocab_size=tokenizer.get_vocab_size(), seq_len=config.seq_len
    )
    check_checkpoint(config.checkpoint, config.model, transformer)
    missing = [f for f in TOKENIZER_FILES if not (config.hf_assets_path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"--hf-assets-path {str(config.hf_assets_path)!r} has no {missing}")

    model = load_checkpoint(
        config.checkpoint, config.model, tokenizer.get_vocab_size(), seq_len=config.seq_len
    )
    if config.quantize_table is not None:
        quantize_table(model, config.quantize_table)

    def add_files(folder: Path) -> None:  # written into the folder before it takes --out's place
        shutil.copy(config.hf_assets_path / "tokenizer_config.json", folder)
        _write_tokenizer(config.hf_assets_path / "tokenizer.json", folder, tokenizer.bos_id)
        # No max_length: generate(max_new_tokens=...) would warn that both are set (the
        # model's length is config.json's max_position_embeddings).
        generation = {
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
            "do_sample": False,
        }
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (folder / "README.md").write_text(_model_card(config, model.config))

    save_pretrained(
        model,
        config.out,
        max_shard_bytes=config.max_shard_mb * 10**6,
        config_extra={"flavor": config.model, "source_checkpoint": str(config.checkpoint)},
        add_files=add_files,
    )
    print(f"wrote {config.out}  (load it: memcompile.from_pretrained({str(config.out)!r}))")
    return config.out


def _check_out(config: ExportConfig) -> None:
    """Refuse, before anything is read or written, an ``--out`` whose replacement would remove
    the checkpoint or anything that is not a model folder."""
    out, checkpoint = config.out.resolve(), config.checkpoint.resolve()  # symlinks count
    if out == checkpoint or checkpoint in out.parents or out in checkpoint.parents:
        where = "is" if out == checkpoint else "lies in" if checkpoint in out.parents else "holds"
        raise UsageError(
            f"--out {str(config.out)!r} {where} the --checkpoint folder "
            f"{str(config.checkpoint)!r}: exporting would change the checkpoint; pass a folder "
            f"outside it"
        )
    check_replaceable(config.out)
    if config.out.exists() and not config.overwrite:
        raise FileExistsError(f"--out {str(config.out)!r} exists: pass --overwrite to replace it")


def _write_tokenizer(source: Path, folder: Path, bos_id: int) -> None:
    """Copy the tokenizer so that ``transformers`` encodes as training did, ``BOS text``: the
    recipes add the BOS themselves (torchtitan's ``add_bos``), so a tokenizer without a post
    processor gets one that adds it (lm-eval's hf model: with ``add_bos_token=True``)."""
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_file(str(source))
    if tokenizer.post_processor is None:
        bos = tokenizer.id_to_token(bos_id)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    tokenizer.save(str(folder / "tokenizer.json"))


def _model_card(config: ExportConfig, transformer) -> str:
    stats = model_stats(transformer)
    shape = f"dim {transformer.dim}, {transformer.n_layers} blocks, vocab {transformer.vocab_size}"
    memory = transformer.memory
    table_note = " (one scale per row; inference only)" if config.quantize_table else ""
    engram, peer = transformer.engram, transformer.peer
    if memory is not None:
        layers = (
            f"{memory.kind.value} in blocks {list(memory.layers)}, {memory.num_values:,} values "
            f"shared, {memory.heads} heads x top-{memory.topk}"
        )
    elif engram is not None:
        layers = (
            f"Engram in blocks {list(engram.layers)}, {engram.num_rows:,} hashed rows shared, "
            f"2- to {engram.max_ngram}-grams x {engram.heads} hash heads"
        )
    elif peer is not None:
        layers = (
            f"PEER in blocks {list(peer.layers)}, {peer.num_experts:,} experts shared, "
            f"{peer.heads} heads x top-{peer.topk}"
        )
    else:
        layers = "none (dense)"
    return f"""# {config.out.name}

A memcompile model (memory layers, "Memory Layers at Scale", Berges et al. 2024), exported from
`{config.checkpoint}` (flavor `{config.model}`, {config.checkpoint.name}).

| | |
|---|---|
| architecture | {shape} |
| memory layers | {layers} |
| parameters | {stats.total_params:,} in all, {stats.memory_params:,} in the value table |
| value table | {config.quantize_table or "as trained"}{table_note} |
| active per token | {stats.active_params:,} |

```python
import memcompile
model = memcompile.from_pretrained("{config.out}")

from transformers import AutoModelForCausalLM  # with memcompile installed
model = AutoModelForCausalLM.from_pretrained("{config.out}", trust_remote_code=True)
```
"""


def main(argv: list[str] | None = None) -> None:
    import tyro

    args = sys.argv[1:] if argv is None else argv
    config = tyro.cli(ExportConfig, args=args, description=__doc__)
    with reported_errors(ValueError, FileNotFoundError, FileExistsError):
        run(config)


if __name__ == "__main__":
    main()
