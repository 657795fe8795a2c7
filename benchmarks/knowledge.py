"""The knowledge benchmark: do memory layers store more facts per FLOP than a dense model?

    python -m benchmarks.knowledge            # 5 models x 3 seeds, CPU: ~20 min per seed per core
    python -m benchmarks.knowledge --seeds 0 --models dense memory   # one seed, two models
    python -m benchmarks.knowledge --seeds 0 --num-people 100 --steps 20   # a smoke run

For each seed (``--seeds``; a seed draws the corpus's people, the initialisation and the data
order), trains the dense model and its four memory twins on the same synthetic knowledge corpus
(``recipes.data.knowledge``), with the same data order, steps and optimiser:

* ``dense``: a small Llama-style model;
* ``memory``: its middle block's feed-forward replaced by a plain product-key memory;
* ``memory+``: the feed-forwards of ``memory_plus_layers`` blocks replaced by Memory+ layers,
  all reading one shared value table (the paper's configuration, scaled down);
* ``engram``: Engram (hashed 2- and 3-grams, 4 hash heads each) at the start of block 1 and the
  middle block, 16 tables of ``n_keys² / 2`` rows of width dim / 8: the memory twins' table
  parameters (as ``memcompile.flavors``' ``engram_*``);
* ``peer``: PEER on the ``n_keys²`` product-key grid (``memory_heads`` x ``memory_topk``
  single-neuron experts per token) in place of the Memory+ blocks' feed-forwards (as
  ``peer_*``; its table holds the down and up vectors: twice the values).

The Memory, Memory+ and PEER twins do at most the dense model's FLOPs per token (their
feed-forward replacements are cheaper than the SwiGLU they replace); Engram keeps every
feed-forward and adds its gate's projections, a few percent more (the exact ratios are in the
results). At fixed points
of training and at the end, each model is evaluated with :mod:`recipes.knowledge_eval`: fact recall
(greedy, exact match) on the questions whose Q/A pairs training never showed (knowledge
extracted from biographies) and on the trained ones, answer NLL on the held-out questions, and
held-out biography perplexity. The summary gives each metric's mean and spread (sample standard
deviation, min-max) over the seeds, and each memory twin's recall as a multiple of the dense
model's on the same seed. Writes ``knowledge.json`` (rewritten after every seed), ``knowledge.md``
and ``knowledge.png`` (accuracy vs training tokens, mean over seeds; needs matplotlib) under
``--output-dir``.

A plain PyTorch loop (not ``recipes.pretrain``) keeps a CPU run free of process groups and
checkpoints; it reuses the recipe's corpus, tokenizer and memory-mapped token cache, and the
recipe's optimiser split (the value table in its own AdamW group, larger learning rate, no
weight decay, clipped separately), or ``--table-optimizer`` to train the table row-sparsely.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import tyro

from memcompile.cli import (
    UsageError,
    check_at_least,
    check_each_at_least,
    check_finite,
    reported_errors,
)
from memcompile.config import (
    EngramConfig,
    MemoryConfig,
    MemoryKind,
    PEERConfig,
    TransformerConfig,
    llama_ffn_hidden_dim,
)
from memcompile.model import Transformer
from memcompile.optim import torch_param_groups
from memcompile.sparse_optim import RowSparseOptimizer
from memcompile.stats import model_stats
from recipes.checkpoints import load_tokenizer
from recipes.data.knowledge import KnowledgeCorpus
from recipes.data.loader import (
    PackedWindows,
    default_cache_dir,
    knowledge_source,
    load_token_stream,
)
from recipes.knowledge_eval import evaluate_knowledge

MODEL_NAMES = ("dense", "memory", "memory+", "engram", "peer")
ModelName = Literal["dense", "memory", "memory+", "engram", "peer"]


@dataclass
class KnowledgeBenchmarkConfig:
    """Train dense, Memory and Memory+ twins on the knowledge corpus and compare fact recall."""

    num_people: int = 300
    """People in the corpus (6 facts each); large enough that the dense model cannot learn all"""

    dim: int = 64
    n_layers: int = 4
    n_heads: int = 4

    n_keys: int = 128
    """Sub-keys per half: the shared value table has n_keys² rows of dim values"""

    memory_heads: int = 2
    memory_topk: int = 16

    memory_plus_layers: tuple[int, ...] = (1, 3)
    """Blocks whose feed-forward Memory+ replaces (the plain Memory twin uses the middle one)"""

    steps: int = 500
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 1e-2
    """Peak learning rate (the default pretraining's). 1e-2 recalls several times more than
    3e-3 for all three twins in 500 steps (benchmarks/RESULTS.md, 2026-11-30)"""
    weight_decay: float = 0.1

    memory_lr_multiplier: float = 10.0
    """Learning rate of the value table as a multiple of lr (as recipes.pretrain)"""

    table_optimizer: Literal["adamw", "sgd", "rowwise_adagrad", "adam"] = "adamw"
    """Optimizer of the memory twins' value table: adamw (dense, in the AdamW groups) or a
    row-sparse rule of memcompile.sparse_optim.RowSparseOptimizer (as recipes.pretrain's
    --optimizer.memory_optimizer)"""

    models: tuple[ModelName, ...] = MODEL_NAMES
    """Which twins to train"""

    warmup_steps: int = 50
    evals: int = 4
    """Evaluations during training (plus one at the end), on eval_people people per split"""

    eval_people: int = 50
    """People per split in the intermediate evaluations (the final one uses everyone)"""

    seeds: tuple[int, ...] = (0, 1, 2)
    """One run of every twin per seed; each seed draws its own corpus (other people and facts),
    initialisation and data order"""

    threads: int | None = 1
    """torch CPU threads (None: torch's default). One by default: these models are too small
    to gain from more, and on a shared machine oversubscribed OpenMP threads spin-wait"""

    cache_dir: str = field(default_factory=default_cache_dir)
    output_dir: Path = Path("benchmarks/out/knowledge")


def twin_configs(config: KnowledgeBenchmarkConfig, vocab_size: int) -> dict[str, TransformerConfig]:
    """The dense model and its memory twins: Memory and Memory+ read one value table shape,
    Engram a table of as many parameters, PEER one of twice as many (down and up vectors)."""
    dense = TransformerConfig(
        vocab_size=vocab_size,
        dim=config.dim,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        ffn_hidden_dim=llama_ffn_hidden_dim(config.dim, multiple_of=32),
        max_seq_len=config.seq_len,
    )
    memory = MemoryConfig(
        num_values=config.n_keys**2,
        layers=config.memory_plus_layers,
        heads=config.memory_heads,
        topk=config.memory_topk,
    )
    return {
        "dense": dense,
        "memory": replace(
            dense, memory=replace(memory, layers=(config.n_layers // 2,), kind=MemoryKind.MEMORY)
        ),
        "memory+": replace(dense, memory=memory),
        "engram": replace(
            dense,
            engram=EngramConfig(
                # Block 1 and the middle one (one block when they coincide).
                layers=tuple(dict.fromkeys((min(1, config.n_layers - 1), config.n_layers // 2))),
                max_ngram=3,
                heads=4,
                table_rows=config.n_keys**2 // 2,
                row_dim=max(config.dim // 8, 1),
            ),
        ),
        "peer": replace(
            dense,
            peer=PEERConfig(
                num_experts=config.n_keys**2,
                layers=config.memory_plus_layers,
                heads=config.memory_heads,
                topk=config.memory_topk,
            ),
        ),
    }


def _optimizer(model: Transformer, config: KnowledgeBenchmarkConfig) -> torch.optim.AdamW:
    groups = torch_param_groups(
        model,
        lr=config.lr,
        weight_decay=config.weight_decay,
        memory_lr_multiplier=config.memory_lr_multiplier,
    )
    for group in groups:
        group["initial_lr"] = group["lr"]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)


def _lr_factor(step: int, config: KnowledgeBenchmarkConfig) -> float:
    """Linear warmup, then cosine decay to 10%."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def majority_baseline(corpus: KnowledgeCorpus) -> dict[str, float]:
    """Recall of always answering each attribute's most frequent value among the Q/A-trained
    people: what a model gets from the answer distribution alone, without knowing anyone."""
    answers: dict[str, Counter[str]] = defaultdict(Counter)
    for qa in corpus.train_qa_pairs():
        answers[qa.attribute][qa.answer] += 1
    baseline = {}
    for split, qa_pairs in (
        ("recall_heldout", corpus.eval_qa_pairs()),
        ("recall_trained", corpus.train_qa_pairs()),
    ):
        hits = [answers[qa.attribute].most_common(1)[0][0] == qa.answer for qa in qa_pairs]
        baseline[split] = sum(hits) / max(len(hits), 1)
    return baseline


def _summary(results: dict[str, Any]) -> dict[str, float]:
    return {
        "recall_heldout": results["recall_heldout_questions"]["accuracy"],
        "recall_trained": results["recall_trained_questions"]["accuracy"],
        "answer_nll": results["heldout_answers"]["nll"],
        "biography_nll": results["heldout_biographies"]["nll"],
    }


def train_and_evaluate(
    name: str,
    model_config: TransformerConfig,
    tokens: torch.Tensor,
    config: KnowledgeBenchmarkConfig,
    corpus: KnowledgeCorpus,
    tokenizer,
    seed: int,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = Transformer(model_config)
    table_optimizer = None
    if config.table_optimizer != "adamw" and model.memory_values is not None:
        # Built first: the table is then its alone (torch_param_groups leaves it out).
        table_lr = config.lr * config.memory_lr_multiplier
        table_optimizer = RowSparseOptimizer(model, config.table_optimizer, lr=table_lr)
        table_optimizer.param_groups[0]["initial_lr"] = table_lr
    optimizer = _optimizer(model, config)
    optimizers = [optimizer] if table_optimizer is None else [optimizer, table_optimizer]
    # As recipes.pretrain: the sparse, high-LR table gradients are clipped on their own.
    clip_groups = [group["params"] for group in optimizer.param_groups]
    windows = iter(
        PackedWindows(tokens, seq_len=config.seq_len, seed=seed, dp_rank=0, dp_world_size=1)
    )
    eval_steps = {round(config.steps * (i + 1) / (config.evals + 1)) for i in range(config.evals)}
    tokens_per_step = config.batch_size * config.seq_len
    curve, losses = [], []
    start = time.perf_counter()
    for step in range(config.steps):
        model.train()
        inputs, labels = zip(*(next(windows) for _ in range(config.batch_size)))
        logits = model(torch.stack([x["input"] for x in inputs]))
        loss = F.cross_entropy(logits.flatten(0, 1), torch.stack(labels).flatten())
        for each in optimizers:
            each.zero_grad(set_to_none=True)
        loss.backward()
        for params in clip_groups:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        if table_optimizer is not None:
            table_optimizer.clip_grad_norm_(1.0)
        for each in optimizers:
            for group in each.param_groups:
                group["lr"] = group["initial_lr"] * _lr_factor(step, config)
            each.step()
        losses.append(loss.item())
        if step + 1 in eval_steps:
            model.eval()
            results = evaluate_knowledge(
                model, tokenizer, corpus, max_people=config.eval_people, batch_size=64
            )
            curve.append(
                {"step": step + 1, "tokens": (step + 1) * tokens_per_step, **_summary(results)}
            )
            recent_loss = sum(losses[-20:]) / len(losses[-20:])
            print(
                f"  {name:8s} step {step + 1:5d}  loss {recent_loss:.3f}  "
                f"recall held-out {100 * curve[-1]['recall_heldout']:.1f}%  "
                f"trained {100 * curve[-1]['recall_trained']:.1f}%  "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    train_seconds = time.perf_counter() - start
    model.eval()
    final = evaluate_knowledge(model, tokenizer, corpus, batch_size=64)
    curve.append(
        {
            "step": config.steps,
            "tokens": config.steps * tokens_per_step,
            **_summary(final),
            "all_people": True,
        }
    )
    stats = model_stats(model_config, config.seq_len)
    return {
        "params": {
            "total": stats.total_params,
            "dense": stats.dense_params,
            "memory": stats.memory_params,
        },
        "train_flops_per_token": stats.train_flops_per_token,
        "train_seconds": train_seconds,
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "final": {
            **_summary(final),
            "per_attribute_heldout": final["recall_heldout_questions"]["per_attribute"],
            "per_attribute_trained": final["recall_trained_questions"]["per_attribute"],
            "examples": final["recall_heldout_questions"]["examples"],
        },
        "curve": curve,
    }


def _vs_dense(flops: float, dense: dict[str, Any] | None) -> str:
    return "" if dense is None else f" ({flops / dense['train_flops_per_token']:.2f}x)"


SUMMARY_METRICS = ("recall_trained", "recall_heldout", "answer_nll", "biography_nll")


def _spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max and the values themselves."""
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "per_seed": values,
    }


def summarize(seed_reports: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each model's final metrics over the seeds that trained it (mean and spread) and, for the
    twins, their recall as a multiple of the dense model's on the same seed (same corpus and
    data order)."""
    summary: dict[str, dict[str, Any]] = {}
    for name in MODEL_NAMES:
        seeds = [seed for seed, report in seed_reports.items() if name in report["models"]]
        if not seeds:
            continue
        runs = [seed_reports[seed]["models"][name] for seed in seeds]
        summary[name] = {
            "seeds": seeds,
            "train_flops_per_token": runs[0]["train_flops_per_token"],
            "params": runs[0]["params"],
            "train_loss": _spread([run["final_train_loss"] for run in runs]),
            **{
                metric: _spread([run["final"][metric] for run in runs])
                for metric in SUMMARY_METRICS
            },
        }
        if name == "dense":
            continue
        for metric in ("recall_trained", "recall_heldout"):
            # Only seeds that trained dense too; one where dense recalls nothing has no ratio.
            ratios = [
                seed_reports[seed]["models"][name]["final"][metric] / dense_recall
                for seed in seeds
                if "dense" in seed_reports[seed]["models"]
                and (dense_recall := seed_reports[seed]["models"]["dense"]["final"][metric]) > 0
            ]
            if ratios:
                summary[name][f"{metric}_vs_dense"] = _spread(ratios)
    return summary


def _percent(spread: dict[str, Any]) -> str:
    return (
        f"{100 * spread['mean']:.1f} ± {100 * spread['std']:.1f}% "
        f"({100 * spread['min']:.1f}-{100 * spread['max']:.1f})"
    )


def _ratio(spread: dict[str, Any] | None) -> str:
    if spread is None:
        return "-"
    return f"{spread['mean']:.2f}x ({spread['min']:.2f}-{spread['max']:.2f})"


def summary_table(report: dict[str, Any]) -> str:
    """Mean ± sample standard deviation (min-max) over the seeds, one row per model."""
    summary = report["summary"]
    dense = summary.get("dense")
    lines = [
        f"Over {len(report['seeds'])} seeds ({', '.join(report['seeds'])}): "
        "mean ± standard deviation (min-max); x dense: the ratio to dense on each seed, averaged "
        "(min-max)",
        "",
        "| model | train FLOPs/token (vs dense) | recall, trained questions | x dense "
        "| recall, held-out questions | x dense | answer NLL | train loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in summary.items():
        flops = result["train_flops_per_token"]
        # A model trained on fewer seeds than the others (e.g. a partial run) says so.
        label = (
            name
            if len(result["seeds"]) == len(report["seeds"])
            else (f"{name} (seed{'s' * (len(result['seeds']) > 1)} {', '.join(result['seeds'])})")
        )
        lines.append(
            f"| {label} | {flops / 1e6:.2f}M{_vs_dense(flops, dense)} "
            f"| {_percent(result['recall_trained'])} "
            f"| {_ratio(result.get('recall_trained_vs_dense'))} "
            f"| {_percent(result['recall_heldout'])} "
            f"| {_ratio(result.get('recall_heldout_vs_dense'))} "
            f"| {result['answer_nll']['mean']:.3f} ± {result['answer_nll']['std']:.3f} "
            f"| {result['train_loss']['mean']:.3f} ± {result['train_loss']['std']:.3f} |"
        )
    return "\n".join(lines)


def markdown_table(report: dict[str, Any]) -> str:
    """Every seed's final metrics, one row per seed and model."""
    lines = [
        "| seed | model | params (dense + memory) | train FLOPs/token (vs dense) "
        "| recall, held-out questions | recall, trained questions | answer NLL "
        "| held-out bio NLL | train loss | train time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, seed_report in report["seeds"].items():
        dense = seed_report["models"].get("dense")
        for name, result in seed_report["models"].items():
            final, params = result["final"], result["params"]
            flops = result["train_flops_per_token"]
            lines.append(
                f"| {seed} | {name} | {params['dense'] / 1e3:.0f}K + {params['memory'] / 1e3:.0f}K "
                f"| {flops / 1e6:.2f}M{_vs_dense(flops, dense)} "
                f"| {100 * final['recall_heldout']:.1f}% | {100 * final['recall_trained']:.1f}% "
                f"| {final['answer_nll']:.3f} | {final['biography_nll']:.3f} "
                f"| {result['final_train_loss']:.3f} | {result['train_seconds']:.0f}s |"
            )
        baseline = seed_report["majority_baseline"]
        lines.append(
            f"| {seed} | majority answer (no model) | - | - "
            f"| {100 * baseline['recall_heldout']:.1f}% "
            f"| {100 * baseline['recall_trained']:.1f}% | - | - | - | - |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, summary in report["summary"].items():
        # Every seed evaluates at the same steps: average the curves point by point.
        curves = [report["seeds"][seed]["models"][name]["curve"] for seed in summary["seeds"]]
        tokens = [point["tokens"] / 1e6 for point in curves[0]]
        for axis, key in zip(axes, ("recall_heldout", "recall_trained")):
            mean = [
                100 * statistics.mean(points[i][key] for points in curves)
                for i in range(len(tokens))
            ]
            axis.plot(tokens, mean, marker="o", label=name)
    seeds = len(report["seeds"])
    for axis, title in zip(axes, ("held-out questions (from biographies)", "trained questions")):
        axis.set(
            title=f"Fact recall: {title}, mean of {seeds} seed{'s' * (seeds > 1)}",
            xlabel="training tokens (M)",
            ylabel="exact match (%)",
        )
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _validate(config: KnowledgeBenchmarkConfig) -> None:
    for flag, value in (
        ("--num-people", config.num_people),
        ("--dim", config.dim),
        ("--n-layers", config.n_layers),
        ("--n-heads", config.n_heads),
        ("--n-keys", config.n_keys),
        ("--memory-heads", config.memory_heads),
        ("--memory-topk", config.memory_topk),
        ("--steps", config.steps),
        ("--batch-size", config.batch_size),
        ("--seq-len", config.seq_len),
        ("--evals", config.evals),
        ("--eval-people", config.eval_people),
        ("--threads", config.threads),
    ):
        check_at_least(flag, value, 1)
    check_each_at_least("--memory-plus-layers", config.memory_plus_layers, 0)
    if not config.seeds:
        raise UsageError("--seeds needs at least one seed")
    if len(set(config.seeds)) != len(config.seeds):
        raise UsageError(f"--seeds must be distinct, got {' '.join(map(str, config.seeds))}")
    check_at_least("--warmup-steps", config.warmup_steps, 0)
    for flag, value in (
        ("--lr", config.lr),
        ("--weight-decay", config.weight_decay),
        ("--memory-lr-multiplier", config.memory_lr_multiplier),
    ):
        check_finite(flag, value, 0)


def run_seed(config: KnowledgeBenchmarkConfig, seed: int, tokenizer) -> dict[str, Any]:
    """Every twin of ``config.models`` trained and evaluated on the corpus of ``seed``."""
    corpus = KnowledgeCorpus(num_people=config.num_people, seed=seed)
    source = knowledge_source(corpus)
    tokens = load_token_stream(source, corpus.train_documents, tokenizer, config.cache_dir)
    epochs = config.steps * config.batch_size * config.seq_len / tokens.numel()
    print(
        f"seed {seed}: {config.num_people} people, {tokens.numel():,} training tokens; "
        f"{config.steps} steps = {epochs:.1f} epochs",
        flush=True,
    )
    report: dict[str, Any] = {
        "corpus_tokens": tokens.numel(),
        "epochs": epochs,
        "majority_baseline": majority_baseline(corpus),
        "models": {},
    }
    for name, model_config in twin_configs(config, tokenizer.get_vocab_size()).items():
        if name not in config.models:
            continue
        print(f"seed {seed}: training {name}", flush=True)
        report["models"][name] = train_and_evaluate(
            name, model_config, tokens, config, corpus, tokenizer, seed
        )
    return report


def write_report(report: dict[str, Any], output_dir: Path) -> str:
    """``knowledge.json`` (with the summary over the seeds so far), ``knowledge.md`` and the plot;
    returns the markdown."""
    report["summary"] = summarize(report["seeds"])
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "knowledge.json").write_text(json.dumps(report, indent=2) + "\n")
    tables = f"{summary_table(report)}\n\n{markdown_table(report)}"
    (output_dir / "knowledge.md").write_text(tables + "\n")
    plot(report, output_dir / "knowledge.png")
    return tables


def run(config: KnowledgeBenchmarkConfig) -> dict[str, Any]:
    _validate(config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    tokenizer = load_tokenizer()
    report: dict[str, Any] = {
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(config).items()
            if k != "cache_dir"
        },
        "seeds": {},
    }
    for seed in config.seeds:
        report["seeds"][str(seed)] = run_seed(config, seed, tokenizer)
        # Rewritten after every seed: a long run stopped early keeps what it measured.
        tables = write_report(report, config.output_dir)
    print(tables)
    print(f"wrote {config.output_dir}/knowledge.{{json,md,png}}")
    return report


if __name__ == "__main__":
    with reported_errors():
        run(tyro.cli(KnowledgeBenchmarkConfig, description=__doc__))
