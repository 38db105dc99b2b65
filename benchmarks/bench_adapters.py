#!/usr/bin/env python
"""Training-step speed and memory of our orthogonal adapters against peft and LyCORIS.

    python benchmarks/bench_adapters.py [--quick] [--repeats 5] [--warmup 2] [--threads N]
                                        [--skip-unet] [--out benchmarks/results]

Writes ``adapter_speed.md``, ``adapter_speed.json`` and ``adapter_speed.png`` into ``--out``
(``--quick`` writes to a temporary folder unless ``--out`` is given, so smoke numbers never
replace real ones).

Sections:

1. **Layer level**, Stable Diffusion 1.5 shapes: widths 320 / 640 / 1280 with 4096 / 1024 / 256
   image tokens (64x64 latents), batch 2.  The model is the projections of one SD attention
   pair: ``attn1.to_q/to_k/to_v/to_out.0`` (width x width, on the image tokens) and the
   cross-attention ``attn2.to_k/to_v`` (768 -> width, on 77 text tokens).  The attention
   product itself is left out so that the numbers are the cost of the projections and their
   adapters; in its place q + k + v goes to ``to_out.0``, kept for backward the way
   scaled-dot-product attention keeps its q, k and v (so memory counts what a real block
   holds: a layer that keeps its own output for backward shares it with the attention).
   One training step = forward, a mean-square loss, backward, AdamW step.  The input
   activations require a gradient in every row (upstream layers would be trained too), so
   the frozen base row is the floor: gradients through the activations only.
2. **Full UNet**: an SD 1.5-sized ``UNet2DConditionModel`` (diffusers default layout,
   block_out_channels 320/640/1280/1280, cross_attention_dim 768, random weights) at 32x32
   latents, adapters on ``to_q/to_k/to_v/to_out.0`` of every attention.
3. **Inference** without gradients: merged adapters against the base, and our unmerged live
   paths, at layer level and on the UNet.

Timing: median wall clock of single steps after warm-up.  All variants of one layer width
are built side by side and timed round-robin (one step of each in turn, ``--repeats``
rounds), so a background load spreads over every variant instead of hitting a few.

Memory (CPU, so there is no allocator high-water mark to read): one extra step per variant
runs under ``torch.profiler`` with ``profile_memory=True``.  The profiler records every tensor
allocation and free made while it runs; the running sum of those, in time order, peaks at
the largest number of bytes allocated during the step and alive at the same time (saved
activations, rotated weights, gradients, optimizer temporaries).  Tensors that existed before
the step (frozen weights, inputs, adapter parameters, optimizer state) are not in that sum,
so the adapter's parameters and buffers and the optimizer state are added exactly from their
sizes.  Frozen base weights and inputs, identical in every row, are left out.  The total is
what training needs beyond the frozen model; it is reported in MiB and as a ratio to peft
LoRA.  Memory that bypasses torch's allocator (oneDNN scratch space) is not seen.

Identical configurations: peft BOFT needs its CUDA block-diagonal kernel to keep more than one
butterfly factor (without it, it silently falls back to one factor).  This script gives peft
a vectorised CPU version of that kernel (same contract: blocks in, block-diagonal matrices
out, diagonal blocks of the gradient back), so peft runs its own BOFT maths with every factor.
LyCORIS derives its block layout from ``lora_dim`` (``diag-oft`` keeps the block size at most
the number of blocks; ``boft`` always uses the full ``1 + log2`` factors), so the
``oft_blocks`` tensor is set to the requested ``(factors, blocks, b, b)`` shape after
construction; LyCORIS' forward reads its layout from that tensor.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The memory profiler warns once per freed tensor that predates it; that is expected here.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import ortho_diffusion as od  # noqa: E402
from ortho_diffusion.adapter import OrthogonalAdapter  # noqa: E402
from ortho_diffusion.inject import matches  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STEM = "adapter_speed"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MIB = 2**20


# ----------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Everything that shapes one run (stored in the JSON)."""

    widths: list[tuple[int, int]]  # (width, image tokens)
    batch: int
    context_dim: int
    context_tokens: int
    oft_block: int
    boft_block: int
    boft_factors: list[int]
    lora_rank: int
    neumann_terms: int
    repeats: int
    warmup: int
    unet: str  # "sd15", "tiny" or "skip"
    unet_batch: int
    unet_latent: int
    unet_repeats: int
    only: list[str] = field(default_factory=list)


def make_settings(a: argparse.Namespace) -> Settings:
    if a.quick:
        s = Settings(
            widths=[(64, 64), (128, 16)], batch=2, context_dim=64, context_tokens=8,
            oft_block=32, boft_block=8, boft_factors=[2, 4], lora_rank=16, neumann_terms=5,
            repeats=a.repeats or 1, warmup=a.warmup if a.warmup is not None else 1,
            unet="tiny", unet_batch=1, unet_latent=8, unet_repeats=1,
        )
    else:
        s = Settings(
            widths=[(320, 4096), (640, 1024), (1280, 256)], batch=2, context_dim=768, context_tokens=77,
            oft_block=a.oft_block, boft_block=a.boft_block, boft_factors=[2, 4], lora_rank=a.lora_rank,
            neumann_terms=5, repeats=a.repeats or 5, warmup=a.warmup if a.warmup is not None else 2,
            unet="sd15", unet_batch=a.unet_batch, unet_latent=32, unet_repeats=a.unet_repeats,
        )
    if a.widths:
        s.widths = [tuple(int(v) for v in w.split(":")) for w in a.widths.split(",")]  # type: ignore[misc]
    if a.skip_unet:
        s.unet = "skip"
    s.only = [o for o in (a.only or "").split(",") if o]
    return s


# ------------------------------------------------------------------------ machine info
def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch threads and load, for the report header."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_start": [round(v, 2) for v in load],
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    """Installed versions of the libraries compared."""
    out = {"ortho_diffusion": od.__version__}
    for name, dist in [("torch", "torch"), ("diffusers", "diffusers"), ("peft", "peft"), ("lycoris", "lycoris-lora")]:
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# ------------------------------------------------------------------------ layer model
class _Holder(nn.Module):
    """Plain container so module paths read like a diffusers attention (``attn1.to_q``)."""


