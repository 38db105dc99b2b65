"""Ground truth for the control tasks: Canny edges, segmentation map, landmark map.

Segmentation palette (one RGB colour per shape class, ADE20K-style; index = class id):

====  ==========  ===============
id    class       RGB
====  ==========  ===============
0     background  (0, 0, 0)
1     circle      (230, 25, 75)
2     square      (60, 180, 75)
3     triangle    (0, 130, 200)
4     star        (255, 225, 25)
====  ==========  ===============

Landmark map: black image; each landmark vertex (see :func:`geometry.vertices`) is a white
dot of radius 1 and each shape centre a dot of radius 1 in its class's segmentation colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from . import world
from .geometry import vertices
from .render import coverage, render
from .scene import Scene

SEGMENTATION_CLASSES: tuple[str, ...] = ("background",) + world.SHAPES
SEGMENTATION_PALETTE: dict[str, tuple[int, int, int]] = {
    "background": (0, 0, 0),
    "circle": (230, 25, 75),
    "square": (60, 180, 75),
    "triangle": (0, 130, 200),
    "star": (255, 225, 25),
}
CANNY_LOW, CANNY_HIGH = 100, 200
"""Canny hysteresis thresholds (applied to the RGB image: OpenCV takes the strongest channel
gradient, so colours of equal grey level still give edges)."""
VERTEX_COLOR = (255, 255, 255)
DOT_RADIUS = 1


@dataclass
class GroundTruth:
    """Everything a control task needs about one scene.

    Attributes:
        canny: ``(64, 64, 3)`` uint8 edge map (edges 255 in all channels, else 0).
        labels: ``(64, 64)`` uint8 class ids (index into :data:`SEGMENTATION_CLASSES`).
        segmentation: ``(64, 64, 3)`` uint8 ``labels`` painted with :data:`SEGMENTATION_PALETTE`.
        landmarks: ``(64, 64, 3)`` uint8 landmark map (dots on black).
        keypoints: per object, a ``(K + 1, 2)`` float array of ``(x, y)``: the centre first,
            then its ``K`` vertices, in continuous pixel coordinates (pixel ``(i, j)`` covers
            ``[i, i+1) x [j, j+1)``).
    """

    canny: np.ndarray
    labels: np.ndarray
    segmentation: np.ndarray
    landmarks: np.ndarray
    keypoints: list[np.ndarray]


def canny_map(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> ``(H, W, 3)`` uint8 edge map (ControlNet's Canny layout)."""
    edges = cv2.Canny(np.ascontiguousarray(image), CANNY_LOW, CANNY_HIGH)
    return np.repeat(edges[..., None], 3, axis=2)


def label_map(scene: Scene) -> np.ndarray:
    """``(64, 64)`` uint8 class ids: a pixel belongs to an object covering at least half of it."""
    cov = coverage(scene)
    labels = np.zeros(cov.shape[1:], np.uint8)
    for i, obj in enumerate(scene.objects):
        labels[cov[i] >= 0.5] = SEGMENTATION_CLASSES.index(obj.shape)
    return labels


def colorize_labels(labels: np.ndarray) -> np.ndarray:
    """``(H, W)`` class ids -> ``(H, W, 3)`` uint8 palette colours."""
    lut = np.array([SEGMENTATION_PALETTE[c] for c in SEGMENTATION_CLASSES], np.uint8)
    return lut[labels]


def keypoints(scene: Scene) -> list[np.ndarray]:
    """Per object, a ``(K + 1, 2)`` float array: centre, then landmark vertices."""
    return [np.vstack([np.asarray(o.center)[None], vertices(o)]) for o in scene.objects]


def landmark_map(scene: Scene, size: int = world.IMAGE_SIZE) -> np.ndarray:
    """``(size, size, 3)`` uint8: landmark vertices as white dots, centres in class colours."""
    out = np.zeros((size, size, 3), np.uint8)
    for obj, pts in zip(scene.objects, keypoints(scene)):
        for j, (x, y) in enumerate(pts):
            color = SEGMENTATION_PALETTE[obj.shape] if j == 0 else VERTEX_COLOR
            # Continuous coordinates: pixel (i, j) covers [i, i+1) x [j, j+1).
            center = (int(np.clip(np.floor(x), 0, size - 1)), int(np.clip(np.floor(y), 0, size - 1)))
            cv2.circle(out, center, DOT_RADIUS, color, thickness=-1, lineType=cv2.LINE_8)
    return out


def ground_truth(scene: Scene, image: np.ndarray | None = None) -> GroundTruth:
    """All ground-truth maps of a scene (``image`` is its rendering, recomputed if omitted)."""
    if image is None:
        image = render(scene)
    labels = label_map(scene)
    return GroundTruth(
        canny=canny_map(image),
        labels=labels,
        segmentation=colorize_labels(labels),
        landmarks=landmark_map(scene),
        keypoints=keypoints(scene),
    )
