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


def _series_max_factors(block_size: int) -> int:
    """Most factors the product series may take for ``block_size`` blocks.  Forward plus
    backward on the CPU (1 and 2 threads), it beats the batched inverse up to about 4 factors
    for ``b = 8``, 6 for 16 and 8 to 10 for 32 and 64."""
    return min(8, 2 + block_size // 4)


def _inverse_by_series(q: torch.Tensor, eye: torch.Tensor) -> torch.Tensor | None:
    """``(I - Q)^-1`` of skew ``(n, b, b)`` blocks as ``(I + Q)(I + Q^2)(I + Q^4)...``, or
    ``None`` when that needs more than :func:`_series_max_factors` factors.  ``eye``: the
    ``(b, b)`` identity in ``q``'s dtype and device.

    ``k`` factors leave ``Q^(2^k) (I - Q)^-1``, and ``||(I - Q)^-1||_2 <= 1`` for skew ``Q``
    (the singular values of ``I - Q`` are ``sqrt(1 + s^2)``), so the error is at most the
    Frobenius norm of the next power ``Q^(2^k)``: the series stops when that falls below
    machine epsilon.  On the CPU a batched inverse of small blocks goes matrix by matrix
    through LAPACK (0.7 ms for 40 blocks of 32), where one batched product of them costs
    0.03 ms.
    """
    eps = torch.finfo(q.dtype).eps
    product = q + eye
    power = q
    size = float(q.square().sum((-2, -1)).max())
    for _ in range(_series_max_factors(q.shape[-1])):
        power = torch.bmm(power, power)
        previous, size = size, float(power.square().sum((-2, -1)).max())
        if size <= eps * eps:
            return product
        if size >= previous:
            # With every singular value below 1 the powers shrink at each squaring; they do
            # not, so ||Q||_2 >= 1 and the series diverges.
            return None
        product = torch.baddbmm(product, product, power)  # P (I + Q^(2^i))
    return None


class _Cayley(torch.autograd.Function):
    """``R = 2 (I - Q)^-1 - I`` with backward ``dQ = 2 A^-T G A^-T`` from the kept ``A^-1``."""

    @staticmethod
    def forward(ctx, q: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
        inverse = _inverse_by_series(q, eye) if q.device.type == "cpu" and q.numel() else None
        if inverse is None:
            inverse = torch.linalg.inv(eye - q)
        ctx.save_for_backward(inverse)
        return 2 * inverse - eye

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        it = inverse.transpose(1, 2)
        return 2 * torch.bmm(torch.bmm(it, grad), it)


def cayley(q: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform of skew ``Q`` of shape ``(..., b, b)``: ``(I + Q)(I - Q)^-1``.

    ``I - Q`` is always invertible for skew ``Q`` (its eigenvalues are ``1 - i*lambda``).
    Since ``I + Q = 2I - (I - Q)``, the product is ``2 (I - Q)^-1 - I``.  The inverse is a
    product series on the CPU when ``Q`` is small enough (exact to the dtype's precision: see
    :func:`_inverse_by_series`), a batched inverse otherwise.
    """
    b = q.shape[-1]
    return _Cayley.apply(q.reshape(-1, b, b)).reshape(q.shape)


def _horner_iterates(q: torch.Tensor, terms: int) -> list[torch.Tensor]:
    """``[S_0 = I, S_1, ..., S_k]`` with ``S_m = I + Q S_(m-1)`` for ``(n, b, b)`` blocks."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    iterates = [eye.expand_as(q)]
    for _ in range(terms):
        iterates.append(torch.baddbmm(eye, q, iterates[-1]))
    return iterates


class _CayleyNeumann(torch.autograd.Function):
    """``R = (I + Q) S`` with ``S = I + Q + ... + Q^k`` on ``(n, b, b)`` blocks, by Horner
    (``S_m = I + Q S_(m-1)``), with the backward written out: it walks the iterates back, two
    small products per term (for 40 blocks of 32, 2-4x faster than a block-matrix adjoint that
    keeps only ``S``; about even for blocks of 8).
    The blocks are so small that the number of operations, not their arithmetic, sets the
    cost, so backward recomputes the iterates (``k`` products) instead of keeping them: kept
    (``k n b^2`` numbers per layer), they took OFTv2's training memory in the layer benchmark
    at width 1280 from 1.03x to 1.20x LoRA's.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, terms: int) -> torch.Tensor:
        ctx.save_for_backward(q)
        ctx.terms = terms
        series = _horner_iterates(q, terms)[-1]
        return torch.baddbmm(series, q, series)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (q,) = ctx.saved_tensors
        if ctx.terms == 0:  # R = I + Q
            return grad, None
        iterates = _horner_iterates(q, ctx.terms)
        qt = q.transpose(1, 2)
        # R = (I + Q) S_k: dQ gets G S_k^T, and S_k gets (I + Q)^T G.
        grad_q = torch.bmm(grad, iterates[-1].transpose(1, 2))
        grad_s = torch.baddbmm(grad, qt, grad)
        for previous in reversed(iterates[1:-1]):  # S_m = I + Q S_(m-1), m = k .. 2
            grad_q = torch.baddbmm(grad_q, grad_s, previous.transpose(1, 2))
            grad_s = torch.bmm(qt, grad_s)
        return grad_q + grad_s, None  # m = 1: S_0 = I


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """Cayley transform with ``(I - Q)^-1`` replaced by ``I + Q + ... + Q^terms``.

    ``q``: ``(..., b, b)``.  Needs no inverse (OFTv2); accurate while ``||Q||_2 < 1``,
    with an error of order ``||Q||^(terms+1)``; callers keep ``Q`` in that range.
    """
    b = q.shape[-1]
    return _CayleyNeumann.apply(q.reshape(-1, b, b), terms).reshape(q.shape)
