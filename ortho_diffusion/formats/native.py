"""The native adapter file: one ``.safetensors`` with every adapter tensor and its metadata.

Layout:

* tensors ``"<component>/<module path>/<tensor>"``, e.g.
  ``"unet/down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q/generators"``;
  ``<tensor>`` is ``generators`` (packed skew generators, ``(n_factors, blocks, b(b-1)/2)``),
  ``angles`` / ``relax`` (Givens), ``u`` / ``v`` (``lroft``, ``(dim, rank)``) or
  ``magnitude`` (``rescale``);
* string metadata: ``format`` (``"ortho-diffusion.adapter"``), ``format_version``,
  ``library_version``, ``components`` (JSON list), and per component
  ``config.<c>`` (the :class:`AdapterConfig` as JSON), ``modules.<c>`` (JSON list of
  adapted module paths), ``fingerprint.<c>`` (hash of the base architecture),
  ``base_model.<c>`` (the base model's name or path, informative);
* optional further parts (``parts``: JSON list, e.g. ``["control"]``): tensors
  ``"<part>/..."`` and metadata ``"<part>.*"``, written and read by the module named in
  :data:`FILE_PARTS` (a control encoder is such a part).

Reading files into a model: :mod:`ortho_diffusion.formats.load`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..adapter import OrthogonalAdapter
from ..config import AdapterConfig
from ..files import atomic_file
from ..inject import components, iter_adapters, iter_extensions
from ..version import __version__

FORMAT = "ortho-diffusion.adapter"
FORMAT_VERSION = "1"

#: Parts an adapter file may hold besides rotations, and the module handling each.  Such a
#: module provides ``save(x, adapter_name) -> (tensors, metadata)``,
#: ``check(file, x, adapter_name)`` (raise :class:`AdapterFileError`, touch nothing),
#: ``load(file, x, adapter_name)`` and ``restore_plan(file, x, adapter_name) -> [(param, value)]``.
FILE_PARTS: dict[str, str] = {"control": "ortho_diffusion.control.storage"}


def part_handler(part: str):
    """The module handling a further part of an adapter file (see :data:`FILE_PARTS`)."""
    return importlib.import_module(FILE_PARTS[part])


class AdapterFileError(ValueError):
    """An adapter file cannot be used with this model; the message names file and module."""


def architecture_fingerprint(module: nn.Module) -> str:
    """Short hash of the base architecture: class name and every base parameter's name and shape.

    Adapter parameters (rotations, magnitudes, the ``adapter_modules`` of extensions such as
    a control encoder) and the ``base_layer`` wrapping are ignored, so a model gives the same
    fingerprint with or without adapters attached.
    """
    h = hashlib.sha256(type(module).__name__.encode())
    for name, p in sorted(module.named_parameters()):
        if ".rotations." in name or ".magnitudes." in name or ".adapter_modules." in name:
            continue
        h.update(f"{name.replace('.base_layer', '')}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def _base_model_name(module: nn.Module) -> str:
    config = getattr(module, "config", None)
    name = getattr(config, "_name_or_path", None) if config is not None else None
    if name is None and isinstance(config, dict):
        name = config.get("_name_or_path")
    return str(name or "")


def adapter_tensors(layer: OrthogonalAdapter, name: str) -> dict[str, torch.Tensor]:
    tensors = {k: v for k, v in layer.rotations[name].named_parameters()}
    if name in layer.magnitudes:
        tensors["magnitude"] = layer.magnitudes[name]
    return tensors


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write a safetensors file to a temporary name in the same folder, then rename it."""
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _pick_adapter_name(x: Any, adapter_name: str | None) -> str:
    names = {n for _, _, layer in iter_adapters(x) for n in layer.adapter_names}
    names = sorted(names | {n for _, _, ext in iter_extensions(x) for n in ext.adapter_names})
    if not names:
        raise ValueError("no adapter is attached: nothing to save")
    if adapter_name is not None:
        if adapter_name not in names:
            raise ValueError(f"no adapter named {adapter_name!r}; attached: {names}")
        return adapter_name
    if len(names) > 1:
        raise ValueError(f"several adapters are attached ({names}); pass adapter_name")
    return names[0]


