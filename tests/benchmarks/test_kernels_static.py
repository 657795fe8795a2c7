"""The static Triton check (``benchmarks/kernels_static.py``) on a cheap subset that still catches
regressions: every kernel of ``ops/`` compiled for sm_90 at the widest width the check covers,
fp32 and bf16, with the launch choices of its launcher. No GPU needed: the Triton wheel's
``ptxas`` does the register allocation.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton", reason="the static check compiles Triton kernels (Linux)")

from benchmarks import kernels_static  # noqa: E402

if (missing := kernels_static.ptxas_missing()) is not None:
    pytest.skip(f"cannot compile for sm_90 here: {missing}", allow_module_level=True)

ROW_SPARSE_KERNELS = ("row_sq_norms", "update_rows")


@pytest.fixture(scope="module")
def widest(tmp_path_factory):
    """The check's JSON at the widest D (the lookup kernels' tile stops growing at 512, the
    row-sparse kernels' grows with D: the widest is where registers run out)."""
    out = tmp_path_factory.mktemp("kernels_static") / "static.json"
    widest_dim = max(kernels_static.default_dims())
    payload = kernels_static.main(
        ["--dims", str(widest_dim), "--archs", "90", "--index-dtypes", "int64",
         "--bag-sizes", "128", "--out", str(out)]
    )  # fmt: skip
    return payload, json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90_without_spilling(widest):
    payload, written = widest
    rows = payload["results"]
    assert payload["failures"] == []
    assert written["results"] == rows and written["failures"] == []
    assert {row["kernel"] for row in rows} == set(kernels_static.KERNELS)
    assert {row["dtype"] for row in rows} == {"fp32", "bf16"}
    for row in rows:
        assert "error" not in row, row
        assert 0 < row["registers"] <= 255 and row["spill_bytes"] == 0, row
        assert 0 < row["occupancy"] <= 1, row


def test_row_sparse_kernels_reach_the_lookup_kernels_occupancy(widest):
    rows = widest[0]["results"]
    row_sparse = [row for row in rows if row["kernel"].startswith(ROW_SPARSE_KERNELS)]
    lookup = min(row["occupancy"] for row in rows if row not in row_sparse)
    for row in row_sparse:
        assert row["occupancy"] >= lookup, (row, f"lookup kernels: {lookup:.1%}")


def test_occupancy_is_bounded_by_registers_shared_memory_and_warp_slots():
    # 143 registers -> 144 per thread allocated, 4608 per warp: 14 warps fit, 3 blocks of 4.
    assert kernels_static.occupancy(90, 143, 0, 4) == 12 / 64
    # Few registers and no shared memory: the 64 warp slots are the limit.
    assert kernels_static.occupancy(90, 32, 0, 4) == 1.0
    # 100 KB of shared memory: two blocks fit in the H100's 228 KB, one in the A100's 164 KB.
    assert kernels_static.occupancy(90, 32, 100 * 1024, 4) == 8 / 64
    assert kernels_static.occupancy(80, 32, 100 * 1024, 4) == 4 / 64


def test_bad_arguments_are_refused_with_the_flag_named():
    with pytest.raises(ValueError, match="--jobs"):
        kernels_static.main(["--jobs", "0"])
    with pytest.raises(ValueError, match="--dims"):
        kernels_static.main(["--dims", "0"])
