"""kohya / LyCORIS files (read by ComfyUI, A1111 and LyCORIS): export and exact import.

Key layout: ``<prefix>_<module path with dots as underscores>.<tensor>`` with prefixes
``lora_unet``, ``lora_te`` (SD 1.x/2.x text encoder) or ``lora_te1`` / ``lora_te2`` (SDXL).

* ``diag-oft``: ``oft_blocks`` ``(n, b, b)`` free matrices ``A``; LyCORIS builds
  ``R = Cayley(A - A^T)`` and rotates each block of output rows by ``R^T``:
  ``W' = R^T W``.  That is our output-side OFT with ``Q = A^T - A``.
* ``boft``: ``oft_blocks`` ``(m, n, b, b)`` with ``n = 2^p`` blocks and always
  ``m = p + 1`` stages; stage ``i`` pairs half-blocks ``2^i`` apart, lists each block's
  coordinates interleaved (``a0, b0, a1, b1, ...``), rotates by ``R_i`` (not transposed),
  and stage 0 acts first.  That is our output-side BOFT in the ``descending`` factor order
  with factor ``k`` = stage ``m - 1 - k`` and each block conjugated by the interleaving.
* ``alpha``: a bound on the Frobenius norm of all of a module's ``A - A^T`` together
  (times the output width); exports write a value the generators never reach.
* ``rescale``: per-output magnitude, ``(d_out, 1)`` (Linear) or ``(d_out, 1, 1, 1)`` (Conv2d).
* ``diff``: a full weight difference ``W' - W`` (ComfyUI and LyCORIS read it): exact for
  any adapter, as large as the weight, and needs the base model to compute.

Export (``mode="auto"``) writes native keys for output-side OFT, OFTv2 (when its
Cayley-Neumann rotation equals an exact Cayley rotation within ``1e-6``) and BOFT with
one factor or in descending order over a power-of-two number of blocks; every other
layer (input side, GOFT, qGOFT, ascending BOFT) becomes an exact ``.diff``.  Strength
in these tools blends ``I + s (R - I)`` (not a rotation): bake the strength into the
export (``scale=``) instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import OrthogonalAdapter
from ..config import AdapterConfig
from ..inject import component_name, components, is_pipeline
from ..rotations import cayley, cayley_neumann, pack_skew
from ..rotations.butterfly import butterfly_error
from .convert import (
    ExportError,
    NativeBuilder,
    effective_magnitude,
    effective_skew,
    expand_blocks,
    layer_kinds,
    read_error,
)
from .native import AdapterFile, AdapterFileError, atomic_save_safetensors, read_safetensors

#: Native-key exports of OFTv2 need its rotation to equal an exact Cayley rotation this closely.
NEUMANN_TOLERANCE = 1e-6
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def prefixes(comps: list[str] | tuple[str, ...]) -> dict[str, str]:
    """kohya prefix of each component (``lora_te1``/``lora_te2`` when there are two encoders)."""
    two = "text_encoder_2" in comps
    table = {"unet": "lora_unet", "text_encoder": "lora_te1" if two else "lora_te", "text_encoder_2": "lora_te2"}
    return {c: table.get(c, "lora_unet") for c in comps}


def kohya_name(prefix: str, path: str) -> str:
    """``lora_unet_down_blocks_0_..._to_q``; text encoders use the ``text_model.`` layout.

    transformers 5 dropped the ``text_model`` level of ``CLIPTextModel``; kohya, ComfyUI
    and A1111 name CLIP layers ``lora_te_text_model_encoder_layers_...``, so it is put back.
    """
    if prefix.startswith("lora_te") and path and not path.startswith("text_model."):
        path = "text_model." + path
    return f"{prefix}_{path}".replace(".", "_")


def interleave_perm(b: int) -> torch.Tensor:
    """``perm[c]``: LyCORIS' position of our block coordinate ``c`` (``c = g h + t`` -> ``2t + g``)."""
    h = b // 2
    c = torch.arange(b)
    return 2 * (c % h) + c // h


