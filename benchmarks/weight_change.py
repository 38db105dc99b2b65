#!/usr/bin/env python
"""How far trained adapters moved the UNet's adapted weights: ``||W' - W||_F / ||W||_F`` per layer.

    .venv/bin/python benchmarks/weight_change.py runs/x/adapter.safetensors runs/y/adapter.safetensors

Takes native adapter files (``od.load_adapter``; a control file's encoder is ignored) and the
LoRA baseline files of the training scripts (``--method lora``: peft tensors with
``lora_alpha = rank``, so ``W' - W = B A``).  Prints, per file, the median and range of the
relative change of each projection kind (``attn1.to_q``, ``attn2.to_k``, ...).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _kind(layer: str) -> str:
    """``down_blocks.0....attn2.to_out.0`` -> ``attn2.to_out``."""
    parts = layer.removesuffix(".0").split(".")
    return ".".join(parts[-2:])


def lora_changes(path: Path, base_weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative change of each UNet layer from a LoRA baseline file (``unet.<layer>.lora_A...``)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    out = {}
    for key, a in tensors.items():
        if key.startswith("unet.") and ".lora_A." in key:
            layer = key[len("unet."):].split(".lora_A.")[0]
            delta = tensors[key.replace(".lora_A.", ".lora_B.")] @ a  # (d_out, r) @ (r, d_in)
            out[layer] = float(delta.norm() / base_weights[layer].detach().norm())
    return out


@torch.no_grad()
def native_changes(path: Path, model: Path, base_weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative change of each adapted UNet layer of a native adapter file, from its merged weights."""
    import ortho_diffusion as od
    from ortho_diffusion.adapter import OrthogonalAdapter
    from ortho_diffusion.diffusion import load_pipeline

    pipe = od.merge(od.load_adapter(load_pipeline(model), path))
    out = {}
    for name, module in pipe.unet.named_modules():
        if isinstance(module, OrthogonalAdapter):
            base = base_weights[name].detach()
            out[name] = float((module.base_layer.weight - base).norm() / base.norm())
    return out


def summarise(changes: dict[str, float]) -> dict[str, tuple[float, float, float]]:
    """Per projection kind: (median, min, max) of the relative changes."""
    kinds: dict[str, list[float]] = {}
    for layer, value in changes.items():
        kinds.setdefault(_kind(layer), []).append(value)
    return {k: (statistics.median(v), min(v), max(v)) for k, v in sorted(kinds.items())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="+", type=Path)
    p.add_argument("--model", type=Path, default=ROOT / "assets" / "shapes-sd", help="the base pipeline folder")
    args = p.parse_args(argv)
    from safetensors import safe_open

    from ortho_diffusion.diffusion import load_pipeline

    base = {n: m.weight for n, m in load_pipeline(args.model).unet.named_modules() if isinstance(m, torch.nn.Linear)}
    for path in args.adapters:
        with safe_open(str(path), "pt") as f:
            lora = any(".lora_A." in k for k in f.keys())
        changes = lora_changes(path, base) if lora else native_changes(path, args.model, base)
        if not changes:
            print(f"{path}: no adapted UNet layer")
            continue
        values = sorted(changes.values())
        print(f"{path}: {len(values)} layers, relative change {values[0]:.3f}-{values[-1]:.3f} "
              f"(median {statistics.median(values):.3f})")
        for kind, (med, lo, hi) in summarise(changes).items():
            print(f"  {kind:<14} median {med:.3f}  range {lo:.3f}-{hi:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
