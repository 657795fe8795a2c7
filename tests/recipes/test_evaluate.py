"""``recipes.evaluate`` (the CLI on a real checkpoint, checkpoint loading) and the lm-eval
adapter. The measurements themselves are tested in ``test_knowledge_eval.py``, scoring and
generation in ``tests/memcompile``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("torchtitan", reason="the recipes need the 'recipes' extra")

from memcompile.flavors import get_flavor  # noqa: E402
from memcompile.generate import generate_batched  # noqa: E402
from memcompile.model import Transformer  # noqa: E402
from memcompile.scoring import loglikelihoods  # noqa: E402
from recipes.checkpoints import load_checkpoint, load_tokenizer  # noqa: E402
from recipes.data.knowledge import ATTRIBUTES, KnowledgeCorpus  # noqa: E402
from recipes.evaluate import main  # noqa: E402
from tests.recipes.knowledge_doubles import OracleModel, model_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
CORPUS = KnowledgeCorpus(num_people=8, seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_cli_evaluates_a_pretrain_checkpoint(
    seed_checkpoint: Path, tmp_path: Path, capsys, tokenizer
):
    output = tmp_path / "eval.json"
    main(
        [
            "--checkpoint",
            str(seed_checkpoint),
            "--model",
            "mem_debug",
            "--knowledge.num-people",
            "8",
            "--max-people",
            "2",
            "--output",
            str(output),
        ]
    )
    printed = capsys.readouterr().out
    assert "fact recall, held-out questions" in printed and "held-out biographies" in printed
    results = json.loads(output.read_text())
    assert results["model"] == "mem_debug" and results["corpus"]["num_people"] == 8
    assert results["recall_heldout_questions"]["questions"] == 2 * len(ATTRIBUTES)
    assert results["recall_trained_questions"]["questions"] == 2 * len(ATTRIBUTES)
    biographies = list(KnowledgeCorpus(num_people=8).heldout_documents())[:2]
    assert results["heldout_biographies"]["tokens"] == sum(
        len(tokenizer.encode(text, add_bos=True, add_eos=True)) - 1 for text in biographies
    )


def test_cli_evaluates_engram_and_peer_checkpoints(
    family_seed_checkpoint: tuple[str, Path], tmp_path: Path
):
    flavor, checkpoint = family_seed_checkpoint
    output = tmp_path / "eval.json"
    args = ["--checkpoint", str(checkpoint), "--model", flavor, "--output", str(output)]
    main([*args, "--knowledge.num-people", "8", "--max-people", "1"])
    results = json.loads(output.read_text())
    assert results["model"] == flavor
    assert results["recall_trained_questions"]["questions"] == len(ATTRIBUTES)
    assert results["heldout_biographies"]["tokens"] > 0


def test_load_checkpoint_builds_the_flavor_as_trained(seed_checkpoint: Path, tokenizer):
    loaded = load_checkpoint(seed_checkpoint, "mem_debug")
    assert loaded.config == get_flavor("mem_debug", vocab_size=tokenizer.get_vocab_size())
    assert not loaded.training
    # The loaded weights are the checkpoint's, not a fresh initialisation.
    torch.manual_seed(12345)
    fresh = Transformer(loaded.config)
    assert not torch.equal(loaded.memory_values, fresh.memory_values)
    # A run trained on sequences longer than the flavor's has RoPE tables that long.
    longer = load_checkpoint(seed_checkpoint, "mem_debug", seq_len=1024)
    assert longer.config.max_seq_len == 1024
    assert torch.equal(longer.memory_values, loaded.memory_values)
    with pytest.raises(ValueError, match="unknown flavor 'mem_2b'; choose one of: dense_134m"):
        load_checkpoint(seed_checkpoint, "mem_2b")


def test_cli_rejects_a_folder_that_is_not_a_checkpoint(tmp_path: Path):
    with pytest.raises(SystemExit, match="not a DCP checkpoint folder"):
        main(["--checkpoint", str(tmp_path), "--model", "mem_debug"])


def _requests(*args_list):
    return [SimpleNamespace(args=args) for args in args_list]


def test_lm_eval_adapter(tokenizer):
    pytest.importorskip("lm_eval", reason="the lm-eval adapter needs lm_eval")
    from recipes.lm_eval_adapter import MemcompileLM

    vocab_size = tokenizer.get_vocab_size()
    qa = next(CORPUS.eval_qa_pairs())
    oracle = MemcompileLM(OracleModel(tokenizer, vocab_size, [qa]), tokenizer, batch_size=4)
    # The harness passes the answer's leading space with the context; it moves to the answer.
    (logprob, greedy), (wrong_logprob, _) = oracle.loglikelihood(
        _requests((qa.prompt + " ", qa.answer), (qa.prompt, " not the answer"))
    )
    assert greedy and logprob > -1e-3 and wrong_logprob < -100
    until_comma = _requests((qa.prompt, {"until": [","], "max_gen_toks": 12}))
    assert oracle.generate_until(until_comma) == [" " + qa.answer.split(",")[0]]

    torch.manual_seed(0)
    model = Transformer(model_config(vocab_size, max_seq_len=16)).eval()
    lm = MemcompileLM(model, tokenizer, batch_size=2)

    def ids(text: str) -> list[int]:
        return [tokenizer.bos_id, *tokenizer.encode(text, add_bos=False, add_eos=False)]

    short, long = "Oslo is a city.", " ".join(ATTRIBUTES) * 4
    rolling = lm.loglikelihood_rolling(_requests((short,), (long,)))
    [(whole, _, _)] = loglikelihoods(model, [(ids(short)[:1], ids(short)[1:])])
    assert rolling[0] == pytest.approx(whole, rel=1e-5)
    # A long text is scored max_seq_len tokens at a time, each chunk after the text before it
    # (of which loglikelihoods keeps the last max_seq_len + 1 tokens, as lm_eval's windows do).
    tokens = ids(long)
    assert len(tokens) > 2 * 16
    chunks = [(tokens[: i + 1], tokens[i + 1 : i + 17]) for i in range(0, len(tokens) - 1, 16)]
    expected = sum(logprob for logprob, _, _ in loglikelihoods(model, chunks))
    assert rolling[1] == pytest.approx(expected, rel=1e-5)

    # Generation keeps the last max_seq_len - max_new_tokens prompt tokens (max_gen_toks is
    # capped at max_seq_len - 1) and cuts the text at the first stop string.
    texts = lm.generate_until(
        _requests(
            ("Question: who?", {"until": ["\n"], "max_gen_toks": 5}),
            ("x" * 200, {"max_gen_toks": 40}),
        )
    )

    def greedy_text(prompt: list[int], max_new_tokens: int) -> str:
        new = generate_batched(model, [prompt], max_new_tokens, stop_token=tokenizer.eos_id)[0]
        return tokenizer.decode(new)

    assert texts == [
        greedy_text(ids("Question: who?")[-11:], 5).split("\n")[0],
        greedy_text(ids("x" * 200)[-1:], 15),
    ]


def test_lm_eval_exact_match_on_the_shipped_task_equals_fact_recall(
    tokenizer, tmp_path: Path, monkeypatch
):
    pytest.importorskip("lm_eval", reason="the lm-eval adapter needs lm_eval")
    from recipes.knowledge_eval import fact_recall
    from recipes.lm_eval_adapter import run_lm_eval
    from recipes.lm_eval_task import TASK_NAME, write_task

    questions = list(CORPUS.eval_qa_pairs())
    # It knows a third of the answers: lm-eval's score is not 0 or 1 by construction.
    model = OracleModel(tokenizer, tokenizer.get_vocab_size(), questions[::3]).eval()
    write_task(tmp_path / "written", CORPUS, tokenizer)
    # The task folder travels: moved after writing, read from elsewhere.
    tasks = (tmp_path / "written").rename(tmp_path / "moved")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    results = run_lm_eval(model, tokenizer, [TASK_NAME], include_path=str(tasks))
    recall = fact_recall(model, tokenizer, questions)["accuracy"]
    assert recall == pytest.approx(1 / 3)
    assert results[TASK_NAME]["sample_len"] == len(questions)
    assert results[TASK_NAME]["exact_match,strip"] == pytest.approx(recall)


def test_the_task_command_writes_the_yaml_and_the_questions(tmp_path: Path):
    from recipes.lm_eval_task import main as write_task_main

    write_task_main(["--out", str(tmp_path), "--knowledge.num-people", "8", "--split", "trained"])
    yaml = (tmp_path / "memcompile_knowledge.yaml").read_text()
    assert "output_type: generate_until" in yaml and str(tmp_path) not in yaml  # relocatable
    lines = (tmp_path / "memcompile_knowledge.jsonl").read_text().splitlines()
    trained = list(KnowledgeCorpus(num_people=8).train_qa_pairs())
    assert [json.loads(line)["question"] for line in lines] == [qa.question for qa in trained]


def test_cli_runs_the_knowledge_task_through_lm_eval(seed_checkpoint: Path, tmp_path: Path):
    pytest.importorskip("lm_eval", reason="the lm-eval adapter needs lm_eval")
    output = tmp_path / "eval.json"
    main(
        [
            "--checkpoint",
            str(seed_checkpoint),
            "--model",
            "mem_debug",
            "--knowledge.num-people",
            "8",
            "--lm-eval-tasks",
            "memcompile_knowledge",
            "--output",
            str(output),
        ]  # fmt: skip
    )
    results = json.loads(output.read_text())
    lm_eval_score = results["lm_eval"]["memcompile_knowledge"]["exact_match,strip"]
    assert lm_eval_score == results["recall_heldout_questions"]["accuracy"]
