"""The control benchmark's multi-seed comparison bookkeeping (its full run is a benchmark)."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import load_script


def _row(method: str, seed: int, f1: float, f1_empty: float, f1_no_layout: float | None = None) -> dict:
    row = {"task": "canny", "method": method, "seed": seed, "values": {"canny_iou": f1 / 2, "canny_f1": f1},
           "values_no_caption": {"canny_iou": f1_empty / 2, "canny_f1": f1_empty}, "trainable_parameters": 10,
           "encoder_parameters": 8, "adapter_parameters": 2, "training_seconds": 5.0}
    if f1_no_layout is not None:  # runs scored before that prompt condition existed lack it
        row["values_no_layout"] = {"canny_iou": f1_no_layout / 2, "canny_f1": f1_no_layout}
    return row


def test_compare_means_average_each_method_over_its_seeds():
    mod = load_script("benchmarks/control_benchmark.py")
    rows = [_row("oft", 0, 0.5, 0.2, 0.45), _row("lora", 0, 0.7, 0.3), _row("oft", 1, 0.6, 0.4, 0.35)]
    means = {m["method"]: m for m in mod.compare_means(rows)}
    assert means["oft"]["seeds"] == [0, 1] and means["lora"]["seeds"] == [0]
    assert means["oft"]["values"]["canny_f1"] == pytest.approx(0.55)
    assert means["oft"]["values_std"]["canny_f1"] == pytest.approx(0.0707107, rel=1e-5)  # sample std
    assert means["oft"]["values_no_caption"]["canny_f1"] == pytest.approx(0.3)
    assert means["lora"]["values_std"]["canny_f1"] == 0.0
    table = mod.markdown({"model": "m", "eval_scenes": 2, "first_eval_seed": 0, "sample_steps": 2, "guidance_scale": 3.0,
                          "machine": "x", "compare": rows, "compare_means": list(means.values())})
    assert means["oft"]["values_no_layout"]["canny_f1"] == pytest.approx(0.4)
    assert "values_no_layout" not in means["lora"]
    assert "| oft | 2 | 0.550 ± 0.071 | 0.400 ± 0.071 | 0.300 ± 0.141 |" in table
    assert "| lora | 1 | 0.700 ± 0.000 | - | 0.300 ± 0.000 |" in table
    assert "| lora | 0 | IoU 0.350 / F1 0.700 | - | IoU 0.150 / F1 0.300 |" in table
    recipe = {"steps": 2000, "batch": 16, "learning_rate": 3e-3, "proportion_empty_prompts": 0.5, "layout_free": 0.5}
    table = mod.markdown({"model": "m", "eval_scenes": 2, "first_eval_seed": 0, "sample_steps": 2, "guidance_scale": 3.0,
                          "machine": "x", "compare": rows, "compare_means": list(means.values()), "compare_recipe": recipe})
    assert ("2000 steps of batch 16 at learning rate 0.003, 50% empty prompts, 50% of the training captions "
            "without sizes and places.") in table
    table = mod.markdown({"model": "m", "eval_scenes": 2, "first_eval_seed": 0, "sample_steps": 2, "guidance_scale": 3.0,
                          "machine": "x", "compare": rows, "compare_means": list(means.values()),
                          "compare_recipe": {**recipe, "high_noise_share": 0.3}})
    assert "without sizes and places, 30% of the timesteps near pure noise." in table


def test_a_finished_run_is_recognised_only_with_the_same_training_arguments(tmp_path: Path):
    mod = load_script("benchmarks/control_benchmark.py")
    from ortho_diffusion.training.control import build_parser

    args = Namespace(compare_steps=10, batch=2, learning_rate=1e-3, compare_task="canny", control_channels="8,16",
                     sample_steps=2, proportion_empty_prompts=0.5, block_size=8, boft_block_size=4, boft_factors=2,
                     lora_rank=2, high_noise_share=0.0)
    argv = mod._compare_argv(args, tmp_path / "model", tmp_path / "data", tmp_path / "out", "oft", 1)
    summary = tmp_path / "summary.json"
    assert not mod._trained_with(summary, argv)  # no run yet
    summary.write_text(json.dumps({"arguments": vars(build_parser().parse_args(argv))}))
    assert mod._trained_with(summary, argv)
    assert not mod._trained_with(summary, mod._compare_argv(args, tmp_path / "model", tmp_path / "data",
                                                            tmp_path / "out", "oft", 2))  # another seed
    assert not mod._trained_with(summary, mod._compare_argv(args, tmp_path / "model", tmp_path / "data",
                                                            tmp_path / "out", "lora", 1))  # another method
    rescaled = mod._compare_argv(args, tmp_path / "model", tmp_path / "data", tmp_path / "out", "oft+rescale", 1)
    assert build_parser().parse_args(rescaled).rescale
    assert not mod._trained_with(summary, rescaled)  # the same method with a flag more
    output_side = mod._compare_argv(args, tmp_path / "model", tmp_path / "data", tmp_path / "out", "oft+side=output", 1)
    assert build_parser().parse_args(output_side).side == "output"
    assert not mod._trained_with(summary, output_side)
    high_noise = mod._compare_argv(args, tmp_path / "model", tmp_path / "data", tmp_path / "out",
                                   "oft+high_noise_share=0.15", 1)
    assert build_parser().parse_args(high_noise).high_noise_share == 0.15
    recipe = Namespace(**{**vars(args), "high_noise_share": 0.3})
    assert build_parser().parse_args(mod._compare_argv(recipe, tmp_path, tmp_path, tmp_path, "lora", 1)).high_noise_share == 0.3
    assert build_parser().parse_args(mod._compare_argv(recipe, tmp_path, tmp_path, tmp_path, "oft+high_noise_share=0",
                                                       1)).high_noise_share == 0  # the variant wins
    assert not mod._trained_with(summary, high_noise)  # the same method trained on other timesteps
    low_rank = [mod._compare_argv(args, tmp_path, tmp_path, tmp_path, f"lroft+rank={r}", 1) for r in (2, 4)]
    summary.write_text(json.dumps({"arguments": vars(build_parser().parse_args(low_rank[0]))}))
    assert mod._trained_with(summary, low_rank[0]) and not mod._trained_with(summary, low_rank[1])
    summary.write_text(json.dumps({"arguments": vars(build_parser().parse_args(argv))}))
    summary.write_text(summary.read_text()[:20])  # truncated by a kill
    assert not mod._trained_with(summary, argv)


def test_earlier_result_files_join_the_means_only_when_comparable(tmp_path: Path):
    mod = load_script("benchmarks/control_benchmark.py")
    recipe = {"steps": 10, "batch": 2, "learning_rate": 1e-3, "proportion_empty_prompts": 0.5, "layout_free": 0.5,
              "high_noise_share": 0.3}
    result = {"model": "m", "eval_scenes": 2, "first_eval_seed": 0, "sample_steps": 2, "guidance_scale": 3.0,
              "compare_recipe": recipe}
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({**result, "machine": "another", "compare": [
        _row("oft", 100, 0.5, 0.2, 0.4), _row("lora", 100, 0.6, 0.3, 0.5), _row("oft", 101, 0.9, 0.9, 0.9)]}))
    now = [_row("oft", 101, 0.7, 0.4, 0.6)]
    rows = mod.include_rows(now, [earlier], result)
    assert [(r["method"], r["seed"]) for r in rows] == [("oft", 100), ("lora", 100), ("oft", 101)]
    assert rows[2]["values"]["canny_f1"] == 0.7  # the run measured now wins over the file's
    means = {m["method"]: m for m in mod.compare_means(rows)}
    assert means["oft"]["values"]["canny_f1"] == pytest.approx(0.6)
    assert means["lora"]["seeds"] == [100]

    for change, named in (({"sample_steps": 25}, "sample_steps"),
                          ({"compare_recipe": {**recipe, "high_noise_share": 0.5}}, "compare_recipe")):
        other = tmp_path / "other.json"
        other.write_text(json.dumps({**result, **change, "compare": [_row("lora", 101, 0.6, 0.3, 0.5)]}))
        with pytest.raises(SystemExit, match=named):
            mod.include_rows(now, [other], result)
    segmentation = tmp_path / "segmentation.json"
    segmentation.write_text(json.dumps({**result, "compare": [{**_row("lora", 101, 0.6, 0.3), "task": "segmentation"}]}))
    with pytest.raises(SystemExit, match="task"):
        mod.include_rows(now, [segmentation], result)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(earlier.read_text()[:30])
    with pytest.raises(SystemExit, match="cannot read"):
        mod.include_rows(now, [truncated], result)
