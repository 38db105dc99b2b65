"""``OrthogonalAdapter``: one frozen ``nn.Linear`` / ``nn.Conv2d`` plus named rotations.

Every rotation family plugs into this one wrapper.  For a layer ``y = W x + b`` with the
adapters ``a_1, ..., a_n`` (in the order they were added) the adapted layer computes

    y = M * (R_out W R_in) x + b,
    R_in  = R_{a_1} R_{a_2} ... (input-side adapters; the first added is next to W),
    R_out = ... R_{a_2} R_{a_1} (output-side adapters),
    M     = product of the per-output magnitudes (``rescale``), 1 otherwise.

For a Conv2d, the input side is the flattened ``in_channels * kh * kw`` patch of each
output neuron (the OFT paper's view of a conv filter) and the output side is the channels.

Two computation paths give the same numbers:

* input-centric: rotate the activations (and, for a conv with a kernel > 1, the exact
  unfolded patches), then run the frozen weight; no weight-sized tensor is built.
* weight-centric: rotate the weight (block-aware, never a dense ``d x d`` matrix) and run
  the layer with it.

Strength ``t`` (``set_scale``) replaces each generator ``Q`` by ``t Q`` (magnitudes by
``1 + t (m - 1)``); ``t = 0`` skips the adapter, so the output is the base's, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig
from .rotations import (
    Mode,
    Rotation,
    block_rotated_linear,
    compute_dtype,
    output_rotated_linear,
    rotate_outputs,
    scale_shift,
)


#: Time of one element pass of a rotation in training (forward and backward), in multiply-adds
#: of the frozen layer's matrix product.  Rotations move memory, matrix products compute.  From
#: the layer-level rows of ``benchmarks/bench_adapters.py`` (2 threads): about 220 for 4-factor
#: BOFT at width 320 with 8192 tokens, 490 for OFT at width 1280 with 512 tokens (which also
#: paid for its Cayley inverses then).  The choice only flips near the break-even, where both paths
#: cost about the same, so a middle value serves.
PASS_COST_IN_MACS = 300


@dataclass
class _Active:
    """One adapter as it enters a computation: its rotation, side, strength and magnitude."""

    name: str
    rotation: Rotation
    side: str
    scale: float
    n_active_factors: int | None
    magnitude: torch.Tensor | None


class OrthogonalAdapter(nn.Module):
    """Wraps a frozen ``nn.Linear`` or ``nn.Conv2d`` and applies named orthogonal adapters.

    Args:
        base_layer: the layer to adapt (kept as ``self.base_layer``, frozen).
        name: name of the first adapter.
        config: its :class:`~ortho_diffusion.config.AdapterConfig`.
    """

    def __init__(self, base_layer: nn.Module, name: str, config: AdapterConfig) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"orthogonal adapters wrap nn.Linear or nn.Conv2d, not {type(base_layer).__name__}")
        if isinstance(base_layer, nn.Conv2d) and base_layer.groups != 1:
            raise ValueError(f"grouped convolutions (groups={base_layer.groups}) are not supported")
        self.base_layer = base_layer
        self.rotations = nn.ModuleDict()
        self.magnitudes = nn.ParameterDict()
        self.configs: dict[str, AdapterConfig] = {}
        self.scales: dict[str, float] = {}
        self.active_factors: dict[str, int | None] = {}
        self.compute = config.compute
        # (name, scale, n_active_factors) of each adapter folded into the weight, in order.
        self.merged: list[tuple[str, float, int | None]] = []
        self.add_adapter(name, config)

    # ------------------------------------------------------------------ shapes
    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    @property
    def in_dim(self) -> int:
        """Width of the input side: ``in_features`` or ``in_channels * kh * kw``."""
        w = self.base_layer.weight
        return w[0].numel()

    @property
    def out_dim(self) -> int:
        """Width of the output side: ``out_features`` or ``out_channels``."""
        return self.base_layer.weight.shape[0]

    # --------------------------------------------------------------- adapters
    def add_adapter(self, name: str, config: AdapterConfig) -> None:
        """Add a new adapter at the identity (the layer's output does not change)."""
        if name in self.rotations:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if self.merged:
            raise RuntimeError("unmerge before adding an adapter")
        dim = self.in_dim if config.side == "input" else self.out_dim
        weight = self.base_layer.weight
        rotation = config.build_rotation(dim).to(weight.device)
        self.rotations[name] = rotation
        if config.rescale:
            self.magnitudes[name] = nn.Parameter(torch.ones(self.out_dim, device=weight.device))
        self.configs[name] = config
        self.scales[name] = 1.0
        self.active_factors[name] = None
        self.compute = config.compute

    def remove_adapter(self, name: str) -> None:
        """Drop one adapter (unmerging first if needed)."""
        if self.merged:
            self.unmerge()
        del self.rotations[name]
        if name in self.magnitudes:
            del self.magnitudes[name]
        for d in (self.configs, self.scales, self.active_factors):
            del d[name]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.rotations.keys())

    def set_scale(self, scale: float, name: str | None = None, n_active_factors: int | None = None) -> None:
        """Set strength ``t`` (and BOFT's number of active factors) of one or all adapters."""
        names = self.adapter_names if name is None else [name]
        remerge = bool(self.merged)
        if remerge:
            self.unmerge()
        for n in names:
            if n not in self.rotations:
                continue
            self.scales[n] = float(scale)
            self.active_factors[n] = n_active_factors
        if remerge:
            self.merge()

    def _active(self, exclude_merged: bool = True) -> list[_Active]:
        merged = {n for n, _, _ in self.merged} if exclude_merged else set()
        out = []
        for name, rotation in self.rotations.items():
            t, k = self.scales[name], self.active_factors[name]
            if name in merged or t == 0 or k == 0:
                continue
            mag = self.magnitudes[name] if name in self.magnitudes else None
            out.append(_Active(name, rotation, self.configs[name].side, t, k, mag))
        return out

    # ------------------------------------------------------------- the maths
    @staticmethod
    def _total_magnitude(active: list[_Active], dtype: torch.dtype) -> torch.Tensor | None:
        total = None
        for a in active:
            if a.magnitude is not None:
                m = 1 + a.scale * (a.magnitude.to(dtype) - 1)
                total = m if total is None else total * m
        return total

    def transform_weight(self, weight: torch.Tensor, active: list[_Active], inverse: bool = False) -> torch.Tensor:
        """Apply (or undo) the adapters to a weight of shape ``(d_out, d_in_flat)``.

        Computes ``M * R_out W R_in`` (or its inverse) in ``weight``'s dtype, block-aware.
        """
        ins = [a for a in active if a.side == "input"]
        outs = [a for a in active if a.side == "output"]
        w = weight
        if not inverse:
            for a in ins:  # W R_a1 R_a2 ...: row w -> (R^T w^T)^T
                w = a.rotation.apply(w, a.scale, a.n_active_factors, Mode.TRANSPOSE)
            for a in outs:  # ... R_a2 R_a1 W: each column rotated
                w = a.rotation.apply(w.t(), a.scale, a.n_active_factors, Mode.FORWARD).t()
            m = self._total_magnitude(active, w.dtype)
            if m is not None:
                w = w * m[:, None]
            return w
        m = self._total_magnitude(active, w.dtype)
        if m is not None:
            w = w / m[:, None]
        for a in reversed(outs):
            w = a.rotation.apply(w.t(), a.scale, a.n_active_factors, Mode.INVERSE).t()
        for a in reversed(ins):
            w = a.rotation.apply(w, a.scale, a.n_active_factors, Mode.INVERSE_TRANSPOSE)
        return w

    def _flat_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.reshape(w.shape[0], -1)

    def _n_tokens(self, x: torch.Tensor) -> int:
        if not self.is_conv:
            return x.numel() // x.shape[-1]
        conv = self.base_layer
        if isinstance(conv.padding, str):
            return x.shape[0] * x.shape[-2] * x.shape[-1]
        size = 1
        for i in range(2):
            span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
            size *= (x.shape[-2 + i] + 2 * conv.padding[i] - span) // conv.stride[i] + 1
        return x.shape[0] * size

    def _unfold_needed(self) -> bool:
        conv = self.base_layer
        return self.is_conv and tuple(conv.kernel_size) != (1, 1)

    def choose_compute(self, x: torch.Tensor, active: list[_Active]) -> str:
        """``"input-centric"`` or ``"weight-centric"`` for this call (see README: compute paths).

        Rule: compare estimated time.  Rotating ``N`` activation vectors costs ``N * p`` element
        passes (``p`` from :meth:`Rotation.passes_per_vector`); rotating the weight costs
        ``rows * p``.  In training, the weight-centric path also needs the full weight
        gradient, ``N * d_in * d_out`` multiply-adds, which input-centric avoids; one element
        pass (forward and backward) costs about :data:`PASS_COST_IN_MACS` of those.
        Except where :meth:`_closed_form` applies: there the weight-centric path gets its
        gradients without the full weight gradient, for the price of one of input-centric's
        three passes per vector (forward, input gradient, block gradient; a single pass even
        for BOFT, whose factors multiply into one block-diagonal matrix) plus rotating the
        weight twice (forward, and again in backward instead of keeping it), so it wins
        whenever ``d_out`` is below the number of tokens.
        """
        if self.compute != "auto":
            return self.compute
        has_input_side = any(a.side == "input" for a in active)
        if has_input_side and self._unfold_needed():
            # Exact input-centric convs need unfolded patches (kernel area x the activations).
            return "weight-centric"
        n = self._n_tokens(x)
        p_in = sum(a.rotation.passes_per_vector() for a in active if a.side == "input")
        p_out = sum(a.rotation.passes_per_vector() for a in active if a.side == "output")
        input_centric = n * (p_in + p_out)
        weight_centric = self.out_dim * p_in + self.in_dim * p_out
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.rotations.parameters())
        if training:
            input_centric *= PASS_COST_IN_MACS
            if self._closed_form(active):
                rotated_width = self.in_dim if active[0].side == "input" else self.out_dim
                weight_centric = PASS_COST_IN_MACS * (2 * weight_centric + n * rotated_width) / 3
            else:
                weight_centric = PASS_COST_IN_MACS * weight_centric + n * self.in_dim * self.out_dim
        return "input-centric" if input_centric <= weight_centric else "weight-centric"

    def _closed_form(self, active: list[_Active]) -> bool:
        """Whether the weight-centric path can use
        :func:`~ortho_diffusion.rotations.block_rotated_linear` (input side) or
        :func:`~ortho_diffusion.rotations.output_rotated_linear` (output side): a Linear layer
        with a frozen weight and one active adapter whose rotation is block-diagonal (OFT,
        OFTv2 and BOFT: see :meth:`Rotation.block_diagonal`)."""
        return (
            not self.is_conv
            and not self.base_layer.weight.requires_grad
            and len(active) == 1
            and active[0].rotation.is_block_diagonal
        )

    def _run_layer(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.is_conv:
            return self.base_layer._conv_forward(x, weight.reshape(self.base_layer.weight.shape), bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def _block_diagonal(a: _Active, x_dtype: torch.dtype) -> torch.Tensor:
        """``a``'s rotation as its diagonal blocks ``(d / B, B, B)``, in the compute dtype for ``x_dtype``."""
        dtype = compute_dtype(next(a.rotation.parameters()).dtype, x_dtype)
        return a.rotation.block_diagonal(a.scale, dtype, a.n_active_factors)

    def _rotate_channels(self, x: torch.Tensor, a: _Active, mode: Mode = Mode.FORWARD) -> torch.Tensor:
        """Rotate the feature dimension: last for Linear inputs, dim 1 for conv maps."""
        if self.is_conv:
            # contiguous: a channels-last view would send the conv down another kernel.
            return a.rotation.apply(x.movedim(1, -1), a.scale, a.n_active_factors, mode).movedim(-1, 1).contiguous()
        return a.rotation.apply(x, a.scale, a.n_active_factors, mode)

    def _unfolded_conv(self, x: torch.Tensor, ins: list[_Active]) -> torch.Tensor:
        """Exact input-centric conv: rotate each unfolded patch, then one matmul (no fold)."""
        conv = self.base_layer
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        n, _, h, w = x.shape
        cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
        cols = cols.transpose(1, 2)  # (N, L, C*kh*kw): one patch per output position
        for a in reversed(ins):
            cols = a.rotation.apply(cols, a.scale, a.n_active_factors, Mode.FORWARD)
        out = cols @ self._flat_weight().t()  # (N, L, out_channels)
        pad = (padding, padding) if isinstance(padding, int) else padding
        size = [
            (dim + 2 * pad[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
            for i, dim in enumerate((h, w))
        ]
        return out.transpose(1, 2).reshape(n, -1, *size)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self._active()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        path = self.choose_compute(x, active)
        if isinstance(self.base_layer, nn.Conv2d) and isinstance(self.base_layer.padding, str):
            path = "weight-centric"  # F.unfold takes no "same"/"valid" padding
        bias = self.base_layer.bias
        if path == "weight-centric":
            if self._closed_form(active):
                a = active[0]
                blocks = self._block_diagonal(a, x.dtype)
                magnitude = self._total_magnitude(active, torch.float32)
                orthogonal = a.rotation.exact
                if a.side == "input":
                    y = block_rotated_linear(x, self.base_layer.weight, blocks, orthogonal)
                elif magnitude is None:
                    # The bias inside, so that the output backward keeps is the layer's own.
                    return output_rotated_linear(x, self.base_layer.weight, blocks, bias, orthogonal)
                else:
                    y = output_rotated_linear(x, self.base_layer.weight, blocks, orthogonal=orthogonal)
                return self._magnitude_and_bias(y, magnitude, bias)
            w = self.transform_weight(self._flat_weight().to(torch.promote_types(x.dtype, torch.float32)), active)
            return self._run_layer(x, w.to(self.base_layer.weight.dtype), bias)

        ins = [a for a in active if a.side == "input"]
        outs = [a for a in active if a.side == "output"]
        magnitude = self._total_magnitude(active, torch.float32)
        if ins and self._unfold_needed():
            y = self._unfolded_conv(x, ins)
        else:
            for a in reversed(ins):  # R_a1 R_a2 x: the last-added acts first
                x = self._rotate_channels(x, a)
            if not outs and magnitude is None:
                return self._run_layer(x, self.base_layer.weight, bias)
            y = self._run_layer(x, self.base_layer.weight, None)
        if len(outs) == 1 and not self.is_conv and outs[0].rotation.applies_as_blocks(outs[0].n_active_factors):
            # The same pass with its gradients written out: backward keeps the rotated output
            # (with the bias inside, the layer's own output) instead of the unrotated one.
            blocks = self._block_diagonal(outs[0], y.dtype)
            orthogonal = outs[0].rotation.exact
            if magnitude is None:
                return rotate_outputs(y, blocks, bias, orthogonal)
            return self._magnitude_and_bias(rotate_outputs(y, blocks, orthogonal=orthogonal), magnitude, bias)
        for a in outs:
            y = self._rotate_channels(y, a)
        return self._magnitude_and_bias(y, magnitude, bias)

    def _magnitude_and_bias(
        self, y: torch.Tensor, magnitude: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """Scale the output channels of ``y`` by ``magnitude`` (``(d_out,)``), then add the bias."""
        if magnitude is not None:
            return scale_shift(y, magnitude, bias, channel_dim=1 if self.is_conv else -1)
        if bias is not None:
            y = y + (bias.view(-1, 1, 1) if self.is_conv else bias)
        return y

    # ----------------------------------------------------------- merge / unmerge
    @torch.no_grad()
    def merge(self) -> None:
        """Fold every active adapter into the base weight (computed in float64)."""
        active = self._active()
        if not active:
            return
        w = self.base_layer.weight
        new = self.transform_weight(self._flat_weight().double(), active)
        w.copy_(new.reshape(w.shape).to(w.dtype))
        self.merged.extend((a.name, a.scale, a.n_active_factors) for a in active)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight by applying the exact inverse of what :meth:`merge` did."""
        if not self.merged:
            return
        active = []
        for name, scale, k in self.merged:
            mag = self.magnitudes[name] if name in self.magnitudes else None
            active.append(_Active(name, self.rotations[name], self.configs[name].side, scale, k, mag))
        w = self.base_layer.weight
        old = self.transform_weight(self._flat_weight().double(), active, inverse=True)
        w.copy_(old.reshape(w.shape).to(w.dtype))
        self.merged = []

    def penalty(self) -> torch.Tensor:
        """Weighted soft-orthogonality penalty of the relaxed (qGOFT) adapters."""
        total = self.base_layer.weight.new_zeros((), dtype=torch.float32)
        for name, rotation in self.rotations.items():
            if not rotation.exact and self.configs[name].method == "qgoft":
                total = total + self.configs[name].qgoft_lambda * rotation.penalty()
        return total

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, compute={self.compute}, merged={[n for n, _, _ in self.merged]}"
