#!/usr/bin/env python
"""Train the embedded shapes-world text-to-image model from scratch (CPU-friendly).

Single process:
    python training/train_base.py --output_dir assets/shapes-sd --work_dir runs/train_base
Through accelerate (same flags):
    accelerate launch --cpu training/train_base.py --output_dir assets/shapes-sd

All logic lives in ``ortho_diffusion.base_training``; this file only maps flags onto
:class:`ortho_diffusion.base_training.TrainConfig`. Rerunning with the same ``--work_dir``
reuses the finished VAE and latents; ``--resume_from_checkpoint latest`` resumes phase 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ortho_diffusion.base_training import TrainConfig, train  # noqa: E402


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=d.output_dir, help="where the StableDiffusionPipeline folder goes")
    p.add_argument("--work_dir", default=d.work_dir, help="checkpoints, VAE and cached latents")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num_images", type=int, default=d.num_images, help="rendered training scenes")
    p.add_argument("--p_single", type=float, default=d.p_single, help="share of one-object scenes")
    p.add_argument("--model_size", choices=["default", "tiny"], default=d.model_size)
    p.add_argument("--vae_train_steps", type=int, default=d.vae_train_steps)
    p.add_argument("--vae_batch_size", type=int, default=d.vae_batch_size)
    p.add_argument("--vae_learning_rate", type=float, default=d.vae_learning_rate)
    p.add_argument("--vae_crop_size", type=int, default=d.vae_crop_size, help="VAE trains on random crops (0: none)")
    p.add_argument("--vae_full_size_share", type=float, default=d.vae_full_size_share,
                   help="last share of the VAE phase on whole images")
    p.add_argument("--vae_edge_loss_weight", type=float, default=d.vae_edge_loss_weight)
    p.add_argument("--vae_time_limit_minutes", type=float, default=None, help="wall-clock cap of the VAE phase")
    p.add_argument("--max_train_steps", type=int, default=d.max_train_steps, help="UNet + text encoder steps")
    p.add_argument("--train_batch_size", type=int, default=d.train_batch_size)
    p.add_argument("--learning_rate", type=float, default=d.learning_rate)
    p.add_argument("--text_encoder_lr_scale", type=float, default=d.text_encoder_lr_scale)
    p.add_argument("--lr_scheduler", default=d.lr_scheduler)
    p.add_argument("--lr_warmup_steps", type=int, default=d.lr_warmup_steps)
    p.add_argument("--uncond_prob", type=float, default=d.uncond_prob, help="caption dropout for CFG")
    p.add_argument("--partial_caption_prob", type=float, default=d.partial_caption_prob)
    p.add_argument("--no_ema", action="store_true", help="ship the raw weights instead of their EMA")
    p.add_argument("--ema_max_decay", type=float, default=d.ema_max_decay)
    p.add_argument("--checkpointing_steps", type=int, default=d.checkpointing_steps)
    p.add_argument("--checkpoints_total_limit", type=int, default=d.checkpoints_total_limit)
    p.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint folder or "latest"')
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default=d.mixed_precision)
    p.add_argument("--num_threads", type=int, default=None, help="max torch threads (default: all cores)")
    p.add_argument("--no_adaptive_threads", action="store_true",
                   help="always use --num_threads instead of re-measuring 1 vs N threads (see threads.py)")
    p.add_argument("--time_limit_minutes", type=float, default=None,
                   help="wall-clock cap of this invocation; phase 3 anneals and stops in time")
    p.add_argument("--init_from", default=None,
                   help="continue from this pipeline folder (its VAE, text encoder, UNet, tokenizer)")
    p.add_argument("--high_noise_share", type=float, default=d.high_noise_share,
                   help="share of timesteps drawn near pure noise, where layout words must be learnt")
    p.add_argument("--high_noise_min_timestep", type=int, default=d.high_noise_min_timestep)
    a = p.parse_args(argv)
    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(a, f.name)}
    kw["use_ema"] = not a.no_ema
    kw["adaptive_threads"] = not a.no_adaptive_threads
    return TrainConfig(**kw)


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