class _AttentionStandIn(torch.autograd.Function):
    """``q + k + v`` that keeps q, k and v until backward, as attention does (its gradients
    need them), without attention's cost."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return q + k + v

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, grad


class AttentionProjections(nn.Module):
    """The linear projections of an SD 1.5 self- plus cross-attention pair.

    Biases as in diffusers: only ``to_out.0`` has one.  ``forward`` sums q, k, v, holding them
    for backward like attention would (the attention product is left out on purpose), and
    returns the three outputs the loss uses.
    """

    def __init__(self, width: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = _Holder()
        self.attn1.to_q = nn.Linear(width, width, bias=False)
        self.attn1.to_k = nn.Linear(width, width, bias=False)
        self.attn1.to_v = nn.Linear(width, width, bias=False)
        self.attn1.to_out = nn.ModuleList([nn.Linear(width, width)])
        self.attn2 = _Holder()
        self.attn2.to_k = nn.Linear(context_dim, width, bias=False)
        self.attn2.to_v = nn.Linear(context_dim, width, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.attn1
        y = a.to_out[0](_AttentionStandIn.apply(a.to_q(x), a.to_k(x), a.to_v(x)))
        return y, self.attn2.to_k(context), self.attn2.to_v(context)


def layer_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(o.square().mean() for o in model(inputs["x"], inputs["context"]))


def unet_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]).sample
    return F.mse_loss(out, inputs["target"])


# ------------------------------------------------------------------------ the variants
class _BlockDiagOnCpu:
    """CPU version of peft BOFT's CUDA block-diagonal kernel (same contract as ``fbd_cuda``).

    ``forward`` takes ``(factors, blocks, b, b)`` and returns ``[(factors, blocks*b, blocks*b)]``;
    ``backward`` returns the diagonal blocks of the gradient.  Vectorised, so it costs about
    what the kernel does relative to the dense products peft runs after it.
    """

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        m, r, b, _ = blocks.shape
        out = blocks.new_zeros(m, r, b, r, b)
        idx = torch.arange(r, device=blocks.device)
        # Two index arrays split by a slice: the indexed view is (r, m, b, b).
        out[:, idx, :, idx, :] = blocks.transpose(0, 1)
        return [out.reshape(m, r * b, r * b)]

    @staticmethod
    def backward(grad: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        m, r, b, _ = blocks.shape
        idx = torch.arange(r, device=blocks.device)
        return [grad.reshape(m, r, b, r, b)[:, idx, :, idx, :].transpose(0, 1).contiguous()]


def _patch_peft_boft() -> None:
    import peft.tuners.boft.layer as boft_layer

    boft_layer.get_fbd_cuda = lambda: _BlockDiagOnCpu
    boft_layer._FBD_CUDA = _BlockDiagOnCpu


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def attach_peft(model: nn.Module, config: Any, check_factors: int | None = None) -> Callable[[], None]:
    """Inject a peft adapter in place; returns the function that restores the base layers."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    inject_adapter_in_model(config, model)
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if check_factors is not None:
        for path, layer in layers:
            got = layer.boft_R["default"].shape[0]
            if got != check_factors:
                raise RuntimeError(f"peft BOFT kept {got} factors on {path}, not {check_factors}")

    def undo() -> None:
        for path, layer in layers:
            _set_module(model, path, layer.get_base_layer())
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in model.__dict__:
                delattr(model, attr)

    return undo


