"""The vocabulary and geometry of the shapes world (a single source of truth).

Every other module (sampler, renderer, captions, detector, tokenizer) reads these constants,
so adding a colour or a shape here is enough to extend the world.
"""

from __future__ import annotations

IMAGE_SIZE = 64
"""Side of every rendered image, in pixels (images are ``(64, 64, 3)`` uint8 RGB)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 40),
    "purple": (145, 55, 200),
    "white": (250, 250, 250),
}
"""Object colours (RGB). Chosen far apart in RGB so a nearest-colour rule separates them."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "pink": (250, 185, 200),
    "brown": (115, 75, 40),
}
"""Plain background colours (RGB). An object never has the colour of its background."""

SIZES: dict[str, tuple[float, float]] = {"small": (8.0, 9.5), "large": (13.0, 14.5)}
"""Circumradius range in pixels per size word (for a circle, its radius)."""

SIZE_THRESHOLD = 11.25
"""Circumradius separating "small" from "large" (between the two ranges above)."""

POSITIONS: dict[str, tuple[float, float]] = {
    "left": (16.0, 32.0),
    "right": (48.0, 32.0),
    "top": (32.0, 16.0),
    "bottom": (32.0, 48.0),
    "center": (32.0, 32.0),
}
"""Nominal ``(x, y)`` centre of each position word, in pixels (y grows downwards). With the
jitter and the largest radius, left/right (top/bottom) objects can touch but never overlap."""

POSITION_JITTER = 1.5
"""Maximum offset (pixels, each axis) of an object's centre from its nominal position."""

PAIRS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))
"""Position pairs used by two-object scenes; opposite sides never overlap even when large."""

POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

STAR_INNER_RATIO = 0.5
"""Inner/outer radius of the 5-point star: its solidity (~0.65) is far from the other shapes'
(>= 0.9) while its tips stay a few pixels wide even when small."""

RESERVED_TOKENS: tuple[str, ...] = ("sks", "qwe", "zxc", "vbn")
"""Rare words in the tokenizer vocabulary never used by the world's captions, kept free to
name personalized subjects (DreamBooth-style identifiers)."""

EXTRA_WORDS: tuple[str, ...] = (
    "a", "an", "the", "on", "at", "in", "and", "of", "with", "background", "photo", "picture",
    "image", "shape", "object", "one", "two", "small", "large", "big", "tiny", "left", "right",
    "top", "bottom", "center", "middle", "style", "drawing", "scene", "dog", "cat", "toy",
)
"""Words the tokenizer keeps whole besides the world's attribute words (common prompt words)."""


def world_words() -> list[str]:
    """All words the tokenizer must encode as single tokens, without duplicates (sorted)."""
    words = set(SHAPES) | set(COLORS) | set(BACKGROUNDS) | set(SIZES) | set(EXTRA_WORDS)
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    words.update(RESERVED_TOKENS)
    return sorted(words)
