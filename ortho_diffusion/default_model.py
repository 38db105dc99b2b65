"""Where the embedded default model lives.

The package ships one small text-to-image model trained from scratch on the shapes world
(:mod:`ortho_diffusion.shapes`) as a standard ``StableDiffusionPipeline`` folder in the
repository's ``assets/`` directory, so everything works offline:

    from diffusers import StableDiffusionPipeline
    from ortho_diffusion.default_model import default_model_path
    pipe = StableDiffusionPipeline.from_pretrained(default_model_path())
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "shapes-sd"
ENV_VAR = "ORTHO_DIFFUSION_DEFAULT_MODEL"
"""Set to a pipeline folder to use another default model (e.g. a copy outside the repo)."""

DEFAULT_GUIDANCE_SCALE = 3.0
"""Classifier-free guidance the embedded model draws best at (its default in the app, the
scripts' validation samples and the benchmarks). Measured on 200 single-object prompts:
shape right 94.5% at 2, 92.5% at 3, 89.5% at 4, 86% at 5; higher guidance overshoots into
star-like triangles and square-ish circles. 3 keeps two-object prompts best (58% all right)."""


class DefaultModelMissingError(FileNotFoundError):
    """The embedded model folder is not where it should be."""


def _repo_assets() -> Path:
    # ortho_diffusion/default_model.py -> <repo>/assets
    return Path(__file__).resolve().parent.parent / "assets"


def default_model_path() -> Path:
    """Folder of the default ``StableDiffusionPipeline`` (``<repo>/assets/shapes-sd``, or the
    folder named by ``$ORTHO_DIFFUSION_DEFAULT_MODEL``).

    Raises:
        DefaultModelMissingError: the folder or its ``model_index.json`` is missing.
    """
    override = os.environ.get(ENV_VAR)
    path = Path(override).expanduser().resolve() if override else _repo_assets() / DEFAULT_MODEL_NAME
    if not (path / "model_index.json").is_file():
        raise DefaultModelMissingError(
            f"The default model is missing: no model_index.json in {path}. It ships in the "
            f"repository's assets/{DEFAULT_MODEL_NAME} folder (a source checkout, not a wheel); "
            "check it out with git, retrain it with training/train_base.py (see README), or set "
            f"${ENV_VAR} to a StableDiffusionPipeline folder."
        )
    return path


def load_default_pipeline(**kwargs):
    """``StableDiffusionPipeline.from_pretrained(default_model_path(), **kwargs)`` (offline)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(default_model_path(), **kwargs)
