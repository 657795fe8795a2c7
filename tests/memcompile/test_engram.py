"""Engram: the n-gram hashing against plain Python integers, the layer by hand and in float64.

The hashing reference walks every position and head with Python's unbounded integers; the
hand-computed forward spells out the gate, the convolution and the SiLU for three tokens.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from memcompile.engram import (
    Engram,
    EngramConfig,
    NgramHasher,
    engram_table_sizes,
    hash_multipliers,
    init_engram_table_,
    tokenizer_compression,
)
from memcompile.memory import ValueTable
from memcompile.sparse_optim import RowSparseOptimizer
from ops.row_sparse import GradRecorder

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = EngramConfig(layers=(0, 2), max_ngram=3, heads=2, table_rows=11, row_dim=3)
VOCAB = 40


def reference_rows(config: EngramConfig, vocab_size: int, ids: list[int]) -> list[list[list[int]]]:
    """``[t][layer][order·heads]`` rows of one sequence of (compressed) ids, in Python ints."""
    multipliers = hash_multipliers(config, vocab_size + 1).tolist()
    sizes = engram_table_sizes(config)
    flat_sizes = [p for layer in sizes for order in layer for p in order]
    offsets = [sum(flat_sizes[:i]) for i in range(len(flat_sizes))]
    out = []
    for t in range(len(ids)):
        per_layer = []
        for layer in range(len(config.layers)):
            rows = []
            for order in range(config.orders):
                n = order + 2
                ngram = [ids[t - j] if t - j >= 0 else vocab_size for j in range(n)]
                for head in range(config.heads):
                    mix = 0
                    for j, token in enumerate(ngram):
                        mix ^= token * multipliers[layer][order][head][j]
                    table = (layer * config.orders + order) * config.heads + head
                    rows.append(offsets[table] + mix % flat_sizes[table])
            per_layer.append(rows)
        out.append(per_layer)
    return out


# --------------------------------------------------------------------------- hashing


def test_table_sizes_are_distinct_primes_from_table_rows():
    sizes = [p for layer in engram_table_sizes(CONFIG) for order in layer for p in order]
    assert sizes == sorted(set(sizes)) and sizes[0] >= CONFIG.table_rows
    assert all(all(p % d for d in range(2, math.isqrt(p) + 1)) for p in sizes)
    # Every prime from table_rows on is used: no table is larger than it needs to be.
    primes = [n for n in range(CONFIG.table_rows, sizes[-1] + 1) if all(n % d for d in range(2, n))]
    assert primes == sizes
    assert CONFIG.num_rows == sum(sizes)


def test_hashes_match_python_integers_and_lie_in_their_tables():
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (3, 9))
    rows = NgramHasher(CONFIG, VOCAB)(tokens)
    assert rows.shape == (3, 9, len(CONFIG.layers), CONFIG.heads_per_layer)
    assert rows.tolist() == [reference_rows(CONFIG, VOCAB, seq) for seq in tokens.tolist()]

    sizes = torch.tensor(engram_table_sizes(CONFIG)).flatten(1)  # [layers, orders·heads]
    starts = (sizes.flatten().cumsum(0) - sizes.flatten()).view_as(sizes)
    assert ((rows >= starts) & (rows < starts + sizes)).all()


def test_hashes_are_deterministic_and_depend_only_on_the_ngram():
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 12))
    rows = NgramHasher(CONFIG, VOCAB)(tokens)
    assert torch.equal(rows, NgramHasher(CONFIG, VOCAB)(tokens))  # a fresh hasher, same rows
    assert torch.equal(rows[1:], NgramHasher(CONFIG, VOCAB)(tokens[1:]))  # batch-independent
    # The same trigram later in a sequence reads the same rows.
    repeated = torch.tensor([[5, 6, 7, 1, 2, 5, 6, 7]])
    rows = NgramHasher(CONFIG, VOCAB)(repeated)
    assert torch.equal(rows[0, 2], rows[0, 7])
    # Changing the token two back changes the trigram rows, never the bigram rows.
    changed = repeated.clone()
    changed[0, 5] = 9
    new_rows = NgramHasher(CONFIG, VOCAB)(changed)
    bigram, trigram = slice(0, CONFIG.heads), slice(CONFIG.heads, None)
    assert torch.equal(new_rows[0, 7, :, bigram], rows[0, 7, :, bigram])
    assert (new_rows[0, 7, :, trigram] != rows[0, 7, :, trigram]).all()


def test_another_seed_hashes_differently():
    tokens = torch.arange(VOCAB).view(1, -1)
    other = EngramConfig(**{**CONFIG.__dict__, "hash_seed": 1})
    assert not torch.equal(NgramHasher(CONFIG, VOCAB)(tokens), NgramHasher(other, VOCAB)(tokens))


def test_heads_collide_independently():
    """Over all bigrams of a small vocabulary: each head's collision rate is about 1/p, and two
    heads share a collision about 1/(p·p') of the time: the heads are independent hashes."""
    config = EngramConfig(layers=(0,), max_ngram=2, heads=2, table_rows=11, row_dim=1)
    vocab = 30
    first, second = torch.meshgrid(torch.arange(vocab), torch.arange(vocab), indexing="ij")
    bigrams = torch.stack((first.flatten(), second.flatten()), dim=1)  # [vocab², 2]
    rows = NgramHasher(config, vocab)(bigrams)[:, 1, 0]  # the bigram at position 1: [vocab², 2]
    same = rows[:, None, :] == rows[None, :, :]  # [pairs, pairs, heads]
    distinct_pairs = ~torch.eye(len(rows), dtype=torch.bool)
    p0, p1 = engram_table_sizes(config)[0][0]
    rate0 = same[..., 0][distinct_pairs].float().mean().item()
    rate1 = same[..., 1][distinct_pairs].float().mean().item()
    both = (same[..., 0] & same[..., 1])[distinct_pairs].float().mean().item()
    assert 0.7 / p0 < rate0 < 1.3 / p0 and 0.7 / p1 < rate1 < 1.3 / p1
    assert both < 2 / (p0 * p1)


def test_multipliers_keep_products_exact_in_int64():
    multipliers = hash_multipliers(CONFIG, VOCAB + 1)
    used = multipliers[multipliers != 0]
    assert (used % 2 == 1).all()
    assert int(used.max()) * VOCAB < 2**62
    # Order n uses exactly its n offsets.
    for order in range(CONFIG.orders):
        assert (multipliers[:, order, :, : order + 2] != 0).all()
        assert (multipliers[:, order, :, order + 2 :] == 0).all()


def test_tokenizer_compression_merges_equivalent_tokens():
    pieces = ["Hello", " hello", "héllo", "HELLO", "world", "  ", "\t", "", "ﬁ", "fi"]
    token_map = tokenizer_compression(pieces)
    assert token_map.tolist() == [0, 0, 0, 0, 1, 2, 2, 3, 4, 4]
    # Compressed tokens hash as one: "Hello world" and "hello world" read the same rows.
    hasher = NgramHasher(CONFIG, len(pieces), token_map)
    assert torch.equal(hasher(torch.tensor([[0, 4]])), hasher(torch.tensor([[1, 4]])))
    assert not torch.equal(hasher(torch.tensor([[0, 4]])), hasher(torch.tensor([[0, 5]])))


def test_hasher_built_on_meta_matches_after_materialising():
    tokens = torch.randint(0, VOCAB, (2, 6))
    with torch.device("meta"):
        hasher = NgramHasher(CONFIG, VOCAB)
    hasher.to_empty(device="cpu")
    hasher.token_map.copy_(torch.arange(VOCAB))
    hasher.init_buffers()
    assert torch.equal(hasher(tokens), NgramHasher(CONFIG, VOCAB)(tokens))
    assert list(hasher.state_dict()) == ["token_map"]  # the rest derives from the config


# --------------------------------------------------------------------------- the layer


def test_tiny_forward_by_hand():
    """dim 2, one bigram head with rows of width 1, a 2-tap convolution with dilation 2."""
    config = EngramConfig(layers=(0,), max_ngram=2, heads=1, table_rows=3, row_dim=1, conv_kernel=2)
    layer = Engram(2, config, norm_eps=0.0).double()
    table = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    with torch.no_grad():
        layer.key.weight.copy_(torch.tensor([[1.0], [3.0]]))
        layer.value.weight.copy_(torch.tensor([[2.0], [-1.0]]))
        layer.conv.weight.copy_(torch.tensor([[[0.5, 1.0]], [[-1.0, 2.0]]]))  # [dim, 1, taps]
    h = torch.tensor([[[1.0, 2.0], [-1.0, 0.5], [3.0, -3.0]]], dtype=torch.float64)
    rows = torch.tensor([[[2], [0], [1]]])

    def rms_norm(v):
        scale = 1 / math.sqrt(sum(x * x for x in v) / len(v))
        return [x * scale for x in v]

    def silu(x):
        return x / (1 + math.exp(-x))

    gated = []
    for t in range(3):
        e = table[rows[0, t, 0]].item()
        key, value = [e * 1.0, e * 3.0], [e * 2.0, e * -1.0]
        score = sum(a * b for a, b in zip(rms_norm(h[0, t].tolist()), rms_norm(key)))
        gate = 1 / (1 + math.exp(-score / math.sqrt(2)))
        gated.append([gate * v for v in value])
    normed = [rms_norm(v) for v in gated]
    taps = [[0.5, 1.0], [-1.0, 2.0]]
    expected = []
    for t in range(3):
        before = normed[t - 2] if t >= 2 else [0.0, 0.0]  # dilation 2: the tap two tokens back
        conv = [taps[c][0] * before[c] + taps[c][1] * normed[t][c] for c in range(2)]
        expected.append([gated[t][c] + silu(conv[c]) for c in range(2)])

    out = layer(h, rows, table)
    torch.testing.assert_close(out, torch.tensor([expected], dtype=torch.float64))


def _random_layer(config: EngramConfig, dim: int) -> Engram:
    layer = Engram(dim, config).double()
    with torch.no_grad():
        for param in layer.parameters():  # norm gains and the convolution too, not just the init
            param.normal_()
    return layer


def test_gradients_float64_gradcheck():
    torch.manual_seed(2)
    dim = 4
    layer = _random_layer(CONFIG, dim)
    rows = NgramHasher(CONFIG, VOCAB)(torch.randint(0, VOCAB, (2, 5)))[:, :, 1]
    table = torch.randn(CONFIG.num_rows, CONFIG.row_dim, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 5, dim, dtype=torch.float64, requires_grad=True)
    params = dict(layer.named_parameters())

    def run(h, table, *weights):
        return torch.func.functional_call(layer, dict(zip(params, weights)), (h, rows, table))

    assert torch.autograd.gradcheck(run, (h, table, *params.values()))


class _TwoEngramBlocks(torch.nn.Module):
    """What a model does: hash once, two Engram layers reading one table, which it owns as
    ``memory_values`` and passes through a ``ValueTable`` sharing the lookups' recorder."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.hasher = NgramHasher(CONFIG, VOCAB)
        table = init_engram_table_(torch.empty(CONFIG.num_rows, CONFIG.row_dim))
        self.memory_values = torch.nn.Parameter(table)
        recorder = GradRecorder()
        self.memory_table = ValueTable(recorder)
        self.blocks = torch.nn.ModuleList(
            Engram(dim, CONFIG, grad_recorder=recorder) for _ in CONFIG.layers
        )
        for block in self.blocks:
            torch.nn.init.normal_(block.conv.weight)

    def forward(self, tokens, h):
        rows = self.hasher(tokens)
        table = self.memory_table(self.memory_values)
        for i, block in enumerate(self.blocks):
            h = h + block(h, rows[:, :, i], table)
        return h


def test_row_sparse_optimizer_trains_the_engram_table_as_dense_sgd():
    torch.manual_seed(5)
    sparse_model = _TwoEngramBlocks(dim=8)
    dense_model = copy.deepcopy(sparse_model)
    before = sparse_model.memory_values.detach().clone()
    tokens, h = torch.randint(0, VOCAB, (2, 7)), torch.randn(2, 7, 8)
    optimizer = RowSparseOptimizer(sparse_model, "sgd", lr=0.5)
    sparse_model(tokens, h).square().sum().backward()
    optimizer.step()
    dense_model(tokens, h).square().sum().backward()
    with torch.no_grad():
        dense_model.memory_values -= 0.5 * dense_model.memory_values.grad
    torch.testing.assert_close(sparse_model.memory_values, dense_model.memory_values)
    read = NgramHasher(CONFIG, VOCAB)(tokens).unique()
    untouched = torch.ones(CONFIG.num_rows, dtype=torch.bool)
    untouched[read] = False
    assert torch.equal(sparse_model.memory_values[untouched], before[untouched])
    assert not torch.equal(sparse_model.memory_values[~untouched], before[~untouched])


def test_compiled_fullgraph_matches_eager():
    torch.manual_seed(3)
    model = _TwoEngramBlocks(dim=8)
    tokens = torch.randint(0, VOCAB, (2, 7))
    h = torch.randn(2, 7, 8)
    eager = model(tokens, h)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)(tokens, h)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), list(model.parameters()))
    torch.testing.assert_close(compiled, eager)
    for grad, eager_grad in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"layers": ()}, "engram.layers must name at least one block"),
        ({"layers": (1, 1)}, "engram.layers must be distinct"),
        ({"max_ngram": 1}, "engram.max_ngram must be >= 2"),
        ({"heads": 0}, "engram.heads must be >= 1"),
        ({"table_rows": 1}, "engram.table_rows must be >= 2"),
        ({"row_dim": 0}, "engram.row_dim must be >= 1"),
        ({"conv_kernel": 0}, "engram.conv_kernel must be >= 1"),
        ({"hash_seed": -1}, "engram.hash_seed must lie in"),
    ],
)
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        EngramConfig(**{"layers": (0,), **overrides})


def test_bad_tokens_and_token_map_are_rejected():
    hasher = NgramHasher(CONFIG, VOCAB)
    with pytest.raises(ValueError, match=r"NgramHasher: tokens must be 2-D"):
        hasher(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"NgramHasher: tokens must be int64 or int32"):
        hasher(torch.zeros(1, 4))
    with pytest.raises(IndexError, match=r"NgramHasher: tokens must lie in \[0, 40\)"):
        hasher(torch.tensor([[0, VOCAB]]))
    with pytest.raises(ValueError, match=r"token_map must have shape \(40,\)"):
        NgramHasher(CONFIG, VOCAB, torch.arange(VOCAB - 1))
    with pytest.raises(ValueError, match=r"token_map must map onto fewer ids than vocab_size"):
        NgramHasher(CONFIG, VOCAB, torch.arange(VOCAB) + 1)
    with pytest.raises(TypeError, match=r"token_map must be an int64 or int32 tensor"):
        NgramHasher(CONFIG, VOCAB, torch.arange(VOCAB).float())


def test_bad_layer_inputs_are_rejected():
    layer = Engram(4, CONFIG)
    h, table = torch.randn(2, 5, 4), torch.randn(CONFIG.num_rows, CONFIG.row_dim)
    rows = torch.zeros(2, 5, CONFIG.heads_per_layer, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"Engram: h must be \[batch, seq_len, dim\]"):
        layer(h[0], rows, table)
    with pytest.raises(ValueError, match=r"Engram: rows must have shape \(2, 5, 4\)"):
        layer(h, rows[..., :2], table)
    with pytest.raises(TypeError, match=r"Engram: rows must be int64 or int32"):
        layer(h, rows.float(), table)
    with pytest.raises(
        ValueError, match=rf"Engram: table must have shape \({CONFIG.num_rows}, 3\)"
    ):
        layer(h, rows, table[:-1])
    with pytest.raises(IndexError, match=r"lookup: indices must lie in"):
        layer(h, rows + CONFIG.num_rows, table)


def test_output_is_causal():
    """A change at position t moves no output before t (the convolution looks back only)."""
    torch.manual_seed(4)
    layer = _random_layer(CONFIG, 4)
    table = torch.randn(CONFIG.num_rows, CONFIG.row_dim, dtype=torch.float64)
    tokens = torch.randint(0, VOCAB, (1, 10))
    hasher = NgramHasher(CONFIG, VOCAB)
    h = torch.randn(1, 10, 4, dtype=torch.float64)
    out = layer(h, hasher(tokens)[:, :, 0], table)
    tokens[0, 6] = (tokens[0, 6] + 1) % VOCAB
    h[0, 6] += 1
    changed = layer(h, hasher(tokens)[:, :, 0], table)
    assert torch.equal(changed[0, :6], out[0, :6])
    assert not torch.allclose(changed[0, 6:], out[0, 6:])
