"""Feature detection for capabilities that live elsewhere in the project.

The app uses the embedded default model, the control adapters and their preprocessors, the
control training script and the exporters when they are present, and says clearly that a
capability is "not available yet" otherwise.  Each capability is looked up here, in one
place, so that wiring a newly landed module into the app is a matter of a few lines.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS = REPO_ROOT / "assets"
TRAINING_DIR = REPO_ROOT / "training"


class NotAvailableError(RuntimeError):
    """A capability this checkout does not have (yet); the message says which."""


# ------------------------------------------------------------------ the model
def default_model_path() -> Path:
    """The embedded model's folder, or :class:`NotAvailableError` with the reason."""
    try:
        from ..default_model import default_model_path as find
    except ImportError:
        raise NotAvailableError(
            "the embedded default model is not available in this checkout yet; "
            "start the app with --model PATH_TO_A_DIFFUSERS_FOLDER"
        ) from None
    try:
        return Path(find())
    except FileNotFoundError as err:
        raise NotAvailableError(f"{err} Or start the app with --model PATH.") from None


# --------------------------------------------------------------- subject data
@dataclass(frozen=True)
class BuiltinSubject:
    """A shipped shapes-world subject: images and the prompts it was made with."""

    name: str
    folder: Path
    token: str
    class_word: str
    instance_prompt: str
    class_prompt: str


def builtin_subjects() -> list[BuiltinSubject]:
    """Subjects shipped in ``assets/subjects`` (empty when the folder is absent)."""
    index = ASSETS / "subjects" / "subjects.json"
    if not index.is_file():
        return []
    out = []
    try:
        entries = json.loads(index.read_text())
    except ValueError:
        return []
    for e in entries:
        folder = (ASSETS / "subjects" / str(e.get("folder", ""))).resolve()
        if not folder.is_dir() or (ASSETS / "subjects").resolve() not in folder.parents:
            continue
        class_prompt = str(e.get("class_prompt", ""))
        out.append(
            BuiltinSubject(
                name=str(e["name"]),
                folder=folder,
                token=str(e.get("token", "sks")),
                class_word=class_prompt.split()[-1] if class_prompt else "",
                instance_prompt=str(e.get("instance_prompt", "")),
                class_prompt=class_prompt,
            )
        )
    return out


# ------------------------------------------------------------ training scripts
def subject_training_script() -> Path:
    """``training/train_dreambooth.py``."""
    script = TRAINING_DIR / "train_dreambooth.py"
    if not script.is_file():
        raise NotAvailableError(f"{script} is missing: subject training needs a source checkout")
    return script


def control_training_script() -> Path:
    """``training/train_control.py``, or :class:`NotAvailableError` until it lands."""
    script = TRAINING_DIR / "train_control.py"
    if not script.is_file():
        raise NotAvailableError("control training is not available in this version yet (no training/train_control.py)")
    return script


# -------------------------------------------------------------------- control
def _builtin_canny(image: np.ndarray) -> np.ndarray:
    # The shapes world's own edge map (OpenCV, thresholds 100/200 as controlnet-aux's default).
    from ..shapes.groundtruth import canny_map

    return canny_map(image)


def _as_given(image: np.ndarray) -> np.ndarray:
    return image


PREPROCESSOR_NAMES = ("Canny edges", "Face landmarks", "Segmentation map (as given)", "Control map (as given)")


def preprocessors() -> dict[str, Callable[[np.ndarray], np.ndarray] | None]:
    """Preprocessor name -> ``(H, W, 3) uint8 -> (H, W, 3) uint8``, or ``None`` if missing.

    The control package's own preprocessors win (training and inference then agree: Canny
    and face landmarks from controlnet-aux, segmentation maps checked against the palette);
    the fallbacks cover what needs no extra package.
    """
    found: dict[str, Callable | None] = {
        "Canny edges": _builtin_canny,
        "Face landmarks": None,
        "Segmentation map (as given)": _as_given,
        "Control map (as given)": _as_given,
    }
    try:
        pre = importlib.import_module("ortho_diffusion.control.preprocess")
    except ImportError:
        return found

    def canny(image: np.ndarray) -> np.ndarray:
        if min(image.shape[:2]) < 64:
            # controlnet-aux rounds its working size to a multiple of 64 (0 below 64 pixels);
            # OpenCV with the same thresholds handles small images directly.
            return _builtin_canny(image)
        try:
            return np.asarray(pre.canny(image))
        except pre.PreprocessError:
            if importlib.util.find_spec("controlnet_aux") is None:
                return _builtin_canny(image)  # same detector family and thresholds, from OpenCV
            raise

    def segmentation(image: np.ndarray) -> np.ndarray:
        pre.check_segmentation_map(image)  # a photo given by mistake gets a clear message
        return image

    found["Canny edges"] = canny
    found["Face landmarks"] = lambda image: np.asarray(pre.face_landmarks(image))
    found["Segmentation map (as given)"] = segmentation
    return found


def preprocess(name: str, image: np.ndarray) -> np.ndarray:
    """Run preprocessor ``name`` on an RGB uint8 image; a missing one raises NotAvailableError."""
    if name not in PREPROCESSOR_NAMES:
        raise NotAvailableError(f"unknown preprocessor {name!r}; choose one of {', '.join(PREPROCESSOR_NAMES)}")
    fn = preprocessors().get(name)
    if fn is None:
        raise NotAvailableError(f"the {name} preprocessor is not available in this version yet")
    out = np.asarray(fn(image))
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return out.astype(np.uint8)


# --------------------------------------------------------------------- export
DEFAULT_EXPORT_FORMATS = ("peft", "lycoris", "merged")


def export_formats() -> list[str]:
    """Formats ``od.export`` can write ([] until the exporter lands)."""
    import ortho_diffusion as od

    if not callable(getattr(od, "export", None)):
        return []
    try:
        from ..formats.export import FORMATS
    except ImportError:
        return list(DEFAULT_EXPORT_FORMATS)
    return list(FORMATS)


def export(adapter_path: Path, fmt: str, out: Path, base: Path, scale: float = 1.0) -> list[Path]:
    """``od.export(adapter_path, fmt, out, base=..., scale=...)``; the paths it wrote.

    Raises :class:`NotAvailableError` until the exporter exists.
    """
    import ortho_diffusion as od

    fn = getattr(od, "export", None)
    if not callable(fn):
        raise NotAvailableError("export (peft / LyCORIS / merged) is not available in this version yet")
    if fmt not in export_formats():
        raise NotAvailableError(f"unknown export format {fmt!r}; choose one of {', '.join(export_formats())}")
    report = fn(str(adapter_path), fmt, str(out), base=str(base), scale=float(scale))
    paths = getattr(report, "paths", None) or [out]
    return [Path(p) for p in paths]


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors of other modules whose messages are written for users (shown as they are)."""
    found: list[type[BaseException]] = []
    for module, name in (("ortho_diffusion.formats.convert", "ExportError"),
                         ("ortho_diffusion.images", "DataError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)