# ----------------------------------------------------------------------------- export
def _native_tensors(config: AdapterConfig, tensors: dict[str, torch.Tensor], kind, scale: float):
    """LyCORIS tensors for one module, or ``(None, reason)`` when native keys cannot express it."""
    if config.method not in ("oft", "oftv2", "boft"):
        return None, f"{config.method} is not a block rotation, and LyCORIS has keys only for those"
    if config.side != "output":
        return None, "LyCORIS rotates the output side (R W); this adapter rotates the input side (W R)"
    q = effective_skew(config, tensors["generators"], scale)  # (m, stored, b, b) float64
    m, stored, b, _ = q.shape
    magnitude = effective_magnitude(tensors.get("magnitude"), scale)
    if config.block_share:
        out_dim = magnitude.numel() if magnitude is not None else (kind.out_dim if kind else None)
        if not out_dim:
            return None, "a shared block must be repeated over the layer, whose width is unknown without the base"
        q = expand_blocks(q, out_dim // b)
    n = q.shape[1]
    out: dict[str, torch.Tensor] = {}
    if m == 1:
        if config.method == "oftv2":
            # The Neumann series gives a near-rotation; LyCORIS computes exact Cayley. Invert the
            # Cayley map, Q' = (R - I)(R + I)^-1, and accept only if it gives R back.
            r = cayley_neumann(q, config.neumann_terms)
            eye = torch.eye(b, dtype=r.dtype)
            q2 = torch.linalg.solve((r + eye).transpose(-1, -2), (r - eye).transpose(-1, -2)).transpose(-1, -2)
            q2 = (q2 - q2.transpose(-1, -2)) / 2
            err = float((cayley(q2) - r).abs().max()) if q.numel() else 0.0
            if err > NEUMANN_TOLERANCE:
                return None, f"its Cayley-Neumann rotation is {err:.1e} away from any exact Cayley rotation"
            q = q2
        # W' = R^T W with R = Cayley(A - A^T): A - A^T = -Q, e.g. A = -Q/2.
        out["oft_blocks"] = (-q[0] / 2).float()
    else:
        if config.method != "boft" or config.butterfly_order != "descending":
            return None, "LyCORIS applies the block-diagonal BOFT factor first (descending order); this one is ascending"
        if n & (n - 1) or b % 2:
            return None, f"LyCORIS BOFT needs a power-of-two number of blocks and an even block size (has {n} x {b})"
        stages = n.bit_length()  # LyCORIS always stores 1 + log2(n) stages
        inv = torch.argsort(interleave_perm(b))
        a = torch.zeros(stages, n, b, b, dtype=torch.float64)
        for i in range(m):  # stage i is our factor m - 1 - i, blocks re-ordered by the interleaving
            a[i] = q[m - 1 - i][:, inv[:, None], inv[None, :]] / 2
        out["oft_blocks"] = a.float()
    full = out["oft_blocks"].double()
    norm = float(torch.linalg.vector_norm(full - full.transpose(-1, -2)))
    # alpha bounds that norm (LyCORIS multiplies it by the width); A1111 reads 0 as "no change".
    out["alpha"] = torch.tensor(norm * 1.01 + 1e-4)
    if magnitude is not None:
        if kind is None or kind.is_conv is None:
            return None, "LyCORIS shapes rescale by layer type, which is unknown without the base model"
        out["rescale"] = magnitude.float().view(-1, *([1, 1, 1] if kind.is_conv else [1]))
    return out, "oft" if m == 1 else "boft"


def _diff(config: AdapterConfig, tensors: dict[str, torch.Tensor], layer: nn.Module, scale: float, dtype) -> torch.Tensor:
    """``W' - W`` of one layer, computed in float64 by the adapter's own merge maths."""
    if isinstance(layer, OrthogonalAdapter):
        layer = layer.base_layer
    adapter = OrthogonalAdapter(layer, "export", config)
    with torch.no_grad():
        for key, param in adapter.rotations["export"].named_parameters():
            param.copy_(tensors[key])
        if "magnitude" in tensors:
            adapter.magnitudes["export"].copy_(tensors["magnitude"])
        adapter.set_scale(scale)
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
        new = adapter.transform_weight(w, adapter._active())
    return (new - w).reshape(layer.weight.shape).to(dtype)


def _base_model_version(file: AdapterFile, base: Any) -> str | None:
    unet = components(base).get("unet") if base is not None else None
    if unet is not None and hasattr(unet, "config"):
        if getattr(unet.config, "addition_embed_type", None) == "text_time":
            return "sdxl_base_v1-0"
        return {768: "sd_v1", 1024: "sd_v2"}.get(getattr(unet.config, "cross_attention_dim", None))
    return "sdxl_base_v1-0" if "text_encoder_2" in file.components else None


def export_lycoris(
    file: AdapterFile, out: str | os.PathLike, base: Any = None, scale: float = 1.0, mode: str = "auto",
    dtype: str = "float32",
) -> tuple[Path, list[str]]:
    """Write ``file`` as one kohya/LyCORIS ``.safetensors``; returns the path and notes.

    ``mode``: ``"auto"`` (native keys where exact, ``.diff`` elsewhere), ``"native"``
    (refuse layers native keys cannot express), ``"diff"`` (every layer as ``.diff``).
    ``base`` (module or pipeline) is needed for ``.diff`` layers.
    """
    if mode not in ("auto", "native", "diff"):
        raise ExportError(f"LyCORIS export mode must be auto, native or diff, got {mode!r}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    kinds = layer_kinds(file, base)
    comps = components(base) if base is not None else {}
    if base is not None and not is_pipeline(base) and len(file.components) == 1:
        comps = {file.components[0]: next(iter(comps.values()))}
    names = prefixes(file.components)
    tensors: dict[str, torch.Tensor] = {}
    algos: dict[str, int] = {}
    diffs: list[str] = []
    strict_loader: list[str] = []
    for comp in file.components:
        by_module = file.component_tensors(comp)
        for path in file.modules[comp]:
            config, t = file.config_for(comp, path), by_module[path]
            name = kohya_name(names[comp], path)
            native, why = (None, "requested") if mode == "diff" else _native_tensors(config, t, kinds[(comp, path)], scale)
            if native is not None:
                tensors.update({f"{name}.{k}": v.contiguous() for k, v in native.items()})
                algos[why] = algos.get(why, 0) + 1
                blocks = native["oft_blocks"]
                if why == "oft" and blocks.shape[-1] > blocks.shape[0]:
                    strict_loader.append(path)
                continue
            if mode == "native":
                raise ExportError(f"{comp}.{path}: cannot be written as LyCORIS oft_blocks: {why}")
            if comp not in comps:
                raise ExportError(
                    f"{comp}.{path}: {why}, so it needs an exact full-difference (.diff) export, which needs the "
                    "base model (base=path/to/pipeline)"
                )
            try:
                layer = comps[comp].get_submodule(path)
            except AttributeError:
                raise ExportError(f"the base model has no module {comp}.{path}: another base model?") from None
            tensors[f"{name}.diff"] = _diff(config, t, layer, scale, DTYPES[dtype]).contiguous()
            diffs.append(f"{comp}.{path}")
            algos["full"] = algos.get("full", 0) + 1
    main_algo = {"oft": "diag-oft", "boft": "boft", "full": "full"}[max(algos, key=algos.get)]
    rescaled = any(k.endswith(".rescale") for k in tensors)
    metadata = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps({"algo": main_algo, "rescaled": rescaled, "constraint": 0}),
        "ss_output_name": out.stem,
        "ss_training_comment": f"exported by ortho-diffusion at strength {scale}",
        "ortho_diffusion_source": json.dumps({c: file.configs[c].to_dict() for c in file.components}),
    }
    version = _base_model_version(file, base)
    if version:
        metadata["ss_base_model_version"] = version
    atomic_save_safetensors(tensors, out, metadata)
    notes = []
    if diffs:
        notes.append(f"{len(diffs)} layers written as exact full weight differences (.diff): {diffs[0]}, ...")
    if strict_loader:
        notes.append(
            f"{len(strict_loader)} diag-oft layers have more coordinates per block than blocks; lycoris-lora's own "
            "loader re-derives the block size and rejects them (ComfyUI and A1111 read the tensor shapes)"
        )
    return out, notes


# ----------------------------------------------------------------------------- import
def _module_names(x: Any, file_comps: set[str]) -> dict[str, tuple[str, str, nn.Module]]:
    """``{kohya name: (component, module path, layer)}`` for every adaptable layer of ``x``."""
    comps = components(x)
    if not is_pipeline(x):
        comps = {component_name(x): next(iter(comps.values()))}
    table: dict[str, tuple[str, str, nn.Module]] = {}
    for comp, module in comps.items():
        options = {"unet": ["lora_unet"], "text_encoder": ["lora_te", "lora_te1"], "text_encoder_2": ["lora_te2"]}
        options["model"] = ["lora_unet", "lora_te", "lora_te1", "lora_te2"]
        for prefix in options[comp]:
            for path, layer in module.named_modules():
                if path.endswith("base_layer") or not isinstance(layer, (nn.Linear, nn.Conv2d, OrthogonalAdapter)):
                    continue
                entry = ("unet" if comp == "model" else comp, path, layer)
                table[kohya_name(prefix, path)] = entry
                table.setdefault(f"{prefix}_{path}".replace(".", "_"), entry)  # without the text_model level
    return table


def _constrained(a: torch.Tensor, alpha: torch.Tensor | None, out_dim: int) -> torch.Tensor:
    """LyCORIS' ``A - A^T``, scaled down when its norm exceeds ``alpha * out_dim``."""
    q = a - a.transpose(-1, -2)
    bound = float(alpha) * out_dim if alpha is not None else 0.0
    if bound > 0:
        norm = float(torch.linalg.vector_norm(q)) + 1e-8
        if norm > bound:
            q = q * bound / norm
    return q


def read_lycoris(path: str | os.PathLike, x: Any) -> AdapterFile:
    """Convert a LyCORIS ``diag-oft`` / ``boft`` file to the native form, against the model ``x``."""
    path = Path(path)
    _, raw = read_safetensors(path)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        name, _, tensor = key.partition(".")
        grouped.setdefault(name, {})[tensor] = value.to(torch.float64)
    table = _module_names(x, set())
    wanted_prefixes = {kohya_name(p, "") for p in ("lora_unet", "lora_te", "lora_te1", "lora_te2")}
    builder = NativeBuilder()
    for name, t in sorted(grouped.items()):
        if name not in table:
            own = [p for p in wanted_prefixes if name.startswith(p)]
            if not is_pipeline(x) and own and not any(k.startswith(own[0]) for k in table):
                continue  # another component's layers, when loading into one module
            raise read_error(path, f"module {name} does not exist in this model (a file for another base model?)")
        if "oft_blocks" not in t:
            algo = ", ".join(sorted(t))
            raise read_error(path, f"module {name} holds {algo}: only diag-oft and boft convert to orthogonal adapters")
        if not all(torch.isfinite(v).all() for v in t.values()):
            raise read_error(path, f"module {name} holds NaN or inf")
        comp, mod_path, layer = table[name]
        weight = (layer.base_layer if isinstance(layer, OrthogonalAdapter) else layer).weight
        out_dim = weight.shape[0]
        a = t["oft_blocks"]
        q = _constrained(a, t.get("alpha"), out_dim)
        if a.dim() == 3:
            n, b, _ = a.shape
            m = 1
            gens = pack_skew(-q)[None]  # W' = R^T W: our Q = -(A - A^T)
        elif a.dim() == 4:
            m, n, b, _ = a.shape
            perm = interleave_perm(b)
            gens = torch.stack([pack_skew(q[m - 1 - k][:, perm[:, None], perm[None, :]]) for k in range(m)])
        else:
            raise read_error(path, f"module {name}: oft_blocks of shape {tuple(a.shape)}")
        if n * b != out_dim or (m > 1 and butterfly_error(out_dim, b, m)):
            raise read_error(path, f"module {name}: {n} blocks of {b} do not fit {mod_path} ({out_dim} outputs)")
        config = AdapterConfig(
            method="oft" if m == 1 else "boft", block_size=b, n_factors=m, side="output",
            rescale="rescale" in t, butterfly_order="descending" if m > 1 else "ascending",
        )
        tensors = {"generators": gens.float()}
        if "rescale" in t:
            tensors["magnitude"] = t["rescale"].reshape(-1).float()
        builder.add(comp, mod_path, config, tensors)
    if not builder.entries:
        raise read_error(path, "no layer of this model is adapted by the file")
    return builder.build(path, {"converted_from": "lycoris"})


__all__ = ["AdapterFileError", "export_lycoris", "read_lycoris"]
