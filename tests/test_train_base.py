"""Smoke test of ``training/train_base.py``: a few steps of every phase on a tiny config,
offline; the result must be a loadable StableDiffusionPipeline, and resuming must continue
from the last checkpoint instead of starting over."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import load_script  # noqa: E402


def _script():
    return load_script("training/train_base.py")


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


def test_continuing_from_a_pipeline_keeps_its_vae_and_starts_from_its_weights(tmp_path):
    from diffusers import UNet2DConditionModel

    mod = _script()
    first = tmp_path / "first"
    mod.main(_args(first, tmp_path / "w1", 2))
    unet_before = UNet2DConditionModel.from_pretrained(first / "unet")
    second = tmp_path / "second"
    mod.main(_args(second, tmp_path / "w2", 1) + ["--init_from", str(first), "--learning_rate", "0", "--no_ema"])
    vae_cfg = [json.loads((d / "vae" / "config.json").read_text()) for d in (first, second)]
    assert vae_cfg[0]["scaling_factor"] == vae_cfg[1]["scaling_factor"]
    # With a zero learning rate the continued UNet is the starting one, not a fresh init.
    unet_after = UNet2DConditionModel.from_pretrained(second / "unet")
    for a, b in zip(unet_before.state_dict().values(), unet_after.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_high_noise_share_moves_that_share_of_timesteps_to_the_top():
    from ortho_diffusion.base_training.trainer import BaseTrainer, TrainConfig

    trainer = BaseTrainer.__new__(BaseTrainer)
    trainer.cfg = TrainConfig(high_noise_share=0.25, high_noise_min_timestep=960)
    t = trainer._timesteps(40000, 1000, torch.Generator().manual_seed(0))
    share_high = float((t >= 960).float().mean())
    # 25% drawn from [960, 1000) plus 4% of the uniform 75%: 0.25 + 0.75 * 0.04 = 0.28.
    assert abs(share_high - 0.28) < 0.01
    assert int(t.min()) >= 0 and int(t.max()) < 1000
