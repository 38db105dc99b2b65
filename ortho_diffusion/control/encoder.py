"""The light control encoder of the OFT paper and its attachment to a UNet's ``conv_in``.

A control image ``(B, 3, H, W)`` in [0, 1] goes through a few small 3x3 convolutions with
SiLU, ``log2(H / h)`` of them with stride 2, down to the latent size ``(h, w)``; a last
zero-initialised convolution maps it to the width of the UNet's first layer, and the result
is added once to the output of ``conv_in``:

    conv_in'(z) = conv_in(z) + t * s * E(c)

with ``t`` the adapter strength (``od.set_scale``) and ``s`` the control scale of the call.
At initialisation (zero last layer), with ``t = 0`` or ``s = 0``, or without a control image,
the UNet computes exactly what the base model computes.

The wrapper :class:`ControlledConvIn` is an :class:`~ortho_diffusion.inject.AdapterExtension`,
so ``od.set_scale``, ``od.detach``, ``od.adapter_parameters``, ``od.summary`` and the native
adapter file handle it like the rotations of the same adapter name.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..inject import AdapterExtension, components

#: Where the encoder's output is added: the first convolution of every diffusers UNet.
TARGET = "conv_in"


@dataclass
class ControlEncoderConfig:
    """Architecture of one control encoder.

    Attributes:
        out_channels: width of the UNet's ``conv_in`` output (320 for SD 1.x).
        downscale: control image size / latent size (the VAE factor: 8 for SD, 4 for the
            embedded shapes model); a power of two, one stride-2 step per factor 2.
        channels: widths of the stages; the OFT paper (SD) uses ``(16, 32, 96, 256)``, i.e.
            convolutions 16, 16, 32, 32, 96, 96, 256.
        in_channels: channels of the control image (3: RGB maps).
        task: what the control image shows (``"canny"``, ``"segmentation"``,
            ``"landmarks"``, ...); informative, shown by the app.
    """

    out_channels: int
    downscale: int = 8
    channels: tuple[int, ...] = (16, 32, 96, 256)
    in_channels: int = 3
    task: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if self.downscale < 1 or self.downscale & (self.downscale - 1):
            raise ValueError(f"downscale must be a power of two, got {self.downscale}")
        if len(self.channels) < 1 or min(self.channels) < 1:
            raise ValueError(f"channels must be positive widths, got {self.channels}")
        if self.n_down > len(self.channels) - 1:
            raise ValueError(
                f"downscale {self.downscale} needs {self.n_down} stride-2 steps, but channels {self.channels} "
                f"give only {len(self.channels) - 1} stages"
            )
        if self.out_channels < 1 or self.in_channels < 1:
            raise ValueError("out_channels and in_channels must be positive")

    @property
    def n_down(self) -> int:
        return int(math.log2(self.downscale))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ControlEncoderConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown control encoder fields {unknown}")
        return cls(**data)


class ControlEncoder(nn.Module):
    """Control image ``(B, in_channels, H, W)`` -> features ``(B, out_channels, H/f, W/f)``.

    Stages: ``conv(in, c0)``, then per further width ``c_{i+1}``: ``conv(c_i, c_i)``,
    ``conv(c_i, c_{i+1}, stride 2 for the first log2(f) stages)``; SiLU after each; then the
    zero-initialised ``conv(c_last, out_channels)`` (``self.zero_conv``).
    """

    def __init__(self, config: ControlEncoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, c[0], 3, padding=1), nn.SiLU()]
        for i in range(len(c) - 1):
            stride = 2 if i < config.n_down else 1
            layers += [nn.Conv2d(c[i], c[i], 3, padding=1), nn.SiLU()]
            layers += [nn.Conv2d(c[i], c[i + 1], 3, padding=1, stride=stride), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self._init_body()
        self.zero_conv = nn.Conv2d(c[-1], config.out_channels, 3, padding=1)
        # Zero output at initialisation: training starts exactly at the base model.
        nn.init.zeros_(self.zero_conv.weight)
        nn.init.zeros_(self.zero_conv.bias)

    def _init_body(self) -> None:
        # PyTorch's default convolution init shrinks activations at every layer; on a sparse
        # map (Canny edges: 3% white) seven of them leave spatial features ~1e-3 in size, and
        # the zero convolution then learns from almost nothing (measured: the shipped encoders
        # barely lowered the loss after 400 steps).  He init keeps the size through the SiLUs,
        # and the first layer reads the map as if centred to [-1, 1] (W' = 2W, b' = -sum W), so
        # a black background is a signal rather than zeros.  Only the initial values change.
        convs = [m for m in self.body if isinstance(m, nn.Conv2d)]
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        first = convs[0]
        with torch.no_grad():
            first.bias.copy_(-first.weight.sum(dim=(1, 2, 3)))
            first.weight.mul_(2.0)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` in [0, 1] -> ``(B, out_channels, H / f, W / f)``."""
        return self.zero_conv(self.body(hint))


