"""README's user example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_user_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    example = next(block for block in blocks if "torch.ops.memlayer.lookup" in block)
    exec(compile(example, str(README), "exec"), {"__name__": "readme_example"})
