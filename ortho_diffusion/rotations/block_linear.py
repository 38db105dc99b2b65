"""A frozen linear layer behind a block-diagonal rotation of its input, with the gradients
written out: the rotated weight in both passes, no full weight gradient and no extra pass over
the activations beyond one.

For ``y = x R^T W^T`` (rows ``x``, ``R = diag(B_1 .. B_r)`` acting on column vectors) the
forward pass uses the rotated weight ``W' = W R``, which costs ``d_out d_in b`` multiply-adds
instead of ``N d_in b`` for rotating ``N`` activation rows.  Autograd through ``W R`` would
then need the full weight gradient ``gy^T x`` (``N d_in d_out``, as much as the layer itself).
Instead, with ``G = gy W``:

* the input gradient is ``gx = G R = gy W'``: one matrix product, the same as the frozen
  layer's own input gradient;
* the gradient of block ``k`` is ``G_k^T x_k`` (summed over rows), and since
  ``gx_k = G_k B_k`` that is ``B_k^{-T} (gx_k^T x_k)``: one batched product over the blocks
  and ``r`` small ``(b, b)`` solves; for an exact rotation ``B_k^{-T} = B_k``, so callers that
  know their blocks are orthogonal pass ``orthogonal=True`` and get one more batched product
  instead (the Neumann series is only close to orthogonal: it keeps the solve).

So a training step costs the frozen layer's two products plus a single pass over the
activations, against three passes for rotating them (the input-centric path).

The output side, ``out = x W^T R^T + c`` (bias ``c`` added after the rotation), works the same
way with ``W'' = R W``: ``gx = gy W''``, and block ``k``'s gradient ``gy_k^T z_k`` (``z = x
W^T``, the unrotated output) equals ``(gy_k^T y_k) B_k^{-T}`` with ``y = out - c``.  So backward
needs the layer's own output, not ``z``: the next operation usually keeps that output anyway
(attention keeps q, k and v), where rotating the outputs directly would keep ``z`` as well.
:func:`rotate_outputs` does the same when the rotation is applied to ``z`` itself (cheaper
than rebuilding ``R W`` twice when there are fewer tokens than output channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def apply_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Rows ``x`` ``(..., dim)`` times ``blockdiag(blocks)^T`` for contiguous ``blocks``
    ``(dim / B, B, B)``: each ``B``-slice ``v`` of a row becomes ``block v``.  Computed in
    ``blocks.dtype``, returned in ``x.dtype``."""
    r, size, _ = blocks.shape
    rows = x.to(blocks.dtype).reshape(-1, r, size).transpose(0, 1)  # (r, n, B), a strided view
    return torch.bmm(rows, blocks.transpose(1, 2)).transpose(0, 1).reshape(x.shape).to(x.dtype)


