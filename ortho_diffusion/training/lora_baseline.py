"""peft's LoRA as the training scripts' baseline (``--method lora``): attach it to the same
layers the orthogonal adapters would take, and save / restore its tensors for checkpoints."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from .. import inject
from ..formats.native import AdapterFileError, atomic_save_safetensors, read_safetensors
from .common import parse_targets


def lora_targets(value: str) -> str | list[str]:
    """peft ``target_modules`` for a ``--unet_targets`` / ``--text_encoder_targets`` value.

    The same presets and patterns as the orthogonal adapters, so a baseline compared with
    them adapts the same layers. peft matches names by suffix, as :func:`~ortho_diffusion.inject.matches` does;
    ``re:`` patterns become one full-match regular expression.
    """
    patterns = inject.resolve_targets(parse_targets(value))
    if not any(p.startswith("re:") for p in patterns):
        return patterns
    return "|".join(f"(?:{p[3:]})" if p.startswith("re:") else f"(?:.*\\.)?{re.escape(p)}" for p in patterns)


def attach_lora(pipe: Any, args: argparse.Namespace) -> list[torch.nn.Parameter]:
    """The peft LoRA baseline (``--method lora``) on the UNet (and text encoder); its parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    rank = args.lora_rank
    # Frozen first, both: the saved file holds every tensor that requires a gradient, and a
    # text encoder left trainable (though not trained) would add all its weights to it.
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=lora_targets(args.unet_targets)))
    modules = [pipe.unet]
    if args.train_text_encoder:
        # peft's own injector: transformers' add_adapter asks for a newer peft than the pinned one.
        inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=lora_targets(args.text_encoder_targets)),
            pipe.text_encoder,
        )
        modules.append(pipe.text_encoder)
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def _lora_tensors(pipe: Any) -> dict[str, torch.Tensor]:
    out = {}
    for comp in ("unet", "text_encoder"):
        for name, p in getattr(pipe, comp).named_parameters():
            if p.requires_grad:
                out[f"{comp}.{name}"] = p
    return out


def save_lora(pipe: Any, path: Path) -> None:
    """The LoRA baseline's trainable tensors in one safetensors file (written atomically)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in _lora_tensors(pipe).items()}
    atomic_save_safetensors(tensors, path, {"format": "ortho-diffusion.lora-baseline"})


@torch.no_grad()
def restore_lora(pipe: Any, path: Path) -> None:
    """Inverse of :func:`save_lora` into the already attached LoRA layers; an unreadable or
    mismatched file raises :class:`AdapterFileError`."""
    _, values = read_safetensors(path)
    params = _lora_tensors(pipe)
    if set(values) != set(params):
        raise AdapterFileError(f"{path}: LoRA tensors do not match this run")
    for k, p in params.items():
        p.copy_(values[k])
