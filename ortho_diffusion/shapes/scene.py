"""Scene descriptions and their deterministic random sampling.

A :class:`Scene` is a pure description (background word + 1-2 :class:`ShapeObject`); rendering,
captions and ground truth are functions of it, so the same seed always gives the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import world


@dataclass(frozen=True)
class ShapeObject:
    """One filled shape.

    Attributes:
        shape: a word of :data:`world.SHAPES`.
        color: a word of :data:`world.COLORS`.
        size: ``"small"`` or ``"large"``.
        position: a word of :data:`world.POSITIONS`.
        center: ``(x, y)`` centre in pixels (the polygon's area centroid).
        radius: circumradius in pixels.
    """

    shape: str
    color: str
    size: str
    position: str
    center: tuple[float, float]
    radius: float


@dataclass(frozen=True)
class Scene:
    """A plain background and one or two objects that never overlap."""

    background: str
    objects: tuple[ShapeObject, ...]


def _sample_object(rng: np.random.Generator, position: str, background: str) -> ShapeObject:
    shape = world.SHAPES[rng.integers(len(world.SHAPES))]
    # An object the colour of its background would be invisible.
    colors = [c for c in world.COLORS if c != background]
    color = colors[rng.integers(len(colors))]
    size = ("small", "large")[rng.integers(2)]
    lo, hi = world.SIZES[size]
    radius = float(rng.uniform(lo, hi))
    x0, y0 = world.POSITIONS[position]
    dx, dy = rng.uniform(-world.POSITION_JITTER, world.POSITION_JITTER, size=2)
    return ShapeObject(shape, color, size, position, (x0 + float(dx), y0 + float(dy)), radius)


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, p_single: float = 0.5) -> Scene:
    """Draw one scene.

    Args:
        rng: the random source (all randomness comes from it).
        n_objects: 1 or 2; ``None`` draws 1 with probability ``p_single``, else 2.
        p_single: probability of a single-object scene when ``n_objects`` is ``None``.
    """
    if n_objects is None:
        n_objects = 1 if rng.random() < p_single else 2
    if n_objects not in (1, 2):
        raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")
    backgrounds = list(world.BACKGROUNDS)
    background = backgrounds[rng.integers(len(backgrounds))]
    if n_objects == 1:
        positions = list(world.POSITIONS)
        chosen = [positions[rng.integers(len(positions))]]
    else:
        pair = world.PAIRS[rng.integers(len(world.PAIRS))]
        # Random caption order: the first object mentioned is not always on the left/top.
        chosen = list(pair) if rng.random() < 0.5 else [pair[1], pair[0]]
    objects = tuple(_sample_object(rng, p, background) for p in chosen)
    return Scene(background, objects)


def scene_from_seed(seed: int, n_objects: int | None = None, p_single: float = 0.5) -> Scene:
    """The scene of a seed: ``sample_scene(np.random.default_rng(seed), ...)``."""
    return sample_scene(np.random.default_rng(seed), n_objects=n_objects, p_single=p_single)


def make_scene(
    background: str,
    objects: list[tuple[str, str, str, str]] | tuple[tuple[str, str, str, str], ...],
) -> Scene:
    """A scene from words, each object as ``(size, color, shape, position)``, with exact
    nominal centres and the middle radius of its size range (used for prompts and tests)."""
    if background not in world.BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}")
    built = []
    for size, color, shape, position in objects:
        if shape not in world.SHAPES or color not in world.COLORS or position not in world.POSITIONS:
            raise ValueError(f"unknown object words {(size, color, shape, position)!r}")
        lo, hi = world.SIZES[size]
        built.append(ShapeObject(shape, color, size, position, world.POSITIONS[position], (lo + hi) / 2))
    return Scene(background, tuple(built))
