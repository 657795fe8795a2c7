"""The capacity table of ``benchmarks/RESULTS.md``: ``recipes.plan`` runs, kept as JSON.

    python -m benchmarks.capacity run mem_1b_64m rowwise_adagrad 16 32 64   # until one fits
    python -m benchmarks.capacity run mem_1b adamw 1 2 --degree 1           # plain FSDP
    python -m benchmarks.capacity run mem_8b_16m adamw 32 64 --micro-batch 4 # 2 accumulations
    python -m benchmarks.capacity table                                      # the markdown

``run`` plans the flavor (``python -m recipes.plan``, H100-80GB, ``--training.seq_len 2048``,
the flavor's own vocabulary, 8 sequences per rank and step, in micro-batches of
``--micro-batch``) on each world size in turn and stops at the first that fits; the
memory-parallel degree is ``--degree`` or, as ``recipes.plan --search`` takes it, the widest
that divides the world and the value dim. Every plan, fitting or not, is kept in
``benchmarks/results/capacity/`` (a plan already there is not run again). ``table`` prints,
from those files alone, the minimum count per flavor, table optimizer and micro-batch with the
worlds that did not fit, and one breakdown row per plan.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from memcompile.cli import UsageError, reported_errors
from memcompile.flavors import FLAVORS, get_flavor
from memcompile.stats import model_stats
from recipes.plan import RankPlan, format_table
from recipes.plan import main as plan_main

RESULTS = Path(__file__).resolve().parent / "results" / "capacity"
GPU = "h100"
SEQ_LEN = 2048
#: Sequences per rank and step (16,384 tokens); ``--micro-batch`` splits them into
#: gradient-accumulation steps.
LOCAL_BATCH = 8


def plan_path(model: str, world: int, degree: int, rule: str, micro_batch: int) -> Path:
    batch = "" if micro_batch == LOCAL_BATCH else f"-micro{micro_batch}"
    return RESULTS / f"{model}-{world}x{GPU}-G{degree}-{rule}{batch}.json"


def run(
    model: str,
    rule: str,
    worlds: list[int],
    degree: int | None = None,
    micro_batch: int = LOCAL_BATCH,
) -> None:
    """Plan ``model`` with table optimizer ``rule`` on each of ``worlds`` until one fits;
    ``micro_batch`` sequences per forward (the rest of the rank's 8 by accumulation)."""
    value_dim = FLAVORS[model].memory.value_dim
    RESULTS.mkdir(parents=True, exist_ok=True)
    for world in worlds:
        g = degree or math.gcd(world, value_dim)
        path = plan_path(model, world, g, rule, micro_batch)
        if not path.exists():
            argv = [
                "--model", model, "--ngpu", str(world), "--gpu", GPU,
                "--training.seq_len", str(SEQ_LEN),
                "--parallelism.memory_parallel_degree", str(g),
                "--optimizer.memory_optimizer", rule, "--json", str(path),
                "--training.local_batch_size", str(micro_batch),
                "--training.global_batch_size", str(LOCAL_BATCH * world),
            ]  # fmt: skip
            if plan_main(argv) != 0:
                raise SystemExit(f"recipes.plan failed for {path.name}")
        if load(path).fits:
            return


def load(path: Path) -> RankPlan:
    (plan,) = json.loads(path.read_text())
    return RankPlan(**plan)


def table() -> str:
    """The minimum-count table, then the breakdown rows per micro-batch, from the JSON files."""
    plans = sorted((load(path) for path in RESULTS.glob("*.json")), key=_order)
    rows = [
        "| flavor | vocabulary | params | table optimizer | micro-batch | minimum H100-80GB "
        "| did not fit |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str, int], list[RankPlan]] = {}
    for p in plans:
        groups.setdefault(_group(p), []).append(p)
    for (model, rule, micro_batch), group in groups.items():
        fitting = [p for p in group if p.fits]
        best = min(fitting, key=lambda p: p.setting["world_size"]) if fitting else None
        found = (
            f"{best.setting['world_size']} (G = {best.setting['memory_parallel_degree']}; "
            f"{best.peak_bytes / 2**30:.1f} GiB)"
            if best
            else "none tried fits"
        )
        misses = ", ".join(
            f"{p.setting['world_size']} (G = {p.setting['memory_parallel_degree']}; "
            f"{p.peak_bytes / 2**30:.1f} GiB)"
            for p in group
            if not p.fits
        )
        vocab = group[0].setting["vocab_size"]
        stats = model_stats(get_flavor(model, vocab_size=vocab))
        params = (stats.dense_params + stats.memory_params) / 1e9
        rows.append(
            f"| {model} | {vocab:,} | {params:.2f}B | {rule} | {micro_batch} x {SEQ_LEN} "
            f"| {found} | {misses or '-'} |"
        )
    sections = ["\n".join(rows)]
    for micro_batch in sorted({p.setting["local_batch_size"] for p in plans}, reverse=True):
        steps = LOCAL_BATCH // micro_batch
        sections.append(f"Micro-batch {micro_batch} x {SEQ_LEN} ({steps} per step):")
        sections.append(format_table([p for p in plans if _group(p)[2] == micro_batch]))
    return "\n\n".join(sections)


def _group(p: RankPlan) -> tuple[str, str, int]:
    s = p.setting
    return s["model"], s["memory_optimizer"], s["local_batch_size"]


def _order(p: RankPlan) -> tuple:
    """Flavors as listed, then table optimizer, larger micro-batch first, world, degree."""
    s = p.setting
    return (
        list(FLAVORS).index(s["model"]), s["memory_optimizer"], -s["local_batch_size"],
        s["world_size"], s["memory_parallel_degree"],
    )  # fmt: skip


def _integer(flag: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{flag} must be an integer, got {value!r}") from None


def main(argv: list[str]) -> int:
    if argv[:1] == ["table"]:
        print(table())
        return 0
    if argv[:1] != ["run"] or len(argv) < 4:
        print(__doc__)
        return 2
    with reported_errors():
        options: dict[str, int | None] = {"--degree": None, "--micro-batch": LOCAL_BATCH}
        for flag in options:
            if flag in argv:
                at = argv.index(flag)
                options[flag] = _integer(flag, argv[at + 1] if at + 1 < len(argv) else "")
                argv = argv[:at] + argv[at + 2 :]
        model, rule = argv[1], argv[2]
        if model not in FLAVORS or FLAVORS[model].memory is None:
            memory_flavors = ", ".join(name for name, c in FLAVORS.items() if c.memory)
            raise UsageError(f"FLAVOR must be a memory flavor ({memory_flavors}), got {model!r}")
        worlds = [_integer("N", w) for w in argv[3:]]
    run(model, rule, worlds, options["--degree"], options["--micro-batch"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
