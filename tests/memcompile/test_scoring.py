"""``memcompile.scoring``: batched, truncated scoring equals one forward pass per request."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from memcompile.flavors import FLAVORS
from memcompile.model import Transformer
from memcompile.scoring import loglikelihoods, mean_nll


def _model(vocab_size: int = 50, max_seq_len: int = 16) -> Transformer:
    torch.manual_seed(1)
    config = replace(FLAVORS["dense_debug"], vocab_size=vocab_size, max_seq_len=max_seq_len)
    return Transformer(config).double().eval()


def _requests(shapes: list[tuple[int, int]], vocab_size: int = 50, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for context_len, continuation_len in shapes:
        ids = torch.randint(0, vocab_size, (context_len + continuation_len,), generator=generator)
        requests.append((ids[:context_len].tolist(), ids[context_len:].tolist()))
    return requests


def test_loglikelihoods_match_unbatched_scoring_with_truncation():
    """Right-padded batches (sorted by length) and left-truncated long contexts score exactly
    what one forward pass per request over its last max_seq_len + 1 tokens gives."""
    model = _model()
    requests = _requests([(1, 1), (5, 3), (2, 7), (14, 2), (30, 4), (3, 16), (9, 1)])
    scores = loglikelihoods(model, requests, batch_size=3)
    for (context, continuation), (logprob, greedy, count) in zip(requests, scores):
        sequence = torch.tensor(context + continuation)[-17:]
        with torch.no_grad():
            logprobs = F.log_softmax(model(sequence[None, :-1])[0], dim=-1)[-len(continuation) :]
        targets = torch.tensor(continuation)
        expected = logprobs.gather(-1, targets[:, None]).sum().item()
        assert count == len(continuation)
        assert logprob == pytest.approx(expected, rel=1e-9, abs=1e-9)
        assert greedy == bool((logprobs.argmax(-1) == targets).all())
    with pytest.raises(ValueError, match="non-empty context"):
        loglikelihoods(model, [([], [1])])
    with pytest.raises(ValueError, match="does not fit"):
        loglikelihoods(model, [([1], list(range(17)))])


def test_mean_nll_is_per_token_over_all_continuations():
    model = _model()
    requests = _requests([(2, 3), (4, 1), (1, 6)])
    logprobs = [logprob for logprob, _, _ in loglikelihoods(model, requests)]
    result = mean_nll(model, requests, batch_size=2)
    assert result["tokens"] == 3 + 1 + 6
    assert result["nll"] == pytest.approx(-sum(logprobs) / 10, rel=1e-12)
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"]), rel=1e-12)
