"""Plan a pretraining run on any number of GPUs, on a CPU: ``python -m recipes.plan``.

    python -m recipes.plan --model mem_1b --ngpu 8 --training.seq_len 2048
    python -m recipes.plan --model mem_1b_64m --ngpu 256 --parallelism.memory_parallel_degree 8 \\
        --optimizer.memory_optimizer rowwise_adagrad --gpu h200 --json plan.json
    python -m recipes.plan --model mem_1b_64m --search     # fewest H100s, per table optimizer

The run is ``recipes.pretrain``'s (same config, same flags), simulated as one rank of ``--ngpu``:
torch's fake process group stands in for the others (every collective returns at once) and
``FakeTensorMode`` for the data (tensors have shapes and dtypes, no storage), so a 138B-parameter
model costs nothing here. The real trainer is built (the flavor, ``recipes.parallelize``: memory
parallelism, activation checkpointing, FSDP2; the optimizers) and runs whole
``train_step``s, a first that creates the optimizer states and the measured second: every
micro-batch's forward and backward, the replica reduce, clipping, the optimizer step and the
table's optimizer. Measured on the way:

- memory: torch's ``FSDPMemTracker`` (every allocation, by kind, at the step's peak);
- collectives: every c10d / functional collective this rank issues, as the bytes it sends with
  the usual ring algorithms (all-gather and reduce-scatter ``(n-1)/n`` of the full tensor,
  all-reduce twice that, all-to-all ``(n-1)/n`` of its input);
- time: a roofline of every operator (its FLOPs at the GPU's peak, or its bytes at its HBM
  bandwidth, whichever is slower) plus the collectives at the link's bandwidth (NVLink within
  a group of at most 8 ranks, InfiniBand beyond), with no overlap: an upper bound.
  ``torch.distributed._tools.runtime_estimator`` needs a CUDA device.

What it does not simulate: ``torch.compile`` (fake tensors cannot be compiled here; the plan is
of the eager step, whose activations compile only shrinks), weight initialisation (there are no
values) and the data loader (each step's tokens are random). Without ``--hf_assets_path`` the
vocabulary is the flavor's own (its Llama tokenizer's), not the built-in corpus's.

Bad input (a world the mesh cannot factor, a memory-parallel degree that does not divide
``--ngpu`` or the value dim, an unknown GPU) is one line ``error: ...`` and exit code 2, before
anything is traced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import (
    DynamicOutputShapeException,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.distributed._tools.fake_collectives import CollectiveOp, collective_ops, sync_ops
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from torchtitan.tools.logging import init_logger, logger

from memcompile.cli import UsageError, check_at_least, reported_errors
from memcompile.flavors import fit_to_run
from recipes import shims
from recipes.model import TitanTransformer, model_spec
from recipes.parallelize import SelectiveAC
from recipes.preflight import USABLE_FRACTION, GiB, _run_arguments, available_bytes, estimate
from recipes.pretrain import parse_args, validate
from recipes.trainer import PretrainTrainer

ROW_SPARSE_RULES = ("sgd", "rowwise_adagrad", "adam")
#: Ranks that share one NVLink domain (one HGX node); collectives over more cross InfiniBand.
RANKS_PER_NODE = 8


@dataclass(frozen=True)
class GPU:
    """What the roofline needs of a device: memory, dense bf16 FLOP/s, HBM and link bytes/s."""

    name: str
    memory_bytes: int
    peak_flops: float
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per direction, per GPU
    network_bytes_per_s: float  # per GPU, across nodes


GPUS = {
    "h100": GPU("H100 SXM 80GB", 80 * 10**9, 989e12, 3.35e12, 450e9, 50e9),
    "h200": GPU("H200 SXM 141GB", 141 * 10**9, 989e12, 4.8e12, 450e9, 50e9),
    "a100": GPU("A100 SXM 80GB", 80 * 10**9, 312e12, 2.04e12, 300e9, 25e9),
    # This machine's memory, and a rough CPU: the time is an order of magnitude at best.
    "cpu": GPU("CPU (this host)", available_bytes(), 1e12, 50e9, 10e9, 10e9),
}


@dataclass
class RankPlan:
    """One rank's numbers for one training step (bytes, seconds)."""

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    comm_buffers_bytes: int
    other_bytes: int
    peak_bytes: int
    #: Bytes this rank sends per step, per collective kind ("all_gather", "reduce_scatter",
    #: "all_reduce", "all_to_all", "broadcast").
    collective_bytes: dict[str, int]
    step_seconds: float
    #: Tokens per second of this rank (the job's: times the data-parallel ranks).
    tokens_per_second: float
    mfu: float
    fits: bool
    #: The run as planned: flavor, world size, memory-parallel degree, table optimizer, GPU...
    setting: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- bad input