def save_adapter(
    x: Any,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write the adapter attached to ``x`` (module or pipeline) to one ``.safetensors`` file.

    Args:
        x: the adapted module or pipeline.
        path: destination; written atomically.
        adapter_name: which adapter, when several are attached.
        extra_tensors: further tensors stored beside the adapter (for example a control
            encoder), keys must not contain the adapter components' prefixes.
        extra_metadata: further string metadata.

    Returns:
        The path written.
    """
    name = _pick_adapter_name(x, adapter_name)
    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__}
    comps = []
    for comp, module in components(x).items():
        layers = [(p, a) for _, p, a in iter_adapters(module) if name in a.rotations]
        if not layers:
            continue
        comps.append(comp)
        configs = {a.configs[name].to_json() for _, a in layers}
        if len(configs) > 1:
            raise ValueError(f"adapter {name!r} has several configurations on {comp}; cannot store one")
        metadata[f"config.{comp}"] = configs.pop()
        metadata[f"modules.{comp}"] = json.dumps([p for p, _ in layers])
        metadata[f"fingerprint.{comp}"] = architecture_fingerprint(module)
        metadata[f"base_model.{comp}"] = _base_model_name(module)
        for p, layer in layers:
            for key, value in adapter_tensors(layer, name).items():
                tensors[f"{comp}/{p}/{key}"] = value.detach().to("cpu", torch.float32).contiguous()
    metadata["components"] = json.dumps(comps)
    parts = sorted({e.file_part for _, _, e in iter_extensions(x) if name in e.adapter_names and e.file_part})
    for part in parts:
        part_tensors, part_metadata = part_handler(part).save(x, name)
        if any(not k.startswith(f"{part}/") for k in part_tensors) or any(
            not k.startswith(f"{part}.") for k in part_metadata
        ):
            raise ValueError(f"file part {part!r} must prefix its tensors with {part}/ and its metadata with {part}.")
        tensors.update({k: v.detach().to("cpu").contiguous() for k, v in part_tensors.items()})
        metadata.update(part_metadata)
    if parts:
        metadata["parts"] = json.dumps(parts)
    if extra_tensors:
        for key, value in extra_tensors.items():
            if key in tensors:
                raise ValueError(f"extra tensor {key!r} collides with an adapter tensor")
            tensors[key] = value.detach().to("cpu").contiguous()
    if extra_metadata:
        metadata.update(extra_metadata)
    path = Path(path)
    atomic_save_safetensors(tensors, path, metadata)
    return path


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and every tensor of the safetensors file ``path``; an unreadable or
    truncated file raises :class:`AdapterFileError` naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad files
        raise AdapterFileError(f"{path}: not a readable safetensors file ({err})") from None


class AdapterFile:
    """A parsed native adapter file: metadata and tensors, read without touching any model.

    Raises :class:`AdapterFileError` for a missing, truncated, corrupt or foreign file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise AdapterFileError(f"{self.path}: no such adapter file")
        self._parse(*read_safetensors(self.path))

    @classmethod
    def from_memory(
        cls, path: str | os.PathLike, metadata: dict[str, str], tensors: dict[str, torch.Tensor]
    ) -> AdapterFile:
        """A file converted in memory (from peft or LyCORIS) in the native layout.

        ``path`` is the original file or folder (used in messages and for the default
        adapter name).  An empty ``fingerprint.<c>`` means the base architecture is unknown:
        loading then relies on the module names and tensor shapes alone.
        """
        file = cls.__new__(cls)
        file.path = Path(path)
        file._parse(metadata, tensors)
        return file

    def _parse(self, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
        self.metadata, self.tensors = metadata, tensors
        if self.metadata.get("format") != FORMAT:
            raise AdapterFileError(
                f"{self.path}: not an ortho-diffusion adapter (metadata format={self.metadata.get('format')!r})"
            )
        try:
            self.components: list[str] = json.loads(self.metadata["components"])
            self.configs = {c: AdapterConfig.from_dict(json.loads(self.metadata[f"config.{c}"])) for c in self.components}
            self.modules = {c: json.loads(self.metadata[f"modules.{c}"]) for c in self.components}
            self.fingerprints = {c: self.metadata[f"fingerprint.{c}"] for c in self.components}
            self.parts: list[str] = json.loads(self.metadata.get("parts", "[]"))
            # Optional per-module configurations (converted files whose layers differ, e.g.
            # in block size); modules not listed use the component's config.
            self.module_configs: dict[str, dict[str, AdapterConfig]] = {
                c: {p: AdapterConfig.from_dict(d) for p, d in json.loads(self.metadata[f"module_configs.{c}"]).items()}
                for c in self.components
                if f"module_configs.{c}" in self.metadata
            }
        except (KeyError, ValueError, TypeError) as err:
            raise AdapterFileError(f"{self.path}: damaged metadata ({err})") from None
        unknown = [p for p in self.parts if p not in FILE_PARTS]
        if unknown:
            raise AdapterFileError(f"{self.path}: holds parts {unknown} that this version of ortho-diffusion cannot read")

    def config_for(self, component: str, module: str) -> AdapterConfig:
        """The configuration of one adapted module."""
        return self.module_configs.get(component, {}).get(module, self.configs[component])

    def component_tensors(self, component: str) -> dict[str, dict[str, torch.Tensor]]:
        """``{module path: {tensor name: tensor}}`` of one component."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in self.tensors.items():
            comp, _, rest = key.partition("/")
            if comp != component:
                continue
            path, _, tensor = rest.rpartition("/")
            out.setdefault(path, {})[tensor] = value
        return out

    def part_tensors(self, part: str) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` of one further part (``"<part>/<name>"`` keys, prefix removed)."""
        prefix = f"{part}/"
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}
