"""Image files: load, check, resize (with errors that name the file), folders of training images, grids."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
#: Images larger than this many pixels are refused (decompression bombs).
MAX_PIXELS = 64_000_000


class DataError(ValueError):
    """Training data that cannot be used; the message names the file or folder."""


@dataclass
class Example:
    """One training image: ``pixels`` (3, H, W) in [-1, 1], its caption (or ``None``), its file."""

    pixels: torch.Tensor
    caption: str | None
    path: Path


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image as RGB, or raise :class:`DataError` naming it."""
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise DataError(f"{path}: image of {img.width}x{img.height} is too large")
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: not a readable image ({err})") from None


def to_tensor(img: Image.Image, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """Resize (shorter side to ``resolution``, then center crop; or squash) to (3, res, res) in [-1, 1]."""
    if center_crop:
        scale = resolution / min(img.size)
        w, h = max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - resolution) // 2, (h - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    else:
        img = img.resize((resolution, resolution), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_image_folder(folder: str | Path, resolution: int, center_crop: bool = True) -> list[Example]:
    """Every image in ``folder`` (sorted by name), with the caption of a same-named ``.txt``.

    Non-image files are skipped with a warning; a missing folder, a folder without images
    or an image that cannot be decoded raises :class:`DataError`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    examples = []
    for path in sorted(folder.iterdir()):
        if path.is_dir() or path.name.startswith("."):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            if path.suffix.lower() != ".txt":
                warnings.warn(f"skipping {path}: not an image", stacklevel=2)
            continue
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else None
        examples.append(Example(to_tensor(open_image(path), resolution, center_crop), caption or None, path))
    if not examples:
        raise DataError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return examples


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile equally sized images into one grid image."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def to_pil(images: torch.Tensor | np.ndarray | list) -> list[Image.Image]:
    """Pipeline output (PIL list, or arrays in [0, 1] of shape (B, H, W, 3)) to PIL images."""
    if isinstance(images, list) and images and isinstance(images[0], Image.Image):
        return images
    arr = np.asarray(images)
    return [Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)) for a in arr]
