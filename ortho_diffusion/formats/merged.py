"""Merged export: a complete diffusers pipeline folder with the rotations folded into the weights.

The result loads with plain ``StableDiffusionPipeline.from_pretrained`` (or the SDXL
pipeline), needs no ortho-diffusion at inference and costs exactly what the base costs.
The merge runs in float64 and is cast once to the base's dtype (or ``dtype``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_folder
from ..inject import _set_submodule, components, iter_adapters
from .convert import ExportError
from .load import load_adapter
from .native import AdapterFile

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export_merged(
    file: AdapterFile, base: str | os.PathLike | Any, out: str | os.PathLike, scale: float = 1.0, dtype: str = "keep"
) -> Path:
    """Load the pipeline ``base``, attach ``file`` at strength ``scale``, fold it in, save to ``out``.

    Args:
        file: the adapter.
        base: a diffusers pipeline folder, or a loaded pipeline (it is not modified).
        out: destination folder, written atomically (temporary folder, then rename).
        scale: strength ``t`` folded into the weights.
        dtype: ``"keep"`` (the base's dtypes) or ``"float32"`` / ``"float16"`` / ``"bfloat16"``.
    """
    from diffusers import DiffusionPipeline

    if dtype != "keep" and dtype not in DTYPES:
        raise ExportError(f"dtype must be keep or one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(base, (str, os.PathLike)):
        if not (Path(base) / "model_index.json").is_file():
            raise ExportError(f"{base}: a merged export needs a diffusers pipeline folder (with model_index.json)")
        pipe = DiffusionPipeline.from_pretrained(str(base), local_files_only=True)
    elif hasattr(base, "save_pretrained") and hasattr(base, "unet"):
        import copy

        pipe = copy.deepcopy(base)  # the caller's pipeline stays as it was
    else:
        raise ExportError("a merged export needs a diffusers pipeline (a folder or a loaded pipeline)")
    load_adapter(pipe, file, scale=scale, adapter_name="merged_export")
    with torch.no_grad():
        for comp, module in components(pipe).items():
            for path, layer in [(p, a) for _, p, a in iter_adapters(module)]:
                layer.merge()
                # Keep the folded weight and drop the wrapper: the saved model is a plain one.
                _set_submodule(module, path, layer.base_layer)
            if dtype != "keep":
                module.to(DTYPES[dtype])
    out = Path(out)
    with atomic_folder(out) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    return out
