"""The Transformer on CPU: initialisation, the shared table, positions, torch.compile, training."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from memcompile.config import EngramConfig, PEERConfig, TransformerConfig
from memcompile.engram import Engram, NgramHasher
from memcompile.flavors import get_flavor
from memcompile.memory import ProductKeyMemory
from memcompile.model import Transformer
from memcompile.peer import PEER
from memcompile.telemetry import memory_usage


def debug_config(name: str = "mem_debug", **memory) -> TransformerConfig:
    """A debug flavor with qk-norm and telemetry on, so that every code path runs."""
    config = get_flavor(name)
    if config.memory is None:
        return config
    return replace(config, memory=replace(config.memory, qk_norm=True, telemetry=True, **memory))


@pytest.mark.parametrize(
    "name", ["mem_debug", "memplain_debug", "dense_debug", "engram_debug", "peer_debug"]
)
def test_meta_built_model_initialises_every_parameter_and_buffer(name):
    with torch.device("meta"):
        model = Transformer(debug_config(name))
    model.to_empty(device="cpu")
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data.fill_(float("nan") if tensor.is_floating_point() else -1)
    model.init_weights()
    for tensor_name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor_name.startswith("hasher."):
            continue  # integer hash buffers: checked against a fresh hasher below
        assert tensor.is_floating_point() or tensor_name.endswith("usage.counts")
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), tensor_name
        else:
            assert (tensor == 0).all(), tensor_name
    if model.hasher is not None:  # the derived buffers rebuilt (the token map is a weight)
        fresh = NgramHasher(model.config.engram, model.config.vocab_size)
        for buffer_name in ("multipliers", "table_sizes", "row_offsets"):
            assert torch.equal(getattr(model.hasher, buffer_name), getattr(fresh, buffer_name))
    if model.memory_values is not None and model.config.memory is not None:
        value_dim = model.config.memory.value_dim
        assert float(model.memory_values.detach().std()) == pytest.approx(value_dim**-0.5, rel=0.05)


@pytest.mark.parametrize(
    ("name", "reader", "table_arg"), [("engram_debug", Engram, 2), ("peer_debug", PEER, 1)]
)
def test_engram_and_peer_layers_all_read_the_models_one_table(name, reader, table_arg):
    model = Transformer(debug_config(name))
    tables = []
    for module in model.modules():
        if isinstance(module, reader):
            module.register_forward_pre_hook(lambda _, args: tables.append(args[table_arg]))
    model(torch.zeros(1, 4, dtype=torch.long))
    assert len(tables) == 2 and all(table is model.memory_values for table in tables)
    assert [n for n, _ in model.named_parameters() if "values" in n or "table" in n] == [
        "memory_values"
    ]


def test_two_memory_families_in_one_model_are_refused():
    with pytest.raises(ValueError, match=r"one memory family, got memory and engram"):
        replace(get_flavor("mem_debug"), engram=get_flavor("engram_debug").engram)
    with pytest.raises(ValueError, match=r"engram.layers \[7\] out of range"):
        replace(get_flavor("engram_debug"), engram=EngramConfig(layers=(1, 7)))
    with pytest.raises(ValueError, match=r"peer.key_dim must be even"):
        replace(
            get_flavor("dense_debug"),
            peer=PEERConfig(num_experts=16, layers=(1,), topk=2, key_dim=5),
        )


def test_memory_layers_all_read_the_models_table():
    model = Transformer(debug_config())
    tables = []
    for module in model.modules():
        if isinstance(module, ProductKeyMemory):
            module.register_forward_pre_hook(lambda _, args: tables.append(args[1]))
    model(torch.zeros(1, 4, dtype=torch.long))
    assert len(tables) == len(model.config.memory.layers) == 2
    assert all(table is model.memory_values for table in tables)


def test_positions_select_rope_angles():
    torch.manual_seed(0)
    model = Transformer(debug_config())
    tokens = torch.randint(0, 256, (2, 7))
    logits = model(tokens)
    torch.testing.assert_close(model(tokens, positions=torch.arange(7)), logits)
    # Per-sequence positions: the second sequence continues at offset 3; RoPE is relative, so
    # shifting every position of a sequence leaves its logits unchanged.
    positions = torch.stack([torch.arange(7), torch.arange(3, 10)])
    torch.testing.assert_close(model(tokens, positions=positions), logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="sequence length 257 exceeds max_seq_len 256"):
        model(torch.zeros(1, 257, dtype=torch.long))


def test_a_left_padded_batch_in_one_forward_gives_each_row_its_own_logits():
    """Rows of different lengths, left-padded, with the padding mask and each row's positions:
    one forward gives every real token what the row alone gives (padding is never read, and
    no NaN from the padded queries reaches the real ones through later layers)."""
    torch.manual_seed(0)
    model = Transformer(debug_config()).eval()
    lengths = [7, 3, 5]
    rows = [torch.randint(1, 256, (n,)) for n in lengths]
    width = max(lengths)
    tokens = torch.stack([F.pad(row, (width - len(row), 0)) for row in rows])
    mask = torch.stack([torch.arange(width) >= width - n for n in lengths])
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(tokens, positions, attention_mask=mask)
        assert not logits.isnan().any()
        for i, row in enumerate(rows):
            alone = model(row[None])[0]
            torch.testing.assert_close(logits[i, width - len(row) :], alone, rtol=1e-5, atol=1e-5)
        # An all-ones mask is plain causal attention.
        torch.testing.assert_close(
            model(tokens, attention_mask=torch.ones_like(mask)), model(tokens), rtol=0, atol=1e-6
        )
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[batch, cached \+ "):
        model(tokens, attention_mask=mask[:, 1:])


def test_memory_usage_reports_each_layer_and_resets():
    model = Transformer(debug_config())
    model(torch.randint(0, 256, (2, 8)))
    usage = memory_usage(model)
    memory = model.config.memory
    layer_names = [f"layers.{i}.feed_forward.memory.usage" for i in memory.layers]
    assert set(usage) == {*layer_names, "all"}
    reads_per_layer = 2 * 8 * memory.heads * memory.topk
    assert all(usage[name].reads == reads_per_layer for name in layer_names)
    assert usage["all"].reads == 2 * reads_per_layer
    assert 0 < usage["all"].fraction_used <= 1
    assert memory_usage(model)["all"].reads == 0  # the first call reset the window


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    ("name", "backend", "device"),
    [
        # On CPU: AOTAutograd with inductor's decompositions and partitioner, everything but
        # inductor's codegen (which costs minutes on a small CPU).
        ("mem_debug", "aot_eager_decomp_partition", "cpu"),
        ("engram_debug", "aot_eager_decomp_partition", "cpu"),
        ("peer_debug", "aot_eager_decomp_partition", "cpu"),
        pytest.param("mem_debug", "inductor", "cuda", marks=[pytest.mark.gpu, requires_cuda]),
    ],
)
def test_compiled_model_matches_eager_without_graph_breaks(name, backend, device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    with torch.device(device):
        eager = Transformer(debug_config(name))
        compiled_model = Transformer(debug_config(name))
    compiled_model.load_state_dict(eager.state_dict())
    counter = CompileCounterWithBackend(backend)
    # fullgraph=True raises on any graph break, so a break fails this test.
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)

    for seq_len in (9, 14):  # the second length must reuse the dynamic graph
        tokens = torch.randint(0, 256, (2, seq_len), device=device)
        torch._dynamo.mark_dynamic(tokens, 1)
        for model in (eager, compiled):
            model.zero_grad()
        expected, actual = eager(tokens), compiled(tokens)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        cotangent = torch.randn_like(expected)
        (expected * cotangent).sum().backward()
        (actual * cotangent).sum().backward()
        for (param_name, param), compiled_param in zip(
            eager.named_parameters(), compiled_model.parameters(), strict=True
        ):
            torch.testing.assert_close(
                compiled_param.grad,
                param.grad,
                rtol=1e-4,  # decompositions change the fp32 summation order
                atol=1e-5,
                msg=lambda message, param_name=param_name: f"{param_name}: {message}",
            )
    assert counter.frame_count == 1
    if eager.config.memory is None:
        return
    # The telemetry buffers are updated inside the compiled graph.
    eager_usage, compiled_usage = memory_usage(eager), memory_usage(compiled_model)
    assert eager_usage == compiled_usage and eager_usage["all"].reads > 0


def synthetic_corpus(num_sequences: int, seq_len: int, vocab_size: int) -> torch.Tensor:
    """Deterministic sequences following a fixed random successor table, with 10% noise.

    Learning the successor table takes the loss from ``ln(vocab)`` (5.5 nats for bytes) to about
    0.9 nats; below that, the model memorises the noise of this finite corpus.
    """
    generator = torch.Generator().manual_seed(1234)
    successor = torch.randperm(vocab_size, generator=generator)
    corpus = torch.empty(num_sequences, seq_len, dtype=torch.long)
    corpus[:, 0] = torch.randint(0, vocab_size, (num_sequences,), generator=generator)
    for position in range(1, seq_len):
        noise = torch.rand(num_sequences, generator=generator) < 0.1
        random_tokens = torch.randint(0, vocab_size, (num_sequences,), generator=generator)
        corpus[:, position] = torch.where(noise, random_tokens, successor[corpus[:, position - 1]])
    return corpus


def test_tiny_model_learns_a_synthetic_corpus():
    torch.manual_seed(0)
    config = get_flavor("mem_debug")
    model = Transformer(config)
    corpus = synthetic_corpus(512, 33, config.vocab_size)
    values_at_init = model.memory_values.detach().clone()
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in model.named_parameters() if n != "memory_values"]},
            {"params": [model.memory_values], "lr": 1e-2},  # the paper's 10x LR for values
        ],
        lr=3e-3,
        weight_decay=0.0,
    )
    losses = []
    for _ in range(60):
        batch = corpus[torch.randint(0, len(corpus), (16,))]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 5.0 and last < 1.5, (first, last)
    assert not torch.equal(model.memory_values.detach(), values_at_init)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("shape", [(0, 8), (2, 0), (0, 0)])
def test_empty_batch_gives_empty_logits(shape):
    model = Transformer(debug_config())
    logits = model(torch.zeros(shape, dtype=torch.long))
    assert logits.shape == (*shape, model.config.vocab_size)
    logits.sum().backward()  # and an empty backward


@pytest.mark.parametrize(
    "tokens, positions, error, message",
    [
        (
            torch.zeros(8, dtype=torch.long),
            None,
            ValueError,
            r"tokens must be 2-D \[batch, seq_len\], got shape \(8,\)",
        ),
        (
            torch.zeros(2, 4),
            None,
            TypeError,
            r"tokens must be int64 or int32 ids, got torch.float32",
        ),
        (
            torch.full((1, 4), 256),
            None,
            IndexError,
            r"tokens must lie in \[0, 256\) \(the vocabulary\), found 256",
        ),
        (torch.full((1, 4), -3), None, IndexError, r"tokens must lie in \[0, 256\) .*found -3"),
        (
            torch.zeros(1, 4, dtype=torch.long),
            torch.tensor([-1, 0, 1, 2]),
            IndexError,
            r"positions must lie in \[0, 256\) \(max_seq_len\), found -1",
        ),
        (
            torch.zeros(1, 4, dtype=torch.long),
            torch.tensor([0, 1, 2, 256]),
            IndexError,
            r"positions must lie in \[0, 256\) .*found 256",
        ),
        (
            torch.zeros(1, 4, dtype=torch.long),
            torch.arange(3),
            ValueError,
            r"positions must have shape \[seq_len\] = \[4\]",
        ),
        (
            torch.zeros(1, 4, dtype=torch.long, device="meta"),
            None,
            ValueError,
            r"tokens are on meta but the model is on cpu",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(tokens, positions, error, message):
    model = Transformer(debug_config())
    with pytest.raises(error, match=message):
        model(tokens, positions=positions)


@pytest.mark.parametrize("name", ["mem_debug", "engram_debug", "peer_debug"])
def test_meta_model_loaded_with_assign_runs_like_its_source(name):
    """Derived buffers (RoPE tables, telemetry counters, Engram's hash multipliers and table
    offsets) are rebuilt after the load, not left on meta or zeroed."""
    torch.manual_seed(0)
    source = Transformer(debug_config(name))
    with torch.device("meta"):
        loaded = Transformer(debug_config(name))
    tokens = torch.randint(0, 256, (2, 6))
    with pytest.raises(ValueError, match="on the meta device .* assign=True"):
        loaded(tokens)
    loaded.load_state_dict(source.state_dict(), assign=True)
    torch.testing.assert_close(loaded(tokens), source(tokens), rtol=0, atol=0)


# A process-level failure: run in a subprocess so that an abort fails this test, not the run.
_COMPILED_OUT_OF_RANGE_TOKENS = """
import torch
from memcompile.flavors import get_flavor
from memcompile.model import Transformer

config = get_flavor("mem_debug")
model = torch.compile(Transformer(config), fullgraph=True, dynamic=True)
tokens = torch.zeros(8, 256, dtype=torch.long)  # large enough for Inductor's parallel loops
tokens[3, 100] = config.vocab_size
try:
    model(tokens).sum().backward()
except IndexError as error:
    print("IndexError:", error)
"""


def test_compiled_model_raises_on_out_of_range_tokens_instead_of_aborting():
    result = subprocess.run(
        [sys.executable, "-c", _COMPILED_OUT_OF_RANGE_TOKENS],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, f"exit status {result.returncode}:\n{result.stderr[-3000:]}"
    assert "IndexError: Transformer: tokens must lie in [0, 256)" in result.stdout, result.stderr
