"""Plain-English captions of scenes.

The canonical caption names every attribute in a fixed order, e.g.
``"a large red circle on the left and a small blue square on the right, on a white background"``.
Partial captions (some attributes left out) teach a text-to-image model what each word does on
its own and let it follow shorter prompts.
"""

from __future__ import annotations

import numpy as np

from . import world
from .scene import Scene, ShapeObject


def object_phrase(obj: ShapeObject, size: bool = True, color: bool = True, position: bool = True) -> str:
    """E.g. ``"a large red circle on the left"``; flags drop attributes."""
    words = ["a"]
    if size:
        words.append(obj.size)
    if color:
        words.append(obj.color)
    words.append(obj.shape)
    if position:
        words.append(world.POSITION_PHRASES[obj.position])
    return " ".join(words)


def caption(scene: Scene) -> str:
    """The canonical (complete) caption of a scene."""
    objs = " and ".join(object_phrase(o) for o in scene.objects)
    return f"{objs}, on a {scene.background} background"


def layout_free_caption(scene: Scene) -> str:
    """The caption without sizes and places, e.g. ``"a red circle and a blue square, on a white
    background"``: what to draw but not where, as a photo's caption describes content but not
    its exact layout (a control map's job)."""
    objs = " and ".join(object_phrase(o, size=False, position=False) for o in scene.objects)
    return f"{objs}, on a {scene.background} background"


def partial_caption(scene: Scene, rng: np.random.Generator, p_drop: float = 0.35) -> str:
    """A caption where each of size / colour / position / background is left out with
    probability ``p_drop`` (independently); shapes are always named."""
    keep_size, keep_color, keep_pos, keep_bg = (rng.random(4) >= p_drop).tolist()
    objs = " and ".join(object_phrase(o, keep_size, keep_color, keep_pos) for o in scene.objects)
    return f"{objs}, on a {scene.background} background" if keep_bg else objs
