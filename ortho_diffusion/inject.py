"""Attach, detach, merge and scale adapters on any torch module or diffusers pipeline.

Targets are module-name patterns: a plain pattern matches a dotted module name equal to it
or ending with ``"." + pattern`` (``"to_q"`` matches ``...attn1.to_q``); ``"re:<regex>"``
matches the whole name against a regular expression.  Presets cover the usual layers of
SD 1.x / 2.x / SDXL UNets and CLIP text encoders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .adapter import OrthogonalAdapter
from .config import AdapterConfig

PRESETS: dict[str, list[str]] = {
    "unet-attn": ["to_q", "to_k", "to_v", "to_out.0"],
    # Cross-attention only: the layers that read the prompt (Custom Diffusion trains to_k/to_v).
    "unet-cross-attn": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
    "unet-cross-kv": ["attn2.to_k", "attn2.to_v"],
    "unet-attn-ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
    "text-attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"],
    "text-attn-mlp": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
    ],
}

#: Pipeline components that adapters can live on, in file order.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

DEFAULT_ADAPTER = "default"


def resolve_targets(targets: str | Iterable[str]) -> list[str]:
    """A preset name or a list of patterns to a list of patterns."""
    if isinstance(targets, str):
        if targets in PRESETS:
            return list(PRESETS[targets])
        return [targets]
    return list(targets)


def matches(name: str, patterns: list[str]) -> bool:
    """Whether the dotted module ``name`` matches one of ``patterns``."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def is_pipeline(x: Any) -> bool:
    """True for diffusers pipelines (anything with ``components`` holding a UNet)."""
    return not isinstance(x, nn.Module) and hasattr(x, "components") and hasattr(x, "unet")


def components(x: Any) -> dict[str, nn.Module]:
    """The modules of ``x`` that may carry adapters, keyed by component name.

    A pipeline gives its ``unet`` and text encoder(s); a bare module gives one entry named
    after its kind (``unet``, ``text_encoder``, ``text_encoder_2``), else ``model``.
    """
    if is_pipeline(x):
        found = {}
        for name in COMPONENTS:
            module = getattr(x, name, None)
            if isinstance(module, nn.Module):
                found[name] = module
        return found
    if not isinstance(x, nn.Module):
        raise TypeError(f"expected a torch module or a diffusers pipeline, got {type(x).__name__}")
    return {component_name(x): x}


def component_name(module: nn.Module) -> str:
    """Conventional pipeline name of a bare module, from its class."""
    cls = type(module).__name__
    if "UNet" in cls:
        return "unet"
    if cls == "CLIPTextModelWithProjection":
        return "text_encoder_2"
    if cls.startswith("CLIPTextModel"):
        return "text_encoder"
    return "model"


class AdapterExtension(nn.Module):
    """Base of wrappers that add adapter parts other than rotations (e.g. a control encoder).

    A subclass wraps one layer (``self.base_layer``) and keeps one trainable module per
    adapter name in ``self.adapter_modules`` (parameters under that name are left out of the
    architecture fingerprint).  :func:`set_scale`, :func:`detach`, :func:`adapter_parameters`
    and :func:`summary` treat these parts like rotations of the same adapter name, and
    ``file_part`` names the section of the native adapter file that stores them.
    """

    file_part: str = ""
    kind: str = "extension"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter_modules = nn.ModuleDict()
        self.scales: dict[str, float] = {}

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_modules.keys())

    def set_scale(self, scale: float, name: str | None = None) -> None:
        """Strength of one part (or all): 0 leaves the base layer's output untouched."""
        for n in self.adapter_names:
            if name is None or n == name:
                self.scales[n] = float(scale)

    def remove_adapter(self, name: str) -> None:
        del self.adapter_modules[name]
        self.scales.pop(name, None)


def iter_extensions(x: Any) -> Iterator[tuple[str, str, AdapterExtension]]:
    """Yield ``(component, module_path, extension)`` for every :class:`AdapterExtension` in ``x``."""
    for comp, module in components(x).items():
        for path, sub in module.named_modules():
            if isinstance(sub, AdapterExtension):
                yield comp, path, sub


