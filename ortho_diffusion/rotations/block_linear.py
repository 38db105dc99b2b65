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
  and ``r`` small ``(b, b)`` solves (``B_k^{-T} = B_k`` for an exact rotation; the Neumann
  series is only close to one, so the solve keeps the gradient exact).

So a training step costs the frozen layer's two products plus a single pass over the
activations, against three passes for rotating them (the input-centric path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rotated_weight(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``W R`` block by block: ``(d_out, d_in)`` in ``blocks.dtype``."""
    r, b, _ = blocks.shape
    d_out, d_in = weight.shape
    w = weight.to(blocks.dtype).reshape(d_out, r, b).transpose(0, 1)  # (r, d_out, b)
    return torch.bmm(w, blocks).transpose(0, 1).reshape(d_out, d_in)


class _BlockRotatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        # W' is rebuilt in backward rather than saved: at the widest layers it is larger than
        # the activations, and rebuilding costs d_out*d_in*b, a few percent of the layer.
        ctx.save_for_backward(x, weight, blocks)
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
            grad_blocks = torch.linalg.solve(blocks.transpose(1, 2), m)
        grad_x = gx.reshape(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, grad_blocks


def block_rotated_linear(x: torch.Tensor, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``F.linear(x R^T, weight)`` for ``R = blockdiag(blocks)``, computed as ``x (W R)^T``.

    Args:
        x: ``(..., d_in)`` activations.
        weight: ``(d_out, d_in)`` frozen weight (gets no gradient).
        blocks: ``(d_in / b, b, b)`` rotation blocks ``B_k`` (any invertible matrices, not
            only orthogonal ones); gradients flow to them and to ``x``.

    Returns:
        ``(..., d_out)``, without bias.
    """
    r, b, b2 = blocks.shape
    if b != b2 or r * b != weight.shape[1] or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"blocks {tuple(blocks.shape)} do not tile the input width {weight.shape[1]} of weight "
            f"{tuple(weight.shape)} (x: {tuple(x.shape)})"
        )
    return _BlockRotatedLinear.apply(x, weight, blocks)
