"""``od.export``: write a native adapter in another tool's format.

Formats:

* ``"peft"``: ``adapter_config.json`` + ``adapter_model.safetensors`` (one folder per
  component for a pipeline adapter), loadable by ``PeftModel.from_pretrained``;
  see :mod:`ortho_diffusion.formats.peft`.
* ``"lycoris"``: one kohya/LyCORIS ``.safetensors`` (``lora_unet_..._oft_blocks``, ``.alpha``,
  ``.rescale``, ``ss_*`` metadata) for ComfyUI, A1111 and LyCORIS; layers a LyCORIS
  rotation cannot express are written as exact full weight differences (``.diff``), which
  needs the base model; see :mod:`ortho_diffusion.formats.lycoris`.
* ``"merged"``: a complete diffusers pipeline folder with the rotations folded into the
  weights; see :mod:`ortho_diffusion.formats.merged`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .convert import ExportError
from .native import AdapterFile

FORMATS = ("peft", "lycoris", "merged")


@dataclass
class ExportReport:
    """What :func:`export` wrote: the format, the paths, and notes worth showing the user."""

    format: str
    paths: list[Path]
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"exported to {self.format}: " + ", ".join(str(p) for p in self.paths)]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def load_base(base: Any) -> Any:
    """A module or pipeline as is; a folder path loaded offline with diffusers.

    A folder with ``model_index.json`` loads as a pipeline; a folder with a
    ``config.json`` naming a diffusers or transformers class loads as that model.
    """
    if base is None or not isinstance(base, (str, os.PathLike)):
        return base
    folder = Path(base)
    if (folder / "model_index.json").is_file():
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        cls_name = config.get("_class_name") or (config.get("architectures") or [None])[0]
        import diffusers
        import transformers

        cls = getattr(diffusers, cls_name or "", None) or getattr(transformers, cls_name or "", None)
        if cls is not None:
            return cls.from_pretrained(str(folder), local_files_only=True)
    raise ExportError(f"{folder}: not a diffusers pipeline folder or a model folder")


def export(
    adapter: str | os.PathLike | AdapterFile,
    format: str,
    out: str | os.PathLike,
    base: Any = None,
    scale: float = 1.0,
    mode: str = "auto",
    dtype: str = "float32",
) -> ExportReport:
    """Write the native adapter ``adapter`` in ``format`` to ``out``.

    Args:
        adapter: a native adapter file (or an already read :class:`AdapterFile`).
        format: ``"peft"``, ``"lycoris"`` or ``"merged"``.
        out: destination folder (peft, merged) or ``.safetensors`` file (lycoris); written
            atomically (a temporary name, then a rename).
        base: the base model: a pipeline / model folder, or a loaded module or pipeline.
            Required for ``merged`` and for LyCORIS ``.diff`` layers; lets peft and
            LyCORIS exports check layer types (else module names decide).
        scale: strength ``t`` baked into the export (the other tools' own strength
            settings are not rotations, see the README).
        mode: LyCORIS only: ``"auto"`` (native keys where exact, ``.diff`` elsewhere),
            ``"native"`` (refuse what native keys cannot express), ``"diff"`` (all ``.diff``).
        dtype: LyCORIS ``.diff`` tensors and merged weights: ``"float32"``, ``"float16"``,
            ``"bfloat16"`` (merged: ``"keep"`` keeps the base's dtype).

    Raises:
        ExportError: the adapter cannot be written in this format; the message says why.
        AdapterFileError: ``adapter`` is not a readable native file.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    file = adapter if isinstance(adapter, AdapterFile) else AdapterFile(adapter)
    if format == "peft":
        from .peft import export_peft

        return ExportReport("peft", export_peft(file, out, load_base(base), scale))
    if format == "lycoris":
        from .lycoris import export_lycoris

        path, notes = export_lycoris(file, out, load_base(base), scale, mode, dtype)
        return ExportReport("lycoris", [path], notes)
    from .merged import export_merged

    if base is None:
        raise ExportError("a merged export needs the base pipeline (base=path/to/pipeline)")
    return ExportReport("merged", [export_merged(file, base, out, scale, dtype if dtype != "float32" else "keep")])
