"""Test doubles for the knowledge evaluation: a byte tokenizer, a model that knows the answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from memcompile.flavors import FLAVORS
from memcompile.model import Transformer
from recipes.knowledge_eval import answer_requests


class ByteTokenizer:
    """UTF-8 bytes, BOS = 256, EOS = 257: only what :class:`recipes.knowledge_eval.TextTokenizer`
    asks for (no torchtitan)."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str, *, add_bos: bool, add_eos: bool) -> list[int]:
        return [self.bos_id] * add_bos + list(text.encode()) + [self.eos_id] * add_eos

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def model_config(vocab_size: int, max_seq_len: int = 512):
    return replace(FLAVORS["dense_debug"], vocab_size=vocab_size, max_seq_len=max_seq_len)


class OracleModel(Transformer):
    """Knows every answer of ``qa_pairs``: after a question's prompt it puts all probability on
    the next token of ``" answer" EOS``, elsewhere it is uniform. It honours the KV-cache
    protocol (positions advance; it keeps the token history itself)."""

    def __init__(self, tokenizer, vocab_size: int, qa_pairs) -> None:
        super().__init__(model_config(vocab_size))
        self.continuations = {tuple(p): c for p, c in answer_requests(tokenizer, qa_pairs)}
        self.history = torch.empty(0, 0, dtype=torch.long)

    def forward(self, tokens, positions=None, kv_cache=None):
        sequences = tokens
        if kv_cache is not None:
            kv_cache.next_positions(tokens.shape[1], tokens.device)
            if kv_cache.length:
                sequences = torch.cat([self.history, tokens], dim=1)
            self.history = sequences
            kv_cache.advance(tokens.shape[1])
        logits = torch.zeros(*tokens.shape, self.config.vocab_size)
        first = sequences.shape[1] - tokens.shape[1]
        for row, sequence in enumerate(sequences.tolist()):
            for column in range(tokens.shape[1]):
                seen = sequence[: first + column + 1]
                for length in range(1, len(seen) + 1):
                    continuation = self.continuations.get(tuple(seen[:length]))
                    if continuation is not None and len(seen) - length < len(continuation):
                        logits[row, column] = -1e4
                        logits[row, column, continuation[len(seen) - length]] = 0.0
        return logits
