"""``AdapterConfig``: what to attach, where, and how to compute it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .rotations import ButterflyCayleyRotation, GivensRotation, LowRankCayleyRotation, Rotation, default_block_size

METHODS = ("oft", "oftv2", "boft", "goft", "qgoft", "lroft")
#: ``rank`` of ``lroft`` when not given.
DEFAULT_RANK = 4
SIDES = ("input", "output")
COMPUTES = ("auto", "input-centric", "weight-centric")
BUTTERFLY_ORDERS = ("ascending", "descending")


@dataclass
class AdapterConfig:
    """Hyperparameters of one orthogonal adapter.

    Attributes:
        method: ``"oft"`` (block-diagonal, exact Cayley), ``"oftv2"`` (Cayley-Neumann),
            ``"boft"`` (butterfly product), ``"goft"`` (Givens), ``"qgoft"`` (relaxed Givens),
            ``"lroft"`` (Cayley of a rank-``2r`` generator: moves only a learned subspace).
        block_size: block size ``b`` of the block families; exclusive with ``n_blocks``.
            When both are ``None``, each layer takes the largest valid ``b <= 32``.
        n_blocks: number of blocks ``r`` per layer (``b = width / r``).
        n_factors: BOFT butterfly factors (``1`` is OFT).
        neumann_terms: highest power kept in OFTv2's Cayley-Neumann series.
        side: ``"input"`` rotates the input side of each neuron, ``W' = W R`` (OFT paper,
            peft); ``"output"`` rotates output rows, ``W' = R W`` (LyCORIS, kohya).
        compute: ``"input-centric"`` rotates activations, ``"weight-centric"`` rotates the
            weight, ``"auto"`` picks the cheaper per call.
        constraint: COFT bound on the norm of each block generator (angle for Givens).
        rescale: learnable per-output magnitude, starting at 1.
        block_share: one block shared by all blocks of a layer.
        targets: a preset name (see :data:`ortho_diffusion.inject.PRESETS`) or a list of
            module-name patterns (suffixes of dotted names, or ``"re:<regex>"``).
        qgoft_lambda: weight of qGOFT's soft-orthogonality penalty.
        rank: ``r`` of ``lroft`` (default 4; it rotates a subspace of dimension ``2r``).
        butterfly_order: ``"ascending"`` (factor ``k`` of ``R = F_0 ... F_{m-1}`` pairs
            half-blocks ``2^k`` apart: peft's order) or ``"descending"`` (``2^(m-1-k)``:
            the block-diagonal factor acts first, LyCORIS' order; set by LyCORIS imports).
    """

    method: str = "oft"
    block_size: int | None = None
    n_blocks: int | None = None
    n_factors: int = 1
    neumann_terms: int = 5
    side: str = "input"
    compute: str = "auto"
    constraint: float | None = None
    rescale: bool = False
    block_share: bool = False
    targets: str | list[str] = "unet-attn"
    qgoft_lambda: float = 1e-2
    butterfly_order: str = "ascending"
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {self.side!r}")
        if self.compute not in COMPUTES:
            raise ValueError(f"compute must be one of {COMPUTES}, got {self.compute!r}")
        if self.block_size is not None and self.n_blocks is not None:
            raise ValueError("give block_size or n_blocks, not both")
        if self.n_factors < 1:
            raise ValueError(f"n_factors must be at least 1, got {self.n_factors}")
        if self.method != "boft" and self.n_factors != 1:
            raise ValueError(f"n_factors={self.n_factors} only applies to method 'boft'")
        if self.constraint is not None and self.constraint <= 0:
            raise ValueError(f"constraint must be positive, got {self.constraint}")
        if self.method in ("goft", "qgoft") and (self.block_size or self.n_blocks or self.block_share):
            raise ValueError(f"{self.method} rotates the whole width: block_size, n_blocks, block_share do not apply")
        if self.method == "lroft":
            if self.block_size or self.n_blocks or self.block_share or self.constraint is not None:
                raise ValueError("lroft has a rank, not blocks or a constraint: block_size, n_blocks, block_share, constraint do not apply")
            if self.rank is None:
                self.rank = DEFAULT_RANK
            if self.rank < 1:
                raise ValueError(f"rank must be at least 1, got {self.rank}")
        elif self.rank is not None:
            raise ValueError(f"rank only applies to method 'lroft', not {self.method!r}")
        if self.butterfly_order not in BUTTERFLY_ORDERS:
            raise ValueError(f"butterfly_order must be one of {BUTTERFLY_ORDERS}, got {self.butterfly_order!r}")
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (stored in adapter files)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown adapter config fields: {sorted(unknown)}")
        return cls(**data)

    def build_rotation(self, dim: int) -> Rotation:
        """The rotation of this method for a width ``dim``."""
        if self.method == "lroft":
            return LowRankCayleyRotation(dim, self.rank)
        if self.method in ("goft", "qgoft"):
            return GivensRotation(dim, relaxed=self.method == "qgoft", constraint=self.constraint)
        n_factors = self.n_factors
        if self.n_blocks is not None:
            if dim % self.n_blocks:
                raise ValueError(f"width {dim} is not divisible by n_blocks={self.n_blocks}")
            block_size = dim // self.n_blocks
        elif self.block_size is not None:
            block_size = self.block_size
        else:
            block_size = default_block_size(dim, n_factors)
        return ButterflyCayleyRotation(
            dim,
            block_size,
            n_factors=n_factors,
            neumann_terms=self.neumann_terms if self.method == "oftv2" else None,
            constraint=self.constraint,
            block_share=self.block_share,
            descending=self.butterfly_order == "descending",
        )
