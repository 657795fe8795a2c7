"""The knowledge corpus's questions as an lm-evaluation-harness task: ``memcompile_knowledge``.

    python -m recipes.lm_eval_task --out tasks/            # held-out questions, default corpus
    lm_eval --model hf --include_path tasks/ --tasks memcompile_knowledge \\
        --model_args pretrained=exported/mem_debug,trust_remote_code=True,add_bos_token=True
    python -m recipes.evaluate --checkpoint ... --lm-eval-tasks memcompile_knowledge

Writes ``memcompile_knowledge.jsonl`` (one Q/A pair per line), ``.yaml`` and
``memcompile_task.py`` (which reads the questions next to itself: the folder can move): greedy
generation from ``Question: ...\\nAnswer:`` up to the end-of-text token, at most the longest
answer's tokens + 3 (as :func:`recipes.knowledge_eval.fact_recall`), leading whitespace
stripped, exact match. Its score is ``fact_recall``'s accuracy on the same questions.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from memcompile.cli import UsageError, reported_errors
from recipes.data.knowledge import KnowledgeCorpus, question_prompt
from recipes.data.tokenizer import BUILTIN_TOKENIZER_DIR
from recipes.knowledge_eval import TextTokenizer

TASK_NAME = "memcompile_knowledge"

#: The module next to the YAML that reads the questions (lm-eval's ``custom_dataset``).
LOADER_NAME = "memcompile_task"
# Relative to the module, so that the folder can move: lm-eval's own ``data_files`` are read
# relative to the current directory, not the YAML.
_LOADER = '''"""The questions of the memcompile tasks in this folder, for lm-eval (each YAML's
custom_dataset). Read next to this file, so the folder can move. Written by recipes.lm_eval_task."""

from pathlib import Path

import datasets


def questions(data_file: str, **metadata):
    path = Path(__file__).parent / data_file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the task's questions are missing (rewrite the task:"
                                f" python -m recipes.lm_eval_task)")
    return datasets.load_dataset("json", data_files={"test": str(path)})
'''

_TASK_YAML = """\
task: {task}
custom_dataset: !function {loader}.questions
dataset_kwargs:
  data_file: {data}
test_split: test
output_type: generate_until
doc_to_text: "{prompt}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: []
  do_sample: false
  max_gen_toks: {max_gen_toks}
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(
    folder: str | Path,
    corpus: KnowledgeCorpus,
    tokenizer: TextTokenizer,
    *,
    split: Literal["heldout", "trained"] = "heldout",
    task: str = TASK_NAME,
) -> Path:
    """Write the task for ``corpus``'s held-out (or trained) questions into ``folder``; returns
    the YAML file (pass ``folder`` as lm-eval's ``--include_path``)."""
    qa_pairs = list(corpus.eval_qa_pairs() if split == "heldout" else corpus.train_qa_pairs())
    if not qa_pairs:
        raise UsageError(f"the corpus has no {split} questions (see --knowledge.qa-train-fraction)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{task}.jsonl"
    with open(data, "w") as f:
        for qa in qa_pairs:
            record = {"question": qa.question, "answer": qa.answer, "attribute": qa.attribute}
            f.write(json.dumps(record) + "\n")
    longest = max(
        len(tokenizer.encode(" " + qa.answer, add_bos=False, add_eos=True)) for qa in qa_pairs
    )
    prompt = json.dumps(question_prompt("{{question}}"))[1:-1]  # escaped for a YAML string
    (folder / f"{LOADER_NAME}.py").write_text(_LOADER)
    yaml = folder / f"{task}.yaml"
    yaml.write_text(
        _TASK_YAML.format(
            task=task, loader=LOADER_NAME, data=data.name, prompt=prompt, max_gen_toks=longest + 3
        )
    )
    return yaml


@dataclass
class TaskConfig:
    """Write the memcompile_knowledge lm-eval task (questions of the built-in corpus)."""

    out: Path
    """Folder to write into (lm-eval's --include_path)"""

    knowledge: KnowledgeCorpus = field(default_factory=KnowledgeCorpus)
    """The corpus of the pretraining (its --dataloader.knowledge.* flags)"""

    split: Literal["heldout", "trained"] = "heldout"
    hf_assets_path: Path = BUILTIN_TOKENIZER_DIR
    """The tokenizer of the model to evaluate (sets the generation length)"""


def main(argv: list[str] | None = None) -> None:
    import tyro
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    args = sys.argv[1:] if argv is None else argv
    config = tyro.cli(TaskConfig, args=args, description=__doc__)
    with reported_errors(ValueError, FileNotFoundError):
        tokenizer = HuggingFaceTokenizer(tokenizer_path=str(config.hf_assets_path))
        yaml = write_task(config.out, config.knowledge, tokenizer, split=config.split)
    print(f"wrote {yaml}  (lm_eval ... --include_path {config.out} --tasks {TASK_NAME})")


if __name__ == "__main__":
    main()
