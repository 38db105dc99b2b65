"""Smoke run of ``benchmarks/overhead_parts.py``: every variant builds, trains and lands in the table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_parts_writes_every_variant(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # A subprocess, like the layer benchmark's smoke run: that module patches peft for its process.
    proc = subprocess.run(
        [sys.executable, "benchmarks/overhead_parts.py", "--width", "64", "--tokens", "16", "--rounds", "1",
         "--threads", "1", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in (tmp_path / "overhead_parts_64.md").read_text().splitlines() if line.startswith("| ")][1:]
    keys = [row.split(" ")[1] for row in rows]
    assert keys == ["base", "peft/lora", "ours/oft/auto", "peft/lora-self-attention", "ours/oft-self-attention",
                    "ours/oft-fixed-blocks", "ours/oft-out/auto"]
    assert rows[0].endswith("| 1.000 |")
    assert all(float(row.split("|")[-2]) > 0 for row in rows)