def attach_lycoris(model: nn.Module, algo: str, block: int, factors: int, bypass: bool) -> Callable[[], None]:
    """Wrap every target ``nn.Linear`` with LyCORIS' own module at the given layout."""
    from lycoris.modules.boft import ButterflyOFTModule
    from lycoris.modules.diag_oft import DiagOFTModule

    cls = {"diag-oft": DiagOFTModule, "boft": ButterflyOFTModule}[algo]
    wrapped = nn.ModuleList()
    for path, layer in list(model.named_modules()):
        if not (isinstance(layer, nn.Linear) and matches(path, TARGETS)):
            continue
        dim = layer.out_features
        # lora_dim=dim always constructs; the layout is then set explicitly (module docstring).
        module = cls("lora_unet_" + path.replace(".", "_"), layer, lora_dim=dim, bypass_mode=bypass)
        shape = (dim // block, block, block) if algo == "diag-oft" else (factors, dim // block, block, block)
        module.oft_blocks = nn.Parameter(torch.zeros(shape))
        module.block_size, module.block_num = block, dim // block
        if algo == "boft":
            module.boft_b, module.boft_m = block, factors
        module.apply_to()
        wrapped.append(module)
    model.lycoris_modules = wrapped

    def undo() -> None:
        for module in wrapped:
            module.restore()
        del model.lycoris_modules

    return undo


def attach_ours(model: nn.Module, **config: Any) -> Callable[[], None]:
    od.attach(model, od.AdapterConfig(targets=list(TARGETS), **config))
    return lambda: od.detach(model)


@dataclass(frozen=True)
class Variant:
    """One row: a library's adapter at one configuration.

    ``match`` names the comparison group of rows whose configurations are identical.
    """

    key: str
    library: str
    method: str
    computes: str
    layout: str
    attach: Callable[[nn.Module], Callable[[], None]] | None
    match: str = ""


#: The floor of every comparison: the frozen model, gradients through the activations only.
BASE = Variant("base", "base", "frozen", "-", "no adapter", None)


def _peft_lora(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(TARGETS))


def _peft_oft(block: int, neumann_terms: int | None):
    from peft import OFTConfig

    if neumann_terms is None:
        return OFTConfig(r=0, oft_block_size=block, use_cayley_neumann=False, target_modules=list(TARGETS))
    # peft's n series terms are our neumann_terms = n - 2 (README, parity with peft).
    return OFTConfig(
        r=0, oft_block_size=block, use_cayley_neumann=True, num_cayley_neumann_terms=neumann_terms + 2,
        target_modules=list(TARGETS),
    )


def _peft_boft(block: int, factors: int):
    from peft import BOFTConfig

    return BOFTConfig(boft_block_size=block, boft_n_butterfly_factor=factors, target_modules=list(TARGETS))


COMPUTES = ("input-centric", "weight-centric", "auto")


def training_variants(s: Settings) -> list[Variant]:
    """Every layer-level training row, baselines first."""
    b, bb, k = s.oft_block, s.boft_block, s.neumann_terms
    v = [
        BASE,
        Variant("peft/lora", "peft", "LoRA", "low-rank side path", f"r={s.lora_rank}, alpha={s.lora_rank}",
                lambda m: attach_peft(m, _peft_lora(s.lora_rank))),
        Variant("peft/oft", "peft", "OFT (exact Cayley)", "rotates inputs (einsum)", f"b={b}, input side",
                lambda m: attach_peft(m, _peft_oft(b, None)), match="oft-in"),
        Variant("peft/oft-neumann", "peft", "OFT (Cayley-Neumann)", "rotates inputs (einsum)",
                f"b={b}, input side, {k + 2} peft terms = our {k}",
                lambda m: attach_peft(m, _peft_oft(b, k)), match="oftv2-in"),
    ]
    for m in s.boft_factors:
        v.append(Variant(f"peft/boft-m{m}", "peft", f"BOFT m={m}", "dense d x d rotation per step",
                         f"b={bb}, m={m}, input side, scale",
                         lambda mod, m=m: attach_peft(mod, _peft_boft(bb, m), check_factors=m), match=f"boft{m}-in"))
    for bypass in (False, True):
        mode = "bypass (rotates outputs)" if bypass else "rebuild dW (extra matmul)"
        tag = "bypass" if bypass else "rebuild"
        v.append(Variant(f"lycoris/diag-oft-{tag}", "lycoris", "diag-oft", mode, f"b={b}, output side",
                         lambda mod, p=bypass: attach_lycoris(mod, "diag-oft", b, 1, p), match="oft-out"))
        for m in s.boft_factors:
            v.append(Variant(f"lycoris/boft-m{m}-{tag}", "lycoris", f"boft m={m}", mode, f"b={bb}, m={m}, output side",
                             lambda mod, m=m, p=bypass: attach_lycoris(mod, "boft", bb, m, p), match=f"boft{m}-out"))
    ours: list[tuple[str, str, dict[str, Any], str, str]] = [
        ("oft", "OFT (exact Cayley)", dict(method="oft", block_size=b), f"b={b}, input side", "oft-in"),
        ("oftv2", "OFTv2 (Cayley-Neumann)", dict(method="oftv2", block_size=b, neumann_terms=k),
         f"b={b}, input side, {k} terms", "oftv2-in"),
    ]
    ours += [(f"boft-m{m}", f"BOFT m={m}", dict(method="boft", block_size=bb, n_factors=m),
              f"b={bb}, m={m}, input side", "") for m in s.boft_factors]
    ours += [("goft", "GOFT", dict(method="goft"), "d-1 Givens angles, input side", "")]
    # Rows configured exactly like the peft BOFT and LyCORIS rows (scale / output side).
    ours += [(f"boft-m{m}-scale", f"BOFT m={m}", dict(method="boft", block_size=bb, n_factors=m, rescale=True),
              f"b={bb}, m={m}, input side, scale", f"boft{m}-in") for m in s.boft_factors]
    ours += [("oft-out", "OFT (exact Cayley)", dict(method="oft", block_size=b, side="output"), f"b={b}, output side",
              "oft-out")]
    ours += [(f"boft-m{m}-out", f"BOFT m={m}",
              dict(method="boft", block_size=bb, n_factors=m, side="output", butterfly_order="descending"),
              f"b={bb}, m={m}, output side, descending", f"boft{m}-out") for m in s.boft_factors]
    for name, label, cfg, layout, match in ours:
        for compute in COMPUTES:
            v.append(Variant(f"ours/{name}/{compute}", "ours", label, compute, layout,
                             lambda mod, c=cfg, cc=compute: attach_ours(mod, compute=cc, **c), match=match))
    return v


def unet_variants(s: Settings) -> list[Variant]:
    """The smaller set measured on the whole UNet (BOFT with 2 factors only)."""
    b, bb, m = s.oft_block, s.boft_block, 2
    boft_in = dict(method="boft", block_size=bb, n_factors=m, rescale=True)
    boft_out = dict(method="boft", block_size=bb, n_factors=m, side="output", butterfly_order="descending")
    return [
        BASE,
        Variant("peft/lora", "peft", "LoRA", "low-rank side path", f"r={s.lora_rank}",
                lambda mod: attach_peft(mod, _peft_lora(s.lora_rank))),
        Variant("peft/oft", "peft", "OFT (exact Cayley)", "rotates inputs (einsum)", f"b={b}, input side",
                lambda mod: attach_peft(mod, _peft_oft(b, None)), match="oft-in"),
        Variant(f"peft/boft-m{m}", "peft", f"BOFT m={m}", "dense d x d rotation per step",
                f"b={bb}, m={m}, input side, scale",
                lambda mod: attach_peft(mod, _peft_boft(bb, m), check_factors=m), match=f"boft{m}-in"),
        Variant(f"lycoris/boft-m{m}-rebuild", "lycoris", f"boft m={m}", "rebuild dW (extra matmul)",
                f"b={bb}, m={m}, output side", lambda mod: attach_lycoris(mod, "boft", bb, m, False),
                match=f"boft{m}-out"),
        Variant("ours/oft/auto", "ours", "OFT (exact Cayley)", "auto", f"b={b}, input side",
                lambda mod: attach_ours(mod, method="oft", block_size=b), match="oft-in"),
        Variant("ours/oftv2/auto", "ours", "OFTv2 (Cayley-Neumann)", "auto", f"b={b}, input side",
                lambda mod: attach_ours(mod, method="oftv2", block_size=b, neumann_terms=s.neumann_terms)),
        Variant(f"ours/boft-m{m}-scale/auto", "ours", f"BOFT m={m}", "auto", f"b={bb}, m={m}, input side, scale",
                lambda mod: attach_ours(mod, **boft_in), match=f"boft{m}-in"),
        Variant(f"ours/boft-m{m}-scale/weight-centric", "ours", f"BOFT m={m}", "weight-centric",
                f"b={bb}, m={m}, input side, scale",
                lambda mod: attach_ours(mod, compute="weight-centric", **boft_in), match=f"boft{m}-in"),
        Variant(f"ours/boft-m{m}-out/auto", "ours", f"BOFT m={m}", "auto", f"b={bb}, m={m}, output side, descending",
                lambda mod: attach_ours(mod, **boft_out), match=f"boft{m}-out"),
    ]


# ------------------------------------------------------------------------ measuring
@dataclass
class Case:
    """A model with one variant attached, its inputs, optimizer and measurements."""

    variant: Variant
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    params: list[nn.Parameter]
    adapter_bytes: int
    undo: Callable[[], None] | None
    optimizer: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    paths: Counter = field(default_factory=Counter)
    peak_bytes: int = 0
    optimizer_bytes: int = 0

    def step(self) -> None:
        """One training step: forward, loss, backward, optimizer step."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        for t in self.inputs.values():
            t.grad = None
        loss = self.loss_fn(self.model, self.inputs)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def prepare(variant: Variant, model: nn.Module, inputs: dict[str, torch.Tensor], loss_fn) -> Case:
    """Freeze ``model``, attach the variant, and collect what it added."""
    model.requires_grad_(False)
    before = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    undo = variant.attach(model) if variant.attach else None
    params = [p for p in model.parameters() if id(p) not in before]
    buffers = [b for b in model.buffers() if id(b) not in before]
    for p in params:
        p.requires_grad_(True)
    case = Case(variant, model, inputs, loss_fn, params, _tensor_bytes(params) + _tensor_bytes(buffers), undo)
    if params:
        case.optimizer = torch.optim.AdamW(params, lr=1e-4)
    return case


@contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: Kineto prints a line at every profiler start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def peak_step_bytes(fn: Callable[[], None]) -> int:
    """Peak bytes of tensors allocated during ``fn()`` and alive at the same time (module doc)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # negative for frees
        peak = max(peak, live)
    return peak


@contextmanager
def record_paths(model: nn.Module, counter: Counter):
    """Count which computation path each of our adapter layers takes while active."""
    hooks = []
    for module in model.modules():
        if isinstance(module, OrthogonalAdapter):
            def hook(mod, args, _c=counter):
                _c[mod.choose_compute(args[0], mod._active())] += 1
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def finish_memory(case: Case) -> None:
    case.peak_bytes = peak_step_bytes(case.step)
    if case.optimizer is not None:
        case.optimizer_bytes = _tensor_bytes(
            t for state in case.optimizer.state.values() for t in state.values() if torch.is_tensor(t)
        )


def run_round_robin(cases: list[Case], warmup: int, repeats: int, desc: str) -> None:
    """Warm up each case, time ``repeats`` rounds of one step each in turn, then profile memory."""
    total = len(cases) * (warmup + repeats + 1)
    with tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr) as bar:
        for case in cases:
            for i in range(warmup):
                if i == 0:
                    with record_paths(case.model, case.paths):
                        case.step()
                else:
                    case.step()
                bar.update()
        for _ in range(repeats):
            for case in cases:
                t0 = time.perf_counter()
                case.step()
                case.times.append(time.perf_counter() - t0)
                bar.update()
        for case in cases:
            finish_memory(case)
            bar.update()