def _rotated_weight(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``W R`` block by block: ``(d_out, d_in)`` in ``blocks.dtype``."""
    r, b, _ = blocks.shape
    d_out, d_in = weight.shape
    w = weight.to(blocks.dtype).reshape(d_out, r, b).transpose(0, 1)  # (r, d_out, b)
    return torch.bmm(w, blocks).transpose(0, 1).reshape(d_out, d_in)


def _times_inverse_transpose(blocks: torch.Tensor, m: torch.Tensor, orthogonal: bool) -> torch.Tensor:
    """``B_k^{-T} m_k`` for ``(r, b, b)`` blocks: a product when ``B^{-T} = B``.  A batched
    solve of small blocks goes matrix by matrix through LAPACK on the CPU: about 0.35 ms a
    call even for two blocks of 32, a fifth of a whole training step of the layer
    benchmark's attention block at width 64."""
    if orthogonal:
        return torch.bmm(blocks, m)
    return torch.linalg.solve(blocks.transpose(1, 2), m)


class _BlockRotatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, blocks: torch.Tensor, orthogonal: bool) -> torch.Tensor:
        # W' is rebuilt in backward rather than saved: at the widest layers it is larger than
        # the activations, and rebuilding costs d_out*d_in*b, a few percent of the layer.
        ctx.save_for_backward(x, weight, blocks)
        ctx.orthogonal = orthogonal
        return F.linear(x, _rotated_weight(weight, blocks).to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, blocks = ctx.saved_tensors
        r, b, _ = blocks.shape
        rotated = _rotated_weight(weight, blocks)
        gx = grad_out.to(blocks.dtype) @ rotated  # (..., d_in) = G R
        grad_blocks = None
        if ctx.needs_input_grad[2]:
            gx_blocks = gx.reshape(-1, r, b).transpose(0, 1)  # (r, N, b), a strided view
            x_blocks = x.to(blocks.dtype).reshape(-1, r, b).transpose(0, 1)
            m = torch.bmm(gx_blocks.transpose(1, 2), x_blocks)  # (r, b, b): gx_k^T x_k
            grad_blocks = _times_inverse_transpose(blocks, m, ctx.orthogonal)
        grad_x = gx.reshape(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, grad_blocks, None


def block_rotated_linear(
    x: torch.Tensor, weight: torch.Tensor, blocks: torch.Tensor, orthogonal: bool = False
) -> torch.Tensor:
    """``F.linear(x R^T, weight)`` for ``R = blockdiag(blocks)``, computed as ``x (W R)^T``.

    Args:
        x: ``(..., d_in)`` activations.
        weight: ``(d_out, d_in)`` frozen weight (gets no gradient).
        blocks: ``(d_in / b, b, b)`` rotation blocks ``B_k`` (any invertible matrices, not
            only orthogonal ones); gradients flow to them and to ``x``.
        orthogonal: the blocks are orthogonal to rounding (exact Cayley, BOFT products):
            their gradient then needs no solve.

    Returns:
        ``(..., d_out)``, without bias.
    """
    r, b, b2 = blocks.shape
    if b != b2 or r * b != weight.shape[1] or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"blocks {tuple(blocks.shape)} do not tile the input width {weight.shape[1]} of weight "
            f"{tuple(weight.shape)} (x: {tuple(x.shape)})"
        )
    return _BlockRotatedLinear.apply(x, weight, blocks, orthogonal)


def _grad_output_blocks(
    grad_out: torch.Tensor, y: torch.Tensor, blocks: torch.Tensor, orthogonal: bool
) -> torch.Tensor:
    """Gradient of the blocks of ``out = z R^T (+ c)`` from ``y = out - c``: ``(gy_k^T y_k) B_k^-T``,
    ``(r, b, b)``, exact for any invertible blocks (the Neumann series too)."""
    r, b, _ = blocks.shape
    g_blocks = grad_out.to(blocks.dtype).reshape(-1, r, b).transpose(0, 1)  # (r, N, b)
    y_blocks = y.to(blocks.dtype).reshape(-1, r, b).transpose(0, 1)
    m = torch.bmm(g_blocks.transpose(1, 2), y_blocks)  # (r, b, b): gy_k^T y_k
    return _times_inverse_transpose(blocks.transpose(1, 2), m.transpose(1, 2), orthogonal).transpose(1, 2)


def _grad_bias(grad_out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(bias.dtype)


def _row_rotated_weight(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``R W`` block by block (blocks of output rows): ``(d_out, d_in)`` in ``blocks.dtype``."""
    r, b, _ = blocks.shape
    d_out, d_in = weight.shape
    return torch.bmm(blocks, weight.to(blocks.dtype).reshape(r, b, d_in)).reshape(d_out, d_in)


class _OutputRotatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None,
                orthogonal: bool):
        out = F.linear(x, _row_rotated_weight(weight, blocks).to(x.dtype), None if bias is None else bias.to(x.dtype))
        # The output, not the unrotated z: see the module docstring.
        ctx.save_for_backward(out, weight, blocks, bias)
        ctx.orthogonal = orthogonal
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        out, weight, blocks, bias = ctx.saved_tensors
        grad_x = grad_blocks = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out.to(blocks.dtype) @ _row_rotated_weight(weight, blocks)).to(out.dtype)
        if ctx.needs_input_grad[2]:
            y = out if bias is None else out - bias.to(out.dtype)
            grad_blocks = _grad_output_blocks(grad_out, y, blocks, ctx.orthogonal)
        if bias is not None and ctx.needs_input_grad[3]:
            grad_bias = _grad_bias(grad_out, bias)
        return grad_x, None, grad_blocks, grad_bias, None


def output_rotated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    blocks: torch.Tensor,
    bias: torch.Tensor | None = None,
    orthogonal: bool = False,
) -> torch.Tensor:
    """``F.linear(x, weight) R^T + bias`` for ``R = blockdiag(blocks)`` acting on the outputs,
    computed as ``x (R W)^T + bias``; backward keeps the output instead of ``x W^T``.

    Args:
        x: ``(..., d_in)`` activations.
        weight: ``(d_out, d_in)`` frozen weight (gets no gradient).
        blocks: ``(d_out / b, b, b)`` rotation blocks ``B_k`` (any invertible matrices);
            gradients flow to them and to ``x``.
        bias: ``(d_out,)``, added after the rotation, or ``None``.
        orthogonal: the blocks are orthogonal to rounding: their gradient then needs no solve.

    Returns:
        ``(..., d_out)``. Modifying it in place before backward is an error (autograd's
        version check), since backward reads it.
    """
    r, b, b2 = blocks.shape
    if b != b2 or r * b != weight.shape[0] or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"blocks {tuple(blocks.shape)} do not tile the output width {weight.shape[0]} of weight "
            f"{tuple(weight.shape)} (x: {tuple(x.shape)})"
        )
    return _OutputRotatedLinear.apply(x, weight, blocks, bias, orthogonal)


class _RotateOutputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None, orthogonal: bool):
        out = apply_blocks(z, blocks)
        if bias is not None:
            out.add_(bias.to(out.dtype))  # out is a fresh tensor here
        ctx.save_for_backward(out, blocks, bias)
        ctx.orthogonal = orthogonal
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        out, blocks, bias = ctx.saved_tensors
        grad_z = grad_blocks = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_z = apply_blocks(grad_out, blocks.transpose(1, 2)).to(out.dtype)  # gy R
        if ctx.needs_input_grad[1]:
            y = out if bias is None else out - bias.to(out.dtype)
            grad_blocks = _grad_output_blocks(grad_out, y, blocks, ctx.orthogonal)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = _grad_bias(grad_out, bias)
        return grad_z, grad_blocks, grad_bias, None


def rotate_outputs(
    z: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None = None, orthogonal: bool = False
) -> torch.Tensor:
    """``z R^T + bias`` for ``R = blockdiag(blocks)``; backward keeps the result, not ``z``.

    Args:
        z: ``(..., d)`` layer outputs before the rotation.
        blocks: ``(d / b, b, b)`` rotation blocks (any invertible matrices); gradients flow to
            them and to ``z``.
        bias: ``(d,)`` or ``None``.
        orthogonal: the blocks are orthogonal to rounding: their gradient then needs no solve.

    Returns:
        ``(..., d)``. Modifying it in place before backward is an error (autograd's version
        check), since backward reads it.
    """
    r, b, b2 = blocks.shape
    if b != b2 or r * b != z.shape[-1]:
        raise ValueError(f"blocks {tuple(blocks.shape)} do not tile the width {z.shape[-1]} of {tuple(z.shape)}")
    return _RotateOutputs.apply(z, blocks, bias, orthogonal)
