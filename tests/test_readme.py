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
    model, optimizer, dense = scope["model"], scope["values_optimizer"], scope["optimizer"]
    assert all(p is not model.memory_values for g in dense.param_groups for p in g["params"])
    assert optimizer.state[model.memory_values]["sum"].count_nonzero() > 0  # rows were updated
    assert model.memory_values.grad is None  # zero_grad cleared what the lookups recorded
