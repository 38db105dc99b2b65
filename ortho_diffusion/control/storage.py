"""The ``control`` part of a native adapter file: a control encoder beside the rotations.

Tensors ``control/<parameter>`` (the encoder's ``state_dict``, e.g.
``control/zero_conv.weight``) and metadata:

* ``control.config``: the :class:`~ortho_diffusion.control.encoder.ControlEncoderConfig` as JSON;
* ``control.component``: the component it belongs to (``"unet"``);
* ``control.module``: the UNet layer whose output it is added to (``"conv_in"``);
* ``control.fingerprint``: the architecture fingerprint of that UNet.

:mod:`ortho_diffusion.formats` (saving and loading) calls these functions (see ``FILE_PARTS``): ``check``
validates everything without touching the model, ``load`` then attaches the encoder.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ..formats.native import AdapterFile, AdapterFileError, architecture_fingerprint
from ..inject import is_pipeline
from .encoder import TARGET, ControlEncoder, ControlEncoderConfig, ControlledConvIn, _unet_of, attach_control

PART = "control"


def save(x: Any, adapter_name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of the control encoder ``adapter_name`` of ``x``."""
    unet = _unet_of(x)
    wrapper = getattr(unet, TARGET)
    enc: ControlEncoder = wrapper.adapter_modules[adapter_name]
    tensors = {f"{PART}/{k}": v.detach().to("cpu", torch.float32) for k, v in enc.state_dict().items()}
    metadata = {
        f"{PART}.config": enc.config.to_json(),
        f"{PART}.component": "unet",
        f"{PART}.module": TARGET,
        f"{PART}.fingerprint": architecture_fingerprint(unet),
    }
    return tensors, metadata


def read_config(file: AdapterFile) -> ControlEncoderConfig:
    """The encoder architecture stored in ``file`` (raises :class:`AdapterFileError`)."""
    try:
        return ControlEncoderConfig.from_dict(json.loads(file.metadata[f"{PART}.config"]))
    except KeyError:
        raise AdapterFileError(f"{file.path}: control encoder metadata is missing ({PART}.config)") from None
    except (ValueError, TypeError) as err:
        raise AdapterFileError(f"{file.path}: damaged control encoder metadata ({err})") from None


def _target_unet(file: AdapterFile, x: Any) -> nn.Module:
    try:
        unet = _unet_of(x)
    except (ValueError, TypeError) as err:
        raise AdapterFileError(f"{file.path}: the control encoder needs a UNet ({err})") from None
    expected = file.metadata.get(f"{PART}.fingerprint", "")
    actual = architecture_fingerprint(unet)
    if expected and expected != actual:
        raise AdapterFileError(
            f"{file.path}: the control encoder was made for another UNet (fingerprint {expected}, this one has {actual})"
        )
    return unet


def check(file: AdapterFile, x: Any, adapter_name: str) -> None:
    """Raise :class:`AdapterFileError` unless the stored encoder fits ``x``; touches nothing."""
    config = read_config(file)
    unet = _target_unet(file, x)
    module = file.metadata.get(f"{PART}.module", TARGET)
    if module != TARGET:
        raise AdapterFileError(f"{file.path}: control encoder for {module!r}; only {TARGET} is supported")
    conv = getattr(unet, TARGET)
    if isinstance(conv, ControlledConvIn) and adapter_name in conv.adapter_names:
        raise AdapterFileError(
            f"{file.path}: a control encoder named {adapter_name!r} is already attached; pass another adapter_name"
        )
    if config.out_channels != conv.out_channels:
        raise AdapterFileError(
            f"{file.path}: control encoder of width {config.out_channels}, but unet.{TARGET} has {conv.out_channels}"
        )
    with torch.device("meta"):  # shapes only, no memory
        probe = ControlEncoder(config)
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in file.part_tensors(PART).items()}
    if set(want) != set(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise AdapterFileError(f"{file.path}: control encoder: missing tensors {missing}, unexpected tensors {extra}")
    for k in want:
        if want[k] != got[k]:
            raise AdapterFileError(f"{file.path}: control encoder: tensor {k} has shape {got[k]}, expected {want[k]}")
    for k, v in file.part_tensors(PART).items():
        if not torch.isfinite(v).all():
            raise AdapterFileError(f"{file.path}: control encoder: tensor {k} holds NaN or inf")


@torch.no_grad()
def load(file: AdapterFile, x: Any, adapter_name: str) -> None:
    """Attach the stored encoder (after :func:`check`) and make a pipeline accept control images."""
    enc = attach_control(x, read_config(file), adapter_name)
    values = file.part_tensors(PART)
    for k, v in enc.state_dict().items():
        v.copy_(values[k].to(v.dtype))
    enc.requires_grad_(False)  # loaded for inference; training re-enables what it trains
    if is_pipeline(x):
        from .pipeline import enable_control

        enable_control(x)


def restore_plan(file: AdapterFile, x: Any, adapter_name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter, stored value)`` pairs to resume training of the attached encoder ``adapter_name``."""
    conv = getattr(_unet_of(x), TARGET, None)
    if not isinstance(conv, ControlledConvIn) or adapter_name not in conv.adapter_names:
        raise AdapterFileError(f"{file.path}: no control encoder {adapter_name!r} is attached to restore")
    params = conv.adapter_modules[adapter_name].state_dict(keep_vars=True)
    values = file.part_tensors(PART)
    if set(params) != set(values) or any(params[k].shape != values[k].shape for k in params):
        raise AdapterFileError(f"{file.path}: control encoder tensors do not fit encoder {adapter_name!r}")
    return [(params[k], values[k]) for k in params]
