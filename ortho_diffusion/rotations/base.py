"""The interface every rotation family implements, and small helpers they share.

Convention used everywhere in the project: a rotation ``R`` acts on column vectors, and
``rotation(x)`` for a batch of row vectors ``x`` of shape ``(..., dim)`` returns the rows
``(R x_i)``, i.e. ``x @ R.T``.  ``R`` is a product of factors ``F_0 F_1 ... F_{m-1}``; the
last factor is applied first.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn


class Mode(str, Enum):
    """Which of ``R``, ``R^T``, ``R^-1``, ``R^-T`` to apply."""

    FORWARD = "forward"
    TRANSPOSE = "transpose"
    INVERSE = "inverse"
    INVERSE_TRANSPOSE = "inverse_transpose"

    @property
    def transposed(self) -> bool:
        return self in (Mode.TRANSPOSE, Mode.INVERSE_TRANSPOSE)

    @property
    def inverted(self) -> bool:
        return self in (Mode.INVERSE, Mode.INVERSE_TRANSPOSE)

    @property
    def reverses_factor_order(self) -> bool:
        # (F_0 ... F_{m-1})^T and (F_0 ... F_{m-1})^-1 both start with F_0.
        return self.transposed != self.inverted

    def orient(self, blocks: torch.Tensor) -> torch.Tensor:
        """Turn a batch of small factor blocks ``(..., k, k)`` into what this mode applies."""
        if self.inverted:
            blocks = torch.linalg.inv(blocks)
        return blocks.transpose(-1, -2) if self.transposed else blocks


def compute_dtype(param_dtype: torch.dtype, x_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """Rotation maths runs in float32 at least (float64 when parameters or inputs are float64)."""
    return torch.promote_types(torch.promote_types(param_dtype, x_dtype), torch.float32)


def project_norm(v: torch.Tensor, bound: float, dims: tuple[int, ...]) -> torch.Tensor:
    """Scale ``v`` so that its Frobenius norm over ``dims`` is at most ``bound``.

    The projection is differentiable and leaves tensors inside the ball unchanged, so it can
    run in every forward pass instead of as a separate step after the optimizer.
    """
    norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    factor = torch.clamp(bound / norm.clamp_min(torch.finfo(v.dtype).tiny), max=1.0)
    return v * factor


class Rotation(nn.Module):
    """An orthogonal (or, for qGOFT, near-orthogonal) linear map on vectors of size ``dim``.

    Subclasses implement :meth:`apply`.  ``scale`` is the strength ``t``: the map generated
    by ``t`` times the trained generator (``t = 0`` is exactly the identity).
    ``n_active_factors`` keeps only the first ``k`` factors ``F_0 .. F_{k-1}`` (BOFT's
    factor-by-factor interpolation); ``None`` keeps all.
    """

    dim: int
    n_factors: int = 1
    #: True when the map is orthogonal up to rounding for any parameter value.
    exact: bool = True

    def apply(
        self,
        x: torch.Tensor,
        scale: float = 1.0,
        n_active_factors: int | None = None,
        mode: Mode = Mode.FORWARD,
    ) -> torch.Tensor:
        """Rotate rows: ``x`` of shape ``(..., dim)`` to ``(..., dim)`` in ``x``'s dtype."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Shorthand for :meth:`apply` in :attr:`Mode.FORWARD`."""
        return self.apply(x, scale)

    def matrix(
        self, scale: float = 1.0, n_active_factors: int | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The dense ``(dim, dim)`` matrix ``R`` (for tests, exports and small layers only)."""
        p = next(self.parameters())
        eye = torch.eye(self.dim, dtype=dtype or compute_dtype(p.dtype), device=p.device)
        # Rows of apply(I, transpose) are R^T e_i, i.e. the rows of R.
        return self.apply(eye, scale, n_active_factors, Mode.TRANSPOSE)

    @property
    def is_block_diagonal(self) -> bool:
        """True when the map is one block-diagonal matrix (see :meth:`block_diagonal`)."""
        return False

    def block_diagonal(
        self, scale: float = 1.0, dtype: torch.dtype | None = None, n_active_factors: int | None = None
    ) -> torch.Tensor:
        """``(dim / B, B, B)``: the ``B x B`` blocks along the diagonal of the map, for layers
        that compute with them directly (closed-form gradients); only when
        :attr:`is_block_diagonal`."""
        raise NotImplementedError(f"{type(self).__name__} is not block-diagonal")

    def applies_as_blocks(self, n_active_factors: int | None = None) -> bool:
        """True when :meth:`apply` is a single pass with :meth:`block_diagonal`'s blocks, so a
        layer may run that pass itself (with gradients written out) at the same cost."""
        return False

    def penalty(self) -> torch.Tensor:
        """Soft-orthogonality penalty added to the training loss (zero for exact families)."""
        p = next(self.parameters())
        return p.new_zeros(())

    def passes_per_vector(self) -> int:
        """Elements read and written to rotate one vector: ``dim`` times the number of
        factors or stages (drives the ``compute="auto"`` choice).

        Rotations are memory-bound here: a pass costs about the same whatever the block
        size (measured from b = 8 to 32), so this, not a multiply-add count, predicts time."""
        raise NotImplementedError

    def n_parameters(self) -> int:
        """Number of trainable numbers in this rotation."""
        return sum(p.numel() for p in self.parameters())
