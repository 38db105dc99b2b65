"""Shared pieces of the converters between the native file and other tools' formats.

* :class:`NativeBuilder` assembles a converted adapter in the native layout (metadata and
  ``<component>/<module>/<tensor>`` tensors) so that it loads through the one validation
  path of :func:`~ortho_diffusion.formats.load.load_adapter`.
* :func:`effective_skew` gives the generators a rotation really uses at a strength ``t``
  (after the COFT constraint and OFTv2's Neumann guard), which is what exports write.
* :func:`layer_kinds` tells exports whether each adapted module is a Linear or a Conv2d,
  from the base model when given, else from the usual Stable Diffusion / CLIP names.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import OrthogonalAdapter
from ..config import AdapterConfig
from ..inject import components
from ..rotations import ButterflyCayleyRotation, pack_skew
from ..version import __version__
from .native import FORMAT, FORMAT_VERSION, AdapterFile, AdapterFileError


class ExportError(ValueError):
    """An adapter cannot be written in the requested format; the message says why."""


def packed_block_size(n_packed: int) -> int:
    """Block size ``b`` with ``b(b-1)/2 == n_packed``."""
    b = (1 + math.isqrt(1 + 8 * n_packed)) // 2
    if b * (b - 1) // 2 != n_packed:
        raise ValueError(f"{n_packed} is not the size of a packed skew-symmetric block")
    return b


class NativeBuilder:
    """Collects converted modules and builds an in-memory native :class:`AdapterFile`.

    Layers of one component may differ in their hyperparameters (a LyCORIS file picks a
    block size per layer): the most common configuration becomes the component's and the
    others go to the ``module_configs.<component>`` metadata.
    """

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, tuple[AdapterConfig, dict[str, torch.Tensor]]]] = {}

    def add(self, component: str, module: str, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
        """Add one module: ``generators`` ``(n_factors, blocks, b(b-1)/2)``, optional ``magnitude`` ``(d_out,)``."""
        self.entries.setdefault(component, {})[module] = (config, tensors)

    def build(self, source: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> AdapterFile:
        metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__}
        tensors: dict[str, torch.Tensor] = {}
        comps = [c for c in ("unet", "text_encoder", "text_encoder_2", "model") if c in self.entries]
        for comp in comps:
            modules = self.entries[comp]
            paths = sorted(modules)
            # One shared `targets` so that configurations compare on their hyperparameters.
            configs = {p: AdapterConfig.from_dict({**modules[p][0].to_dict(), "targets": "converted"}) for p in paths}
            common_json, _ = Counter(c.to_json() for c in configs.values()).most_common(1)[0]
            metadata[f"config.{comp}"] = common_json
            others = {p: c.to_dict() for p, c in configs.items() if c.to_json() != common_json}
            if others:
                metadata[f"module_configs.{comp}"] = json.dumps(others)
            metadata[f"modules.{comp}"] = json.dumps(paths)
            metadata[f"fingerprint.{comp}"] = ""  # unknown: checked by module names and shapes
            metadata[f"base_model.{comp}"] = ""
            for p in paths:
                for key, value in modules[p][1].items():
                    tensors[f"{comp}/{p}/{key}"] = value.detach().to("cpu", torch.float32).contiguous()
        metadata["components"] = json.dumps(comps)
        metadata.update(extra_metadata or {})
        return AdapterFile.from_memory(source, metadata, tensors)


def effective_skew(config: AdapterConfig, generators: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The skew generators ``t Q`` a block rotation uses, after constraint and Neumann guard.

    Args:
        config: the adapter's configuration (``oft``, ``oftv2`` or ``boft``).
        generators: stored ``(n_factors, stored_blocks, b(b-1)/2)``.
        scale: strength ``t``.

    Returns:
        ``(n_factors, stored_blocks, b, b)`` float64.
    """
    m, stored, n_el = generators.shape
    b = packed_block_size(n_el)
    # Any width with a valid layout gives the same per-block maths; the real width only
    # matters for where the blocks go, which callers handle.
    dim = stored * b * 2 ** (m - 1)
    rot = ButterflyCayleyRotation(
        dim, b, m, neumann_terms=config.neumann_terms if config.method == "oftv2" else None,
        constraint=config.constraint, block_share=True,
    ).double()
    rot.generators = nn.Parameter(generators.detach().to(torch.float64).clone(), requires_grad=False)
    with torch.no_grad():
        return rot.skew(scale, torch.float64)