def iter_adapters(x: Any) -> Iterator[tuple[str, str, OrthogonalAdapter]]:
    """Yield ``(component, module_path, adapter)`` for every adapter layer in ``x``."""
    for comp, module in components(x).items():
        for path, sub in module.named_modules():
            if isinstance(sub, OrthogonalAdapter):
                yield comp, path, sub


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


def find_targets(module: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the ``nn.Linear`` / ``nn.Conv2d`` (or existing adapter) layers ``config`` targets."""
    patterns = resolve_targets(config.targets)
    found = []
    for name, sub in module.named_modules():
        if ".base_layer" in name or name.endswith("base_layer"):
            continue
        if isinstance(sub, (nn.Linear, nn.Conv2d, OrthogonalAdapter)) and matches(name, patterns):
            found.append(name)
    return found


def attach_to_module(
    module: nn.Module, config: AdapterConfig, adapter_name: str = DEFAULT_ADAPTER, freeze: bool = True
) -> list[str]:
    """Wrap every targeted layer of ``module``; returns the adapted module paths.

    All adapters are built first, so a bad configuration (a width the method cannot split,
    for example) raises before the module is changed.
    """
    paths = find_targets(module, config)
    if not paths:
        raise ValueError(
            f"no layer of {type(module).__name__} matches targets {config.targets!r} "
            f"(patterns {resolve_targets(config.targets)}); presets: {', '.join(PRESETS)}"
        )
    built: list[tuple[str, nn.Module, bool]] = []
    for path in paths:
        layer = module.get_submodule(path)
        try:
            if isinstance(layer, OrthogonalAdapter):
                if adapter_name in layer.rotations:
                    raise ValueError(f"adapter {adapter_name!r} is already attached")
                built.append((path, layer, True))
            else:
                built.append((path, OrthogonalAdapter(layer, adapter_name, config), False))
        except (ValueError, TypeError) as err:
            raise ValueError(f"cannot attach {config.method} to {path}: {err}") from None
    # Second pass: existing adapters get their new rotation only now that everything fits.
    for path, layer, existing in built:
        if existing:
            layer.add_adapter(adapter_name, config)
        else:
            _set_submodule(module, path, layer)
    if freeze:
        for p in module.parameters():
            p.requires_grad_(False)
        for _, layer, _ in built:
            for p in layer.rotations[adapter_name].parameters():
                p.requires_grad_(True)
            if adapter_name in layer.magnitudes:
                layer.magnitudes[adapter_name].requires_grad_(True)
    return paths


def attach(
    x: Any,
    config: AdapterConfig,
    text_encoder_config: AdapterConfig | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> Any:
    """Attach orthogonal adapters; afterwards only adapter parameters are trainable.

    Args:
        x: a module (UNet, text encoder, any ``nn.Module``) or a diffusers pipeline.  On a
            pipeline, ``config`` goes on the UNet and ``text_encoder_config`` (if given) on
            every text encoder.
        config: the adapter configuration.
        text_encoder_config: configuration for the pipeline's text encoder(s).
        adapter_name: name of this adapter (several can be attached and compose).

    Returns:
        ``x`` itself.
    """
    if is_pipeline(x):
        comps = components(x)
        plan = [(comps["unet"], config)]
        if text_encoder_config is not None:
            plan += [(comps[n], text_encoder_config) for n in ("text_encoder", "text_encoder_2") if n in comps]
        for module, cfg in plan:
            attach_to_module(module, cfg, adapter_name)
    else:
        attach_to_module(x, config, adapter_name)
    return x


def detach(x: Any, adapter_name: str | None = None) -> Any:
    """Remove adapters (all, or one by name), restoring the original layers and weights."""
    for comp, module in components(x).items():
        for path, layer in [(p, a) for _, p, a in iter_adapters(module)]:
            if adapter_name is None or layer.adapter_names == [adapter_name]:
                layer.unmerge()
                _set_submodule(module, path, layer.base_layer)
            elif adapter_name in layer.rotations:
                layer.remove_adapter(adapter_name)
        for path, ext in [(p, e) for _, p, e in iter_extensions(module)]:
            if adapter_name is None or ext.adapter_names == [adapter_name]:
                _set_submodule(module, path, ext.base_layer)
            elif adapter_name in ext.adapter_names:
                ext.remove_adapter(adapter_name)
    return x


def set_scale(x: Any, scale: float, adapter_name: str | None = None, n_active_factors: int | None = None) -> Any:
    """Set the strength ``t`` of the adapters (0 = base model, 1 = trained, > 1 extrapolates).

    ``n_active_factors`` keeps only the first ``k`` butterfly factors of BOFT adapters (the
    BOFT paper's factor-by-factor interpolation).  Merged layers are re-merged at the new
    strength.  No reload is needed.
    """
    for _, _, layer in iter_adapters(x):
        layer.set_scale(scale, adapter_name, n_active_factors)
    for _, _, ext in iter_extensions(x):
        ext.set_scale(scale, adapter_name)
    return x


def merge(x: Any) -> Any:
    """Fold every adapter into its base weight (zero-overhead inference)."""
    for _, _, layer in iter_adapters(x):
        layer.merge()
    return x


def unmerge(x: Any) -> Any:
    """Undo :func:`merge`, restoring the base weights."""
    for _, _, layer in iter_adapters(x):
        layer.unmerge()
    return x


def adapter_parameters(x: Any, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The trainable parameters of the adapters (for the optimizer)."""
    params = []
    for _, _, layer in iter_adapters(x):
        for name in layer.adapter_names:
            if adapter_name is None or name == adapter_name:
                params += list(layer.rotations[name].parameters())
                if name in layer.magnitudes:
                    params.append(layer.magnitudes[name])
    for _, _, ext in iter_extensions(x):
        for name in ext.adapter_names:
            if adapter_name is None or name == adapter_name:
                params += list(ext.adapter_modules[name].parameters())
    return params


def orthogonality_penalty(x: Any) -> torch.Tensor:
    """Sum of the qGOFT soft-orthogonality penalties, each weighted by its ``qgoft_lambda``.

    Add it to the training loss; it is zero for the exactly orthogonal methods.
    """
    total = torch.zeros(())
    for _, _, layer in iter_adapters(x):
        total = total + layer.penalty()
    return total


@dataclass
class SummaryRow:
    """One adapted layer in :func:`summary`."""

    component: str
    module: str
    adapter: str
    method: str
    side: str
    weight_shape: tuple[int, ...]
    parameters: int


@dataclass
class Summary:
    """Per-layer rows and the total trainable parameter count of attached adapters."""

    rows: list[SummaryRow]

    @property
    def total(self) -> int:
        return sum(r.parameters for r in self.rows)

    def __str__(self) -> str:
        lines = [f"{'module':<70} {'method':<6} {'side':<6} {'weight':<18} {'params':>9}"]
        for r in self.rows:
            name = f"{r.component}.{r.module}" + ("" if r.adapter == DEFAULT_ADAPTER else f" [{r.adapter}]")
            shape = "x".join(map(str, r.weight_shape))
            lines.append(f"{name:<70} {r.method:<6} {r.side:<6} {shape:<18} {r.parameters:>9,}")
        lines.append(f"{len(self.rows)} adapted layers, {self.total:,} trainable parameters")
        return "\n".join(lines)


def summary(x: Any) -> Summary:
    """Name, weight shape, method, side and parameter count of every adapter."""
    rows = []
    for comp, path, layer in iter_adapters(x):
        for name in layer.adapter_names:
            cfg = layer.configs[name]
            n = layer.rotations[name].n_parameters()
            if name in layer.magnitudes:
                n += layer.magnitudes[name].numel()
            shape = tuple(layer.base_layer.weight.shape)
            rows.append(SummaryRow(comp, path, name, cfg.method, cfg.side, shape, n))
    for comp, path, ext in iter_extensions(x):
        for name in ext.adapter_names:
            n = sum(p.numel() for p in ext.adapter_modules[name].parameters())
            shape = tuple(getattr(ext.base_layer, "weight", torch.empty(0)).shape)
            rows.append(SummaryRow(comp, path, name, ext.kind, "-", shape, n))
    return Summary(rows)
