"""The built-in knowledge corpus, the token cache and the packed-window dataset (in process)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchtitan", reason="the recipes need the 'recipes' extra")

from torchtitan.components.tokenizer import HuggingFaceTokenizer  # noqa: E402

from recipes.data.knowledge import ATTRIBUTES, KnowledgeCorpus  # noqa: E402
from recipes.data.loader import (  # noqa: E402
    PackedWindows,
    cache_key,
    check_dataset_location,
    knowledge_source,
    load_token_stream,
)
from recipes.data.tokenizer import BUILTIN_TOKENIZER_DIR  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer() -> HuggingFaceTokenizer:
    return HuggingFaceTokenizer(tokenizer_path=str(BUILTIN_TOKENIZER_DIR))


def test_corpus_is_deterministic_and_seed_dependent():
    a, b = KnowledgeCorpus(num_people=37, seed=3), KnowledgeCorpus(num_people=37, seed=3)
    assert list(a.train_documents()) == list(b.train_documents())
    assert a.people != KnowledgeCorpus(num_people=37, seed=4).people
    assert len({p.name for p in a.people}) == 37


def test_qa_pairs_match_biographies_and_split_people():
    corpus = KnowledgeCorpus(
        num_people=21, seed=1, biographies_per_person=2, qa_train_fraction=1 / 3
    )
    documents = list(corpus.train_documents())
    train_qa, eval_qa = list(corpus.train_qa_pairs()), list(corpus.eval_qa_pairs())
    assert len(train_qa) == 7 * len(ATTRIBUTES) and len(eval_qa) == 14 * len(ATTRIBUTES)
    assert sorted(d for d in documents if d.startswith("Question: ")) == sorted(
        qa.text for qa in train_qa
    )
    biographies = [d for d in documents if not d.startswith("Question: ")]
    assert len(biographies) == 21 * 2
    assert {qa.person for qa in train_qa}.isdisjoint({qa.person for qa in eval_qa})
    for qa in train_qa + eval_qa:
        person_bios = [b for b in biographies if b.startswith(qa.person) or f" {qa.person}" in b]
        assert len(person_bios) == 2 and all(qa.answer in bio for bio in person_bios)
    # Evaluation questions never appear in training text; training questions do.
    assert all(qa.text not in documents for qa in eval_qa)
    assert all(qa.text in documents for qa in train_qa)
    heldout = list(corpus.heldout_documents())
    assert len(heldout) == 21 and not set(heldout) & set(documents)


@pytest.mark.parametrize(
    "bad", [dict(num_people=0), dict(biographies_per_person=5), dict(qa_train_fraction=1.5)]
)
def test_corpus_rejects_bad_config(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        KnowledgeCorpus(**bad)


def test_token_cache_tokenises_once(tmp_path: Path, tokenizer):
    corpus = KnowledgeCorpus(num_people=5, seed=0)
    calls = []

    def documents():
        calls.append(1)
        return corpus.train_documents()

    source = {"dataset": "test", "num_people": 5}
    first = load_token_stream(source, documents, tokenizer, str(tmp_path))
    second = load_token_stream(source, documents, tokenizer, str(tmp_path))
    assert len(calls) == 1
    assert torch.equal(first, second) and first.dtype == torch.int32
    expected = [
        t for d in corpus.train_documents() for t in tokenizer.encode(d, add_bos=True, add_eos=True)
    ]
    assert first.tolist() == expected
    (entry,) = [p for p in tmp_path.iterdir()]
    assert entry.name == cache_key(source, tokenizer)
    assert json.loads((entry / "meta.json").read_text())["num_tokens"] == len(expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_new_people_continue_the_sequence_of_a_smaller_corpus():
    base, everyone = KnowledgeCorpus(num_people=30), KnowledgeCorpus(num_people=40)
    new = KnowledgeCorpus(num_people=10, first_person=30)
    assert everyone.people == base.people + new.people
    assert not {p.name for p in base.people} & {p.name for p in new.people}
    assert list(new.heldout_documents()) == list(everyone.heldout_documents())[30:]
    with pytest.raises(ValueError, match="first_person must be >= 0"):
        KnowledgeCorpus(first_person=-1)


def test_every_corpus_parameter_is_part_of_the_cache_key(tokenizer):
    corpus = KnowledgeCorpus(num_people=5)
    key = cache_key(knowledge_source(corpus), tokenizer)
    assert cache_key(knowledge_source(KnowledgeCorpus(num_people=5)), tokenizer) == key
    changes = [
        dict(num_people=6),
        dict(seed=1),
        dict(biographies_per_person=3),
        dict(qa_train_fraction=0.25),
        dict(first_person=2),
    ]
    assert {name for change in changes for name in change} == set(asdict(corpus))
    for change in changes:
        assert cache_key(knowledge_source(replace(corpus, **change)), tokenizer) != key


def test_packed_windows_split_ranks_and_resume_exactly():
    tokens = torch.arange(1 + 7 * 10, dtype=torch.int32)  # 10 windows of 7 tokens
    ranks = [PackedWindows(tokens, seq_len=7, seed=1, dp_rank=r, dp_world_size=2) for r in range(2)]
    epoch = [[int(x["input"][0]) // 7 for x, _ in _take(r, 5)] for r in ranks]
    assert sorted(epoch[0] + epoch[1]) == list(range(10))  # disjoint and complete

    full = PackedWindows(tokens, seq_len=7, seed=1, dp_rank=0, dp_world_size=1)
    samples = _take(full, 13)  # crosses an epoch boundary
    for x, y in samples:
        assert torch.equal(x["input"][1:], y[:-1])
    resumed = PackedWindows(tokens, seq_len=7, seed=1, dp_rank=0, dp_world_size=1)
    replay = PackedWindows(tokens, seq_len=7, seed=1, dp_rank=0, dp_world_size=1)
    _take(replay, 6)
    resumed.load_state_dict(replay.state_dict())
    assert all(
        torch.equal(a[0]["input"], b[0]["input"]) for a, b in zip(_take(resumed, 7), samples[6:])
    )


def test_packed_windows_shift_their_grid_each_epoch():
    tokens = torch.arange(1 + 7 * 10, dtype=torch.int32)
    dataset = PackedWindows(tokens, seq_len=7, seed=3, dp_rank=0, dp_world_size=1)
    offsets = []
    for _ in range(4):
        starts = sorted(dataset._epoch_windows().tolist())
        offset = starts[0] % 7
        assert starts == list(range(offset, offset + 7 * len(starts), 7))  # one grid, no overlap
        assert len(starts) == (70 - offset) // 7  # every whole window of the shifted grid
        offsets.append(offset)
        dataset.epoch += 1
    assert offsets[0] == 0 and len(set(offsets)) > 1


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_ranks_read_the_windows_of_one_process_in_its_order(epoch):
    tokens = torch.arange(1 + 7 * 11, dtype=torch.int32)  # 11 windows: odd, for 2 ranks
    one = PackedWindows(tokens, seq_len=7, seed=5, dp_rank=0, dp_world_size=1)
    two = [PackedWindows(tokens, seq_len=7, seed=5, dp_rank=r, dp_world_size=2) for r in (0, 1)]
    for dataset in (one, *two):
        dataset.epoch = epoch
    single = one._epoch_windows().tolist()
    interleaved = [int(start) for pair in zip(*(r._epoch_windows() for r in two)) for start in pair]
    assert interleaved == single[: len(interleaved)] and len(single) - len(interleaved) <= 1


def _take(dataset: PackedWindows, n: int):
    iterator = iter(dataset)
    return [next(iterator) for _ in range(n)]


def test_missing_dataset_path_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_dataset_location(str(tmp_path / "missing.jsonl"), None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_dataset_location("allenai/c4", str(tmp_path / "nowhere"))
    bad = tmp_path / "data.xyz"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unsupported extension"):
        check_dataset_location(str(bad), None)
    check_dataset_location("knowledge", None)
    check_dataset_location("allenai/c4", None)  # a hub id: checked when loaded


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_local_hf_dataset_file_is_tokenised(tmp_path: Path, tokenizer, suffix):
    from recipes.data.loader import CorpusDataLoader

    texts = ["first document", "second one, longer than the first", "third"]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    else:
        path.write_text("\n".join(texts) + "\n")
    config = CorpusDataLoader.Config(
        dataset=str(path),
        text_column="body" if suffix == ".jsonl" else "text",
        max_documents=2,
        cache_dir=str(tmp_path / "cache"),
    )
    tokens = load_token_stream(config.source(), config.documents, tokenizer, config.cache_dir)
    expected = [t for text in texts[:2] for t in tokenizer.encode(text, add_bos=True, add_eos=True)]
    assert tokens.tolist() == expected

    with pytest.raises(ValueError, match="no column 'missing'"):
        list(CorpusDataLoader.Config(dataset=str(path), text_column="missing").documents())