def expand_blocks(q: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """``(m, stored, b, b)`` to ``(m, n_blocks, b, b)`` (a shared block repeated)."""
    return q.expand(q.shape[0], n_blocks, *q.shape[2:]) if q.shape[1] == 1 else q


def effective_magnitude(magnitude: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    """``1 + t (m - 1)``: the per-output magnitude at strength ``t`` (float64)."""
    return None if magnitude is None else 1 + scale * (magnitude.to(torch.float64) - 1)


def generators_from_skew(q: torch.Tensor) -> torch.Tensor:
    """``(..., b, b)`` skew to packed ``(..., b(b-1)/2)`` float32, after exact skew-symmetrization."""
    return pack_skew((q - q.transpose(-1, -2)) / 2).to(torch.float32)


# Linear layers of SD / SDXL UNets and CLIP text encoders, by name suffix.
_LINEAR_SUFFIXES = (
    "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "q_proj", "k_proj", "v_proj",
    "out_proj", "fc1", "fc2", "linear_1", "linear_2", "time_emb_proj", "add_k_proj", "add_v_proj",
)
# Layers that are a Linear or a 1x1 Conv2d depending on the model version.
_POINTWISE_SUFFIXES = ("proj_in", "proj_out", "conv_shortcut")


@dataclass
class LayerKind:
    """What an export needs to know about the base layer of one adapted module."""

    is_conv: bool | None  # None: a Linear or a 1x1 conv, unknown which
    kernel_size: tuple[int, int] = (1, 1)
    square_simple: bool = True  # square kernel, equal strides/paddings, dilation 1, zero padding
    in_dim: int | None = None
    out_dim: int | None = None


def _kind_of(layer: nn.Module) -> LayerKind:
    if isinstance(layer, OrthogonalAdapter):
        layer = layer.base_layer
    if isinstance(layer, nn.Linear):
        return LayerKind(False, in_dim=layer.in_features, out_dim=layer.out_features)
    if isinstance(layer, nn.Conv2d):
        simple = (
            layer.kernel_size[0] == layer.kernel_size[1]
            and not isinstance(layer.padding, str)
            and layer.padding[0] == layer.padding[1]
            and layer.stride[0] == layer.stride[1]
            and tuple(layer.dilation) == (1, 1)
            and layer.padding_mode == "zeros"
        )
        return LayerKind(
            True, tuple(layer.kernel_size), simple, layer.weight[0].numel(), layer.weight.shape[0]
        )
    raise ExportError(f"{type(layer).__name__} cannot carry an orthogonal adapter")


def layer_kinds(file: AdapterFile, base: Any = None) -> dict[tuple[str, str], LayerKind | None]:
    """``{(component, module): LayerKind or None}``; ``None`` when neither ``base`` nor the name tells.

    ``base``: the base model (module or pipeline) the adapter was trained on, or ``None``.
    """
    out: dict[tuple[str, str], LayerKind | None] = {}
    comps = components(base) if base is not None else {}
    if base is not None and len(comps) == 1 and len(file.components) == 1:
        comps = {file.components[0]: next(iter(comps.values()))}
    for comp in file.components:
        for path in file.modules[comp]:
            if comp in comps:
                try:
                    out[(comp, path)] = _kind_of(comps[comp].get_submodule(path))
                except AttributeError:
                    raise ExportError(f"the base model has no module {comp}.{path}: another base model?") from None
            elif path.endswith(_LINEAR_SUFFIXES):
                out[(comp, path)] = LayerKind(False)
            elif path.endswith(_POINTWISE_SUFFIXES):
                out[(comp, path)] = LayerKind(None)
            else:
                out[(comp, path)] = None
    return out


def read_error(path: Path, message: str) -> AdapterFileError:
    return AdapterFileError(f"{path}: {message}")
