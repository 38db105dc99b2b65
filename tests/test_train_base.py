"""Smoke test of ``training/train_base.py``: a few steps of every phase on a tiny config,
offline; the result must be a loadable StableDiffusionPipeline, and resuming must continue
from the last checkpoint instead of starting over."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train_base.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_base", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(out, work, steps):
    return ["--model_size", "tiny", "--num_images", "48", "--vae_train_steps", "2", "--vae_batch_size", "4",
            "--max_train_steps", str(steps), "--train_batch_size", "4", "--checkpointing_steps", "2",
            "--lr_warmup_steps", "1", "--output_dir", str(out), "--work_dir", str(work), "--seed", "3",
            "--resume_from_checkpoint", "latest"]


def test_flags_map_onto_the_config():
    cfg = _script().parse_args(["--output_dir", "x", "--train_batch_size", "7", "--learning_rate", "0.01",
                                "--mixed_precision", "bf16", "--no_ema"])
    assert (cfg.output_dir, cfg.train_batch_size, cfg.learning_rate, cfg.mixed_precision, cfg.use_ema) == (
        "x", 7, 0.01, "bf16", False)


def test_tiny_training_runs_resumes_and_exports(tmp_path):
    from diffusers import StableDiffusionPipeline

    mod = _script()
    out, work = tmp_path / "model", tmp_path / "work"
    mod.main(_args(out, work, 3))
    assert (out / "model_index.json").is_file()
    assert [p.name for p in work.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not list(tmp_path.glob(".*tmp*")) and not list(work.glob(".*tmp*"))  # atomic writes cleaned up
    log = json.loads((work / "train_log.json").read_text())
    assert log["phases"]["diffusion"]["steps"] == 3

    # A longer run in the same work dir reuses the VAE and latents and resumes at step 2.
    vae_mtime = (work / "vae" / "config.json").stat().st_mtime
    mod.main(_args(out, work, 5))
    assert (work / "vae" / "config.json").stat().st_mtime == vae_mtime
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.clip_sample is False
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    img = pipe("a small red circle on the left, on a white background", num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    scale = pipe.vae.config.scaling_factor
    latents = torch.load(work / "latents.pt")
    assert abs(latents["scaling_factor"] - scale) < 1e-6
    assert abs(float(latents["latents"].std()) - 1.0) < 1e-3