def case_record(case: Case, extra: dict[str, Any]) -> dict[str, Any]:
    v = case.variant
    total = case.peak_bytes + case.adapter_bytes + case.optimizer_bytes
    return {
        **extra,
        "key": v.key, "library": v.library, "method": v.method, "computes": v.computes, "layout": v.layout,
        "match": v.match,
        "trainable_params": sum(p.numel() for p in case.params),
        "step_s": statistics.median(case.times), "step_s_min": min(case.times), "step_s_all": case.times,
        "auto_paths": dict(case.paths),
        "memory": {
            "step_peak_bytes": case.peak_bytes, "adapter_bytes": case.adapter_bytes,
            "optimizer_bytes": case.optimizer_bytes, "total_bytes": total,
        },
    }


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile (the median of a single value for both)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def add_ratios(rows: list[dict[str, Any]], paired: bool = True) -> None:
    """Step time relative to the frozen base, memory relative to peft LoRA (same group).

    Round-robin rows (``paired``) have one step per round each, so the time ratio is taken per round
    (``step / base step of the same round``) and summarised by its median and quartiles: a
    slow stretch of the machine then hits a row and its base together instead of biasing one.
    """
    base = next((r for r in rows if r["key"] == "base"), None)
    lora = next((r for r in rows if r["key"] == "peft/lora"), None)
    for r in rows:
        if paired and base and len(base["step_s_all"]) == len(r["step_s_all"]):
            ratios = [t / b for t, b in zip(r["step_s_all"], base["step_s_all"])]
            r["time_vs_base_rounds"] = ratios
            r["time_vs_base"] = statistics.median(ratios)
            r["time_vs_base_quartiles"] = quartiles(ratios)
        else:
            r["time_vs_base"] = r["step_s"] / base["step_s"] if base else None
        r["memory_vs_lora"] = r["memory"]["total_bytes"] / lora["memory"]["total_bytes"] if lora else None


def overhead_against_lora(rows: list[dict[str, Any]], keys: tuple[str, ...] = ("ours/oft/auto", "ours/oftv2/auto")
                          ) -> list[dict[str, Any]]:
    """Our rows against peft LoRA, round by round: the overhead target (ours <= LoRA).

    Per width and row: the median and quartiles of ``ours - LoRA`` in units of the base step
    (both ratios from the same round), and the share of rounds in which ours was not slower.
    """
    out = []
    for width in sorted({r["width"] for r in rows}):
        by_key = {r["key"]: r for r in rows if r["width"] == width}
        lora = by_key.get("peft/lora")
        if not lora or "time_vs_base_rounds" not in lora:
            continue
        for key in keys:
            ours = by_key.get(key)
            if not ours or "time_vs_base_rounds" not in ours:
                continue
            diffs = [o - l for o, l in zip(ours["time_vs_base_rounds"], lora["time_vs_base_rounds"])]
            out.append({
                "width": width, "ours": key, "ours_x_base": ours["time_vs_base"], "lora_x_base": lora["time_vs_base"],
                "difference_median": statistics.median(diffs), "difference_quartiles": quartiles(diffs),
                "rounds": len(diffs), "share_not_slower": sum(d <= 0 for d in diffs) / len(diffs),
            })
    return out


def wanted(variants: list[Variant], only: list[str]) -> list[Variant]:
    if not only:
        return variants
    return [v for v in variants if v.key in ("base", "peft/lora") or any(o in v.key for o in only)]


# ---------------------------------------------------------------------- layer section
def layer_inputs(s: Settings, width: int, tokens: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(s.batch, tokens, width, generator=g).requires_grad_(True),
        "context": torch.randn(s.batch, s.context_tokens, s.context_dim, generator=g),
    }


def layer_model(s: Settings, width: int) -> nn.Module:
    torch.manual_seed(0)
    return AttentionProjections(width, s.context_dim)


def bench_layers(s: Settings) -> list[dict[str, Any]]:
    rows = []
    variants = wanted(training_variants(s), s.only)
    for width, tokens in s.widths:
        inputs = layer_inputs(s, width, tokens)
        cases = [prepare(v, layer_model(s, width), inputs, layer_loss) for v in variants]
        run_round_robin(cases, s.warmup, s.repeats, f"layers d={width}")
        width_rows = [case_record(c, {"width": width, "tokens": tokens, "batch": s.batch}) for c in cases]
        add_ratios(width_rows)
        rows += width_rows
        del cases
        gc.collect()
        print(f"  layer width {width}: done", flush=True)
    return rows


def speedups(rows: list[dict[str, Any]], scope: str) -> list[dict[str, Any]]:
    """Time of each peft / LyCORIS row over our row(s) of the identical configuration."""
    out = []
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["match"]:
            groups.setdefault((r.get("width"), r["match"]), []).append(r)
    for (width, match), members in groups.items():
        ours = {r["computes"]: r for r in members if r["library"] == "ours"}
        if not ours:
            continue
        best = min(ours.values(), key=lambda r: r["step_s"])
        for theirs in (r for r in members if r["library"] != "ours"):
            out.append({
                "scope": scope, "width": width, "match": match, "theirs": theirs["key"], "theirs_s": theirs["step_s"],
                "ours_auto": ours.get("auto", best)["key"], "ours_auto_s": ours.get("auto", best)["step_s"],
                "speedup_auto": theirs["step_s"] / ours.get("auto", best)["step_s"],
                "ours_best": best["key"], "speedup_best": theirs["step_s"] / best["step_s"],
                "memory_ratio_auto": ours.get("auto", best)["memory"]["total_bytes"] / theirs["memory"]["total_bytes"],
            })
    return out


