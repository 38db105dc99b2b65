"""Low-rank Cayley rotations: an exact rotation that moves only a learned subspace.

The generator is the skew matrix ``Q = U V^T - V U^T`` of rank at most ``2r`` (``U``, ``V``:
``(dim, r)``), and ``R = (I + Q)(I - Q)^-1``.  ``R`` is the identity on every vector
orthogonal to the columns of ``U`` and ``V``, which is what sets it apart from the
block-diagonal families: those turn every direction of the width a little, where this one
can leave all directions but a few alone, like LoRA's low-rank update, and still preserves
norms and angles.

With ``W = [U, V]`` ``(dim, 2r)`` and ``K = [[0, I], [-I, 0]]``, ``Q = W K W^T`` and, by the
Woodbury identity, ``(I - Q)^-1 = I - W (K + W^T W)^-1 W^T``, so

    ``R = I - 2 W S W^T``,  ``S = (K + W^T W)^-1``  (``2r x 2r``).

``K + W^T W`` is always invertible (``z^T (K + W^T W) z = |W z|^2``, and ``K`` is), so no
``dim x dim`` matrix is ever formed: rotating a vector costs two thin products.  ``V = 0``
at initialisation (``U`` random, as LoRA's ``A``) gives ``S``'s top-left block ``0`` and
``R = I`` exactly.  Strength ``t`` scales the generator (``U, t V``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Mode, Rotation, compute_dtype


def low_rank_cayley_core(w: torch.Tensor) -> torch.Tensor:
    """``S = (K + W^T W)^-1`` for ``W = [U, V]`` of shape ``(dim, 2r)``; returns ``(2r, 2r)``."""
    r2 = w.shape[-1]
    r = r2 // 2
    k = w.new_zeros(r2, r2)
    eye = torch.eye(r, dtype=w.dtype, device=w.device)
    k[:r, r:] = eye
    k[r:, :r] = -eye
    return torch.linalg.inv(k + w.transpose(-1, -2) @ w)


class LowRankCayleyRotation(Rotation):
    """Cayley rotation of a rank-``2r`` skew generator, width ``dim``.

    Parameters: ``u`` and ``v``, both ``(dim, rank)``; ``v`` starts at zero.

    Args:
        dim: width rotated.
        rank: ``r``; the rotation moves a subspace of dimension at most ``2r``.
    """

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        if rank < 1 or 2 * rank > dim:
            raise ValueError(f"rank must be between 1 and width/2 = {dim // 2}, got {rank}")
        self.dim, self.rank = dim, rank
        # LoRA's scale for its random factor; V = 0 makes the start exactly the identity.
        self.u = nn.Parameter(torch.empty(dim, rank).uniform_(-1, 1) / math.sqrt(dim))
        self.v = nn.Parameter(torch.zeros(dim, rank))

    def factors(self, scale: float = 1.0, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``W = [U, t V]`` ``(dim, 2r)`` and ``S`` ``(2r, 2r)`` with ``R = I - 2 W S W^T``."""
        dtype = dtype or compute_dtype(self.u.dtype)
        w = torch.cat([self.u.to(dtype), scale * self.v.to(dtype)], dim=1)
        return w, low_rank_cayley_core(w)

    def apply(
        self,
        x: torch.Tensor,
        scale: float = 1.0,
        n_active_factors: int | None = None,
        mode: Mode = Mode.FORWARD,
    ) -> torch.Tensor:
        w, s = self.factors(scale, compute_dtype(self.u.dtype, x.dtype))
        # R^-1 = R^T exactly (Q is skew), so the four modes are R or R^T.  Rows: x R^T uses
        # S^T, x R uses S.
        if mode.transposed == mode.inverted:
            s = s.transpose(0, 1)
        y = x.to(w.dtype)
        y = y - 2 * ((y @ w) @ s) @ w.transpose(0, 1)
        return y.to(x.dtype)

    def passes_per_vector(self) -> int:
        # Two thin products that read the vector and write it once: about two passes.
        return 2 * self.dim

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}"
