"""Preprocessors: a user's photo to a control image, all offline.

* :func:`canny`: controlnet-aux's Canny detector (thresholds configurable).
* :func:`face_landmarks`: controlnet-aux's MediaPipe face detector (face mesh drawn on
  black, the layout of ControlNet's face model); :func:`face_keypoints` gives the raw
  ``(468, 2)`` points from mediapipe's face mesh.  Both use the model inside the mediapipe
  wheel (0.10.21), nothing is downloaded.
* Segmentation maps are given by the user, painted in a palette (:func:`check_segmentation_map`,
  :func:`labels_to_map`, :func:`map_to_labels`); :func:`segment` runs a transformers
  semantic-segmentation model from a *local* folder, and says so clearly when there is none.
* :func:`shapes_control`: on the shapes world, the generator's ground truth gives all three.

controlnet-aux 0.0.10 imports every detector (and torchvision, timm) in its package
``__init__``; we install it without dependencies and import only the two submodules we use,
under a bare package entry (:func:`_aux`), so no GPU build of torchvision is ever pulled.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..images import DataError

TASKS = ("canny", "segmentation", "landmarks")


class PreprocessError(DataError):
    """A preprocessor that cannot run here (missing package or weights) or bad input."""


def _aux(submodule: str) -> types.ModuleType:
    """``controlnet_aux.<submodule>`` without running controlnet_aux's package ``__init__``."""
    if "controlnet_aux" not in sys.modules:
        spec = importlib.util.find_spec("controlnet_aux")  # locates the package, runs nothing
        if spec is None or not spec.submodule_search_locations:
            raise PreprocessError(
                "controlnet-aux is not installed; ./install.sh installs it "
                "(pip install --no-deps controlnet-aux==0.0.10)"
            )
        package = types.ModuleType("controlnet_aux")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["controlnet_aux"] = package
    try:
        return importlib.import_module(f"controlnet_aux.{submodule}")
    except ImportError as err:
        raise PreprocessError(f"controlnet_aux.{submodule} cannot be imported ({err})") from None


def _rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise PreprocessError(f"expected a PIL image or a uint8 (H, W[, 3]) array, got {arr.dtype} {arr.shape}")
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr[..., :3]


def _detect_resolution(arr: np.ndarray, resolution: int | None) -> int:
    # controlnet-aux resizes the shorter side to this (rounded to a multiple of 64);
    # by default keep the photo's own size so thin edges are not resampled.
    return resolution or min(arr.shape[:2])


def canny(
    image: Image.Image | np.ndarray,
    low_threshold: int = 100,
    high_threshold: int = 200,
    resolution: int | None = None,
) -> Image.Image:
    """Canny edge map (white edges on black, RGB) with controlnet-aux's ``CannyDetector``.

    Args:
        image: RGB photo.
        low_threshold, high_threshold: hysteresis thresholds (controlnet-aux's defaults).
        resolution: size of the shorter side for detection and output (default: the photo's).
    """
    arr = _rgb_array(image)
    if not 0 <= low_threshold <= high_threshold:
        raise PreprocessError(f"Canny thresholds must satisfy 0 <= low <= high, got {low_threshold}, {high_threshold}")
    res = _detect_resolution(arr, resolution)
    detector = _aux("canny").CannyDetector()
    out = detector(arr, low_threshold=low_threshold, high_threshold=high_threshold,
                   detect_resolution=res, image_resolution=res, output_type="np")
    return Image.fromarray(out)


def _mediapipe():
    try:
        import mediapipe  # noqa: F401
        from mediapipe.python.solutions import face_mesh
    except ImportError as err:
        raise PreprocessError(
            f"mediapipe is not usable ({err}); ./install.sh installs mediapipe==0.10.21, the last "
            "release that bundles its face models"
        ) from None
    return face_mesh


def face_landmarks(
    image: Image.Image | np.ndarray, max_faces: int = 1, min_confidence: float = 0.5, resolution: int | None = None
) -> Image.Image:
    """Face-mesh control image (controlnet-aux's ``MediapipeFaceDetector``); black if no face."""
    _mediapipe()
    arr = _rgb_array(image)
    res = _detect_resolution(arr, resolution)
    detector = _aux("mediapipe_face").MediapipeFaceDetector()
    out = detector(arr, max_faces=max_faces, min_confidence=min_confidence, detect_resolution=res,
                   image_resolution=res, output_type="np")
    return Image.fromarray(out)


def face_keypoints(image: Image.Image | np.ndarray, max_faces: int = 1, min_confidence: float = 0.5) -> list[np.ndarray]:
    """Face-mesh landmarks in pixels: one ``(468, 2)`` float array ``(x, y)`` per face found."""
    face_mesh = _mediapipe()
    arr = np.ascontiguousarray(_rgb_array(image))
    h, w = arr.shape[:2]
    with face_mesh.FaceMesh(static_image_mode=True, max_num_faces=max_faces, refine_landmarks=False,
                            min_detection_confidence=min_confidence) as mesh:
        result = mesh.process(arr)
    faces = []
    for face in result.multi_face_landmarks or []:
        faces.append(np.array([(p.x * w, p.y * h) for p in face.landmark], dtype=np.float64))
    return faces


