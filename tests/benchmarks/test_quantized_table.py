"""``benchmarks.quantized_table`` at tiny sizes: every table dtype is timed and its bytes are the
rows' plus the scales'; bad values are usage errors. No timing assertions (shared CI machine)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import quantized_table

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_table_dtype_is_timed_and_its_bytes_counted(tmp_path, capsys):
    out = tmp_path / "quantized.json"
    args = ["--device", "cpu", "--rows", "300", "--dim", "33", "--tokens", "5"]
    quantized_table.main([*args, "--rows-per-token", "6", "--repeats", "2", "--out", str(out)])
    rows = {row["table"]: row for row in json.loads(out.read_text())["lookup"]}
    assert set(rows) == {"fp32", "bf16", "int8", "fp8"}
    for row in rows.values():
        assert "error" not in row and math.isfinite(row["time_ms"]) and row["time_ms"] > 0
    # D bytes per quantized row and a 4-byte scale, against 2 * D for bf16.
    for name in ("int8", "fp8"):
        assert rows[name]["bytes_vs_bf16"] == pytest.approx((33 + 4) / 66)
    assert rows["fp32"]["table_mib"] == pytest.approx(300 * 33 * 4 / 2**20)
    assert "time/bf16" in capsys.readouterr().out


def test_a_bad_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as refused:
        with quantized_table.reported_errors():
            quantized_table.main(["--dim", "0"])
    assert refused.value.code == 2
    assert capsys.readouterr().err == "error: --dim must be >= 1, got 0\n"
