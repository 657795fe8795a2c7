"""README's user example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_user_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    example = next(block for block in blocks if "torch.ops.memlayer.lookup" in block)
    exec(compile(example, str(README), "exec"), {"__name__": "readme_example"})


def test_readme_row_sparse_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    example = next(block for block in blocks if "RowSparseOptimizer" in block)
    scope = {"__name__": "readme_example"}
    exec(compile(example, str(README), "exec"), scope)
    model, optimizer = scope["model"], scope["values_optimizer"]
    assert not model.memory_values.requires_grad
    assert optimizer.state[model.memory_values]["sum"].count_nonzero() > 0  # rows were updated