def auto_misses(rows: list[dict[str, Any]], margin: float = 1.1) -> list[dict[str, Any]]:
    """Our configurations where a fixed path beat ``compute="auto"`` by more than ``margin``."""
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["library"] == "ours":
            groups.setdefault((r.get("width"), r["key"].rsplit("/", 1)[0]), {})[r["computes"]] = r
    out = []
    for (width, config), by_compute in groups.items():
        auto = by_compute.get("auto")
        best = min(by_compute.values(), key=lambda r: r["step_s"])
        # Same path, different row: that gap is noise, not a wrong choice.
        if auto and best["computes"] not in auto["auto_paths"] and auto["step_s"] > margin * best["step_s"]:
            out.append({"width": width, "config": config, "auto_took": _paths(auto["auto_paths"]),
                        "faster": best["computes"], "ratio": auto["step_s"] / best["step_s"]})
    return out


# ---------------------------------------------------------------------- UNet section
def build_unet(s: Settings) -> nn.Module:
    torch.manual_seed(0)
    if s.unet == "tiny":
        from ortho_diffusion.testing import tiny_unet

        return tiny_unet("sd15")
    from diffusers import UNet2DConditionModel

    # diffusers' defaults are the SD 1.x layout; SD 1.5 conditions on 768-wide CLIP states.
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)


