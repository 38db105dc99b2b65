"""A classical detector for the shapes world: background colour, and per object its shape
class, colour, size and position, from colour statistics and OpenCV contours.

It is the measuring stick of prompt fidelity: no learned weights, so it scores generated
images the same way on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from . import world

FOREGROUND_DISTANCE = 60.0
"""RGB distance from the background colour above which a pixel is foreground."""
MIN_AREA = 12.0
"""Smaller blobs (pixels) are noise, not objects (a small circle covers ~150 pixels)."""
STAR_SOLIDITY = 0.8
"""Contour area / convex-hull area below this is a star (rendered stars 0.60-0.68, triangles
0.89-0.94, squares and circles >= 0.97)."""
CIRCLE_FILL = 0.78
SQUARE_FILL = 0.56
"""Pixel area / enclosing-circle area (radius + half a pixel): rendered circles 0.87-0.95,
squares ~0.66, triangles 0.44-0.48."""
CENTER_BOX = 8.0
"""An object whose centroid is within this many pixels of the image centre (each axis) is
"center"; otherwise the dominant offset axis gives left/right/top/bottom."""


@dataclass
class DetectedObject:
    """One detected object (words from :mod:`world`, plus measurements in pixels)."""

    shape: str
    color: str
    size: str
    position: str
    centroid: tuple[float, float]
    area: float
    radius: float


@dataclass
class Detection:
    """The detector's reading of one image; ``objects`` sorted by area, largest first."""

    background: str
    objects: list[DetectedObject]


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    ref = np.asarray([table[n] for n in names], np.float32)
    return names[int(np.argmin(((ref - rgb[None]) ** 2).sum(1)))]


def background_rgb(image: np.ndarray) -> np.ndarray:
    """Median colour of the 2-pixel image border, ``(3,)`` float (objects rarely touch it)."""
    b = 2
    border = np.concatenate(
        [image[:b].reshape(-1, 3), image[-b:].reshape(-1, 3), image[:, :b].reshape(-1, 3), image[:, -b:].reshape(-1, 3)]
    )
    return np.median(border.astype(np.float32), axis=0)


def classify_shape(contour: np.ndarray, area: float) -> str:
    """Shape word of one outer contour (``(N, 1, 2)`` int32) enclosing ``area`` pixels."""
    # Both areas from the contour polygon (through boundary pixel centres), so the ratio does
    # not depend on the blob's size the way a pixel count over a hull area would.
    hull_area = cv2.contourArea(cv2.convexHull(contour))
    solidity = cv2.contourArea(contour) / max(hull_area, 1e-6)
    if solidity < STAR_SOLIDITY:
        return "star"
    _, r = cv2.minEnclosingCircle(contour)
    r += 0.5  # contour points are pixel centres; the blob reaches half a pixel further
    fill = area / max(np.pi * r * r, 1e-6)
    if fill > CIRCLE_FILL:
        return "circle"
    return "square" if fill > SQUARE_FILL else "triangle"


def classify_position(cx: float, cy: float, size: int = world.IMAGE_SIZE) -> str:
    """Position word of a centroid in continuous pixel coordinates."""
    dx, dy = cx - size / 2, cy - size / 2
    if abs(dx) < CENTER_BOX and abs(dy) < CENTER_BOX:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def detect(image: np.ndarray, max_objects: int = 2) -> Detection:
    """Read a ``(64, 64, 3)`` uint8 RGB image of the shapes world.

    Foreground = pixels far from the border's median colour; each connected blob of at least
    ``MIN_AREA`` pixels is one object, its outline re-cut at half-way to its own colour. Its colour is the median of its
    interior pixels (edges are anti-aliased blends), nearest to a :data:`world.COLORS` entry.
    """
    img = np.ascontiguousarray(image[..., :3])
    bg = background_rgb(img)
    dist = np.sqrt(((img.astype(np.float32) - bg) ** 2).sum(-1))
    mask = (dist > FOREGROUND_DISTANCE).astype(np.uint8)
    # No morphological opening: it would cut the thin tips of small stars; speckle is
    # dropped by MIN_AREA instead.
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    objects = []
    for c in contours:
        blob = np.zeros_like(mask)
        cv2.drawContours(blob, [c], -1, 1, thickness=-1)
        if blob.sum() < MIN_AREA:
            continue
        inner = cv2.erode(blob, np.ones((3, 3), np.uint8))
        pixels = img[(inner if inner.sum() >= 4 else blob).astype(bool)]
        rgb = np.median(pixels.astype(np.float32), axis=0)
        color = _nearest(rgb, world.COLORS)
        # The shape is where a pixel is at least half object colour: the fixed threshold above
        # also takes in thin anti-aliased edges, which fill a small star's concave corners.
        half = 0.5 * float(np.sqrt(((rgb - bg) ** 2).sum()))
        region = cv2.dilate(blob, np.ones((3, 3), np.uint8)).astype(bool)
        shape_mask = ((dist > max(half, FOREGROUND_DISTANCE / 2)) & region).astype(np.uint8)
        sc, _ = cv2.findContours(shape_mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        if not sc:
            continue
        c = max(sc, key=cv2.contourArea)
        blob = np.zeros_like(mask)
        cv2.drawContours(blob, [c], -1, 1, thickness=-1)
        area = float(blob.sum())
        if area < MIN_AREA:
            continue
        m = cv2.moments(blob, binaryImage=True)
        # +0.5: moments use pixel indices, the world uses continuous coordinates.
        cx, cy = m["m10"] / m["m00"] + 0.5, m["m01"] / m["m00"] + 0.5
        _, radius = cv2.minEnclosingCircle(c)
        # Contour points are pixel centres: the blob reaches about half a pixel further.
        radius = float(radius) + 0.5
        objects.append(
            DetectedObject(
                shape=classify_shape(c, area),
                color=color,
                size="large" if radius >= world.SIZE_THRESHOLD else "small",
                position=classify_position(cx, cy),
                centroid=(cx, cy),
                area=area,
                radius=radius,
            )
        )
    objects.sort(key=lambda o: -o.area)
    return Detection(background=_nearest(bg, world.BACKGROUNDS), objects=objects[:max_objects])
