"""Scoring token sequences: log-likelihoods of continuations, mean NLL and perplexity.

    scores = loglikelihoods(model, [(context_ids, continuation_ids), ...])
    mean_nll(model, requests)  # {"nll": ..., "perplexity": ..., "tokens": ...}

Token ids in, numbers out: the tokenizer (and what a request means) is the caller's. The
lm-eval adapter (:mod:`recipes.lm_eval_adapter`) and the knowledge evaluation
(:mod:`recipes.knowledge_eval`) score through here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: ``(context, continuation)`` token id lists: the continuation is scored given the context.
Request = tuple[Sequence[int], Sequence[int]]


@torch.no_grad()
def loglikelihoods(
    model: nn.Module, requests: Sequence[Request], batch_size: int = 32
) -> list[tuple[float, bool, int]]:
    """For each ``(context, continuation)`` pair of token lists: the log-probability of the
    continuation given the context, whether greedy decoding would produce it, and its length.

    Sequences longer than the model's ``max_seq_len`` lose the start of their context. Pairs
    are right-padded into batches: causal attention keeps padding from affecting them.
    """
    max_len = model.config.max_seq_len + 1  # inputs are the sequence minus its last token
    sequences = []
    for context, continuation in requests:
        if not context or not continuation:
            raise ValueError(
                f"every request needs a non-empty context and continuation, got "
                f"{len(context)} and {len(continuation)} tokens"
            )
        if len(continuation) >= max_len:
            raise ValueError(
                f"continuation of {len(continuation)} tokens does not fit max_seq_len "
                f"{model.config.max_seq_len} with any context"
            )
        sequences.append((list(context) + list(continuation))[-max_len:])
    device = model.output.weight.device
    results = []
    # Longest first, so that each batch pads little (results are put back in order below).
    order = sorted(range(len(requests)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            tokens[row, : len(sequences[i])] = torch.tensor(sequences[i])
        tokens = tokens.to(device)
        logits = model(tokens[:, :-1])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logprobs = F.log_softmax(logits, dim=-1)
        for row, i in enumerate(batch):
            length, num_scored = len(sequences[i]), len(requests[i][1])
            targets = tokens[row, length - num_scored : length]
            scored = logprobs[row, length - num_scored - 1 : length - 1]
            logprob = scored.gather(-1, targets[:, None]).sum().item()
            greedy = bool((scored.argmax(-1) == targets).all())
            results.append((i, (logprob, greedy, num_scored)))
    return [result for _, result in sorted(results, key=lambda pair: pair[0])]


def mean_nll(
    model: nn.Module, requests: Sequence[Request], batch_size: int = 32
) -> dict[str, float]:
    """Per-token NLL (nats) and perplexity of the continuations, over all their tokens."""
    scores = loglikelihoods(model, requests, batch_size)
    num_tokens = sum(n for _, _, n in scores)
    nll = -sum(logprob for logprob, _, _ in scores) / max(num_tokens, 1)
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": num_tokens}
