"""Orthogonal parameterizations: pure tensor maths, no knowledge of diffusers."""

from .base import Mode, Rotation, compute_dtype, project_norm
from .block_linear import block_rotated_linear, output_rotated_linear, rotate_outputs
from .butterfly import ButterflyCayleyRotation, butterfly_error, default_block_size, max_factors, valid_layouts
from .cayley import cayley, cayley_neumann, pack_skew, unpack_skew
from .givens import GivensRotation, givens_stages
from .lowrank import LowRankCayleyRotation
from .scale_shift import scale_shift

__all__ = [
    "Mode",
    "Rotation",
    "ButterflyCayleyRotation",
    "GivensRotation",
    "LowRankCayleyRotation",
    "block_rotated_linear",
    "butterfly_error",
    "cayley",
    "cayley_neumann",
    "compute_dtype",
    "default_block_size",
    "givens_stages",
    "max_factors",
    "output_rotated_linear",
    "pack_skew",
    "project_norm",
    "rotate_outputs",
    "scale_shift",
    "unpack_skew",
    "valid_layouts",
]
