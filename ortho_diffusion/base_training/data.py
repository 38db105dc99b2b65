"""Training data for the base model: rendered shapes-world images with tokenized captions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import CLIPTokenizer

from ..shapes import caption, partial_caption, render, sample_scene


@dataclass
class ShapesData:
    """A rendered data set.

    Attributes:
        images: ``(N, 64, 64, 3)`` uint8 RGB.
        captions: ``N`` canonical captions.
        ids: ``(N, 32)`` int64 token ids of the canonical captions.
        partial_ids: ``(N, 32)`` int64 token ids of a partial caption of the same scene.
    """

    images: np.ndarray
    captions: list[str]
    ids: torch.Tensor
    partial_ids: torch.Tensor


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """``texts`` -> ``(N, model_max_length)`` int64 ids, padded exactly as the pipeline does."""
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def build_data(n: int, seed: int, tokenizer: CLIPTokenizer, p_single: float = 0.7) -> ShapesData:
    """Render ``n`` scenes; scene ``i`` depends only on ``(seed, i)``, so any prefix of a
    larger data set is the smaller one. ``p_single`` is the share of one-object scenes (the
    quality targets are on single objects; two-object scenes teach composition)."""
    images = np.empty((n, 64, 64, 3), np.uint8)
    captions, partials = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, p_single=p_single)
        images[i] = render(scene)
        captions.append(caption(scene))
        partials.append(partial_caption(scene, rng))
    return ShapesData(images, captions, tokenize(tokenizer, captions), tokenize(tokenizer, partials))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """``(N, 64, 64, 3)`` uint8 -> ``(N, 3, 64, 64)`` float32 in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