def check_plan(config: PretrainTrainer.Config, world_size: int, gpu: str) -> None:
    """Every error that does not need a trace (:class:`memcompile.cli.UsageError`): the GPU, the
    world size and the memory-parallel degree, then the pretraining recipe's own checks."""
    if gpu not in GPUS:
        raise UsageError(f"--gpu must be one of {', '.join(GPUS)}, got {gpu!r}")
    check_at_least("--ngpu", world_size, 1)
    parallelism = config.parallelism
    replicate, shard = (
        parallelism.data_parallel_replicate_degree,
        parallelism.data_parallel_shard_degree,
    )
    if shard != -1 and replicate * shard != world_size:
        raise UsageError(
            f"--ngpu {world_size} does not factor into the mesh: --parallelism."
            f"data_parallel_replicate_degree {replicate} x data_parallel_shard_degree {shard} "
            f"= {replicate * shard}"
        )
    if world_size % replicate:
        raise UsageError(
            f"--ngpu {world_size} does not factor into the mesh: --parallelism."
            f"data_parallel_replicate_degree {replicate} does not divide it"
        )
    degree = parallelism.memory_parallel_degree
    if degree < 1 or world_size % degree:
        raise UsageError(
            f"--parallelism.memory_parallel_degree {degree} must be >= 1 and divide --ngpu "
            f"{world_size}"
        )
    validate(config, world_size)


# --------------------------------------------------------------------------- the simulation


class _PlannedTransformer(TitanTransformer):
    """The flavor as the run builds it, with the vocabulary asked for (the flavor's own unless a
    tokenizer is given) and no weight initialisation (fake tensors hold no values)."""

    @dataclass(kw_only=True, slots=True)
    class Config(TitanTransformer.Config):
        vocab_size: int | None = None

        def update_from_config(self, *, config: Any, **kwargs) -> None:
            TitanTransformer.Config.update_from_config(self, config=config, **kwargs)
            if self.vocab_size is not None:
                self.transformer = fit_to_run(self.transformer, vocab_size=self.vocab_size)

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        pass


class _NoData:
    """The data loader's config: the planner feeds the step random tokens itself."""

    def build(self, **kwargs: Any) -> None:
        return None


