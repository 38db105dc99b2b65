"""Prompt fidelity of a text-to-image pipeline on the shapes world, scored by the detector.

Prompt sets are deterministic: the ``i``-th single-object scene of a set comes from
``scene_from_seed(base_seed + i, n_objects=1)``, and its image from generator seed ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..default_model import DEFAULT_GUIDANCE_SCALE
from .captions import caption
from .detector import Detection, detect
from .scene import Scene, scene_from_seed

ATTRIBUTES = ("shape", "color", "size", "position")


def prompt_scenes(n: int, n_objects: int = 1, base_seed: int = 10_000) -> list[Scene]:
    """``n`` evaluation scenes (their canonical captions are the prompts). ``base_seed`` is
    far from the training seeds' indices so prompts are not a replay of training captions."""
    return [scene_from_seed(base_seed + i, n_objects=n_objects) for i in range(n)]


def score(scene: Scene, found: Detection) -> dict[str, float]:
    """Per-attribute correctness (1.0 / 0.0) of one detection against its scene.

    Each requested object is matched to the detected object whose centroid is nearest its
    nominal centre (each detection used once); a missing object gets every attribute wrong.
    Keys: ``background``, ``count``, the :data:`ATTRIBUTES` (mean over objects) and ``all``
    (background and every attribute of every object right).
    """
    out = {"background": float(found.background == scene.background),
           "count": float(len(found.objects) == len(scene.objects))}
    free = list(found.objects)
    per = {a: [] for a in ATTRIBUTES}
    for obj in scene.objects:
        if not free:
            for a in ATTRIBUTES:
                per[a].append(0.0)
            continue
        dists = [np.hypot(d.centroid[0] - obj.center[0], d.centroid[1] - obj.center[1]) for d in free]
        match = free.pop(int(np.argmin(dists)))
        for a in ATTRIBUTES:
            per[a].append(float(getattr(match, a) == getattr(obj, a)))
    for a in ATTRIBUTES:
        out[a] = float(np.mean(per[a]))
    out["all"] = float(out["background"] == 1.0 and all(min(per[a]) == 1.0 for a in ATTRIBUTES))
    return out


@dataclass
class FidelityReport:
    """Mean scores over a prompt set, plus the generated images ``(N, 64, 64, 3)`` uint8."""

    scores: dict[str, float]
    n: int
    images: np.ndarray = field(repr=False)
    prompts: list[str] = field(repr=False)
    per_image: list[dict[str, float]] = field(repr=False)


def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 25, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
             batch_size: int = 25) -> np.ndarray:
    """Images of ``prompts`` (one seed each), ``(N, H, W, 3)`` uint8, in batches."""
    import torch

    out = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch_size]]
        res = pipe(prompts[i : i + batch_size], num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=gens, output_type="np")
        out.append(np.clip(np.round(res.images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def evaluate(pipe, scenes: list[Scene], steps: int = 25, guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed_offset: int = 0,
             batch_size: int = 25) -> FidelityReport:
    """Generate one image per scene caption (seed ``seed_offset + i``) and score it."""
    prompts = [caption(s) for s in scenes]
    seeds = [seed_offset + i for i in range(len(scenes))]
    images = generate(pipe, prompts, seeds, steps, guidance_scale, batch_size)
    per = [score(s, detect(img)) for s, img in zip(scenes, images)]
    means = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
    return FidelityReport(means, len(scenes), images, prompts, per)


def image_grid(images: np.ndarray, cols: int = 10, pad: int = 2) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 -> one ``(rows*(H+pad)+pad, cols*(W+pad)+pad, 3)`` grid."""
    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 40, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return grid