def unet_inputs(s: Settings, unet: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    n, c, h = s.unet_batch, unet.config.in_channels, s.unet_latent
    tokens = 77 if s.unet == "sd15" else 8
    return {
        "x": torch.randn(n, c, h, h, generator=g).requires_grad_(True),
        "t": torch.full((n,), 500, dtype=torch.long),
        "context": torch.randn(n, tokens, unet.config.cross_attention_dim, generator=g),
        "target": torch.randn(n, c, h, h, generator=g),
    }


def bench_unet(s: Settings, unet: nn.Module) -> list[dict[str, Any]]:
    """Variants one after another on one UNet (a copy each would not fit in memory)."""
    inputs = unet_inputs(s, unet)
    unet.train()
    rows = []
    variants = wanted(unet_variants(s), s.only)
    for v in tqdm(variants, desc="unet", unit="variant", leave=False, file=sys.stderr):
        # The variants run one after another over minutes and the machine's speed drifts
        # (measured: a first base row 35% slower than later adapter rows), so each variant
        # is compared with frozen-base steps timed right before it.
        base_adjacent = adjacent_base_seconds(unet, inputs, s.unet_repeats)
        case = prepare(v, unet, inputs, unet_loss)
        run_round_robin([case], s.warmup if s.unet == "tiny" else 1, s.unet_repeats, f"unet {v.key}")
        rows.append(case_record(case, {"batch": s.unet_batch, "latent": s.unet_latent, "base_adjacent_s": base_adjacent}))
        if case.undo:
            case.undo()
        del case
        gc.collect()
        leftover = [p for p in unet.parameters() if p.requires_grad]
        if leftover or any(isinstance(m, OrthogonalAdapter) for m in unet.modules()):
            raise RuntimeError(f"the UNet was not restored after {v.key}")
        print(f"  unet {v.key}: {rows[-1]['step_s']:.2f} s", flush=True)
    add_ratios(rows, paired=False)  # one variant after another: no rounds to pair
    for r in rows:
        r["time_vs_base"] = r["step_s"] / r["base_adjacent_s"]
    return rows


def adjacent_base_seconds(unet: nn.Module, inputs: dict[str, torch.Tensor], repeats: int) -> float:
    """Median time of ``repeats`` frozen-base training steps (after one untimed step)."""
    case = prepare(BASE, unet, inputs, unet_loss)
    case.step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        case.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------ inference section
def _randomize(params: list[nn.Parameter], seed: int = 3) -> None:
    """Small non-zero adapter values, so live and merged paths compute a real rotation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


@contextmanager
def base_layers(model: nn.Module):
    """Temporarily swap our adapter wrappers for their base layers (the true base model)."""
    swapped = [(p, m) for p, m in model.named_modules() if isinstance(m, OrthogonalAdapter)]
    for p, m in swapped:
        _set_module(model, p, m.base_layer)
    try:
        yield
    finally:
        for p, m in swapped:
            _set_module(model, p, m)


def _time_forward(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - t0


def inference_variants(s: Settings) -> list[tuple[str, str, str, Callable[[nn.Module], Any] | None, str]]:
    """(key, library, state, attach, compute) of the layer-level inference rows."""
    b, bb, k = s.oft_block, s.boft_block, s.neumann_terms
    m = s.boft_factors[0]
    ours = {
        "oft": dict(method="oft", block_size=b),
        "oftv2": dict(method="oftv2", block_size=b, neumann_terms=k),
        f"boft-m{m}": dict(method="boft", block_size=bb, n_factors=m),
        f"boft-m{s.boft_factors[-1]}": dict(method="boft", block_size=bb, n_factors=s.boft_factors[-1]),
        "goft": dict(method="goft"),
    }
    rows: list[tuple[str, str, str, Callable[[nn.Module], Any] | None, str]] = [("base", "base", "base", None, "-")]
    for name, cfg in ours.items():
        rows.append((f"ours/{name}/merged", "ours", "merged", lambda mod, c=cfg: attach_ours(mod, **c), "merged"))
        for compute in COMPUTES:
            rows.append((f"ours/{name}/{compute}", "ours", "live",
                         lambda mod, c=cfg, cc=compute: attach_ours(mod, compute=cc, **c), compute))
    rows += [
        ("peft/oft", "peft", "live", lambda mod: attach_peft(mod, _peft_oft(b, None)), "rotates inputs"),
        (f"peft/boft-m{m}", "peft", "live", lambda mod: attach_peft(mod, _peft_boft(bb, m), check_factors=m),
         "dense rotation"),
        ("lycoris/diag-oft-rebuild", "lycoris", "live", lambda mod: attach_lycoris(mod, "diag-oft", b, 1, False),
         "rebuild dW"),
        (f"lycoris/boft-m{m}-rebuild", "lycoris", "live", lambda mod: attach_lycoris(mod, "boft", bb, m, False),
         "rebuild dW"),
    ]
    return [r for r in rows if not s.only or r[0] == "base" or any(o in r[0] for o in s.only)]


def bench_inference_layers(s: Settings) -> list[dict[str, Any]]:
    """Forward passes without gradients, round-robin over all rows of one width."""
    rows = []
    repeats = 3 * s.repeats  # a forward is about a third of a training step
    for width, tokens in s.widths:
        inputs = {k: v.detach() for k, v in layer_inputs(s, width, tokens).items()}
        models: list[tuple[tuple, nn.Module]] = []
        for spec in inference_variants(s):
            key, library, state, attach, compute = spec
            model = layer_model(s, width)
            model.requires_grad_(False)
            before = {id(p) for p in model.parameters()}
            if attach:
                attach(model)
                _randomize([p for p in model.parameters() if id(p) not in before])
            if state == "merged":
                od.merge(model)
            model.eval()
            models.append((spec, model))
        outputs: dict[str, Any] = {}
        paths: dict[str, Counter] = {}
        with torch.inference_mode():
            for (key, *_), model in models:
                paths[key] = Counter()
                with record_paths(model, paths[key]):
                    outputs[key] = model(inputs["x"], inputs["context"])
        times: dict[str, list[float]] = {spec[0]: [] for spec, _ in models}
        # A merged model is also timed through plain base layers holding its (merged) weights:
        # same tensors, same memory, so the per-round ratio isolates what merging costs from
        # where each model's weights happen to sit in memory (a few percent either way).
        plain: dict[str, list[float]] = {spec[0]: [] for spec, _ in models if spec[2] == "merged"}

        def forward(model: nn.Module, key: str) -> None:
            times[key].append(_time_forward(lambda: model(inputs["x"], inputs["context"])))
            if key in plain:
                with base_layers(model):
                    plain[key].append(_time_forward(lambda: model(inputs["x"], inputs["context"])))

        with tqdm(total=len(models) * (repeats + 1), desc=f"inference d={width}", unit="fwd", leave=False,
                  file=sys.stderr) as bar:
            for spec, model in models:
                forward(model, spec[0])  # warm-up
                bar.update()
            for t in (*times.values(), *plain.values()):
                t.clear()
            for _ in range(repeats):
                for spec, model in models:
                    forward(model, spec[0])
                    bar.update()
        base_s = statistics.median(times["base"])
        for (key, library, state, _, compute), model in models:
            rec = {"width": width, "tokens": tokens, "batch": s.batch, "key": key, "library": library, "state": state,
                   "computes": compute, "forward_s": statistics.median(times[key]), "forward_s_all": times[key],
                   "auto_paths": dict(paths[key]) if state == "live" else {}}
            rec["time_vs_base"] = rec["forward_s"] / base_s
            if key in plain:
                rec["plain_forward_s"] = statistics.median(plain[key])
                rec["plain_forward_s_all"] = plain[key]
                rec["time_vs_plain"] = statistics.median(a / b for a, b in zip(times[key], plain[key]))
            live = key.replace("/merged", "/auto")
            if state == "merged" and live in outputs:
                rec["max_abs_diff_vs_live"] = max(
                    float((a - b).abs().max()) for a, b in zip(outputs[key], outputs[live])
                )
            rows.append(rec)
        del models, outputs
        gc.collect()
    return rows


def bench_inference_unet(s: Settings, unet: nn.Module) -> list[dict[str, Any]]:
    """Base, merged and live of our OFT and BOFT on the one UNet, round-robin per method."""
    inputs = {k: v.detach() for k, v in unet_inputs(s, unet).items()}
    unet.eval()
    unet.requires_grad_(False)

    def forward():
        return unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]).sample

    rows = []
    m = s.boft_factors[0]
    methods = {"oft": dict(method="oft", block_size=s.oft_block),
               f"boft-m{m}": dict(method="boft", block_size=s.boft_block, n_factors=m)}
    repeats = max(3, s.unet_repeats)
    for name, cfg in methods.items():
        undo = attach_ours(unet, **cfg)
        _randomize(od.adapter_parameters(unet))
        unet.requires_grad_(False)
        times: dict[str, list[float]] = {"base": [], "live": [], "merged": []}

        def run(state: str) -> float:
            if state == "base":
                with base_layers(unet):
                    return _time_forward(forward)
            if state == "merged":
                od.merge(unet)
                try:
                    return _time_forward(forward)
                finally:
                    od.unmerge(unet)
            return _time_forward(forward)

        paths: Counter = Counter()
        with torch.inference_mode():
            with record_paths(unet, paths):
                live_out = forward()
            od.merge(unet)
            merged_out = forward()
            od.unmerge(unet)
        for state in times:
            run(state)  # warm-up
        for _ in tqdm(range(repeats), desc=f"unet inference {name}", leave=False, file=sys.stderr):
            for state in times:
                times[state].append(run(state))
        base_s = statistics.median(times["base"])
        for state, ts in times.items():
            rows.append({
                "key": "base" if state == "base" else f"ours/{name}/{'merged' if state == 'merged' else 'auto'}",
                "library": "base" if state == "base" else "ours", "state": state,
                "computes": {"base": "-", "merged": "merged", "live": "auto"}[state],
                "forward_s": statistics.median(ts), "forward_s_all": ts,
                "time_vs_base": statistics.median(ts) / base_s,
                "auto_paths": dict(paths) if state == "live" else {},
                "max_abs_diff_vs_live": float((merged_out - live_out).abs().max()) if state == "merged" else None,
                "batch": s.unet_batch, "latent": s.unet_latent,
            })
        undo()
        print(f"  unet inference {name}: base {base_s:.2f} s, merged x{rows[-1]['time_vs_base']:.3f}", flush=True)
    return rows


# ------------------------------------------------------------------------------ report
def _ms(s: float) -> str:
    return f"{s * 1000:.1f}" if s < 10 else f"{s * 1000:.0f}"


def _mib(n: int) -> str:
    return f"{n / MIB:.1f}"


def _x(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f}"


def _spread(r: dict[str, Any]) -> str:
    q = r.get("time_vs_base_quartiles")
    return f" ({q[0]:.2f}-{q[1]:.2f})" if q else ""


def _paths(p: dict[str, int]) -> str:
    return ", ".join(f"{k.split('-')[0]} {n}" for k, n in sorted(p.items())) or "-"


def training_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| library | method | computes | configuration | params | step ms | min ms | x base | memory MiB "
        "(step peak + adapter + optim.) | x LoRA | our layers took |",
        "|---|---|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        mem = r["memory"]
        lines.append(
            f"| {r['library']} | {r['method']} | {r['computes']} | {r['layout']} | {r['trainable_params']:,} | "
            f"{_ms(r['step_s'])} | {_ms(r['step_s_min'])} | {_x(r['time_vs_base'])}{_spread(r)} | "
            f"{_mib(mem['total_bytes'])} ({_mib(mem['step_peak_bytes'])} + {_mib(mem['adapter_bytes'])} + "
            f"{_mib(mem['optimizer_bytes'])}) | {_x(r['memory_vs_lora'])} | {_paths(r['auto_paths'])} |"
        )
    return lines


def speedup_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| scope | width | identical configuration | theirs | their step ms | ours (auto) ms | speedup (auto) "
        "| our best path | speedup (best) | our memory / theirs |",
        "|---|---:|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scope']} | {r['width'] or '-'} | {r['match']} | {r['theirs']} | {_ms(r['theirs_s'])} | "
            f"{_ms(r['ours_auto_s'])} | {r['speedup_auto']:.2f}x | {r['ours_best'].split('/')[-1]} | "
            f"{r['speedup_best']:.2f}x | {r['memory_ratio_auto']:.2f} |"
        )
    return lines


def inference_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| library | adapter | state | path | forward ms | x base | x plain layers, same weights "
             "| within 2% of base | max abs diff merged vs live |",
             "|---|---|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        merged_cost = r.get("time_vs_plain", r["time_vs_base"])
        within = ("yes" if merged_cost <= 1.02 else "no") if r["state"] == "merged" else ""
        diff = r.get("max_abs_diff_vs_live")
        path = r["computes"] + (f" ({_paths(r['auto_paths'])})" if r.get("auto_paths") else "")
        plain = _x(r["time_vs_plain"]) if "time_vs_plain" in r else ""
        lines.append(
            f"| {r['library']} | {r['key'].split('/')[1] if '/' in r['key'] else '-'} | {r['state']} | {path} | "
            f"{_ms(r['forward_s'])} | {_x(r['time_vs_base'])} | {plain} | {within} | "
            f"{'' if diff is None else f'{diff:.1e}'} |"
        )
    return lines


MATCH_NOTES = {
    "oft-in": "peft OFT exact Cayley = ours `oft`: same block size, input side, no scale",
    "oftv2-in": "peft OFT Cayley-Neumann = ours `oftv2` (peft's n terms = our n - 2, same series)",
    "oft-out": "LyCORIS diag-oft = ours `oft` with `side=\"output\"`",
}


def write_report(out: Path, s: Settings, result: dict[str, Any], elapsed: float) -> None:
    m, ver = result["machine"], result["versions"]
    lines = [
        "# Adapter training speed and memory: ours against peft and LyCORIS",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']} "
        f"(interop {m['torch_interop_threads']}), load average at start {m['load_average_at_start']}. "
        "Versions: " + ", ".join(f"{k} {v}" for k, v in ver.items())
        + f". Float32 on the CPU. Run took {elapsed / 60:.1f} min.",
        "",
        f"Command: `{result['command']}`",
        "",
        "How: one training step is forward, a mean-square loss, backward and an AdamW step. "
        f"{s.repeats} timed steps after {s.warmup} warm-up steps per variant; every variant of a width is "
        "built side by side and timed round-robin, one step each per round. `step ms` is the median step. `x base` "
        "is step time over the frozen base (no adapter, gradients through the activations only: the floor), taken "
        "per round against the base step of the same round: the median over rounds, with the quartiles in "
        "brackets (on layer rows). Memory is what training needs beyond the frozen weights and inputs: "
        "the peak of tensor bytes allocated during one profiled step (torch.profiler, `profile_memory=True`: "
        "running sum of allocations and frees) plus the adapter's parameters and buffers plus the AdamW state; "
        "`x LoRA` divides it by peft LoRA's. `our layers took` counts the computation path our adapter layers "
        "chose in the first step.",
        "",
        "Identical configurations: targets `to_q`, `to_k`, `to_v`, `to_out.0` everywhere; the rows of a group share "
        "block size, factors, side (input side for peft, output side for LyCORIS) and per-output scale (peft BOFT "
        "always has one, so ours gets `rescale=True` in those rows). peft BOFT runs with a CPU version of its CUDA "
        "block-diagonal kernel so it keeps every factor (without it peft silently drops to one factor); LyCORIS' "
        "`oft_blocks` tensors are shaped to the requested layout after construction (its forward reads the layout "
        "from them). LyCORIS `rebuild` is its default path (weight difference rebuilt each step, applied as a second "
        "matmul); `bypass` rotates the layer outputs.",
        "",
    ]
    if result["layer_training"]:
        lines += ["## Layer level: one attention pair's projections at SD 1.5 shapes", "",
                  f"Self-attention `to_q/to_k/to_v/to_out.0` (width x width) on the image tokens, cross-attention "
                  f"`to_k/to_v` ({s.context_dim} -> width) on {s.context_tokens} text tokens, batch {s.batch}. "
                  "The attention product itself is left out: q + k + v goes to `to_out.0`, with q, k and v kept "
                  "for backward as attention keeps them.", ""]
        for width, tokens in s.widths:
            rows = [r for r in result["layer_training"] if r["width"] == width]
            lines += [f"### width {width}, {tokens} image tokens", ""] + training_table(rows) + [""]
    if result["speedups"]:
        lines += ["## Identical configurations: their step time over ours", "",
                  "`speedup` > 1: ours is faster. Groups: `boftM-in` = peft BOFT with M factors = ours `boft` with "
                  "`rescale=True`, input side; `boftM-out` = LyCORIS boft = ours `boft` with `side=\"output\"`, "
                  "`butterfly_order=\"descending\"`; "
                  + "; ".join(f"`{k}` = {v}" for k, v in MATCH_NOTES.items()) + ".",
                  ""] + speedup_table(result["speedups"]) + [""]
    if result.get("overhead_vs_lora"):
        lines += ["## OFT and OFTv2 against peft LoRA, round by round", "",
                  "Target: our step-time overhead over the frozen base no larger than LoRA's. Per round, our `x base` "
                  "minus LoRA's from the same round; negative = ours faster.", "",
                  "| width | ours | ours x base | LoRA x base | ours - LoRA: median (quartiles) | rounds "
                  "| rounds ours not slower |",
                  "|---:|---|---:|---:|---|---:|---:|"]
        for o in result["overhead_vs_lora"]:
            q = o["difference_quartiles"]
            lines.append(f"| {o['width']} | {o['ours']} | {o['ours_x_base']:.2f} | {o['lora_x_base']:.2f} | "
                         f"{o['difference_median']:+.3f} ({q[0]:+.3f} to {q[1]:+.3f}) | {o['rounds']} | "
                         f"{o['share_not_slower']:.0%} |")
        lines += [""]
    misses = auto_misses(result["layer_training"]) + auto_misses(result["unet_training"])
    if misses:
        lines += ["Where `compute=\"auto\"` was not our fastest path (by more than 10%):", ""]
        lines += [f"- {m['config']}" + (f" at width {m['width']}" if m["width"] else " on the UNet")
                  + f": auto took {m['auto_took']}, {m['faster']} was {m['ratio']:.2f}x faster" for m in misses]
        lines += [""]
    if result["unet_training"]:
        u = result["unet_training"][0]
        lines += ["## Full UNet, one training step", "",
                  f"{result['unet_description']}, batch {u['batch']}, {u['latent']}x{u['latent']} latents, random "
                  f"weights, adapters on every attention's `to_q/to_k/to_v/to_out.0`. {s.unet_repeats} timed steps "
                  "after one warm-up, variants one after another; `x base` divides each row by the median of "
                  f"{s.unet_repeats} frozen-base steps timed right before it (the machine's speed drifts over the "
                  "minutes this section takes).", ""]
        lines += training_table(result["unet_training"]) + [""]
    if result["layer_inference"]:
        lines += ["## Inference (no gradients)", "",
                  "Merged: the adapters folded into the weights (`od.merge`), which should cost nothing over the base "
                  "(`within 2%`). Live: unmerged, our adapter computing on every call. Adapter values are small "
                  f"random numbers; the last column checks that merging kept the function. Median of {3 * s.repeats} "
                  "forwards, round-robin. `x base` divides by the one base model's median; every row is a separate "
                  "model, so it also carries where that model's weights sit in memory (a few percent either way). "
                  "`x plain layers, same weights` times each merged model in every round also through plain "
                  "`nn.Linear` layers holding its own merged weights (same tensors) and takes the median of the "
                  "per-round ratios: what merging leaves of our wrapper. `within 2%` uses that ratio where it exists "
                  "(on the UNet, base and merged are the same model and weights already).", ""]
        for width, tokens in s.widths:
            rows = [r for r in result["layer_inference"] if r["width"] == width]
            lines += [f"### layer level, width {width}, {tokens} image tokens", ""] + inference_table(rows) + [""]
    if result["unet_inference"]:
        lines += ["### full UNet", ""] + inference_table(result["unet_inference"]) + [""]
    lines += ["![adapter speed](adapter_speed.png)", ""]
    (out / f"{STEM}.md").write_text("\n".join(lines))


PLOT_KEYS = [
    "peft/lora", "peft/oft", "peft/oft-neumann", "peft/boft-m2", "peft/boft-m4",
    "lycoris/diag-oft-rebuild", "lycoris/diag-oft-bypass", "lycoris/boft-m2-rebuild", "lycoris/boft-m2-bypass",
    "lycoris/boft-m4-rebuild", "lycoris/boft-m4-bypass",
    "ours/oft/auto", "ours/oftv2/auto", "ours/boft-m2/auto", "ours/boft-m4/auto", "ours/goft/auto",
]


def write_plot(out: Path, s: Settings, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["layer_training"]
    keys = [k for k in PLOT_KEYS if any(r["key"] == k for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(keys) + 2), sharey=True)
    height = 0.8 / max(1, len(s.widths))
    for i, (width, tokens) in enumerate(s.widths):
        by_key = {r["key"]: r for r in rows if r["width"] == width}
        ys = [j + i * height for j in range(len(keys))]
        t = [by_key[k]["time_vs_base"] if k in by_key else float("nan") for k in keys]
        mem = [by_key[k]["memory_vs_lora"] if k in by_key else float("nan") for k in keys]
        axes[0].barh(ys, t, height=height, label=f"d={width}, {tokens} tokens")
        axes[1].barh(ys, mem, height=height, label=f"d={width}")
    centre = [j + 0.4 - height / 2 for j in range(len(keys))]
    axes[0].set_yticks(centre, keys)
    axes[0].invert_yaxis()
    axes[0].set_xscale("log")
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_xlabel("training step time / frozen base (log)")
    axes[1].set_xscale("log")
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].set_xlabel("training memory / peft LoRA (log)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Layer level, SD 1.5 attention projections, batch {s.batch}, "
                 f"{result['machine']['torch_threads']} threads, CPU")
    fig.tight_layout()
    fig.savefig(out / f"{STEM}.png", dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny widths and a tiny UNet, 1 repeat: a smoke run")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 5; quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-unet", action="store_true", help="leave out the full UNet sections")
    p.add_argument("--unet-repeats", type=int, default=2, help="timed UNet steps per variant")
    p.add_argument("--unet-batch", type=int, default=1)
    p.add_argument("--oft-block", type=int, default=32, help="block size of the OFT rows")
    p.add_argument("--boft-block", type=int, default=8, help="block size of the BOFT rows")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--widths", default=None, help="override layer shapes, e.g. '320:4096,640:1024'")
    p.add_argument("--only", default=None, help="comma list of substrings of row keys to keep (base and LoRA stay)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results; quick: a temp folder)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    s = make_settings(a)
    out = Path(a.out) if a.out else (Path(tempfile.mkdtemp(prefix="adapter_speed_")) if a.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)

    machine, ver = machine_info(), versions()
    print(f"machine: {machine['cpu']} | {machine['cores']} cores | torch threads {machine['torch_threads']} "
          f"(interop {machine['torch_interop_threads']}) | load {machine['load_average_at_start']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()))
    import lycoris.logging

    # LyCORIS logs each layout it derives from lora_dim; ours are set explicitly afterwards.
    lycoris.logging.logger.setLevel("WARNING")
    _patch_peft_boft()
    torch.manual_seed(0)
    start = time.perf_counter()
    result: dict[str, Any] = {
        "machine": machine, "versions": ver, "settings": s.__dict__,
        "command": "python benchmarks/bench_adapters.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "layer_training": [], "speedups": [], "overhead_vs_lora": [], "unet_training": [], "layer_inference": [], "unet_inference": [],
        "unet_description": "",
    }
    print(f"layer level: widths {s.widths}, batch {s.batch}, {s.repeats} repeats", flush=True)
    result["layer_training"] = bench_layers(s)
    result["speedups"] = speedups(result["layer_training"], "layer")
    result["overhead_vs_lora"] = overhead_against_lora(result["layer_training"])
    print("layer-level inference", flush=True)
    result["layer_inference"] = bench_inference_layers(s)
    if s.unet != "skip":
        print("building the UNet", flush=True)
        unet = build_unet(s)
        n = sum(p.numel() for p in unet.parameters())
        result["unet_description"] = (
            f"{'SD 1.5-sized' if s.unet == 'sd15' else 'tiny SD 1.5-layout'} UNet2DConditionModel "
            f"({n / 1e6:.0f}M parameters, block_out_channels {list(unet.config.block_out_channels)}, "
            f"cross_attention_dim {unet.config.cross_attention_dim})"
        )
        result["unet_training"] = bench_unet(s, unet)
        result["speedups"] += speedups(result["unet_training"], "unet")
        result["unet_inference"] = bench_inference_unet(s, unet)
        del unet
    elapsed = time.perf_counter() - start
    result["elapsed_s"] = elapsed
    (out / f"{STEM}.json").write_text(json.dumps(result, indent=1, default=str))
    write_report(out, s, result, elapsed)
    write_plot(out, s, result)
    for r in result["speedups"]:
        print(f"  {r['scope']:5} d={r['width'] or '-':>5} {r['match']:9} {r['theirs']:28} "
              f"their step / ours (auto) = {r['speedup_auto']:.2f}")
    print(f"wrote {out / STEM}.md, .json, .png in {elapsed:.0f} s")
    return result


if __name__ == "__main__":
    main()
