"""``recipes.evaluate``: scoring, fact recall, the CLI on a real checkpoint, the lm-eval adapter.

(That the corpus's Q/A pairs match its biographies is tested in ``test_data.py``.)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchtitan", reason="the recipes need the 'recipes' extra")

from memcompile.flavors import FLAVORS  # noqa: E402
from memcompile.model import Transformer  # noqa: E402
from recipes.data.knowledge import ATTRIBUTES, KnowledgeCorpus  # noqa: E402
from recipes.evaluate import (  # noqa: E402
    answer_requests,
    evaluate_knowledge,
    fact_recall,
    load_checkpoint,
    load_tokenizer,
    loglikelihoods,
    main,
)

REPO = Path(__file__).resolve().parents[2]
CORPUS = KnowledgeCorpus(num_people=8, seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _config(vocab_size: int, max_seq_len: int = 128):
    return replace(FLAVORS["dense_debug"], vocab_size=vocab_size, max_seq_len=max_seq_len)


class OracleModel(Transformer):
    """A test double that knows every answer of ``qa_pairs``: after a question's prompt it puts
    all probability on the next token of ``" answer" EOS``, elsewhere it is uniform. It honours
    the KV-cache protocol (positions advance; it keeps the token history itself)."""

    def __init__(self, tokenizer, qa_pairs) -> None:
        super().__init__(_config(tokenizer.get_vocab_size()))
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


def test_a_model_that_knows_the_answers_scores_100_percent(tokenizer):
    qa_pairs = list(CORPUS.eval_qa_pairs())
    oracle = OracleModel(tokenizer, qa_pairs)
    recall = fact_recall(oracle, tokenizer, qa_pairs, batch_size=5)
    assert recall["accuracy"] == 1.0 and recall["questions"] == len(qa_pairs)
    assert recall["per_attribute"] == {a: 1.0 for a in ATTRIBUTES}
    scores = loglikelihoods(oracle, answer_requests(tokenizer, qa_pairs))
    assert all(greedy and logprob > -1e-3 for logprob, greedy, _ in scores)


def test_a_random_model_recalls_nothing(tokenizer):
    torch.manual_seed(0)
    model = Transformer(_config(tokenizer.get_vocab_size())).eval()
    results = evaluate_knowledge(model, tokenizer, CORPUS, batch_size=16)
    assert results["recall_heldout_questions"]["accuracy"] <= 0.05
    assert results["recall_trained_questions"]["accuracy"] <= 0.05
    # Untrained: about the entropy of a uniform guess over the vocabulary.
    uniform = math.log(tokenizer.get_vocab_size())
    assert abs(results["heldout_biographies"]["nll"] - uniform) < 0.5 * uniform


def test_loglikelihoods_match_unbatched_scoring_with_truncation(tokenizer):
    """Right-padded batches (sorted by length) and left-truncated long contexts score exactly
    what one forward pass per request over its last max_seq_len + 1 tokens gives."""
    torch.manual_seed(1)
    model = Transformer(_config(50, max_seq_len=16)).double().eval()
    generator = torch.Generator().manual_seed(2)
    requests = []
    for context_len, continuation_len in [(1, 1), (5, 3), (2, 7), (14, 2), (30, 4), (3, 16), (9, 1)]:
        ids = torch.randint(0, 50, (context_len + continuation_len,), generator=generator).tolist()
        requests.append((ids[:context_len], ids[context_len:]))
    scores = loglikelihoods(model, requests, batch_size=3)
    for (context, continuation), (logprob, greedy, count) in zip(requests, scores):
        sequence = torch.tensor(context + continuation)[-17:]
        with torch.no_grad():
            logprobs = F.log_softmax(model(sequence[None, :-1])[0], dim=-1)[-len(continuation):]
        targets = torch.tensor(continuation)
        assert count == len(continuation)
        assert logprob == pytest.approx(logprobs.gather(-1, targets[:, None]).sum().item(), rel=1e-9, abs=1e-9)
        assert greedy == bool((logprobs.argmax(-1) == targets).all())
    with pytest.raises(ValueError, match="non-empty context"):
        loglikelihoods(model, [([], [1])])
    with pytest.raises(ValueError, match="does not fit"):
        loglikelihoods(model, [([1], list(range(17)))])


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory) -> Path:
    """A real ``recipes.pretrain`` checkpoint (step 0 of a memory model)."""
    dump = tmp_path_factory.mktemp("pretrain")
    args = ["--model", "mem_debug", "--dump_folder", str(dump), "--dataloader.cache_dir", str(dump / "cache"),
            "--dataloader.knowledge.num_people", "8", "--training.seq_len", "32",
            "--training.local_batch_size", "2", "--metrics.no-enable-tensorboard",
            "--checkpoint.create_seed_checkpoint"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "recipes.pretrain", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return dump / "checkpoint" / "step-0"


def test_cli_evaluates_a_pretrain_checkpoint(seed_checkpoint: Path, tmp_path: Path, capsys):
    output = tmp_path / "eval.json"
    main(["--checkpoint", str(seed_checkpoint), "--model", "mem_debug", "--knowledge.num-people", "8",
          "--max-people", "2", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "fact recall, held-out questions" in printed and "held-out biographies" in printed
    results = json.loads(output.read_text())
    assert results["model"] == "mem_debug" and results["corpus"]["num_people"] == 8
    assert results["recall_heldout_questions"]["questions"] == 2 * len(ATTRIBUTES)
    assert results["heldout_biographies"]["tokens"] > 0
    # The loaded weights are the checkpoint's, not a fresh initialisation.
    loaded = load_checkpoint(seed_checkpoint, "mem_debug")
    torch.manual_seed(12345)
    fresh = Transformer(loaded.config)
    assert not torch.equal(loaded.memory_values, fresh.memory_values)


def test_cli_rejects_a_folder_that_is_not_a_checkpoint(tmp_path: Path):
    with pytest.raises(SystemExit, match="not a DCP checkpoint folder"):
        main(["--checkpoint", str(tmp_path), "--model", "mem_debug"])


def _requests(*args_list):
    return [SimpleNamespace(args=args) for args in args_list]


def test_lm_eval_adapter(tokenizer):
    pytest.importorskip("lm_eval", reason="the lm-eval adapter needs lm_eval")
    from recipes.lm_eval_adapter import MemcompileLM

    qa = next(CORPUS.eval_qa_pairs())
    oracle = MemcompileLM(OracleModel(tokenizer, [qa]), tokenizer, batch_size=4)
    # The harness passes the answer's leading space with the context; it moves to the answer.
    (logprob, greedy), (wrong_logprob, _) = oracle.loglikelihood(
        _requests((qa.prompt + " ", qa.answer), (qa.prompt, " not the answer"))
    )
    assert greedy and logprob > -1e-3 and wrong_logprob < -100
    assert oracle.generate_until(_requests((qa.prompt, {"until": [","], "max_gen_toks": 12})))[0] == (
        " " + qa.answer.split(",")[0]
    )

    torch.manual_seed(0)
    model = Transformer(_config(tokenizer.get_vocab_size(), max_seq_len=16)).eval()
    lm = MemcompileLM(model, tokenizer, batch_size=2)
    short, long = "Oslo is a city.", " ".join(ATTRIBUTES) * 4
    rolling = lm.loglikelihood_rolling(_requests((short,), (long,)))
    whole = loglikelihoods(model, [([tokenizer.bos_id], tokenizer.encode(short, add_bos=False, add_eos=False))])
    assert rolling[0] == pytest.approx(whole[0][0], rel=1e-5)
    long_tokens = len(tokenizer.encode(long, add_bos=False, add_eos=False))
    assert long_tokens > 16 and math.isfinite(rolling[1]) and rolling[1] < rolling[0]
    texts = lm.generate_until(_requests(("Question: who?", {"until": ["\n"], "max_gen_toks": 5}),
                                        ("x" * 200, {"max_gen_toks": 40})))
    assert len(texts) == 2 and all(isinstance(t, str) and "\n" not in t for t in texts[:1])
