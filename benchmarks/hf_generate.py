"""Hugging Face ``generate()`` against ``memcompile.generate``: the same model, the same greedy
tokens, and what transformers' generation loop and cache cost on top.

    python -m benchmarks.hf_generate                        # mem_debug, seeded init, CPU
    python -m benchmarks.hf_generate --folder exported/mem_debug --new-tokens 64 512 --out hf.json

The model is a folder (``recipes.export`` / ``save_pretrained``) loaded with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``, or, without
``--folder``, ``--flavor`` initialised with ``--seed`` and saved to a temporary folder first.
Both engines run the very same ``Transformer`` (``memcompile.generate`` runs ``hf.model``), so
the difference is the generation loop and the cache: ``memcompile`` (its ``KVCache``, written in
place), ``hf`` (``generate()`` with transformers' default ``DynamicCache``, grown by
concatenation) and ``hf_static`` (``cache_implementation="static"``). Each timing is the median
of ``--repeats`` runs after a first untimed one (whose tokens are compared) and ``--warmup``
more, the engines interleaved so that a noisy neighbour slows all of them alike; each run is
timed by the wall clock and by the process's CPU time (``time.process_time``, all threads): on
a shared CPU, where waiting for a core can double the wall time, the CPU time is the work.
Greedy decoding, ``min_new_tokens`` forcing every token out.

A length past the model's ``max_seq_len`` (mem_debug's is 256; 512 new tokens need more) is run
on a copy of the model with longer RoPE tables (the weights are the same; positions past the
training length make the text meaningless, not the timing), and the row says so.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import tyro

from benchmarks.common import (
    Target,
    config_as_json,
    environment,
    evaluate_targets,
    format_table,
    print_verdicts,
    resolve_device,
    synchronize,
    write_json,
)
from memcompile.cli import check_at_least, check_each_at_least, check_seed, reported_errors
from memcompile.flavors import get_flavor
from memcompile.generate import generate
from memcompile.model import Transformer
from memcompile.pretrained import save_pretrained

ENGINES = ("memcompile", "hf", "hf_static")


@dataclass
class HFGenerateBenchmark:
    """Time greedy generation: memcompile.generate vs transformers' generate() (dynamic and
    static cache) on one model."""

    folder: Path | None = None
    """A model folder (recipes.export); default: --flavor initialised with --seed"""

    flavor: str = "mem_debug"
    seed: int = 0

    prompt_len: int = 16
    new_tokens: tuple[int, ...] = (64, 512)
    batch_size: int = 1

    warmup: int = 0
    repeats: int = 3
    device: str = "cpu"
    """cpu, cuda, or auto"""

    out: Path | None = None
    """Write the results as JSON here"""


def _validate(config: HFGenerateBenchmark) -> None:
    check_at_least("--prompt-len", config.prompt_len, 1)
    check_each_at_least("--new-tokens", config.new_tokens, 1)
    check_at_least("--batch-size", config.batch_size, 1)
    check_at_least("--warmup", config.warmup, 0)
    check_at_least("--repeats", config.repeats, 1)
    check_seed("--seed", config.seed)


def load_hf_model(folder: Path, device: torch.device) -> torch.nn.Module:
    """``AutoModelForCausalLM`` of a model folder, as its users load it."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    return hf.to(device).eval()


def _with_room_for(hf: torch.nn.Module, length: int) -> bool:
    """Make ``hf.model``'s RoPE tables reach ``length`` positions (same weights); True if it had
    to be extended."""
    model = hf.model
    if length <= model.config.max_seq_len:
        return False
    longer = Transformer(replace(model.config, max_seq_len=length))
    longer.load_state_dict(model.state_dict())
    hf.model = longer.to(model.output.weight.device).eval()
    hf.config.max_position_embeddings = length
    return True


