"""Loading adapter files into a model: native files, peft folders and LyCORIS/kohya files.

Loading validates everything before it touches the model, and never unpickles anything.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..adapter import OrthogonalAdapter
from ..config import AdapterConfig
from ..inject import attach_to_module, component_name, components, is_pipeline, set_scale
from .lycoris import read_lycoris
from .native import FORMAT, AdapterFile, AdapterFileError, adapter_tensors, architecture_fingerprint, part_handler
from .peft import read_peft


def _match_components(file: AdapterFile, x: Any) -> dict[str, nn.Module]:
    """Map the file's components to the modules of ``x`` they load into."""
    comps = components(x)
    if not file.components:  # a file holding only further parts (e.g. a control encoder)
        return {}
    if is_pipeline(x):
        missing = [c for c in file.components if c not in comps]
        if missing:
            raise AdapterFileError(f"{file.path}: the pipeline has no {', '.join(missing)} for this adapter")
        return {c: comps[c] for c in file.components}
    (module,) = comps.values()
    if len(file.components) == 1:
        return {file.components[0]: module}
    name = component_name(module)
    if name not in file.components:
        raise AdapterFileError(
            f"{file.path}: holds adapters for {file.components}; load it into a pipeline or the matching module"
        )
    return {name: module}


def _check_component(file: AdapterFile, comp: str, module: nn.Module, adapter_name: str) -> None:
    """Raise unless every tensor of ``comp`` fits ``module``; touches nothing."""
    expected_fp = file.fingerprints[comp]
    actual_fp = architecture_fingerprint(module)
    if expected_fp and expected_fp != actual_fp:
        raise AdapterFileError(
            f"{file.path}: the {comp} adapter was made for another base architecture "
            f"(fingerprint {expected_fp}, this {type(module).__name__} has {actual_fp})"
        )
    tensors = file.component_tensors(comp)
    listed = file.modules[comp]
    for path in set(tensors) - set(listed):
        raise AdapterFileError(f"{file.path}: unexpected tensors for module {comp}.{path}")
    for path in listed:
        try:
            layer = module.get_submodule(path)
        except AttributeError:
            raise AdapterFileError(f"{file.path}: module {comp}.{path} does not exist in this model") from None
        if isinstance(layer, OrthogonalAdapter):
            if adapter_name in layer.rotations:
                raise AdapterFileError(
                    f"{file.path}: an adapter named {adapter_name!r} is already attached to {comp}.{path}; "
                    "pass another adapter_name"
                )
            base = layer.base_layer
        else:
            base = layer
        try:
            probe = OrthogonalAdapter(base, "probe", file.config_for(comp, path))
        except (TypeError, ValueError) as err:
            raise AdapterFileError(f"{file.path}: module {comp}.{path}: {err}") from None
        want = {k: tuple(v.shape) for k, v in adapter_tensors(probe, "probe").items()}
        got = {k: tuple(v.shape) for k, v in tensors.get(path, {}).items()}
        if set(want) != set(got):
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            raise AdapterFileError(
                f"{file.path}: module {comp}.{path}: missing tensors {missing}, unexpected tensors {extra}"
            )
        for k in want:
            if want[k] != got[k]:
                raise AdapterFileError(
                    f"{file.path}: module {comp}.{path}: tensor {k} has shape {got[k]}, the model needs {want[k]}"
                )
        for k, v in tensors[path].items():
            if not torch.isfinite(v).all():
                raise AdapterFileError(f"{file.path}: module {comp}.{path}: tensor {k} holds NaN or inf")


