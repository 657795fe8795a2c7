"""``recipes.knowledge_eval``: fact recall and held-out NLL, with any tokenizer.

Every test runs with a plain byte tokenizer (duck typing: no torchtitan needed) and with the
built-in BPE of the pretraining (through torchtitan, when installed). That the corpus's Q/A
pairs match its biographies is tested in ``test_data.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from memcompile.model import Transformer
from memcompile.scoring import loglikelihoods
from recipes.data.knowledge import ATTRIBUTES, KnowledgeCorpus
from recipes.knowledge_eval import (
    answer_requests,
    evaluate_knowledge,
    fact_recall,
    format_table,
    generate_texts,
)
from tests.recipes.knowledge_doubles import ByteTokenizer, OracleModel, model_config

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = KnowledgeCorpus(num_people=8, seed=3)  # 4 people with held-out Q/A pairs, 4 trained


@pytest.fixture(scope="module", params=["bytes", "builtin_bpe"])
def tokenizer_and_vocab(request):
    if request.param == "bytes":
        tokenizer = ByteTokenizer()
        return tokenizer, tokenizer.vocab_size
    pytest.importorskip("torchtitan", reason="the built-in tokenizer loads through torchtitan")
    from recipes.checkpoints import load_tokenizer

    tokenizer = load_tokenizer()
    return tokenizer, tokenizer.get_vocab_size()


def test_a_model_that_knows_the_answers_scores_100_percent(tokenizer_and_vocab):
    tokenizer, vocab_size = tokenizer_and_vocab
    qa_pairs = list(CORPUS.eval_qa_pairs())
    oracle = OracleModel(tokenizer, vocab_size, qa_pairs)
    recall = fact_recall(oracle, tokenizer, qa_pairs, batch_size=5)
    assert recall["accuracy"] == 1.0 and recall["questions"] == len(qa_pairs) == 4 * 6
    assert recall["per_attribute"] == {a: 1.0 for a in ATTRIBUTES}
    assert recall["examples"][0] == {
        "question": qa_pairs[0].question,
        "answer": qa_pairs[0].answer,
        "generated": qa_pairs[0].answer,
    }
    scores = loglikelihoods(oracle, answer_requests(tokenizer, qa_pairs))
    assert all(greedy and logprob > -1e-3 for logprob, greedy, _ in scores)
    # Questions it does not know: the oracle is uniform there, so it answers nothing right.
    others = list(CORPUS.train_qa_pairs())
    assert fact_recall(oracle, tokenizer, others, max_new_tokens=3)["accuracy"] == 0.0


def test_generated_text_ends_before_the_end_of_text_token(tokenizer_and_vocab):
    tokenizer, vocab_size = tokenizer_and_vocab
    qa = next(CORPUS.eval_qa_pairs())
    oracle = OracleModel(tokenizer, vocab_size, [qa])
    assert generate_texts(oracle, tokenizer, [qa.prompt], max_new_tokens=60) == [" " + qa.answer]


def test_a_random_model_recalls_nothing(tokenizer_and_vocab):
    tokenizer, vocab_size = tokenizer_and_vocab
    torch.manual_seed(0)
    model = Transformer(model_config(vocab_size)).eval()
    results = evaluate_knowledge(model, tokenizer, CORPUS, batch_size=16)
    for split in ("recall_heldout_questions", "recall_trained_questions"):
        assert results[split]["questions"] == 4 * len(ATTRIBUTES)
        assert results[split]["accuracy"] <= 0.05
    biographies = list(CORPUS.heldout_documents())
    expected_tokens = sum(
        len(tokenizer.encode(text, add_bos=True, add_eos=True)) - 1 for text in biographies
    )
    assert results["heldout_biographies"]["tokens"] == expected_tokens
    # Untrained: about the entropy of a uniform guess over the vocabulary.
    uniform = math.log(vocab_size)
    for nll in (results["heldout_biographies"]["nll"], results["heldout_answers"]["nll"]):
        assert abs(nll - uniform) < 0.5 * uniform
    assert results["heldout_biographies"]["perplexity"] == pytest.approx(
        math.exp(results["heldout_biographies"]["nll"])
    )

    limited = evaluate_knowledge(
        model, tokenizer, CORPUS, max_people=1, include_trained_questions=False
    )
    assert limited["recall_heldout_questions"]["questions"] == len(ATTRIBUTES)
    assert "recall_trained_questions" not in limited


def test_format_table_shows_every_measurement():
    results = {
        "heldout_biographies": {"nll": 1.5, "perplexity": math.exp(1.5), "tokens": 40},
        "heldout_answers": {"nll": 0.25, "tokens": 12},
        "recall_heldout_questions": {
            "accuracy": 0.5,
            "questions": 12,
            "per_attribute": {"birth_city": 0.75},
        },
    }
    assert format_table(results).splitlines() == [
        "| metric | value |",
        "|---|---|",
        "| held-out biographies: NLL / perplexity | 1.5000 / 4.482 (40 tokens) |",
        "| held-out answers: NLL / token | 0.2500 (12 tokens) |",
        "| fact recall, held-out questions | 50.0% (12 questions) |",
        "| &nbsp; birth_city | 75.0% |",
    ]
