"""Smoke run of ``benchmarks/bench_adapters.py --quick``: every row is there and timed.

No timing assertions: the point is that every adapter of every library builds, trains a step,
is profiled and lands in the report.
"""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

pytest.importorskip("peft")
pytest.importorskip("lycoris")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_adapters.py"


def load_bench():
    return load_script("benchmarks/bench_adapters.py")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter_speed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # A subprocess: the script patches peft's BOFT kernel loader for its whole process.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_machine_and_versions_are_printed(quick_run):
    _, stdout = quick_run
    assert "cores" in stdout and "torch threads" in stdout
    for lib in ("torch", "diffusers", "peft", "lycoris"):
        assert f"{lib} " in stdout


def test_every_layer_row_is_in_json_and_table(quick_run):
    out, _ = quick_run
    bench = load_bench()
    settings = bench.make_settings(bench.argparse.Namespace(
        quick=True, repeats=None, warmup=None, widths=None, skip_unet=False, only=None,
    ))
    keys = [v.key for v in bench.training_variants(settings)]
    for must in ("base", "peft/lora", "peft/oft", "peft/boft-m2", "peft/boft-m4", "lycoris/diag-oft-rebuild",
                 "lycoris/boft-m4-bypass", "ours/oft/auto", "ours/oftv2/weight-centric", "ours/boft-m4/input-centric",
                 "ours/goft/auto"):
        assert must in keys

    result = json.loads((out / "adapter_speed.json").read_text())
    for width, _ in settings.widths:
        rows = {r["key"]: r for r in result["layer_training"] if r["width"] == width}
        assert sorted(rows) == sorted(keys)
        for r in rows.values():
            assert positive(r["step_s"]) and all(positive(t) for t in r["step_s_all"])
            assert positive(r["memory"]["total_bytes"]) and positive(r["time_vs_base"])
            if r["library"] != "base":
                assert r["trainable_params"] > 0
            if r["library"] == "ours":
                assert sum(r["auto_paths"].values()) == 6  # every adapted projection reported its path

    table = (out / "adapter_speed.md").read_text()
    for width, _ in settings.widths:
        lines = table.split(f"### width {width},")[1].split("\n\n")[1].splitlines()[2:]
        assert len(lines) == len(keys)
        for line in lines:
            step_ms = float(line.split("|")[6])
            assert positive(step_ms)
    assert (out / "adapter_speed.png").stat().st_size > 0


def test_speedups_unet_and_inference(quick_run):
    out, _ = quick_run
    result = json.loads((out / "adapter_speed.json").read_text())
    theirs = {s["theirs"] for s in result["speedups"] if s["scope"] == "layer"}
    assert {"peft/boft-m2", "peft/boft-m4", "lycoris/boft-m2-rebuild", "lycoris/boft-m4-bypass"} <= theirs
    assert all(positive(s["speedup_auto"]) for s in result["speedups"])

    unet = {r["key"]: r for r in result["unet_training"]}
    assert {"base", "peft/lora", "peft/oft", "peft/boft-m2", "lycoris/boft-m2-rebuild", "ours/oft/auto",
            "ours/oftv2/auto", "ours/boft-m2-scale/auto"} <= set(unet)
    assert all(positive(r["step_s"]) for r in unet.values())
    # UNet rows are timed one after another, each against frozen-base steps timed just before it.
    assert all(positive(r["base_adjacent_s"]) for r in unet.values())
    assert all(abs(r["time_vs_base"] - r["step_s"] / r["base_adjacent_s"]) < 1e-12 for r in unet.values())

    merged = [r for r in result["layer_inference"] + result["unet_inference"] if r["state"] == "merged"]
    assert merged and all(positive(r["forward_s"]) for r in merged)
    assert all(r["max_abs_diff_vs_live"] < 1e-4 for r in merged)  # merging kept the function
    # Layer-level merged rows are also timed through plain layers holding the same weights,
    # round by round: the ratio is the median of the per-round ratios.
    layer_merged = [r for r in result["layer_inference"] if r["state"] == "merged"]
    assert layer_merged
    for r in layer_merged:
        assert len(r["plain_forward_s_all"]) == len(r["forward_s_all"]) and all(map(positive, r["plain_forward_s_all"]))
        ratios = [a / b for a, b in zip(r["forward_s_all"], r["plain_forward_s_all"])]
        assert r["time_vs_plain"] == statistics.median(ratios)
    assert "x plain layers, same weights" in (out / "adapter_speed.md").read_text()


def _row(key: str, times: list[float], width: int = 64) -> dict:
    return {"key": key, "width": width, "step_s": sorted(times)[len(times) // 2], "step_s_all": times,
            "memory": {"total_bytes": 100}}


def test_time_ratios_are_paired_by_round():
    bench = load_bench()
    # Round 2 is slow for everyone: per-round ratios stay 1.5 where the medians' ratio would not.
    base = _row("base", [1.0, 4.0, 1.0, 1.0, 1.0])
    ours = _row("ours/oft/auto", [1.5, 6.0, 1.5, 1.5, 1.5])
    lora = _row("peft/lora", [2.0, 8.0, 1.2, 2.0, 2.0])
    rows = [base, lora, ours]
    bench.add_ratios(rows)
    assert ours["time_vs_base_rounds"] == [1.5] * 5 and ours["time_vs_base"] == 1.5
    assert ours["time_vs_base_quartiles"] == (1.5, 1.5)
    assert lora["time_vs_base"] == 2.0
    (o,) = bench.overhead_against_lora(rows, keys=("ours/oft/auto",))
    assert o["rounds"] == 5 and o["difference_median"] == -0.5
    assert o["share_not_slower"] == 0.8  # LoRA's 1.2 in round 3 beats our 1.5

    unpaired = [_row("base", [1.0, 3.0]), _row("ours/oft/auto", [2.0, 2.0])]
    bench.add_ratios(unpaired, paired=False)
    assert unpaired[1]["time_vs_base"] == 2.0 / unpaired[0]["step_s"] and "time_vs_base_rounds" not in unpaired[1]


def test_overhead_against_lora_is_reported(quick_run):
    out, _ = quick_run
    result = json.loads((out / "adapter_speed.json").read_text())
    widths = {r["width"] for r in result["overhead_vs_lora"]}
    assert widths == {r["width"] for r in result["layer_training"]}
    assert {r["ours"] for r in result["overhead_vs_lora"]} == {"ours/oft/auto", "ours/oftv2/auto"}
    assert "OFT and OFTv2 against peft LoRA, round by round" in (out / "adapter_speed.md").read_text()
