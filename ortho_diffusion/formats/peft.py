"""peft OFT / BOFT adapter folders: export and exact import.

A peft folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.oft_R.weight`` (OFT: ``(r, b(b-1)/2)`` packed upper triangles)
or ``base_model.model.<module>.boft_R`` ``(m, r, b, b)`` and ``.boft_s`` (BOFT).  For a
pipeline, :func:`export_peft` writes one such folder per component (``out/unet``,
``out/text_encoder``, ...), each loadable with ``PeftModel.from_pretrained(unet, out/"unet")``.

The maths (tested against peft itself):

* peft OFT, exact Cayley: ``oft_R.weight`` is our ``generators[0]``; Cayley-Neumann with
  ``n`` terms is our OFTv2 with ``neumann_terms = n - 2`` and negated generators (peft
  builds the transposed rotation); ``n = 3`` sums the same series as ``n = 4``.
* peft BOFT: ``boft_R`` holds free matrices ``A``, the rotation uses ``Q = (A - A^T)/2``;
  ``boft_s`` is our per-output magnitude.  peft's permutations match our butterfly for
  one and two factors only.
* COFT: peft's ``eps`` bounds each block generator's norm by ``eps / sqrt(r)``: our
  ``constraint``.

Limits (refused with the reason): GOFT/qGOFT (peft has no Givens tuner), output-side
adapters (peft rotates the input side), BOFT with 3+ factors, OFTv2 with a rescale,
convolutions whose kernel is larger than 1x1 for OFT (peft's OFT forward folds
overlapping patches back, which is not the rotated convolution), layers whose block
sizes differ within one component (a peft config holds one block size).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import AdapterConfig
from ..files import atomic_folder
from ..rotations import pack_skew, unpack_skew
from .convert import (
    ExportError,
    NativeBuilder,
    effective_magnitude,
    effective_skew,
    expand_blocks,
    layer_kinds,
    packed_block_size,
    read_error,
)
from .native import AdapterFile, read_safetensors

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


# ----------------------------------------------------------------------------- export
def _peft_layer(comp: str, path: str, config: AdapterConfig, tensors: dict[str, torch.Tensor], kind, scale: float):
    """peft tensors of one module and the peft type/block layout they need."""
    where = f"{comp}.{path}"
    if config.method in ("goft", "qgoft"):
        raise ExportError(f"{where}: peft has no Givens-rotation tuner, so {config.method} cannot be exported to peft")
    if config.method == "lroft":
        raise ExportError(f"{where}: peft has no low-rank Cayley tuner, so lroft cannot be exported to peft; export it to 'lycoris' (full differences) or 'merged'")
    if config.side != "input":
        raise ExportError(
            f"{where}: peft rotates the input side of each neuron (W R); this adapter rotates the output side (R W). "
            "Export it to 'lycoris' or 'merged' instead"
        )
    gens = tensors["generators"]
    m = gens.shape[0]
    if config.method == "boft" and m > 2:
        raise ExportError(
            f"{where}: peft's BOFT permutations match a butterfly for one or two factors only; this adapter has {m}"
        )
    if config.method == "boft" and m > 1 and config.butterfly_order != "ascending":
        raise ExportError(f"{where}: peft's BOFT applies its factors in ascending order; this adapter is descending")
    if kind is None:
        raise ExportError(f"{where}: cannot tell whether this is a Linear or a Conv2d; pass the base model (base=...)")
    q = effective_skew(config, gens, scale)  # (m, stored, b, b), constraint and guard applied
    b = q.shape[-1]
    magnitude = effective_magnitude(tensors.get("magnitude"), scale)
    # peft's OFT forward on a kxk conv (k > 1) folds overlapping patches back, which is not
    # the rotated convolution; its BOFT conv rotates the flattened filters, so an exact-Cayley
    # OFT goes through BOFT with one factor there.
    wide_conv = bool(kind.is_conv) and kind.kernel_size != (1, 1)
    if wide_conv and config.method == "oftv2":
        raise ExportError(
            f"{where}: peft's OFT forward on a {kind.kernel_size[0]}x{kind.kernel_size[1]} convolution does not "
            "compute the rotated convolution, and peft's BOFT has no Cayley-Neumann series"
        )
    if kind.is_conv and config.method == "boft" or wide_conv:
        if not kind.square_simple:
            raise ExportError(f"{where}: peft's BOFT convolution assumes a square kernel, equal strides and no dilation")
    if config.block_share:
        if not kind.in_dim:
            raise ExportError(f"{where}: a shared block must be repeated over the layer; pass the base model (base=...)")
        n_blocks = kind.in_dim // b
    else:
        n_blocks = q.shape[1]
    q = expand_blocks(q, n_blocks)
    if config.method == "oftv2":
        if magnitude is not None:
            raise ExportError(f"{where}: peft's OFT has no rescale, and its BOFT has no Cayley-Neumann series")
        if config.neumann_terms < 2:
            raise ExportError(f"{where}: peft cannot sum a Cayley-Neumann series of {config.neumann_terms} powers")
        # peft's Neumann path builds the transposed rotation: ours with -Q.
        return "OFT", b, m, {"oft_R.weight": pack_skew(-q[0]).float()}, config.neumann_terms + 2
    if magnitude is None and config.method == "oft" and not wide_conv:
        return "OFT", b, m, {"oft_R.weight": pack_skew(q[0]).float()}, None
    # BOFT (or OFT with a rescale, which is BOFT with one factor): Q = (A - A^T)/2 with A = Q.
    if kind.is_conv is None:
        raise ExportError(f"{where}: peft stores BOFT scales of Linear and Conv2d differently; pass the base model")
    out_dim = magnitude.numel() if magnitude is not None else (kind.out_dim or None)
    if magnitude is None:
        if out_dim is None:
            raise ExportError(f"{where}: the output width is unknown; pass the base model (base=...)")
        magnitude = torch.ones(out_dim, dtype=torch.float64)
    s = magnitude.float()
    s = s[None, :] if kind.is_conv else s[:, None]
    return "BOFT", b, m, {"boft_R": q.float(), "boft_s": s}, None


def export_peft(file: AdapterFile, out: str | os.PathLike, base: Any = None, scale: float = 1.0) -> list[Path]:
    """Write ``file`` as peft adapter folder(s) under ``out``; returns the folders written.

    A single-component adapter is written to ``out`` itself; a pipeline adapter to
    ``out/<component>`` (``unet``, ``text_encoder``, ``text_encoder_2``).  The strength
    ``scale`` is baked in (peft OFT has no strength).  ``base`` (module or pipeline)
    lets the export check convolution targets; without it, module names decide.
    """
    out = Path(out)
    kinds = layer_kinds(file, base)
    plans = []
    for comp in file.components:
        tensors_by_module = file.component_tensors(comp)
        entries = []
        for path in file.modules[comp]:
            cfg = file.config_for(comp, path)
            entries.append((path, *_peft_layer(comp, path, cfg, tensors_by_module[path], kinds[(comp, path)], scale)))
        types = {e[1] for e in entries}
        layouts = {(e[2], e[3], e[5]) for e in entries}
        if len(types) > 1 or len(layouts) > 1:
            raise ExportError(
                f"{comp}: one peft config holds one tuner type, block size and factor count; this adapter mixes "
                f"{sorted(types)} with layouts (block size, factors, Neumann terms) {sorted(layouts, key=str)}"
            )
        peft_type, (b, m, terms) = types.pop(), layouts.pop()
        common = {
            "peft_type": peft_type,
            "task_type": None,
            "base_model_name_or_path": file.metadata.get(f"base_model.{comp}") or None,
            "target_modules": [e[0] for e in entries],
            "exclude_modules": None,
            "fan_in_fan_out": False,
            "bias": "none",
            "init_weights": True,
            "inference_mode": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "modules_to_save": None,
            "revision": None,
        }
        if peft_type == "OFT":
            config = {
                **common, "r": 0, "oft_block_size": b, "module_dropout": 0.0, "coft": False, "eps": 6e-5,
                "block_share": False, "use_cayley_neumann": terms is not None,
                "num_cayley_neumann_terms": terms if terms is not None else 5,
            }
        else:
            config = {**common, "boft_block_size": b, "boft_block_num": 0, "boft_n_butterfly_factor": m, "boft_dropout": 0.0}
        weights = {f"{PREFIX}{path}.{k}": v.contiguous() for path, *_, t, _ in entries for k, v in t.items()}
        plans.append((comp, config, weights))
    written = []
    single = len(plans) == 1
    with atomic_folder(out) as tmp:
        for comp, config, weights in plans:
            folder = tmp if single else tmp / comp
            folder.mkdir(parents=True, exist_ok=True)
            (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
            save_file(weights, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
            written.append(out if single else out / comp)
    return written


# ----------------------------------------------------------------------------- import
def is_peft_folder(path: str | os.PathLike) -> bool:
    """A folder with ``adapter_config.json``, or with component subfolders that have one."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() or any((path / c / CONFIG_NAME).is_file() for c in COMPONENTS)