class _ShapesOnly(FakeTensorMode):
    """Fake tensors that also run the few data-dependent operations of a step: a scalar read
    (``.item()``: a norm, a count, only logged or used as a factor) is 1, and an output whose
    size depends on the values (``unique``, ``nonzero``) gets its largest possible size (every
    index distinct), which is what memory must allow for."""

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True)

    def dispatch(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1
        try:
            return super().dispatch(func, types, args, kwargs)
        except DynamicOutputShapeException:
            return self._largest_output(func, args, kwargs or {})

    def _largest_output(self, func, args, kwargs):
        source = args[0]
        with self:
            if func in (torch.ops.aten.nonzero.default,):
                return torch.empty(
                    source.numel(), source.dim(), dtype=torch.long, device=source.device
                )
            if func in (torch.ops.aten._unique2.default, torch.ops.aten.unique_consecutive.default):
                values = torch.empty(source.numel(), dtype=source.dtype, device=source.device)
                inverse = torch.empty(source.shape, dtype=torch.long, device=source.device)
                counts = torch.empty(source.numel(), dtype=torch.long, device=source.device)
                return values, inverse, counts
        raise NotImplementedError(f"recipes.plan: no largest-output rule for {func}")


class _PropagationApart:
    """DTensor derives each result's global shape by running the operator on global-shape fake
    tensors, in the active fake mode if there is one: that would be the simulation's, whose
    trackers would count a whole table. Used as DTensor's propagation lock, this makes the
    propagation use a mode of its own, which the trackers skip."""

    def __enter__(self) -> None:
        self._unset = unset_fake_temporarily()
        self._unset.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._unset.__exit__(*exc)


@contextlib.contextmanager
def _shape_propagation_apart() -> Iterator[None]:
    original = ShardingPropagator._fake_mode_lock
    ShardingPropagator._fake_mode_lock = _PropagationApart()
    try:
        yield
    finally:
        ShardingPropagator._fake_mode_lock = original


class _StepCounter(TorchDispatchMode):
    """FLOPs, bytes moved and collective bytes of every operator a rank runs (local tensors:
    DTensor operations are seen as the local operations and collectives they become)."""

    def __init__(self, gpu: GPU, fake_mode: FakeTensorMode) -> None:
        super().__init__()
        self.gpu, self.fake_mode = gpu, fake_mode
        self.flops = 0
        self.compute_seconds = 0.0
        self.comm_seconds = 0.0
        self.collective_bytes: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if active_fake_mode() is not self.fake_mode:  # DTensor's shape propagation
            return out
        if func in collective_ops:
            if func not in sync_ops:
                self._count_collective(func, out, args, kwargs)
            return out
        packet = func._overloadpacket
        flops = (
            flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        )
        moved = 0 if func.is_view else _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
        self.flops += flops
        self.compute_seconds += max(flops / self.gpu.peak_flops, moved / self.gpu.hbm_bytes_per_s)
        return out

    def _count_collective(self, func, out, args, kwargs) -> None:
        name = func._overloadpacket.__name__.replace("_", "")
        kind = next(
            (
                k
                for k in ("allgather", "reducescatter", "allreduce", "alltoall", "broadcast")
                if k in name.replace("tensor", "").replace("into", "")
            ),
            None,
        )
        if kind is None:
            return
        ranks = CollectiveOp.get_process_group(func, args).size()
        if kind == "alltoall" or "alltoall" in name:
            size = _tensor_bytes(
                args[1] if func._overloadpacket.__name__.startswith("alltoall") else args[0]
            )
            kind = "alltoall"
        else:
            size = CollectiveOp.get_comm_tensor_size(func, out, args, kwargs)
        share = {"allreduce": 2 * (ranks - 1) / ranks, "broadcast": 1.0}.get(
            kind, (ranks - 1) / ranks
        )
        sent = int(size * share)
        label = {
            "allgather": "all_gather",
            "reducescatter": "reduce_scatter",
            "allreduce": "all_reduce",
            "alltoall": "all_to_all",
            "broadcast": "broadcast",
        }[kind]
        self.collective_bytes[label] += sent
        link = (
            self.gpu.nvlink_bytes_per_s if ranks <= RANKS_PER_NODE else self.gpu.network_bytes_per_s
        )
        self.comm_seconds += sent / link


def _tensor_bytes(tree: Any) -> int:
    total = 0
    for leaf in torch.utils._pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            total += leaf.numel() * leaf.element_size()
    return total


#: FSDPMemTracker's kinds, as the plan reports them.
_KINDS = {
    "params_bytes": (_FSDPRefType.SHARDED_PARAM, _FSDPRefType.UNSHARDED_PARAM),
    "grads_bytes": (_FSDPRefType.SHARDED_GRAD, _FSDPRefType.UNSHARDED_GRAD),
    "optimizer_bytes": (_FSDPRefType.OPT,),
    "activations_bytes": (_FSDPRefType.ACT, _FSDPRefType.TEMP, _FSDPRefType.INP),
    "comm_buffers_bytes": (_FSDPRefType.ALL_GATHER, _FSDPRefType.REDUCE_SCATTER),
}


@contextlib.contextmanager
def _fake_world(world_size: int, rank: int) -> Iterator[None]:
    """This process as rank ``rank`` of ``world_size`` on torch's fake process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("recipes.plan needs a process without a process group")
    saved = dict(os.environ)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank % RANKS_PER_NODE),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(min(world_size, RANKS_PER_NODE)),
    )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _all_to_all_as_on_gpus() -> Iterator[None]:
    """DTensor's ``Shard(i) -> Shard(j)`` redistribute on a CPU mesh all-gathers and keeps a
    chunk (gloo has no all-to-all); NCCL runs the all-to-all. The simulated GPUs' meshes are
    CPU meshes here: within this block they take the GPUs' path (the op has a fake kernel)."""
    from torch.distributed._functional_collectives import _resolve_group
    from torch.distributed.tensor import placement_types

    def shard_dim_alltoall(input, gather_dim, shard_dim, mesh, mesh_dim):
        group = _resolve_group((mesh, mesh_dim))
        return torch.ops._dtensor.shard_dim_alltoall(input, gather_dim, shard_dim, group)

    original = placement_types.shard_dim_alltoall
    placement_types.shard_dim_alltoall = shard_dim_alltoall
    try:
        yield
    finally:
        placement_types.shard_dim_alltoall = original


def _planned_config(
    config: PretrainTrainer.Config, vocab_size: int | None
) -> PretrainTrainer.Config:
    """``config`` as the simulation runs it: no checkpoints, logs, evaluation or data."""
    config = dataclasses.replace(config)
    spec = model_spec(config.model, _PlannedTransformer)
    spec.model.vocab_size = vocab_size
    config.model_spec = spec
    config.dataloader = _NoData()
    config.checkpoint.enable = False
    config.metrics.enable_tensorboard = False
    config.metrics.enable_wandb = False
    config.metrics.save_for_all_ranks = False
    config.final_eval = False
    config.validator.enable = False
    config.compile.enable = False
    return config


def plan(
    config: PretrainTrainer.Config,
    world_size: int,
    gpu: str = "h100",
    rank: int = 0,
    *,
    vocab_size: int | None = None,
) -> RankPlan:
    """Simulate one training step of ``config`` (``recipes.pretrain``'s, as parsed) as rank
    ``rank`` of ``world_size`` and measure it for ``gpu``. ``vocab_size`` overrides the
    tokenizer's vocabulary (``None``: the tokenizer's). Raises ``UsageError`` for bad input
    before tracing."""
    check_plan(config, world_size, gpu)
    device = GPUS[gpu]
    shims.apply()
    compiled = config.compile.enable and "model" in config.compile.components
    config = _planned_config(config, vocab_size)
    fake = _ShapesOnly()
    on_gpus = _all_to_all_as_on_gpus() if gpu != "cpu" else contextlib.nullcontext()
    with (
        _fake_world(world_size, rank),
        on_gpus,
        _shape_propagation_apart(),
        contextlib.ExitStack() as simulation,
    ):
        parallelize = config.model_spec.parallelize_fn

        def parallelize_then_fake(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
            # Meshes and the meta model are built for real (a mesh reads its ranks' values);
            # from here on, every tensor the trainer makes is fake.
            model = parallelize(model, **kwargs)
            simulation.enter_context(fake)
            return model

        config.model_spec = dataclasses.replace(
            config.model_spec, parallelize_fn=parallelize_then_fake
        )
        trainer = config.build()
        trainer.metrics_processor.should_log = lambda step: False  # logging reads values
        # A fake tensor keeps the index of "cpu:0" (a real one drops it): the model's check
        # that tokens and weights share a device would fail.
        trainer.device = torch.device(trainer.device.type)
        training = config.training
        batch = (training.local_batch_size, training.seq_len)
        vocab = trainer.model_config.transformer.vocab_size

        def tokens() -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
            while True:
                yield {"input": torch.randint(0, vocab, batch)}, torch.randint(0, vocab, batch)

        # The first step creates the optimizer states: the second is measured, as every later
        # one, with the states the tracker is told of (the container keeps none itself).
        trainer.train_step(tokens())
        memory = FSDPMemTracker(trainer.model_parts[0], trainer.optimizers)
        counter = _StepCounter(device, fake)
        with memory, counter:
            for optimizer in trainer.optimizers:
                memory._track_optimizer_states(_FSDPRefType.OPT, optimizer)
            for parameter in trainer.model_parts[0].parameters():  # FSDP's ignored ones too
                local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
                memory._update_and_maybe_create_winfos(local, _FSDPRefType.SHARDED_PARAM)
            trainer.train_step(tokens())
        peak = memory.get_tracker_snapshot("peak")
        breakdown = {kind: 0 for kind in _KINDS}
        other = 0
        total = 0
        for snapshot in peak.values():
            for key, value in snapshot.items():
                if key == "Total":
                    total += value
                    continue
                kind = next(
                    (k for k, refs in _KINDS.items() if key in [r.value for r in refs]), None
                )
                if kind is None:
                    other += value
                else:
                    breakdown[kind] += value
        accumulation = trainer.gradient_accumulation_steps
        step_tokens = accumulation * training.local_batch_size * training.seq_len
        flops_per_token = trainer.metrics_processor.num_flops_per_token
        degree = config.parallelism.memory_parallel_degree
    step_seconds = counter.compute_seconds + counter.comm_seconds
    return RankPlan(
        **breakdown,
        other_bytes=other,
        peak_bytes=total,
        collective_bytes=dict(counter.collective_bytes),
        step_seconds=step_seconds,
        tokens_per_second=step_tokens / step_seconds,
        mfu=flops_per_token * step_tokens / step_seconds / device.peak_flops,
        fits=total <= device.memory_bytes * USABLE_FRACTION,
        setting={
            "model": config.model,
            "world_size": world_size,
            "rank": rank,
            "gpu": gpu,
            "memory_parallel_degree": degree,
            "memory_optimizer": config.optimizer.memory_optimizer,
            "local_batch_size": training.local_batch_size,
            "seq_len": training.seq_len,
            "vocab_size": vocab,
            "gradient_accumulation_steps": accumulation,
            "activation_checkpoint": type(config.activation_checkpoint).__qualname__,
            "mixed_precision_param": training.mixed_precision_param,
            "compile": "not simulated" if compiled else "off",
        },
    )


# --------------------------------------------------------------------------- search


def search(
    config: PretrainTrainer.Config,
    gpu: str = "h100",
    *,
    rules: tuple[str, ...] = ("adamw", *ROW_SPARSE_RULES),
    max_ranks: int = 4096,
    vocab_size: int | None = None,
) -> dict[str, RankPlan | None]:
    """The smallest power-of-two world (and its memory-parallel degree) on which ``config`` fits
    ``gpu``, for each table optimizer of ``rules`` (dense AdamW, the row-sparse rules):
    ``{rule: plan or None}`` (``None``: nothing up to ``max_ranks`` fits). Per world size the
    widest memory-parallel degree (dividing it and the value dim) is tried, and for AdamW also
    plain FSDP (degree 1). Skipped without a trace: a world whose weights and optimizer states
    alone (the preflight's count) exceed the GPU, and plain FSDP when its largest all-gathered
    unit (a big table is one) does."""
    transformer = config.model_spec.model.transformer
    if vocab_size is not None:
        transformer = fit_to_run(transformer, vocab_size=vocab_size)
    table = transformer.table_shape  # every family's one table: (rows, width)
    found: dict[str, RankPlan | None] = {}
    for rule in rules:
        if table is None and rule != "adamw":
            continue
        found[rule] = None
        world = 1
        while world <= max_ranks and found[rule] is None:
            widest = math.gcd(world, table[1]) if table is not None else 1
            degrees = [1, widest] if rule == "adamw" else [widest]
            for degree in dict.fromkeys(degrees):
                if rule != "adamw" and world > 1 and degree == 1:
                    continue
                candidate = dataclasses.replace(config)
                candidate.optimizer = dataclasses.replace(config.optimizer, memory_optimizer=rule)
                candidate.parallelism = dataclasses.replace(
                    config.parallelism,
                    memory_parallel_degree=degree,
                    row_sparse_table=rule != "adamw",
                )
                static = estimate(transformer, **_run_arguments(candidate, world))
                if static.params + static.optimizer > GPUS[gpu].memory_bytes:
                    continue
                if degree == 1 and static.fsdp_transient > GPUS[gpu].memory_bytes:
                    continue  # FSDP all-gathers the whole table (its largest unit) every step
                logger.info(f"search: {rule} on {world} x {gpu}, memory-parallel degree {degree}")
                result = plan(candidate, world, gpu, vocab_size=vocab_size)
                if result.fits:
                    found[rule] = result
                    break
            world *= 2
    return found


# --------------------------------------------------------------------------- command line


def format_table(plans: list[RankPlan]) -> str:
    """A markdown table, one row per plan (GiB per rank, MB sent per step and rank)."""
    rows = [
        "| model | ranks x GPU | G | table optimizer | params | grads | optimizer | activations "
        "| comm buffers | other | peak GiB | fits | MB sent: all-gather / reduce-scatter / "
        "all-reduce / all-to-all | step s | tokens/s (job) | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in plans:
        s = p.setting
        gib = [f"{getattr(p, kind) / GiB:.2f}" for kind in (*_KINDS, "other_bytes", "peak_bytes")]
        sent = " / ".join(
            f"{p.collective_bytes.get(kind, 0) / 1e6:,.0f}"
            for kind in ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")
        )
        job_tokens = p.tokens_per_second * s["world_size"]
        rows.append(
            f"| {s['model']} | {s['world_size']} x {s['gpu']} | {s['memory_parallel_degree']} "
            f"| {s['memory_optimizer']} | {' | '.join(gib)} | {'yes' if p.fits else 'NO'} "
            f"| {sent} | {p.step_seconds:.3f} | {job_tokens:,.0f} | {p.mfu:.1%} |"
        )
    return "\n".join(rows)


_USAGE = """usage: python -m recipes.plan [--ngpu N] [--gpu {gpus}] [--search] [--json PATH]
                              [--vocab-size V] [every recipes.pretrain flag]

Simulate recipes.pretrain's training step as one rank of N GPUs, on this CPU (a warm-up
step, then the measured one).
  --ngpu N          ranks of the simulated run (default 8)
  --gpu NAME        {gpus} (default h100): memory, peak bf16 FLOP/s, bandwidths
  --search          the fewest ranks (powers of two) that fit, per table optimizer
  --json PATH       also write the plans as JSON
  --vocab-size V    the tokenizer's vocabulary (default: the flavor's own, e.g. 32000 for
                    mem_1b*, 128256 for mem_8b*, unless --hf_assets_path is given)
On a GPU (not --gpu cpu) the run's defaults are a GPU run's: bf16 parameters and selective
activation checkpointing, unless the flags say otherwise. Other flags: python -m
recipes.pretrain --help."""


def _own_flags(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The planner's flags, and the rest (``recipes.pretrain``'s)."""
    own: dict[str, Any] = {"ngpu": "8", "gpu": "h100", "json": None, "vocab-size": None}
    rest, search = [], False
    arguments = iter(argv)
    for argument in arguments:
        name, _, value = argument.partition("=")
        if name == "--search":
            search = True
        elif name.startswith("--") and name[2:] in own:
            value = value or next(arguments, None)
            if value is None:
                raise UsageError(f"{name} needs a value")
            own[name[2:]] = value
        else:
            rest.append(argument)
    own["search"] = search
    return own, rest


def _as_on_gpu(config: PretrainTrainer.Config, argv: list[str]) -> None:
    """A GPU run's defaults (``config_registry.default`` on CUDA) for what the flags leave."""
    if not any(a.startswith("--training.mixed_precision_param") for a in argv):
        config.training.mixed_precision_param = "bfloat16"
    if not any("activation_checkpoint" in a for a in argv):
        config.activation_checkpoint = SelectiveAC.Config()


def _integer(flag: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{flag} must be an integer, got {value!r}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(_USAGE.format(gpus="|".join(GPUS)))
        return 0
    init_logger()
    shims.apply()
    with reported_errors(ValueError, FileNotFoundError):
        own, rest = _own_flags(argv)
        world_size = _integer("--ngpu", own["ngpu"])
        vocab_size = _integer("--vocab-size", own["vocab-size"])
        if vocab_size is not None:
            check_at_least("--vocab-size", vocab_size, 1)
        gpu = own["gpu"]
        if gpu not in GPUS:
            raise UsageError(f"--gpu must be one of {', '.join(GPUS)}, got {gpu!r}")
        config = parse_args(rest)
        if vocab_size is None and not any(a.startswith("--hf_assets_path") for a in rest):
            # The flavor's own tokenizer's (Llama 2's or 3's), not the built-in corpus's.
            vocab_size = config.model_spec.model.transformer.vocab_size
        if gpu != "cpu":
            _as_on_gpu(config, rest)
        if not own["search"]:
            check_plan(config, world_size, gpu)
    if own["search"]:
        found = search(config, gpu, vocab_size=vocab_size)
        plans = [p for p in found.values() if p is not None]
        for rule, p in found.items():
            if p is None:
                print(f"{config.model} with {rule}: does not fit on up to 4096 x {gpu}")
    else:
        logger.info(
            f"Planning {config.model} as rank 0 of {world_size} simulated {gpu}: building the "
            "trainer and tracing two steps (the second is measured)..."
        )
        plans = [plan(config, world_size, gpu, vocab_size=vocab_size)]
    if config.compile.enable:
        print("compile: not simulated (fake tensors are not compiled here): eager numbers")
    print(format_table(plans))
    if own["json"]:
        with open(own["json"], "w") as out:
            json.dump([dataclasses.asdict(p) for p in plans], out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
