"""The built-in tokenizer: a small byte-level BPE trained on the knowledge corpus.

Why a trained BPE and not raw bytes: biographies are ~4x shorter in BPE tokens, so a CPU run
sees ~4x more facts per step for the same sequence length, and byte-level pre-tokenisation
still encodes any UTF-8 text (other datasets work, just less compactly). The files are small
(~100 KB) and ship in ``recipes/assets/tokenizer``, so nothing is downloaded; regenerate them
deterministically with ``python -m recipes.data.tokenizer``. Any Hugging Face tokenizer
directory (``tokenizer.json`` + ``tokenizer_config.json``) can replace it via
``--hf_assets_path``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from recipes.data.knowledge import KnowledgeCorpus

BUILTIN_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
VOCAB_SIZE = 2048
#: The shipped tokenizer was trained on the knowledge corpus of this many people.
TOKENIZER_CORPUS_PEOPLE = 2000


def train_builtin_tokenizer(output_dir: Path = BUILTIN_TOKENIZER_DIR) -> None:
    """Train the byte-level BPE on the knowledge corpus of ``TOKENIZER_CORPUS_PEOPLE`` people
    and write it to ``output_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = KnowledgeCorpus(num_people=TOKENIZER_CORPUS_PEOPLE)
    texts = itertools.chain(
        corpus.train_documents(),
        corpus.heldout_documents(),
        (qa.text for qa in corpus.eval_qa_pairs()),
    )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output_dir / "tokenizer.json"))
    tokenizer_config = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 1 << 20,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (output_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


if __name__ == "__main__":
    train_builtin_tokenizer()
    print(f"wrote {BUILTIN_TOKENIZER_DIR}")