def _read_one(folder: Path, comp: str, builder: NativeBuilder) -> None:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as err:
        raise read_error(folder, f"unreadable {CONFIG_NAME} ({err})") from None
    peft_type = config.get("peft_type")
    if peft_type not in ("OFT", "BOFT"):
        raise read_error(folder, f"a peft {peft_type} adapter; only OFT and BOFT convert to orthogonal adapters")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise read_error(folder, "adapter_model.bin is a pickle, which is never loaded; save it as safetensors")
        raise read_error(folder, f"no {WEIGHTS_NAME}")
    if config.get("modules_to_save") or config.get("bias", "none") != "none":
        raise read_error(folder, "the adapter also trains biases or whole modules, which a rotation cannot hold")
    _, tensors = read_safetensors(weights)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix in (".oft_R.weight", ".boft_R", ".boft_s"):
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[suffix[1:]] = value.to(torch.float64)
                break
        else:
            raise read_error(weights, f"unexpected tensor {key}")
    for path, t in sorted(modules.items()):
        if not all(torch.isfinite(v).all() for v in t.values()):
            raise read_error(weights, f"module {path} holds NaN or inf")
        if peft_type == "OFT":
            builder.add(comp, path, *_from_peft_oft(weights, path, config, t))
        else:
            builder.add(comp, path, *_from_peft_boft(weights, path, t))