# ----------------------------------------------------------------- segmentation maps
def shapes_palette() -> dict[str, tuple[int, int, int]]:
    """The shapes world's class colours (ADE20K-style: one flat colour per class)."""
    from ..shapes import SEGMENTATION_PALETTE

    return dict(SEGMENTATION_PALETTE)


def labels_to_map(labels: np.ndarray, palette: dict[str, tuple[int, int, int]] | None = None) -> Image.Image:
    """``(H, W)`` class ids -> RGB segmentation map in ``palette`` (class id = palette order)."""
    palette = palette or shapes_palette()
    lut = np.array(list(palette.values()), np.uint8)
    if labels.max(initial=0) >= len(lut):
        raise PreprocessError(f"class id {int(labels.max())} is outside the palette of {len(lut)} classes")
    return Image.fromarray(lut[labels])


def map_to_labels(seg_map: Image.Image | np.ndarray, palette: dict[str, tuple[int, int, int]] | None = None) -> np.ndarray:
    """RGB segmentation map -> ``(H, W)`` class ids (nearest palette colour per pixel)."""
    palette = palette or shapes_palette()
    arr = _rgb_array(seg_map).astype(np.int32)
    ref = np.array(list(palette.values()), np.int32)
    d = ((arr[:, :, None, :] - ref[None, None]) ** 2).sum(-1)
    return d.argmin(-1).astype(np.uint8)


def check_segmentation_map(
    seg_map: Image.Image | np.ndarray, palette: dict[str, tuple[int, int, int]] | None = None, tolerance: float = 0.02
) -> None:
    """Raise :class:`PreprocessError` unless the map is painted in the palette's flat colours.

    A photo given where a segmentation map is expected is the usual mistake: it has many
    colours far from every palette entry.  Up to ``tolerance`` of the pixels may be off
    (antialiasing from a resize).
    """
    palette = palette or shapes_palette()
    arr = _rgb_array(seg_map).astype(np.int32)
    ref = np.array(list(palette.values()), np.int32)
    d = np.sqrt(((arr[:, :, None, :] - ref[None, None]) ** 2).sum(-1)).min(-1)
    off = float((d > 30).mean())
    if off > tolerance:
        raise PreprocessError(
            f"not a segmentation map: {off:.0%} of the pixels are not palette colours "
            f"({', '.join(f'{k} {v}' for k, v in palette.items())})"
        )


def segment(image: Image.Image | np.ndarray, model_path: str | os.PathLike | None) -> Image.Image:
    """Segmentation map of a photo with a transformers semantic-segmentation model from a local folder.

    Classes are painted with a fixed palette derived from the class id.  There is no model
    in the package and nothing is downloaded: without a local folder this raises at once.
    """
    if model_path is None or not (Path(model_path) / "config.json").is_file():
        raise PreprocessError(
            "segmenting a photo needs a local transformers segmentation model folder (config.json + weights), "
            f"got {model_path!r}; nothing is downloaded. Otherwise give a segmentation map painted in the palette."
        )
    import torch
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    processor = AutoImageProcessor.from_pretrained(str(model_path), local_files_only=True)
    model = AutoModelForSemanticSegmentation.from_pretrained(str(model_path), local_files_only=True).eval()
    arr = _rgb_array(image)
    with torch.no_grad():
        out = model(**processor(images=arr, return_tensors="pt"))
    labels = processor.post_process_semantic_segmentation(out, target_sizes=[arr.shape[:2]])[0].numpy()
    rng = np.random.default_rng(0)  # fixed palette: class id -> colour
    lut = rng.integers(0, 256, (max(model.config.num_labels, 1), 3), dtype=np.uint8)
    lut[0] = 0
    return Image.fromarray(lut[labels.astype(np.int64)])


# -------------------------------------------------------------------- shapes world
def shapes_control(scene: Any, task: str, image: np.ndarray | None = None) -> np.ndarray:
    """Ground-truth control map ``(64, 64, 3)`` uint8 of a shapes-world scene for ``task``."""
    from ..shapes import ground_truth

    if task not in TASKS:
        raise PreprocessError(f"unknown control task {task!r}; one of {TASKS}")
    gt = ground_truth(scene, image)
    return {"canny": gt.canny, "segmentation": gt.segmentation, "landmarks": gt.landmarks}[task]


def preprocess(image: Image.Image, name: str, **kwargs: Any) -> Image.Image:
    """Run the preprocessor ``name`` (``canny`` or ``landmarks``) on a photo."""
    if name == "canny":
        return canny(image, **kwargs)
    if name == "landmarks":
        return face_landmarks(image, **kwargs)
    raise PreprocessError(f"unknown preprocessor {name!r}: canny or landmarks")
