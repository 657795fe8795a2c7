"""recipes.plan: one training step simulated as one rank of many, with fake tensors."""

from __future__ import annotations

import json

import pytest

from memcompile.flavors import get_flavor
from memcompile.stats import model_stats
from recipes.plan import main


def _planned(tmp_path, *flags: str) -> dict:
    out = tmp_path / "plan.json"
    assert main([*flags, "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    return result


def _params(flavor: str):
    return model_stats(get_flavor(flavor))  # the plan's vocabulary: the flavor's own


def test_mem_1b_on_8_simulated_h100s_fits_with_its_shards(tmp_path, in_process_run, capsys):
    """README's command: FSDP shards every parameter and its two AdamW states over 8 ranks."""
    result = _planned(tmp_path, "--model", "mem_1b", "--ngpu", "8", "--training.seq_len", "2048")
    stats = _params("mem_1b")
    sharded_fp32 = stats.total_params * 4 / 8
    assert result["fits"] and result["setting"]["activation_checkpoint"] == "SelectiveAC.Config"
    assert result["setting"]["vocab_size"] == get_flavor("mem_1b").vocab_size == 32000
    assert result["optimizer_bytes"] == pytest.approx(2 * sharded_fp32, rel=0.01)
    assert result["params_bytes"] >= sharded_fp32  # plus the all-gathered bf16 units
    # Each step all-gathers every parameter in bf16 (forward, and backward's recompute) and
    # reduce-scatters fp32 gradients: 7/8 of each full tensor leaves this rank.
    assert result["collective_bytes"]["all_gather"] >= stats.total_params * 2 * 7 / 8
    assert result["collective_bytes"]["reduce_scatter"] >= stats.total_params * 4 * 7 / 8
    assert 0 < result["mfu"] < 1 and result["tokens_per_second"] > 0
    assert "| mem_1b | 8 x h100 | 1 | adamw |" in capsys.readouterr().out


def test_memory_parallel_row_sparse_table_is_column_sharded(tmp_path, in_process_run):
    """G = 4 of 8 ranks, row-wise AdaGrad: each rank holds a quarter of the table's columns,
    one fp32 state per row, no table-sized gradient, and the reads are all-to-alls."""
    result = _planned(
        tmp_path, "--model", "mem_tiny", "--ngpu", "8",
        "--parallelism.memory_parallel_degree", "4",
        "--optimizer.memory_optimizer", "rowwise_adagrad",
    )  # fmt: skip
    memory = get_flavor("mem_tiny").memory
    stats = _params("mem_tiny")
    table_shard = memory.num_values * memory.value_dim * 4 / 4
    dense_states = 2 * stats.dense_params * 4 / 8
    assert result["params_bytes"] >= table_shard + stats.dense_params * 4 / 8
    assert result["optimizer_bytes"] == pytest.approx(
        dense_states + memory.num_values * 4, rel=0.01
    )
    assert result["grads_bytes"] < table_shard
    assert result["collective_bytes"]["all_to_all"] > 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gpu", "tpu"], "--gpu must be one of h100, h200, a100, cpu, got 'tpu'"),
        (
            ["--ngpu", "6", "--parallelism.data_parallel_shard_degree", "4"],
            "--ngpu 6 does not factor into the mesh",
        ),
        (
            ["--ngpu", "8", "--parallelism.memory_parallel_degree", "3"],
            "--parallelism.memory_parallel_degree 3 must be >= 1 and divide --ngpu 8",
        ),
        (
            ["--ngpu", "12", "--parallelism.memory_parallel_degree", "12"],
            "must divide the value dim 2048",
        ),
        (["--ngpu", "0"], "--ngpu must be >= 1, got 0"),
    ],
)
def test_bad_input_is_one_line_before_any_tracing(flags, message, in_process_run, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "mem_1b", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
