"""Smoke run of ``benchmarks/bench_butterfly.py``: both ways timed, same rows, table written."""

import json

from conftest import load_script


def test_butterfly_benchmark_writes_both_timings(tmp_path):
    bench = load_script("benchmarks/bench_butterfly.py")
    rows = bench.main(["--cases", "32:16:4:2,64:8:2:4", "--repeats", "1", "--out", str(tmp_path)])
    assert [r["group_size"] for r in rows] == [8, 16]
    for r in rows:
        assert r["factors_ms"] > 0 and r["dense_ms"] > 0 and r["max_abs_diff"] < 1e-5
    assert json.loads((tmp_path / "butterfly_dense.json").read_text()) == rows
    assert (tmp_path / "butterfly_dense.md").read_text().count("\n| ") == 1 + len(rows)
