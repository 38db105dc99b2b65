"""Polygon outlines and landmark points of the four shape classes."""

from __future__ import annotations

import numpy as np

from . import world
from .scene import ShapeObject

CIRCLE_SEGMENTS = 96
"""A circle is rendered as a regular polygon with this many sides (invisible at 64x64)."""


def _regular(n: int, radius: float, phase: float) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    # y grows downwards in images, so -sin puts angle pi/2 at the top.
    return np.stack([radius * np.cos(angles), -radius * np.sin(angles)], axis=1)


def outline(obj: ShapeObject) -> np.ndarray:
    """Polygon of an object, ``(N, 2)`` float ``(x, y)`` pixel coordinates, centred so that its
    area centroid is ``obj.center`` and its circumradius is ``obj.radius``."""
    r = obj.radius
    if obj.shape == "circle":
        pts = _regular(CIRCLE_SEGMENTS, r, 0.0)
    elif obj.shape == "square":
        pts = _regular(4, r, np.pi / 4)  # axis-aligned
    elif obj.shape == "triangle":
        pts = _regular(3, r, np.pi / 2)  # pointing up; equilateral centroid = circumcentre
    elif obj.shape == "star":
        outer = _regular(5, r, np.pi / 2)
        inner = _regular(5, r * world.STAR_INNER_RATIO, np.pi / 2 + np.pi / 5)
        pts = np.empty((10, 2))
        pts[0::2], pts[1::2] = outer, inner
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    return pts + np.asarray(obj.center, dtype=np.float64)


def vertices(obj: ShapeObject) -> np.ndarray:
    """Landmark vertices, ``(K, 2)`` float ``(x, y)``: the polygon corners (3 for a triangle,
    4 for a square, 10 for a star: tips and inner corners alternating, starting at the top tip)
    and, since a circle has no corner, its 4 rim points at right, top, left and bottom."""
    if obj.shape == "circle":
        return _regular(4, obj.radius, 0.0) + np.asarray(obj.center)
    return outline(obj)