def _from_peft_oft(source: Path, path: str, config: dict, t: dict[str, torch.Tensor]):
    if "oft_R.weight" not in t:
        raise read_error(source, f"module {path}: no oft_R.weight")
    packed = t["oft_R.weight"]  # (r or 1, b(b-1)/2)
    b = packed_block_size(packed.shape[-1])
    stored = packed.shape[0]
    constraint = None
    if config.get("coft"):
        # peft projects each block generator to Frobenius norm eps / sqrt(stored blocks).
        constraint = float(config.get("eps", 6e-5)) / math.sqrt(stored)
    kw = dict(block_size=b, side="input", constraint=constraint, block_share=bool(config.get("block_share")))
    if not config.get("use_cayley_neumann", True):
        return AdapterConfig(method="oft", **kw), {"generators": packed[None].float()}
    n = int(config.get("num_cayley_neumann_terms", 5))
    if n < 3:
        raise read_error(source, f"module {path}: a Cayley-Neumann series of {n} terms has no OFTv2 equivalent")
    q = unpack_skew(packed, b)
    if constraint is not None:
        norm = torch.linalg.matrix_norm(q).clamp_min(1e-300)
        q = q * torch.clamp(constraint / norm, max=1.0)[..., None, None]
        kw["constraint"] = None
    from ..rotations.butterfly import NEUMANN_MAX_NORM

    worst = float(torch.linalg.matrix_norm(q).max())
    if worst > NEUMANN_MAX_NORM:
        raise read_error(
            source,
            f"module {path}: a block generator has norm {worst:.3f}; OFTv2 guards its series at {NEUMANN_MAX_NORM}, "
            "so this peft adapter cannot be reproduced exactly",
        )
    # peft's n terms sum I + 2Q + ... + 2Q^(n-2) + Q^(n-1) of the transposed rotation.
    cfg = AdapterConfig(method="oftv2", neumann_terms=max(n - 2, 2), **kw)
    return cfg, {"generators": pack_skew(-q)[None].float()}


def _from_peft_boft(source: Path, path: str, t: dict[str, torch.Tensor]):
    if "boft_R" not in t or "boft_s" not in t:
        raise read_error(source, f"module {path}: needs boft_R and boft_s")
    a = t["boft_R"]  # (m, r, b, b)
    m, _, b, _ = a.shape
    if m > 2:
        raise read_error(
            source,
            f"module {path}: peft BOFT with {m} factors pairs the same half-blocks again and is no butterfly; "
            "only one or two factors convert exactly",
        )
    q = (a - a.transpose(-1, -2)) / 2
    cfg = AdapterConfig(method="boft", block_size=b, n_factors=m, side="input", rescale=True)
    return cfg, {"generators": pack_skew(q).float(), "magnitude": t["boft_s"].reshape(-1).float()}


def read_peft(path: str | os.PathLike) -> AdapterFile:
    """Convert a peft OFT/BOFT folder (or one subfolder per component) to the native form.

    A folder with ``adapter_config.json`` at its top is one component (the UNet of a
    pipeline, or the module it is loaded into); subfolders ``unet``, ``text_encoder``,
    ``text_encoder_2`` are the components of a pipeline.
    """
    path = Path(path)
    builder = NativeBuilder()
    if (path / CONFIG_NAME).is_file():
        _read_one(path, "unet", builder)
    else:
        found = [c for c in COMPONENTS if (path / c / CONFIG_NAME).is_file()]
        if not found:
            raise read_error(path, f"no {CONFIG_NAME} here or in a component subfolder ({', '.join(COMPONENTS)})")
        for comp in found:
            _read_one(path / comp, comp, builder)
    return builder.build(path, {"converted_from": "peft"})
