"""Givens rotations in parallel stages: GOFT, and its relaxed form qGOFT.

Layout (any width ``d``, not only powers of two): stage ``s = 1 .. ceil(log2 d)`` rotates
the disjoint coordinate pairs ``(i, i + 2^(s-1))`` for ``i = 0, 2^s, 2*2^s, ...`` with
``i + 2^(s-1) < d``.  That is a binary reduction tree over the coordinates, ``d - 1`` pairs
in all.  ``R = G_S ... G_2 G_1`` (stage 1 is applied first).

GOFT: each pair carries an angle ``theta`` and the exact 2x2 rotation
``[[cos, -sin], [sin, cos]]``.  qGOFT: each pair's 2x2 block is relaxed to the free matrix
``M = Rot(theta) (I + D)`` with ``D`` a learnable 2x2 matrix (zero at init); strength ``t``
follows the path ``Rot(t theta)(I + t D)`` from the identity.  qGOFT adds the penalty
``sum_i <alpha_i, beta_i>^2`` over the two columns of every ``M_i`` to the loss.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Mode, Rotation, compute_dtype, project_norm


def givens_stages(dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Index pairs ``(first, second)`` of every stage, each a ``(n_pairs_s,)`` long tensor."""
    stages = []
    span = 1
    while span < dim:
        first = torch.arange(0, dim - span, 2 * span)
        stages.append((first, first + span))
        span *= 2
    return stages


class GivensRotation(Rotation):
    """Parallel-stage Givens rotation of width ``dim`` (``dim - 1`` angles).

    Parameters: ``angles`` ``(dim - 1,)``; with ``relaxed`` (qGOFT) also ``relax`` ``(dim - 1, 2, 2)``.

    Args:
        dim: width rotated (at least 2).
        relaxed: qGOFT's free 2x2 blocks instead of exact rotations.
        constraint: bound on each angle's magnitude (COFT-style), or ``None``.
    """

    def __init__(self, dim: int, relaxed: bool = False, constraint: float | None = None) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"Givens rotations need a width of at least 2, got {dim}")
        self.dim, self.relaxed, self.constraint = dim, relaxed, constraint
        self.exact = not relaxed
        stages = givens_stages(dim)
        self.n_stages = len(stages)
        sizes = [len(f) for f, _ in stages]
        self._offsets = [0]
        for n in sizes:
            self._offsets.append(self._offsets[-1] + n)
        for s, (first, second) in enumerate(stages):
            self.register_buffer(f"first_{s}", first, persistent=False)
            self.register_buffer(f"second_{s}", second, persistent=False)
        self.angles = nn.Parameter(torch.zeros(self._offsets[-1]))
        self.relax = nn.Parameter(torch.zeros(self._offsets[-1], 2, 2)) if relaxed else None

    def pair_matrices(self, scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The 2x2 block of every pair, ``(dim - 1, 2, 2)`` in ``dtype`` (default: compute dtype)."""
        dtype = dtype or compute_dtype(self.angles.dtype)
        theta = self.angles.to(dtype)
        if self.constraint is not None:
            theta = project_norm(theta.unsqueeze(-1), self.constraint, dims=(-1,)).squeeze(-1)
        theta = theta * scale
        c, s = torch.cos(theta), torch.sin(theta)
        m = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
        if self.relax is not None:
            eye = torch.eye(2, dtype=dtype, device=theta.device)
            m = m @ (eye + scale * self.relax.to(dtype))
        return m

    def apply(
        self,
        x: torch.Tensor,
        scale: float = 1.0,
        n_active_factors: int | None = None,
        mode: Mode = Mode.FORWARD,
    ) -> torch.Tensor:
        m = mode.orient(self.pair_matrices(scale, compute_dtype(self.angles.dtype, x.dtype)))
        out_dtype = x.dtype
        y = x.to(m.dtype)
        stages = range(self.n_stages)
        for s in reversed(stages) if mode.reverses_factor_order else stages:
            first, second = getattr(self, f"first_{s}"), getattr(self, f"second_{s}")
            ms = m[self._offsets[s] : self._offsets[s + 1]]
            a, b = y.index_select(-1, first), y.index_select(-1, second)
            new_a = ms[:, 0, 0] * a + ms[:, 0, 1] * b
            new_b = ms[:, 1, 0] * a + ms[:, 1, 1] * b
            y = y.index_copy(-1, first, new_a).index_copy(-1, second, new_b)
        return y.to(out_dtype)

    def penalty(self) -> torch.Tensor:
        """``sum_i <alpha_i, beta_i>^2`` over the columns of each pair's block (qGOFT)."""
        if self.relax is None:
            return self.angles.new_zeros(())
        m = self.pair_matrices()
        return ((m[:, :, 0] * m[:, :, 1]).sum(-1) ** 2).sum()

    def passes_per_vector(self) -> int:
        # Each stage gathers both halves and copies them back: about two passes.
        return 2 * self.n_stages * self.dim

    def extra_repr(self) -> str:
        return f"dim={self.dim}, stages={self.n_stages}, relaxed={self.relaxed}, constraint={self.constraint}"
