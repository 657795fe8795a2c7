"""A memcompile model in the lm-evaluation-harness (``pip install lm_eval``).

    from recipes.checkpoints import load_checkpoint, load_tokenizer
    from recipes.lm_eval_adapter import MemcompileLM
    import lm_eval
    lm = MemcompileLM(load_checkpoint(path, "mem_1b"), load_tokenizer(tokenizer_dir))
    lm_eval.simple_evaluate(model=lm, tasks=["nq_open", "triviaqa", "hellaswag"])

or ``python -m recipes.evaluate --checkpoint ... --lm-eval-tasks nq_open triviaqa``.

Every text is scored as the model was trained: ``BOS`` followed by the text. Contexts longer
than the model's ``max_seq_len`` lose their beginning; long documents are scored in rolling
windows (``loglikelihood_rolling``). Generation is greedy unless a task asks for sampling.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from memcompile.generate import generate_batched
from memcompile.scoring import loglikelihoods

try:
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
    if error.name is None or not error.name.startswith("lm_eval"):
        raise
    raise ImportError(
        "recipes.lm_eval_adapter needs the lm-evaluation-harness: pip install lm_eval"
    ) from error

_DEFAULT_MAX_GEN_TOKS = 256


class MemcompileLM(LM):
    """``lm_eval.api.model.LM`` over a memcompile ``Transformer`` and its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 32) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_seq_len = model.config.max_seq_len

    def _encode(self, text: str) -> list[int]:
        # Encoded with its BOS, which is then dropped: a tokenizer that adds BOS itself (an
        # exported folder's, for transformers) adds it even when asked not to.
        ids = self.tokenizer.encode(text, add_bos=True, add_eos=False)
        return ids[1:] if ids[:1] == [self.tokenizer.bos_id] else ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # As lm_eval's HF model: trailing spaces belong to the continuation, and the pair is
        # tokenised whole so that the boundary merges as in running text.
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = [self.tokenizer.bos_id, *self._encode(context)]
        whole = [self.tokenizer.bos_id, *self._encode(context + continuation)]
        return context_ids, whole[len(context_ids) :]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args) for request in requests]
        return [
            (logprob, greedy)
            for logprob, greedy, _ in loglikelihoods(self.model, pairs, self.batch_size)
        ]

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for request in requests:
            (text,) = request.args
            windows = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    token_list=self._encode(text),
                    prefix_token=self.tokenizer.bos_id,
                    max_seq_len=self.max_seq_len,
                    context_len=1,
                )
            ]
            scores = loglikelihoods(self.model, windows, self.batch_size)
            results.append(sum(logprob for logprob, _, _ in scores))
        return results

    def generate_until(self, requests) -> list[str]:
        # Requests with the same generation settings are generated together (batched by length).
        groups: dict[tuple[int, float], list[int]] = defaultdict(list)
        prompts, stops = [], []
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            max_new_tokens = min(
                int(gen_kwargs.get("max_gen_toks", _DEFAULT_MAX_GEN_TOKS)), self.max_seq_len - 1
            )
            temperature = (
                float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
            )
            prompt = [self.tokenizer.bos_id, *self._encode(context)]
            prompts.append(prompt[-(self.max_seq_len - max_new_tokens) :])
            groups[max_new_tokens, temperature].append(i)
        results = [""] * len(prompts)
        for (max_new_tokens, temperature), indices in groups.items():
            outputs = generate_batched(
                self.model,
                [prompts[i] for i in indices],
                max_new_tokens,
                stop_token=self.tokenizer.eos_id,
                batch_size=self.batch_size,
                temperature=temperature,
            )
            for i, new_tokens in zip(indices, outputs):
                text = self.tokenizer.decode(new_tokens)
                for stop in stops[i]:
                    text = text.split(stop)[0]
                results[i] = text
        return results


def run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 32,
    include_path: str | None = None,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``tasks`` (``include_path``: a folder of task YAMLs, e.g.
    :func:`recipes.lm_eval_task.write_task`'s); returns its per-task results."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    with torch.no_grad():
        output = lm_eval.simple_evaluate(
            model=MemcompileLM(model, tokenizer, batch_size),
            tasks=tasks,
            limit=limit,
            log_samples=False,
            task_manager=TaskManager(include_path=include_path),
        )
    return output["results"]