class ControlledConvIn(AdapterExtension):
    """``conv_in`` plus named control encoders whose outputs are added to its output.

    The control images are not an argument of the UNet's forward; they are set beforehand
    with :func:`set_control` (or the :func:`control_images` context), and each forward
    broadcasts them over the batch: a batch of ``N`` latents takes ``N / B`` copies of the
    ``B`` control images in order, which is how classifier-free guidance
    (``[uncond; cond]``) and several images per prompt lay out their batches.
    """

    file_part = "control"
    kind = "control"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.hints: dict[str | None, torch.Tensor] = {}  # None: for every encoder
        self.control_scale = 1.0
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # Attributes diffusers or users may read from conv_in.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_channels(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_channels(self) -> int:
        return self.base_layer.out_channels

    def add_encoder(self, name: str, config: ControlEncoderConfig) -> ControlEncoder:
        if name in self.adapter_modules:
            raise ValueError(f"a control encoder named {name!r} is already attached")
        if config.out_channels != self.out_channels:
            raise ValueError(f"control encoder width {config.out_channels} != conv_in width {self.out_channels}")
        ref = self.base_layer.weight
        enc = ControlEncoder(config).to(ref.device, ref.dtype)
        self.adapter_modules[name] = enc
        self.scales[name] = 1.0
        return enc

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self._cache.pop(name, None)

    def _features(self, name: str, hint: torch.Tensor) -> torch.Tensor:
        enc = self.adapter_modules[name]
        if torch.is_grad_enabled():
            return enc(hint)
        # Sampling calls the UNet once per step with the same control image: encode it once.
        cached = self._cache.get(name)
        if cached is None or cached[0] is not hint:
            cached = (hint, enc(hint))
            self._cache[name] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for name in self.adapter_names:
            scale = self.scales.get(name, 1.0) * self.control_scale
            hint = self.hints.get(name, self.hints.get(None))
            if hint is None or scale == 0.0:
                continue  # no control: exactly the base layer
            feat = self._features(name, hint.to(out.device, out.dtype))
            if feat.shape[-2:] != out.shape[-2:]:
                f = self.adapter_modules[name].config.downscale
                raise ValueError(
                    f"control image of size {tuple(hint.shape[-2:])} gives features {tuple(feat.shape[-2:])}, "
                    f"but the latents are {tuple(out.shape[-2:])}: the control image must be {f}x the latent size"
                )
            n, b = out.shape[0], feat.shape[0]
            if n != b:
                if n % b:
                    raise ValueError(f"{b} control images do not divide a batch of {n} latents")
                feat = feat.repeat(n // b, 1, 1, 1)
            out = out + scale * feat
        return out

    def extra_repr(self) -> str:
        return f"encoders={self.adapter_names}"


def find_controlled(unet: nn.Module) -> ControlledConvIn | None:
    """The :class:`ControlledConvIn` of a UNet, if control encoders are attached."""
    layer = getattr(unet, TARGET, None)
    return layer if isinstance(layer, ControlledConvIn) else None


def _unet_of(x: Any) -> nn.Module:
    comps = components(x)
    if "unet" in comps:
        return comps["unet"]
    (module,) = comps.values()
    if not isinstance(getattr(module, TARGET, None), nn.Module):
        raise ValueError(f"{type(module).__name__} has no {TARGET}: control encoders go on a diffusers UNet")
    return module


def attach_control(
    x: Any, config: ControlEncoderConfig | None = None, adapter_name: str = "default", **config_kwargs: Any
) -> ControlEncoder:
    """Attach a (zero-initialised, trainable) control encoder to the UNet of ``x``.

    Args:
        x: a UNet or a pipeline.
        config: the encoder's architecture; or give its fields as keyword arguments
            (``out_channels`` defaults to the width of ``conv_in``).
        adapter_name: name shared with the rotations trained with it (one adapter file).

    Returns:
        The new encoder (its parameters require gradients).
    """
    unet = _unet_of(x)
    conv = getattr(unet, TARGET)
    if config is None:
        width = conv.out_channels
        config = ControlEncoderConfig(out_channels=config_kwargs.pop("out_channels", width), **config_kwargs)
    wrapper = conv if isinstance(conv, ControlledConvIn) else ControlledConvIn(conv)
    enc = wrapper.add_encoder(adapter_name, config)  # raises before the UNet is changed
    if wrapper is not conv:
        setattr(unet, TARGET, wrapper)
    for p in enc.parameters():
        p.requires_grad_(True)
    return enc


def control_encoders(x: Any) -> dict[str, ControlEncoder]:
    """The control encoders attached to the UNet of ``x``, by adapter name."""
    wrapper = find_controlled(_unet_of(x))
    return dict(wrapper.adapter_modules.items()) if wrapper is not None else {}


def set_control(x: Any, images: torch.Tensor | dict[str, torch.Tensor] | None, scale: float = 1.0) -> None:
    """Set the control image(s) of the following UNet calls (``None`` switches control off).

    Args:
        x: a UNet or a pipeline with control encoders.
        images: ``(B, 3, H, W)`` in [0, 1] for every encoder, or ``{adapter name: images}``.
        scale: the control scale ``s`` (multiplies each encoder's strength ``t``).
    """
    wrapper = find_controlled(_unet_of(x))
    if wrapper is None:
        if images is None:
            return
        raise ValueError("no control encoder is attached: load a control adapter first")
    if isinstance(images, dict):
        unknown = sorted(set(images) - set(wrapper.adapter_names))
        if unknown:
            raise ValueError(f"no control encoder named {unknown}; attached: {wrapper.adapter_names}")
        wrapper.hints = dict(images)
    else:
        wrapper.hints = {} if images is None else {None: images}
    wrapper.control_scale = float(scale)
    wrapper._cache.clear()


@contextlib.contextmanager
def control_images(x: Any, images: torch.Tensor | dict[str, torch.Tensor] | None, scale: float = 1.0) -> Iterator[None]:
    """Context manager form of :func:`set_control`; control is switched off on exit."""
    set_control(x, images, scale)
    try:
        yield
    finally:
        set_control(x, None)
