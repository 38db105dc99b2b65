"""The control benchmark's multi-seed comparison bookkeeping (its full run is a benchmark)."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import load_script


def _row(method: str, seed: int, f1: float, f1_empty: float) -> dict:
    return {"task": "canny", "method": method, "seed": seed, "values": {"canny_iou": f1 / 2, "canny_f1": f1},
            "values_no_caption": {"canny_iou": f1_empty / 2, "canny_f1": f1_empty}, "trainable_parameters": 10, "encoder_parameters": 8,
            "adapter_parameters": 2, "training_seconds": 5.0}


def test_compare_means_average_each_method_over_its_seeds():
    mod = load_script("benchmarks/control_benchmark.py")
    rows = [_row("oft", 0, 0.5, 0.2), _row("lora", 0, 0.7, 0.3), _row("oft", 1, 0.6, 0.4)]
    means = {m["method"]: m for m in mod.compare_means(rows)}
    assert means["oft"]["seeds"] == [0, 1] and means["lora"]["seeds"] == [0]
    assert means["oft"]["values"]["canny_f1"] == pytest.approx(0.55)
    assert means["oft"]["values_std"]["canny_f1"] == pytest.approx(0.0707107, rel=1e-5)  # sample std
    assert means["oft"]["values_no_caption"]["canny_f1"] == pytest.approx(0.3)
    assert means["lora"]["values_std"]["canny_f1"] == 0.0
    table = mod.markdown({"model": "m", "eval_scenes": 2, "first_eval_seed": 0, "sample_steps": 2, "guidance_scale": 3.0,
                          "machine": "x", "compare": rows, "compare_means": list(means.values())})
    assert "| oft | 2 | 0.550 ± 0.071 | 0.300 ± 0.141 |" in table
    recipe = {"steps": 2000, "batch": 16, "learning_rate": 3e-3, "proportion_empty_prompts": 0.5}
    table = mod.markdown({"model": "m", "eval_scenes": 2, "first_eval_seed": 0, "sample_steps": 2, "guidance_scale": 3.0,
                          "machine": "x", "compare": rows, "compare_means": list(means.values()), "compare_recipe": recipe})
    assert "2000 steps of batch 16 at learning rate 0.003, 50% empty prompts." in table


def test_a_finished_run_is_recognised_only_with_the_same_training_arguments(tmp_path: Path):
    mod = load_script("benchmarks/control_benchmark.py")
    from ortho_diffusion.training.control import build_parser

    args = Namespace(compare_steps=10, batch=2, learning_rate=1e-3, compare_task="canny", control_channels="8,16",
                     sample_steps=2, proportion_empty_prompts=0.5, block_size=8, boft_block_size=4, boft_factors=2,
                     lora_rank=2)
    argv = mod._compare_argv(args, tmp_path / "model", tmp_path / "data", tmp_path / "out", "oft", 1)
    summary = tmp_path / "summary.json"
    assert not mod._trained_with(summary, argv)  # no run yet
    summary.write_text(json.dumps({"arguments": vars(build_parser().parse_args(argv))}))
    assert mod._trained_with(summary, argv)
    assert not mod._trained_with(summary, mod._compare_argv(args, tmp_path / "model", tmp_path / "data",
                                                            tmp_path / "out", "oft", 2))  # another seed
    assert not mod._trained_with(summary, mod._compare_argv(args, tmp_path / "model", tmp_path / "data",
                                                            tmp_path / "out", "lora", 1))  # another method
    summary.write_text(summary.read_text()[:20])  # truncated by a kill
    assert not mod._trained_with(summary, argv)
