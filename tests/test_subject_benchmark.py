"""The subject benchmark's method@rate variants and ordinary-prompt scoring (its full run is a
benchmark, not a test)."""

from __future__ import annotations

import json

import pytest
from conftest import load_script

from ortho_diffusion.shapes import make_scene, render


def test_variants_carry_their_learning_rate():
    mod = load_script("benchmarks/subject_fidelity.py")
    assert mod.parse_variant("oft@1e-3") == ("oft", "1e-3", ())
    default = mod.METHOD_FLAGS["lora"][mod.METHOD_FLAGS["lora"].index("--learning_rate") + 1]
    assert mod.parse_variant("lora") == ("lora", default, ())
    coft = mod.parse_variant("oft@3e-3+constraint=0.1")
    assert coft == ("oft", "3e-3", ("--constraint", "0.1"))
    assert mod.variant_label(*coft) == "oft @ 3e-3 + constraint=0.1"
    with pytest.raises(ValueError, match="bad variant option"):
        mod.parse_variant("oft@1e-3+dropout=0.1")
    kv = mod.parse_variant("oft@2e-3+side=output+unet_targets=attn2.to_k;attn2.to_v")
    assert kv == ("oft", "2e-3", ("--side", "output", "--unet_targets", "attn2.to_k,attn2.to_v"))
    assert mod.run_name(*kv, 3) == "oft-2e-3outputattn2.to_k+attn2.to_v-3"
    te = mod.parse_variant("lora@5e-4+train_text_encoder+lora_rank=4")
    assert te == ("lora", "5e-4", ("--train_text_encoder", "--lora_rank", "4"))
    assert mod.variant_label(*te) == "lora @ 5e-4 + train_text_encoder + lora_rank=4"
    assert mod.run_name(*te, 0) == "lora-5e-4train_text_encoder4-0"
    with pytest.raises(ValueError, match="bad variant option"):
        mod.parse_variant("lora+train_text_encoder=yes")
    with pytest.raises(ValueError, match="side is one of"):
        mod.parse_variant("oft@1e-3+side=both")
    with pytest.raises(ValueError, match="unknown method"):
        mod.parse_variant("dora@1e-3")
    with pytest.raises(ValueError):
        mod.parse_variant("oft@fast")


def test_ordinary_accuracy_counts_every_image_of_every_prompt():
    mod = load_script("benchmarks/subject_fidelity.py")
    # Ground-truth renders of the ordinary prompts are all right; swapping two prompts' images
    # makes exactly those images wrong.
    images = [render(make_scene(bg, [(size, color, shape, pos)])) for size, color, shape, pos, bg in mod.ORDINARY]
    two_each = [img for img in images for _ in range(2)]
    assert mod.ordinary_accuracy(two_each, per_prompt=2) == 1.0
    swapped = list(two_each)
    swapped[0], swapped[2] = swapped[2], swapped[0]
    assert mod.ordinary_accuracy(swapped, per_prompt=2) == pytest.approx(1 - 2 / len(two_each))
    with pytest.raises(ValueError):
        mod.ordinary_accuracy(two_each[:-1], per_prompt=2)


def test_resume_keeps_finished_runs_in_the_table(tmp_path):
    from argparse import Namespace

    mod = load_script("benchmarks/subject_fidelity.py")
    assert mod.previous_runs(tmp_path) == []
    metrics = {c: 0.5 for c in ("subject_similarity", "subject_shape", "prompt_background", "prompt_position",
                                "ordinary_accuracy", "forgetting", "class_drift", "train_seconds")}
    rows = [{"subject": "split-circle", "method": "base", **metrics, "parameters": 0},
            {"subject": "split-circle", "method": "goft @ 1e-2", "seed": 0, **metrics, "parameters": 7}]
    subject = next(s for s in mod.SUBJECTS if s.name == "split-circle")
    args = Namespace(steps=1, batch=1, seeds="0", eval_seeds=1, sample_steps=1, guidance=3.0)
    mod.write_results(tmp_path, rows, {}, ["oft @ 1e-3"], [subject], args)
    assert [r["method"] for r in mod.previous_runs(tmp_path)] == ["goft @ 1e-2"]
    # A run of other variants resumed from this file still lists the finished ones.
    assert "| goft @ 1e-2 | 1 |" in (tmp_path / "subject_fidelity.md").read_text()
    (tmp_path / "subject_fidelity.json").write_text("{truncated")
    with pytest.raises(SystemExit, match="cannot resume"):
        mod.previous_runs(tmp_path)


