"""A frozen linear layer behind a block-diagonal rotation of its input, with the gradients
written out: the rotated weight in the forward pass, no full weight gradient in backward.

For ``y = x R^T W^T`` (rows ``x``, ``R = diag(B_1 .. B_r)`` acting on column vectors) the
forward pass can use the rotated weight ``W R``, which costs ``d_out d_in b`` multiply-adds
instead of ``N d_in b`` for rotating ``N`` activation rows.  Autograd through ``W R`` would
then need the full weight gradient ``gy^T x`` (``N d_in d_out``, as much as the layer itself);
but with ``G = gy W`` (which the frozen layer computes anyway for its input gradient):

* the input gradient is ``G R``: block ``k`` of each row is ``G_k B_k``;
* the gradient of block ``k`` is ``sum over rows of G_k^T x_k``, a ``(b, b)`` matrix.

Both are one batched product over the blocks, the same work as the backward pass of the
input-centric computation, so training pays for a weight rotation in place of one pass over
the activations (cheaper whenever ``d_out`` is below the number of tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _BlockRotatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        r, b, _ = blocks.shape
        d_out, d_in = weight.shape
        w = weight.to(blocks.dtype).reshape(d_out, r, b).transpose(0, 1)  # (r, d_out, b)
        rotated = torch.bmm(w, blocks).transpose(0, 1).reshape(d_out, d_in)  # W R, block by block
        ctx.save_for_backward(x, weight, blocks)
        return F.linear(x, rotated.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, blocks = ctx.saved_tensors
        r, b, _ = blocks.shape
        g = (grad_out @ weight.to(grad_out.dtype)).to(blocks.dtype)  # G = gy W: (..., d_in)
        g_blocks = g.reshape(-1, r, b).transpose(0, 1)  # (r, N, b), a strided view
        grad_x = grad_blocks = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(g_blocks, blocks).transpose(0, 1).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[2]:
            x_blocks = x.to(blocks.dtype).reshape(-1, r, b).transpose(0, 1)
            grad_blocks = torch.bmm(g_blocks.transpose(1, 2), x_blocks)
        return grad_x, None, grad_blocks


def block_rotated_linear(x: torch.Tensor, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``F.linear(x R^T, weight)`` for ``R = blockdiag(blocks)``, computed as ``x (W R)^T``.

    Args:
        x: ``(..., d_in)`` activations.
        weight: ``(d_out, d_in)`` frozen weight (gets no gradient).
        blocks: ``(d_in / b, b, b)`` rotation blocks ``B_k`` (any, not only orthogonal);
            gradients flow to them and to ``x``.

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
