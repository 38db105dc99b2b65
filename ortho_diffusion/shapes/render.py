"""Rasterisation of scenes: anti-aliased RGB images and hard per-object coverage masks.

Shapes are filled at ``SUPERSAMPLE`` times the resolution and area-averaged down, which gives
smooth edges in the image and an exact coverage fraction for the label maps.
"""

from __future__ import annotations

import cv2
import numpy as np

from . import world
from .geometry import outline
from .scene import Scene

SUPERSAMPLE = 4
_SHIFT = 4  # cv2 fixed-point fractional bits: sub-pixel vertex placement


def _fill(canvas: np.ndarray, poly: np.ndarray, value) -> None:
    # Pixel centres sit at +0.5 in continuous coordinates.
    pts = np.round((poly * SUPERSAMPLE - 0.5) * (1 << _SHIFT)).astype(np.int32)
    cv2.fillPoly(canvas, [pts.reshape(-1, 1, 2)], value, lineType=cv2.LINE_8, shift=_SHIFT)


def coverage(scene: Scene, size: int = world.IMAGE_SIZE) -> np.ndarray:
    """Fraction of each pixel covered by each object, ``(n_objects, size, size)`` float32 in
    [0, 1] (later objects are drawn over earlier ones, so coverage is of the visible part)."""
    hi = size * SUPERSAMPLE
    owner = np.zeros((hi, hi), np.uint8)  # 0 = background, i+1 = object i
    for i, obj in enumerate(scene.objects):
        _fill(owner, outline(obj) * (size / world.IMAGE_SIZE), i + 1)
    out = np.empty((len(scene.objects), size, size), np.float32)
    for i in range(len(scene.objects)):
        mask = (owner == i + 1).astype(np.float32)
        out[i] = cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA)
    return out


def render(scene: Scene, size: int = world.IMAGE_SIZE) -> np.ndarray:
    """The RGB image of a scene, ``(size, size, 3)`` uint8 (64x64 by default)."""
    cov = coverage(scene, size)
    img = np.empty((size, size, 3), np.float32)
    img[:] = world.BACKGROUNDS[scene.background]
    for i, obj in enumerate(scene.objects):
        a = cov[i][..., None]
        img = img * (1 - a) + a * np.asarray(world.COLORS[obj.color], np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)
