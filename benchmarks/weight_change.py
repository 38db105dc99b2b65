#!/usr/bin/env python
"""How far trained adapters moved the UNet's adapted weights: ``||W' - W||_F / ||W||_F`` per layer.

    .venv/bin/python benchmarks/weight_change.py runs/x/adapter.safetensors runs/y/adapter.safetensors

Takes native adapter files (``od.load_adapter``; a control file's encoder is ignored) and the
LoRA baseline files of the training scripts (``--method lora``: peft tensors with
``lora_alpha = rank``, so ``W' - W = B A``).  Prints, per file, the median and range of the
relative change of each projection kind (``attn1.to_q``, ``attn2.to_k``, ...).

With ``--probe_prompt "a sks circle" --probe_token sks`` it also measures how selectively the
cross-attention's keys and values changed: the relative change ``|(W' - W) c| / |W c|`` of the
``to_k`` / ``to_v`` output for the probe token's text-encoder state ``c`` against its median
over the tokens of ``--other_prompt`` (repeatable; start to end of text, no padding), and
their ratio, each a median over the layers.
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


def lora_deltas(path: Path) -> dict[str, torch.Tensor]:
    """``W' - W = B A`` ``(d_out, d_in)`` of each UNet layer of a LoRA baseline file (``unet.<layer>.lora_A...``)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return {
        key[len("unet."):].split(".lora_A.")[0]: tensors[key.replace(".lora_A.", ".lora_B.")] @ a  # (d_out, r) @ (r, d_in)
        for key, a in tensors.items()
        if key.startswith("unet.") and ".lora_A." in key
    }


@torch.no_grad()
def native_deltas(path: Path, model: Path, base_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``W' - W`` ``(d_out, d_in)`` of each adapted UNet layer of a native adapter file, from its merged weights."""
    import ortho_diffusion as od
    from ortho_diffusion.adapter import OrthogonalAdapter
    from ortho_diffusion.diffusion import load_pipeline

    pipe = od.merge(od.load_adapter(load_pipeline(model), path))
    return {
        name: module.base_layer.weight - base_weights[name].detach()
        for name, module in pipe.unet.named_modules()
        if isinstance(module, OrthogonalAdapter)
    }


def relative_changes(deltas: dict[str, torch.Tensor], base_weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """``||W' - W||_F / ||W||_F`` per layer."""
    return {name: float(d.norm() / base_weights[name].detach().norm()) for name, d in deltas.items()}


@torch.no_grad()
def text_states(pipe, prompt: str) -> tuple[torch.Tensor, list[str]]:
    """The text encoder's states of ``prompt`` from its start token to its end token:
    ``(tokens, dim)``, and the tokens."""
    ids = pipe.tokenizer(prompt, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
    states = pipe.text_encoder(torch.tensor([ids]))[0][0]
    return states, pipe.tokenizer.convert_ids_to_tokens(ids)


@torch.no_grad()
def token_selectivity(
    deltas: dict[str, torch.Tensor], base_weights: dict[str, torch.Tensor], probe: torch.Tensor, others: torch.Tensor
) -> dict[str, tuple[float, float, float]]:
    """How much more the probe token's key / value moved than other tokens'.

    For each cross-attention ``to_k`` / ``to_v`` layer, the relative output change
    ``|dW c| / |W c|`` of the probe state ``c`` ``(dim,)`` and the median of it over the rows of
    ``others`` ``(n, dim)``.  Returns, per kind (``attn2.to_k``, ``attn2.to_v``), the medians over
    layers of: the probe's change, the other tokens' median change, and their ratio (1: no
    more selective than moving every token alike).
    """
    kinds: dict[str, list[tuple[float, float]]] = {}
    for name, delta in deltas.items():
        kind = _kind(name)
        if kind not in ("attn2.to_k", "attn2.to_v"):
            continue
        w = base_weights[name].detach()
        on_probe = float((probe @ delta.t()).norm() / (probe @ w.t()).norm())
        on_others = float(((others @ delta.t()).norm(dim=-1) / (others @ w.t()).norm(dim=-1)).median())
        kinds.setdefault(kind, []).append((on_probe, on_others))
    return {
        k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v), statistics.median(a / b for a, b in v))
        for k, v in sorted(kinds.items())
    }


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
    p.add_argument("--probe_prompt", help="a prompt holding the subject's token")
    p.add_argument("--probe_token", help="the token of --probe_prompt whose key and value are probed")
    p.add_argument("--other_prompt", action="append", default=[], help="prompts whose tokens are compared (repeatable)")
    args = p.parse_args(argv)
    if bool(args.probe_prompt) != bool(args.probe_token) or (args.probe_prompt and not args.other_prompt):
        p.error("--probe_prompt, --probe_token and at least one --other_prompt go together")
    from safetensors import safe_open

    from ortho_diffusion.diffusion import load_pipeline

    pipe = load_pipeline(args.model)
    base = {n: m.weight for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)}
    probe = others = None
    if args.probe_prompt:
        states, tokens = text_states(pipe, args.probe_prompt)
        matches = [i for i, t in enumerate(tokens) if t.removesuffix("</w>") == args.probe_token]
        if not matches:
            p.error(f"--probe_token {args.probe_token!r} is not one of the tokens of --probe_prompt: {tokens}")
        probe = states[matches[0]]
        context_dim = pipe.unet.config.cross_attention_dim
        if probe.shape[-1] != context_dim:  # SDXL reads two text encoders' states side by side
            p.error(f"the text encoder's states ({probe.shape[-1]}) are not what the cross-attention reads "
                    f"({context_dim}): the probe works on single-encoder (SD 1.x / 2.x) pipelines")
        others = torch.cat([text_states(pipe, prompt)[0] for prompt in args.other_prompt])
    for path in args.adapters:
        with safe_open(str(path), "pt") as f:
            lora = any(".lora_A." in k for k in f.keys())
        deltas = lora_deltas(path) if lora else native_deltas(path, args.model, base)
        if not deltas:
            print(f"{path}: no adapted UNet layer")
            continue
        changes = relative_changes(deltas, base)
        values = sorted(changes.values())
        print(f"{path}: {len(values)} layers, relative change {values[0]:.3f}-{values[-1]:.3f} "
              f"(median {statistics.median(values):.3f})")
        for kind, (med, lo, hi) in summarise(changes).items():
            print(f"  {kind:<14} median {med:.3f}  range {lo:.3f}-{hi:.3f}")
        if probe is not None:
            for kind, (on_probe, on_others, ratio) in token_selectivity(deltas, base, probe, others).items():
                print(f"  {kind:<14} output change: {args.probe_token} {on_probe:.3f}, other tokens {on_others:.3f}, "
                      f"ratio {ratio:.2f} (medians over layers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
