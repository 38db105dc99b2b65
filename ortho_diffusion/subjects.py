"""Subjects the embedded model has never seen: two-colour shapes drawn with the shapes world.

Each subject is one shape class filled with two colours (split down the middle, split across,
or in wide stripes), named by a reserved rare token.  The base model only knows plain
one-colour shapes, so learning a subject means learning its colour layout; the shape class
is the DreamBooth "class".

The layouts are coarse on purpose: the model's VAE maps 64x64 images to 16x16 latents, and
fine textures (4-pixel checks, 3-pixel stripes) land far outside the latents the base model
was trained on (its denoising loss on them was 4-26x its loss on ordinary scenes), where no
small adapter can reach them.

Subject fidelity is measured classically: the colour composition of the generated object
(fraction of its pixels nearest to each of the subject's two colours, versus anything else)
compared to the instance images', and whether the object's silhouette has the right shape class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .shapes import world
from .shapes.detector import MIN_AREA, background_rgb, classify_shape
from .shapes.render import coverage
from .shapes.scene import make_scene


@dataclass(frozen=True)
class Subject:
    """A two-colour shape.

    Attributes:
        name: folder name, e.g. ``"split-circle"``.
        token: the rare identifier (one of :data:`world.RESERVED_TOKENS`).
        shape: shape class (also the class noun).
        colors: the pattern's two RGB colours.
        pattern: ``"halves"`` (left / right), ``"bands"`` (top / bottom) or ``"stripes"``
            (8-pixel horizontal stripes, the first colour across the centre), all laid out
            around the object's centre.
    """

    name: str
    token: str
    shape: str
    colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    pattern: str

    @property
    def instance_prompt(self) -> str:
        return f"a {self.token} {self.shape}"

    @property
    def class_prompt(self) -> str:
        return f"a {self.shape}"


SUBJECTS: tuple[Subject, ...] = (
    Subject("split-circle", "sks", "circle", ((225, 35, 35), (250, 250, 250)), "halves"),
    Subject("striped-square", "qwe", "square", ((40, 80, 230), (245, 215, 40)), "stripes"),
    Subject("two-tone-triangle", "zxc", "triangle", ((145, 55, 200), (245, 215, 40)), "bands"),
)

#: Positions of the instance images; all large, so the pattern is visible.
INSTANCE_POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")

#: A background closer than this (RGB distance) to a subject colour would hide part of it.
MIN_BACKGROUND_DISTANCE = 100.0


def backgrounds_for(subject: Subject) -> list[str]:
    """Backgrounds on which both of the subject's colours stand out."""
    out = []
    for name, rgb in world.BACKGROUNDS.items():
        if all(np.linalg.norm(np.subtract(rgb, c)) >= MIN_BACKGROUND_DISTANCE for c in subject.colors):
            out.append(name)
    return out


def instance_layouts(subject: Subject) -> list[tuple[str, str]]:
    """``(position, background)`` of each instance image, cycling through the safe backgrounds."""
    bgs = backgrounds_for(subject)
    return [(p, bgs[i % len(bgs)]) for i, p in enumerate(INSTANCE_POSITIONS)]


def pattern_mask(pattern: str, center: tuple[float, float], size: int = world.IMAGE_SIZE) -> np.ndarray:
    """``(size, size)`` bool: True where the pattern shows its first colour.

    ``center`` is the object's ``(x, y)`` centre in pixels; the pattern is laid out around it,
    so the object looks the same wherever it stands."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = x - center[0], y - center[1]
    if pattern == "halves":
        return dx < 0
    if pattern == "bands":
        return dy < 0
    if pattern == "stripes":
        return np.floor((dy + 4) / 8) % 2 == 0  # a band of the first colour across the centre
    raise ValueError(f"unknown pattern {pattern!r}")


def render_subject(subject: Subject, position: str, background: str, size_word: str = "large"):
    """The subject on a plain background: ``(64, 64, 3)`` uint8 image and its caption."""
    # The colour word only matters for plain rendering; the pattern replaces it.
    scene = make_scene(background, [(size_word, "red", subject.shape, position)])
    cov = coverage(scene)[0][..., None]
    first = pattern_mask(subject.pattern, scene.objects[0].center)[..., None]
    fill = np.where(first, subject.colors[0], subject.colors[1]).astype(np.float32)
    img = np.empty_like(fill)
    img[:] = world.BACKGROUNDS[background]
    img = img * (1 - cov) + cov * fill
    phrase = world.POSITION_PHRASES[position]
    caption = f"a {size_word} {subject.token} {subject.shape} {phrase}, on a {background} background"
    return np.clip(np.round(img), 0, 255).astype(np.uint8), caption


def write_instance_folder(subject: Subject, folder: str | Path) -> list[Path]:
    """Write the subject's instance images (PNG) and captions (.txt) to ``folder``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (position, background) in enumerate(instance_layouts(subject)):
        img, caption = render_subject(subject, position, background)
        path = folder / f"{i:02d}.png"
        Image.fromarray(img).save(path)
        path.with_suffix(".txt").write_text(caption + "\n")
        paths.append(path)
    return paths