def test_tradeoff_points_group_rates_and_average_seeds(tmp_path):
    mod = load_script("benchmarks/subject_fidelity.py")

    def row(method, seed, subject, similarity, ordinary):
        return {"subject": subject, "method": method, "seed": seed,
                "subject_similarity": similarity, "ordinary_accuracy": ordinary}

    rows = [
        {"subject": "a", "method": "base", "subject_similarity": 0.2, "ordinary_accuracy": 1.0},
        row("oft @ 1e-3", 0, "a", 0.6, 0.8), row("oft @ 1e-3", 0, "b", 0.8, 0.6),
        row("oft @ 1e-3", 1, "a", 0.4, 1.0), row("oft @ 1e-3", 1, "b", 0.6, 0.8),
        row("oft @ 3e-4", 0, "a", 0.3, 0.9),
        row("oft @ 3e-3 + constraint=0.5", 0, "a", 0.5, 0.5),
        row("oft @ 3e-3 + constraint=0.3", 0, "a", 0.4, 0.6),
    ]
    families = mod.tradeoff_points(rows)
    assert list(families) == ["oft", "oft + constraint"]
    oft = families["oft"]
    assert [q["rate"] for q in oft] == [3e-4, 1e-3]
    # Seed means 0.7 / 0.5 (similarity) and 0.7 / 0.9 (ordinary): std 0.1 each.
    assert oft[1]["similarity"] == pytest.approx(0.6) and oft[1]["ordinary"] == pytest.approx(0.8)
    assert oft[1]["similarity_std"] == pytest.approx(0.1) and oft[1]["ordinary_std"] == pytest.approx(0.1)
    assert oft[1]["seeds"] == 2 and oft[0]["similarity_std"] == 0.0
    assert [q["tag"] for q in families["oft + constraint"]] == ["0.003, constraint=0.3", "0.003, constraint=0.5"]
    mod.write_tradeoff_plot(tmp_path / "tradeoff.png", rows)
    from PIL import Image

    assert Image.open(tmp_path / "tradeoff.png").size[0] > 100


def test_frontier_keeps_undominated_points_and_interpolates_within_its_span():
    mod = load_script("benchmarks/subject_fidelity.py")
    points = [{"similarity": s, "ordinary": o} for s, o in [(0.5, 0.9), (0.6, 0.7), (0.55, 0.6), (0.7, 0.4), (0.65, 0.3)]]
    # (0.55, 0.6) is beaten by (0.6, 0.7); (0.65, 0.3) by (0.7, 0.4).
    front = mod.frontier(points)
    assert front == [(0.5, 0.9), (0.6, 0.7), (0.7, 0.4)]
    assert mod.ordinary_at(front, 0.55) == pytest.approx(0.8)
    assert mod.ordinary_at(front, 0.7) == pytest.approx(0.4)
    assert mod.ordinary_at(front, 0.45) is None and mod.ordinary_at(front, 0.71) is None

    def rows(method, pairs):
        return [{"subject": "a", "method": f"{method} @ {rate}", "seed": 0, "subject_similarity": s,
                 "ordinary_accuracy": o} for rate, s, o in pairs]

    table = mod.tradeoff_lines(rows("lora", [("1e-4", 0.5, 0.9), ("1e-3", 0.7, 0.5)])
                               + rows("oft", [("1e-3", 0.6, 0.8), ("3e-3", 0.8, 0.6)])
                               + rows("goft", [("1e-3", 0.6, 0.8)]), step=0.05)
    # OFT spans 0.6-0.8, LoRA 0.5-0.7: compared on 0.6-0.7 only; GOFT has a single rate.
    assert table[-1] == "- oft vs lora: 0.600: 80% vs 70%; 0.650: 75% vs 60%; 0.700: 70% vs 50%"
    assert not any("goft" in line for line in table)

    # With the same options on both sides the comparison is like for like: OFT on the
    # cross-attention against LoRA on the cross-attention, not against LoRA everywhere.
    kv = " + unet_targets=unet-cross-kv"
    table = mod.tradeoff_lines(rows("lora", [("1e-4", 0.5, 0.9), ("1e-3", 0.7, 0.5)])
                               + rows("lora", [(f"1e-3{kv}", 0.6, 0.9), (f"3e-3{kv}", 0.8, 0.7)])
                               + rows("oft", [(f"3e-3{kv}", 0.6, 0.8), (f"1e-2{kv}", 0.8, 0.6)]), step=0.1)
    assert table[-1] == ("- oft + unet_targets=unet-cross-kv vs lora + unet_targets=unet-cross-kv: "
                         "0.600: 80% vs 90%; 0.700: 70% vs 80%; 0.800: 60% vs 70%")
    # Other layers are another adapter, not a point on the same sweep.
    other = " + unet_targets=attn1.to_q"
    families = mod.tradeoff_points(rows("oft", [(f"3e-3{kv}", 0.6, 0.8), (f"3e-3{other}", 0.7, 0.5)]))
    assert sorted(families) == ["oft + unet_targets=attn1.to_q", "oft + unet_targets=unet-cross-kv"]


def test_resume_with_every_run_finished_rewrites_the_table_without_training(tmp_path):
    mod = load_script("benchmarks/subject_fidelity.py")
    metrics = {c: 0.5 for c in ("subject_similarity", "subject_shape", "prompt_background", "prompt_position",
                                "ordinary_accuracy", "forgetting", "class_drift", "train_seconds")}
    row = {"subject": "split-circle", "method": "oft @ 1e-3", "learning_rate": 1e-3, "seed": 1, **metrics, "parameters": 7}
    (tmp_path / "subject_fidelity.json").write_text(json.dumps([row]))
    work = tmp_path / "work"
    assert mod.main(["--methods", "oft@1e-3", "--subjects", "split-circle", "--seeds", "1", "--resume",
                     "--eval_seeds", "1", "--sample_steps", "1", "--work_dir", str(work), "--results", str(tmp_path)]) == 0
    table = (tmp_path / "subject_fidelity.md").read_text()
    assert "| oft @ 1e-3 | 1 |" in table and "training seeds 1," in table
    assert not work.exists()  # nothing trained
    assert not (tmp_path / "subject_fidelity.png").exists()  # a base-only grid would replace the real one
