"""Per-channel magnitude and bias, ``out = y * m + b``, that keeps its output for backward.

The gradient of the magnitude ``m`` needs the unscaled ``y``.  Plain autograd keeps ``y``
alive for it: one more tensor the size of the layer's output, which is what made a scaled
adapter (peft BOFT's ``boft_s``) need about 1.7x the training memory of an unscaled one.
Here the function keeps its *output* instead and recovers ``y = (out - b) / m`` in backward.
The next operation usually keeps that output anyway (attention keeps q, k and v; a loss keeps
its input), so the two share one tensor.  When some magnitude is too close to zero for the
division to be accurate, it falls back to keeping ``y``.
"""

from __future__ import annotations

import torch

#: Below this, ``(out - b) / m`` would amplify the rounding of ``out`` too much.
_MIN_INVERTIBLE = 1e-3


def _channel_view(t: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[channel_dim] = -1
    return t.view(shape)


def _values(y: torch.Tensor, magnitude: torch.Tensor, bias: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    out = (y * _channel_view(magnitude, y.dim(), channel_dim)).to(y.dtype)
    if bias is not None:
        out = out + _channel_view(bias, y.dim(), channel_dim)
    return out


class _ScaleShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, magnitude, bias, channel_dim: int):
        out = _values(y, magnitude, bias, channel_dim)
        ctx.channel_dim = channel_dim
        # Only the magnitude's gradient reads y back; the check costs a host sync on a GPU.
        ctx.keeps_output = not ctx.needs_input_grad[1] or bool((magnitude.detach().abs() >= _MIN_INVERTIBLE).all())
        ctx.save_for_backward(out if ctx.keeps_output else y, magnitude, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        kept, magnitude, bias = ctx.saved_tensors
        dim, ndim = ctx.channel_dim, grad_out.dim()
        m = _channel_view(magnitude, ndim, dim)
        reduce = [d for d in range(ndim) if d != dim]
        grad_y = grad_m = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_y = (grad_out * m).to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            if ctx.keeps_output:
                y = kept.to(m.dtype)
                if bias is not None:
                    y = y - _channel_view(bias, ndim, dim).to(m.dtype)
                y = y / m
            else:
                y = kept
            grad_m = (grad_out * y).sum(reduce).to(magnitude.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(reduce).to(bias.dtype)
        return grad_y, grad_m, grad_b, None


def scale_shift(
    y: torch.Tensor, magnitude: torch.Tensor, bias: torch.Tensor | None, channel_dim: int = -1
) -> torch.Tensor:
    """``y * magnitude + bias`` along ``channel_dim``, without keeping ``y`` for backward.

    Args:
        y: any shape with ``C`` channels at ``channel_dim`` (``(..., C)`` for a Linear output,
            ``(N, C, H, W)`` for a conv, ``channel_dim=1``).
        magnitude: ``(C,)`` per-channel factors; the product is cast back to ``y.dtype``.
        bias: ``(C,)`` or ``None``, added after the scaling.
        channel_dim: which dimension of ``y`` holds the channels.

    Returns:
        a tensor shaped like ``y``.  Modifying it in place before backward is an error (it is
        what backward reads).
    """
    channel_dim = channel_dim % y.dim()
    if magnitude.shape != (y.shape[channel_dim],) or (bias is not None and bias.shape != magnitude.shape):
        raise ValueError(
            f"magnitude {tuple(magnitude.shape)} and bias {None if bias is None else tuple(bias.shape)} "
            f"must both be ({y.shape[channel_dim]},) for channels at dim {channel_dim} of {tuple(y.shape)}"
        )
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (y, magnitude, bias)):
        # Inference (the live slider path): no graph, nothing to keep, no check to sync on.
        return _values(y, magnitude, bias, channel_dim)
    return _ScaleShift.apply(y, magnitude, bias, channel_dim)