def object_mask(image: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """``(H, W)`` bool: pixels far from the estimated background colour."""
    bg = background_rgb(image).astype(np.float32)
    return np.linalg.norm(image.astype(np.float32) - bg, axis=-1) > threshold


def color_composition(image: np.ndarray, subject: Subject) -> np.ndarray:
    """Fractions of object pixels nearest to the subject's colour 1, colour 2, or neither: ``(3,)``.

    "Neither" collects pixels nearer to another world colour than to both subject colours.
    """
    mask = object_mask(image)
    if mask.sum() == 0:
        return np.array([0.0, 0.0, 1.0])
    pixels = image[mask].astype(np.float32)
    palette = [np.asarray(c, np.float32) for c in subject.colors]
    others = [np.asarray(c, np.float32) for n, c in world.COLORS.items() if tuple(c) not in subject.colors]
    d = np.stack([np.linalg.norm(pixels - c, axis=-1) for c in palette + others], axis=-1)
    nearest = d.argmin(-1)
    counts = np.array([(nearest == 0).mean(), (nearest == 1).mean(), (nearest >= 2).mean()])
    return counts


def subject_similarity(image: np.ndarray, subject: Subject, reference: np.ndarray) -> float:
    """Histogram intersection (0..1) of the image's colour composition with ``reference``."""
    return float(np.minimum(color_composition(image, subject), reference).sum())


def reference_composition(subject: Subject) -> np.ndarray:
    """Mean colour composition of the subject's instance images, ``(3,)``."""
    comps = [color_composition(render_subject(subject, p, b)[0], subject) for p, b in instance_layouts(subject)]
    return np.mean(comps, axis=0)


def silhouette_shape(image: np.ndarray) -> str | None:
    """Shape word of the largest object silhouette in a ``(64, 64, 3)`` uint8 image, or None.

    Unlike :func:`detect`, which cuts objects where their colour changes, this reads the
    outline of everything far from the background: a two-colour subject is one object, even
    when the VAE draws a dark seam between its colours (a closing bridges seams up to 2 px).
    """
    mask = cv2.morphologyEx(object_mask(image).astype(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    c = max(contours, key=cv2.contourArea)
    blob = np.zeros_like(mask)
    cv2.drawContours(blob, [c], -1, 1, thickness=-1)
    area = float(blob.sum())
    return classify_shape(c, area) if area >= MIN_AREA else None


def shape_matches(image: np.ndarray, subject: Subject) -> bool:
    """Whether the largest silhouette has the subject's shape class."""
    return silhouette_shape(image) == subject.shape


def subjects_root() -> Path:
    """``assets/subjects`` of this checkout (instance folders and ``subjects.json``)."""
    return Path(__file__).resolve().parents[1] / "assets" / "subjects"


def write_subject_assets(root: str | Path | None = None) -> Path:
    """Write every subject's instance folder and an index ``subjects.json`` under ``root``."""
    import json

    root = Path(root) if root is not None else subjects_root()
    index = []
    for s in SUBJECTS:
        write_instance_folder(s, root / s.name)
        index.append(
            {
                "name": s.name,
                "folder": s.name,
                "token": s.token,
                "instance_prompt": s.instance_prompt,
                "class_prompt": s.class_prompt,
                "pattern": s.pattern,
            }
        )
    (root / "subjects.json").write_text(json.dumps(index, indent=2) + "\n")
    return root


if __name__ == "__main__":
    print(f"subjects written to {write_subject_assets()}")