def open_adapter(path: str | os.PathLike | AdapterFile, x: Any = None) -> AdapterFile:
    """Read a native file, or convert a peft folder or a LyCORIS file, to an :class:`AdapterFile`.

    ``x`` (the module or pipeline it will load into) is needed for LyCORIS files, whose
    keys flatten module paths (dots become underscores) and can only be resolved against
    a model.
    """
    if isinstance(path, AdapterFile):
        return path
    path = Path(path)
    if path.is_dir():
        return read_peft(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such adapter file or folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
            keys = list(f.keys())
    except Exception as err:  # safetensors raises its own error types for bad files
        raise AdapterFileError(f"{path}: not a readable safetensors file ({err})") from None
    if fmt != FORMAT and any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        if x is None:
            raise AdapterFileError(f"{path}: a LyCORIS file can only be read against the model it adapts")
        return read_lycoris(path, x)
    if fmt != FORMAT and any(k.startswith("base_model.model.") for k in keys):
        raise AdapterFileError(
            f"{path}: looks like peft adapter weights; pass the folder that also holds adapter_config.json"
        )
    return AdapterFile(path)


def default_adapter_name(path: str | os.PathLike) -> str:
    """Adapter name derived from a file name (``"my subject.safetensors"`` -> ``"my_subject"``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem) or "adapter"


@torch.no_grad()
def load_adapter(
    x: Any, path: str | os.PathLike, scale: float = 1.0, adapter_name: str | None = None
) -> Any:
    """Attach the adapter stored in ``path`` to ``x`` (module or pipeline) and load its values.

    Everything is validated first (format, base architecture fingerprint, module names,
    tensor names and shapes, finite values); on any problem an :class:`AdapterFileError`
    names the file and the module, and ``x`` is left unchanged.

    Besides native files, ``path`` may be a peft OFT/BOFT adapter folder
    (``adapter_config.json`` + ``adapter_model.safetensors``, or one such folder per
    component) or a LyCORIS/kohya ``diag-oft`` / ``boft`` ``.safetensors`` file: these are
    converted exactly to the native form first (see :mod:`ortho_diffusion.formats.peft`
    and :mod:`ortho_diffusion.formats.lycoris`) and then go through the same validation.

    Args:
        x: module or diffusers pipeline.
        path: a native ``.safetensors`` adapter file, a peft folder or a LyCORIS file.
        scale: strength ``t`` to set after loading.
        adapter_name: name for this adapter (default: the file's stem); adapters with
            different names compose.

    Returns:
        ``x``.
    """
    file = open_adapter(path, x)
    name = adapter_name or default_adapter_name(file.path)
    targets = _match_components(file, x)
    for comp, module in targets.items():
        _check_component(file, comp, module, name)
    for part in file.parts:
        part_handler(part).check(file, x, name)
    for comp, module in targets.items():
        tensors = file.component_tensors(comp)
        groups: dict[str, list[str]] = {}  # modules sharing one configuration attach together
        for p in file.modules[comp]:
            groups.setdefault(file.config_for(comp, p).to_json(), []).append(p)
        for members in groups.values():
            config = file.config_for(comp, members[0])
            targets_re = [f"re:{re.escape(p)}" for p in members]
            paths = attach_to_module(module, AdapterConfig.from_dict({**config.to_dict(), "targets": targets_re}), name)
            for p in paths:
                layer = module.get_submodule(p)
                for key, param in adapter_tensors(layer, name).items():
                    param.copy_(tensors[p][key].to(param.dtype))
                layer.configs[name] = config  # keep the user's targets, not the exact paths
    for part in file.parts:
        part_handler(part).load(file, x, name)
    set_scale(x, scale, adapter_name=name)
    return x


@torch.no_grad()
def restore_adapter_values(x: Any, path: str | os.PathLike, adapter_name: str) -> None:
    """Copy the tensors of a native file into the already attached adapter ``adapter_name``.

    Used to resume training: the adapter was attached with the same configuration, so every
    tensor must find its parameter with the same shape, or :class:`AdapterFileError` is raised
    before anything is copied.
    """
    file = AdapterFile(path)
    targets = _match_components(file, x)
    plan = []
    for comp, module in targets.items():
        for mod_path, tensors in file.component_tensors(comp).items():
            try:
                layer = module.get_submodule(mod_path)
            except AttributeError:
                raise AdapterFileError(f"{file.path}: module {comp}.{mod_path} does not exist in this model") from None
            if not isinstance(layer, OrthogonalAdapter) or adapter_name not in layer.rotations:
                raise AdapterFileError(f"{file.path}: {comp}.{mod_path} has no adapter {adapter_name!r} to restore")
            params = adapter_tensors(layer, adapter_name)
            if set(params) != set(tensors) or any(params[k].shape != tensors[k].shape for k in params):
                raise AdapterFileError(f"{file.path}: {comp}.{mod_path}: tensors do not fit adapter {adapter_name!r}")
            plan += [(params[k], tensors[k]) for k in params]
    for part in file.parts:
        plan += part_handler(part).restore_plan(file, x, adapter_name)
    for param, value in plan:
        param.copy_(value.to(param.dtype))
