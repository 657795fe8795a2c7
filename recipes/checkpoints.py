"""Loading what the recipes wrote: DCP checkpoints (``recipes.pretrain`` / ``recipes.finetune``
step-N folders) and model folders (``recipes.export``), with the checks that make a wrong
``--model`` or a damaged folder a clear error. ``recipes.evaluate``, ``recipes.generate``,
``recipes.export`` and ``recipes.finetune`` load through here::

    model = load_checkpoint("outputs/mem_debug/checkpoint/step-400", "mem_debug")
    model = load_checkpoint("exported/mem_debug", "mem_debug")   # a recipes.export folder
    tokenizer = load_tokenizer()                                 # the built-in tokenizer
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from memcompile.config import TransformerConfig
from memcompile.flavors import get_flavor
from memcompile.model import Transformer
from memcompile.pretrained import CONFIG_NAME, from_pretrained, load_config
from recipes.data.tokenizer import BUILTIN_TOKENIZER_DIR


def load_tokenizer(path: str | Path = BUILTIN_TOKENIZER_DIR) -> HuggingFaceTokenizer:
    """The tokenizer a checkpoint was trained with (``--hf_assets_path`` of the pretraining)."""
    return HuggingFaceTokenizer(tokenizer_path=str(path))


def load_checkpoint(
    checkpoint: str | Path,
    model: str,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
    *,
    seq_len: int | None = None,
) -> Transformer:
    """The weights of a ``recipes.pretrain`` DCP checkpoint in a plain memcompile model, in
    eval mode.

    ``checkpoint`` is a ``step-N`` folder (full training state or model only: the model's
    parameters are stored under their own names either way), or a folder written by
    ``recipes.export``; ``model`` is the flavor it was trained as. ``vocab_size`` defaults to
    the built-in tokenizer's and ``seq_len`` (the pretraining's ``--training.seq_len``) to the
    flavor's ``max_seq_len``: the model is built by :func:`memcompile.flavors.get_flavor`, as
    in pretraining.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    checkpoint = Path(checkpoint)
    if vocab_size is None:
        vocab_size = load_tokenizer().get_vocab_size()
    config = get_flavor(model, vocab_size=vocab_size, seq_len=seq_len)
    if (checkpoint / CONFIG_NAME).is_file():
        return _load_exported(checkpoint, model, config, device)
    check_checkpoint(checkpoint, model, config)
    with torch.device(device):
        transformer = Transformer(config)
    state = transformer.state_dict()
    with warnings.catch_warnings():  # a single-process load is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
        except CheckpointException as error:  # its message names neither file nor cause
            causes = {repr(exc) for exc, _trace in error.failures.values()}
            files = sorted(p.name for p in checkpoint.glob("*.distcp"))
            raise ValueError(
                f"checkpoint {str(checkpoint)!r}: its data files {files} cannot be read "
                f"({'; '.join(causes)})"
            ) from None
    transformer.load_state_dict(state)
    return transformer.eval()


def _load_exported(
    folder: Path, model: str, config: TransformerConfig, device: str | torch.device
) -> Transformer:
    """A ``recipes.export`` folder, checked to be the flavor ``model`` (any RoPE length)."""
    exported = load_config(folder)
    if replace(exported, max_seq_len=config.max_seq_len) != config:
        raise ValueError(
            f"{folder / CONFIG_NAME} holds a model whose config is not --model {model}'s: "
            f"{exported}"
        )
    return from_pretrained(folder, device)


def check_checkpoint(checkpoint: str | Path, model: str, config: TransformerConfig) -> None:
    """Raise a clear error unless ``checkpoint`` is a DCP folder holding every parameter of
    ``config`` (the flavor ``model``, fitted to the run) with its shape. Reads only metadata;
    :func:`load_checkpoint` checks a DCP folder with it before loading."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from recipes.model import is_adapter, pretrained_name

    checkpoint = Path(checkpoint)
    if not (checkpoint / ".metadata").is_file():
        raise FileNotFoundError(
            f"checkpoint {str(checkpoint)!r} is not a DCP checkpoint folder (no .metadata); "
            f"pass a step-N folder such as outputs/<model>/checkpoint/step-400"
        )
    with torch.device("meta"):
        expected = Transformer(config).state_dict()
    try:
        saved = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    except Exception as error:  # a damaged pickle raises anything pickle.load can
        raise ValueError(
            f"{checkpoint / '.metadata'}: not a readable DCP metadata file "
            f"({type(error).__name__}: {error})"
        ) from None
    for name, tensor in expected.items():
        stored = saved.get(pretrained_name(name))
        if stored is None:
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} has no {name!r}: it was not trained as "
                f"--model {model} (pass the flavor it was trained as)"
            )
        if isinstance(stored, TensorStorageMetadata) and not is_adapter(name):
            if tuple(stored.size) != tuple(tensor.shape):
                raise ValueError(
                    f"checkpoint {str(checkpoint)!r} holds {name} of shape "
                    f"{tuple(stored.size)}, but --model {model} has {tuple(tensor.shape)}: it "
                    f"was not trained as {model} (pass the flavor it was trained as)"
                )
