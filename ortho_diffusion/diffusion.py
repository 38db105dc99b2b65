"""Pipeline-level helpers shared by training, benchmarks and the app.

Loading a local diffusers folder, encoding prompts for SD 1.x/2.x and SDXL, and the
denoising loss (epsilon or v-prediction), all with diffusers' own models and schedulers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


class ModelFolderError(ValueError):
    """A model path that is not a loadable local diffusers pipeline folder."""


def pipeline_class_name(path: str | Path) -> str:
    """``_class_name`` of a local pipeline folder's ``model_index.json``."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise ModelFolderError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    try:
        return json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError) as err:
        raise ModelFolderError(f"{index}: unreadable ({err})") from None


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a local SD 1.x / 2.x / SDXL pipeline folder offline, without a safety checker."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls_name = pipeline_class_name(path)
    if "XL" in cls_name:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    elif cls_name.startswith("StableDiffusion"):
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path),
            dtype=dtype,
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
    else:
        raise ModelFolderError(f"{path}: {cls_name} is not a Stable Diffusion (1.x/2.x/XL) pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_sdxl(pipe: Any) -> bool:
    """True for pipelines with two text encoders and SDXL's size conditioning."""
    return getattr(pipe, "text_encoder_2", None) is not None


@dataclass
class PromptEmbeddings:
    """Text conditioning for one batch.

    ``hidden``: (B, T, D) cross-attention context; ``added``: SDXL's
    ``{"text_embeds": (B, D2), "time_ids": (B, 6)}`` or ``None``.
    """

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None = None


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """``(B, model_max_length)`` token ids, padded and truncated."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_prompts(pipe: Any, prompts: list[str], resolution: int) -> PromptEmbeddings:
    """Encode ``prompts`` with the pipeline's text encoder(s), keeping gradients for adapters.

    SD: the last hidden state.  SDXL: both encoders' penultimate hidden states concatenated,
    plus the second encoder's pooled projection and the size ids of a ``resolution`` square.
    """
    device = pipe.unet.device
    if not is_sdxl(pipe):
        ids = tokenize(pipe.tokenizer, prompts).to(device)
        return PromptEmbeddings(pipe.text_encoder(ids)[0])
    hidden = []
    pooled = None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the projected pooled output of CLIPTextModelWithProjection
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=hidden[0].dtype)
    added = {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1).to(device)}
    return PromptEmbeddings(torch.cat(hidden, dim=-1), added)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` images in [-1, 1] to scaled latent means ``(B, C, H/f, W/f)``."""
    latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def sample_timesteps(
    b: int, n_train: int, generator: torch.Generator, high_noise_share: float = 0.0, high_noise_from: int | None = None
) -> torch.Tensor:
    """``(b,)`` int64 training timesteps in ``[0, n_train)``: uniform, except that a
    ``high_noise_share`` of them is drawn from ``[high_noise_from, n_train)`` (default: the
    top 4% of the range, t >= 960 of 1000).

    Why: where the noisy latent still shows the layout, a model learns to read it from there;
    only near pure noise must the layout come from the conditioning (prompt words, control
    map), and uniform sampling spends 4% of the samples there.
    """
    t = torch.randint(0, n_train, (b,), generator=generator)
    if high_noise_share > 0:
        start = high_noise_from if high_noise_from is not None else int(0.96 * n_train)
        high = torch.randint(start, n_train, (b,), generator=generator)
        t = torch.where(torch.rand(b, generator=generator) < high_noise_share, high, t)
    return t


def denoising_loss(
    unet,
    scheduler,
    latents: torch.Tensor,
    cond: PromptEmbeddings,
    generator: torch.Generator,
    reduction: str = "mean",
    high_noise_share: float = 0.0,
) -> torch.Tensor:
    """The standard diffusion training loss on clean ``latents`` (B, C, h, w).

    Noise and timesteps come from ``generator`` (CPU), so a run is reproducible step by step
    (what makes resuming from a checkpoint exact).  The target follows the scheduler's
    ``prediction_type``.  With ``reduction="none"`` returns one loss per sample, ``(B,)``.
    ``high_noise_share``: see :func:`sample_timesteps`.
    """
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = sample_timesteps(b, scheduler.config.num_train_timesteps, generator, high_noise_share).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    kwargs = {"added_cond_kwargs": cond.added} if cond.added is not None else {}
    pred = unet(noisy, t, cond.hidden, **kwargs).sample
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return loss.mean() if reduction == "mean" else loss