def hf_generate_speed(
    hf: torch.nn.Module,
    prompt: torch.Tensor,
    new_tokens: int,
    *,
    warmup: int = 0,
    repeats: int = 3,
    engines: Sequence[str] = ENGINES,
) -> dict[str, Any]:
    """Median wall-clock and CPU ms of greedy generation of ``new_tokens`` after ``prompt [B,
    S]`` by each engine on ``hf`` (a ``MemcompileForCausalLM``), their tokens/s, each HF
    engine's times over memcompile's, and whether every engine's tokens equal memcompile's.

    ``hf.model`` is extended in place (longer RoPE tables, same weights) when the prompt and
    the new tokens do not fit its ``max_seq_len``."""
    extended = _with_room_for(hf, prompt.shape[1] + new_tokens)
    device = prompt.device
    runs = {
        "memcompile": lambda: generate(hf.model, prompt, new_tokens),
        "hf": lambda: _hf_new_tokens(hf, prompt, new_tokens, None),
        "hf_static": lambda: _hf_new_tokens(hf, prompt, new_tokens, "static"),
    }
    row: dict[str, Any] = {
        "batch": prompt.shape[0],
        "prompt_len": prompt.shape[1],
        "new_tokens": new_tokens,
        "rope_extended": extended,
    }
    with torch.no_grad():
        tokens = {engine: runs[engine]() for engine in engines}  # untimed, as are the warmups
        for engine in engines:
            row[f"{engine}_same_tokens"] = torch.equal(tokens[engine], tokens[engines[0]])
        for _ in range(warmup):
            for engine in engines:
                runs[engine]()
        wall: dict[str, list[float]] = {engine: [] for engine in engines}
        cpu: dict[str, list[float]] = {engine: [] for engine in engines}
        for _ in range(repeats):  # interleaved: a slow moment hits every engine
            for engine in engines:
                wall_ms, cpu_ms = _timed_ms(runs[engine], device)
                wall[engine].append(wall_ms)
                cpu[engine].append(cpu_ms)
    for engine in engines:
        row[f"{engine}_ms"] = statistics.median(wall[engine])
        row[f"{engine}_cpu_ms"] = statistics.median(cpu[engine])
        row[f"{engine}_tokens_per_s"] = prompt.shape[0] * new_tokens / (row[f"{engine}_ms"] / 1e3)
        if engine != "memcompile" and "memcompile" in engines:
            row[f"{engine}_over_memcompile"] = row[f"{engine}_ms"] / row["memcompile_ms"]
            row[f"{engine}_over_memcompile_cpu"] = (
                row[f"{engine}_cpu_ms"] / row["memcompile_cpu_ms"]
            )
    return row


def _timed_ms(run: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU milliseconds of ``run()`` (synchronised on CUDA)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    synchronize(device)
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def _hf_new_tokens(
    hf: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, cache_implementation: str | None
) -> torch.Tensor:
    out = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        cache_implementation=cache_implementation,
        pad_token_id=0,
    )
    return out[:, prompt.shape[1] :]


TARGETS = [
    Target(
        f"issue 25: HF generate() within 1.2x memcompile.generate at 512 new tokens ({clock})",
        device_type,
        metric,
        1.2,
        lambda row: row["new_tokens"] == 512,
        at_most=True,
    )
    for device_type in ("cpu", "cuda")
    for clock, metric in (
        ("wall clock", "hf_over_memcompile"),
        ("CPU time", "hf_over_memcompile_cpu"),
    )
]

_COLUMNS = [
    ("batch", "B", "d"),
    ("prompt_len", "prompt", "d"),
    ("new_tokens", "new", "d"),
    ("memcompile_ms", "memcompile ms", ".0f"),
    ("hf_ms", "HF ms", ".0f"),
    ("hf_static_ms", "HF static ms", ".0f"),
    ("memcompile_tokens_per_s", "memcompile tok/s", ".0f"),
    ("hf_tokens_per_s", "HF tok/s", ".0f"),
    ("hf_static_tokens_per_s", "HF static tok/s", ".0f"),
    ("hf_over_memcompile", "HF / mc", ".2f"),
    ("hf_static_over_memcompile", "static / mc", ".2f"),
    ("hf_over_memcompile_cpu", "HF / mc CPU", ".2f"),
    ("hf_static_over_memcompile_cpu", "static / mc CPU", ".2f"),
    ("hf_same_tokens", "same tokens", ""),
    ("hf_static_same_tokens", "static same", ""),
    ("rope_extended", "RoPE extended", ""),
]


def run(config: HFGenerateBenchmark, argv: Sequence[str]) -> dict[str, Any]:
    _validate(config)
    device = resolve_device(config.device)
    env = environment(device, "benchmarks.hf_generate", argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = config.folder
        if folder is None:
            torch.manual_seed(config.seed)
            folder = Path(scratch) / config.flavor
            save_pretrained(Transformer(get_flavor(config.flavor)), folder)
        hf = load_hf_model(folder, device)
    vocab = hf.config.vocab_size
    prompt = torch.randint(
        1, vocab, (config.batch_size, config.prompt_len), generator=torch.Generator().manual_seed(1)
    ).to(device)
    rows = []
    for new_tokens in config.new_tokens:
        rows.append(
            hf_generate_speed(hf, prompt, new_tokens, warmup=config.warmup, repeats=config.repeats)
        )
        print(format_table(rows[-1:], _COLUMNS), file=sys.stderr)
    print(format_table(rows, _COLUMNS))
    verdicts = evaluate_targets(TARGETS, rows, device, ["batch", "new_tokens"])
    print_verdicts(verdicts)
    payload = {
        "benchmark": "hf_generate",
        "environment": env,
        "config": config_as_json(config),
        "model": config.flavor if config.folder is None else str(config.folder),
        "results": rows,
        "targets": verdicts,
    }
    if config.out is not None:
        write_json(config.out, payload)
    return payload


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(tyro.cli(HFGenerateBenchmark, args=argv), argv)


if __name__ == "__main__":
    with reported_errors():
        main()
