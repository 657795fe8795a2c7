"""``recipes.generate``: streamed answers (with a byte tokenizer and a model that knows them),
and the command on a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from recipes.data.knowledge import QAPair
from tests.recipes.knowledge_doubles import ByteTokenizer, OracleModel

pytest.importorskip("torchtitan", reason="the recipes need the 'recipes' extra")

from recipes.generate import GenerateConfig, main, run, stream_text  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# "Zürich" has a two-byte character: one byte token decodes to nothing printable on its own.
QA = QAPair(
    person="Zoë Ant", attribute="birth_city", question="Where was Zoë Ant born?", answer="Zürich"
)


def test_streamed_pieces_are_the_answer_and_never_half_a_character():
    tokenizer = ByteTokenizer()
    model = OracleModel(tokenizer, tokenizer.vocab_size, [QA]).eval()
    pieces = list(stream_text(model, tokenizer, QA.prompt, max_new_tokens=32))
    assert "".join(pieces) == " Zürich"
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) == len(" Zürich")  # one piece per character: the split byte waited


def test_stream_stops_at_max_new_tokens_and_rejects_a_prompt_that_does_not_fit():
    tokenizer = ByteTokenizer()
    model = OracleModel(tokenizer, tokenizer.vocab_size, [QA]).eval()
    assert "".join(stream_text(model, tokenizer, QA.prompt, max_new_tokens=3)) == " Z"
    with pytest.raises(ValueError, match="the prompt has 601 tokens; the model reads at most 512"):
        next(stream_text(model, tokenizer, "x" * 600))


def test_command_asks_a_checkpoint_and_prints_the_stream(seed_checkpoint: Path, capsys):
    answer = run(
        GenerateConfig(
            checkpoint=seed_checkpoint, model="mem_debug", question=QA.question, max_new_tokens=5
        )
    )
    printed = capsys.readouterr().out
    assert printed == f"Question: {QA.question}\nAnswer:{answer}\n"
    assert answer  # an untrained model says something: 5 tokens unless one of them ends the text


@pytest.mark.parametrize("args", [[], ["--question", "Who?", "--prompt", "Hi"]])
def test_command_needs_exactly_one_of_question_and_prompt(seed_checkpoint: Path, args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(seed_checkpoint), *args])
    assert exit_info.value.code == 2  # a usage error
    assert capsys.readouterr().err == "error: pass exactly one of --question and --prompt\n"
