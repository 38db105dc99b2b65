"""Block-diagonal Cayley rotations and their butterfly products: OFT, OFTv2 and BOFT.

One family covers the three methods:

* ``oft``: one factor, exact Cayley blocks.
* ``oftv2``: one factor, Cayley-Neumann blocks (no matrix inverse).
* ``boft``: ``m`` factors ``R = F_0 F_1 ... F_{m-1}``; factor ``k`` is a block-diagonal
  rotation conjugated by the butterfly permutation of stride ``2^k`` half-blocks.

Butterfly layout of factor ``k`` (block size ``b``, half block ``h = b/2``): the width is cut
into chunks of ``c = b 2^k`` coordinates, each chunk into ``2^(k+1)`` pieces of ``h``; block
``j`` of a chunk holds piece ``j`` and piece ``j + 2^k``.  Factor 0 is plain block-diagonal
(OFT), and ``1 + log2(dim / b)`` factors give a dense rotation.  The permutations are done
with reshapes, never with dense permutation matrices.
"""

from __future__ import annotations


import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import Mode, Rotation, compute_dtype, project_norm
from .block_linear import apply_blocks
from .cayley import cayley, cayley_neumann, n_packed, unpack_skew

#: Guard of the Cayley-Neumann series: each block's generator is scaled down to this
#: Frobenius norm (an upper bound of its spectral norm) before the series is summed.
#: The series then converges, and its orthogonality error is at most
#: rho^(k+1) (1 + rho) / (1 - rho) (about 5% for rho = 0.5, k = 5; far less for the small
#: generators of real training, e.g. 2e-6 at rho = 0.1).
NEUMANN_MAX_NORM = 0.5


#: Largest product block ``B = b 2^(m-1)`` applied as dense blocks rather than factor by factor
#: (measured up to 256 at width 1280: dense still 1.5-2x faster; at ``B = dim`` it is a full
#: matrix product).
DENSE_GROUP_MAX = 256


def butterfly_error(dim: int, block_size: int, n_factors: int) -> str | None:
    """Why (``dim``, ``block_size``, ``n_factors``) is not a valid layout, or ``None``."""
    if block_size < 2:
        return f"block size must be at least 2, got {block_size}"
    if dim % block_size:
        return f"width {dim} is not divisible by block size {block_size}"
    if n_factors < 1:
        return f"n_factors must be at least 1, got {n_factors}"
    if n_factors > 1:
        if block_size % 2:
            return f"butterfly factors need an even block size, got {block_size}"
        if dim % (block_size * 2 ** (n_factors - 1)):
            return (
                f"{n_factors} butterfly factors with block size {block_size} need a width divisible by "
                f"{block_size * 2 ** (n_factors - 1)}, got {dim}"
            )
    return None


def valid_layouts(dim: int, n_factors: int, limit: int = 6) -> list[tuple[int, int]]:
    """Valid ``(block_size, n_factors)`` pairs near the request, for error messages."""
    sizes = [b for b in range(2, dim + 1) if butterfly_error(dim, b, n_factors) is None]
    pairs = [(b, n_factors) for b in sizes[:limit]]
    if not pairs:
        for m in range(n_factors - 1, 0, -1):
            sizes = [b for b in range(2, dim + 1) if butterfly_error(dim, b, m) is None]
            if sizes:
                pairs = [(b, m) for b in sizes[:limit]]
                break
    return pairs


def max_factors(dim: int, block_size: int) -> int:
    """Largest ``n_factors`` valid for this width and block size (0 if none)."""
    if butterfly_error(dim, block_size, 1):
        return 0
    m = 1
    while butterfly_error(dim, block_size, m + 1) is None:
        m += 1
    return m


def to_blocks(x: torch.Tensor, block_size: int, factor: int) -> torch.Tensor:
    """``(..., d)`` to ``(..., d/b, b)`` in the butterfly order of ``factor`` (a view when possible)."""
    lead, d = x.shape[:-1], x.shape[-1]
    if factor == 0:
        return x.reshape(*lead, d // block_size, block_size)
    half, stride = block_size // 2, 2**factor
    x = x.reshape(*lead, d // (block_size * stride), 2, stride, half).transpose(-3, -2)
    return x.reshape(*lead, d // block_size, block_size)


def from_blocks(x: torch.Tensor, block_size: int, factor: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: ``(..., d/b, b)`` back to ``(..., d)``."""
    lead, r = x.shape[:-2], x.shape[-2]
    d = r * block_size
    if factor == 0:
        return x.reshape(*lead, d)
    half, stride = block_size // 2, 2**factor
    x = x.reshape(*lead, d // (block_size * stride), stride, 2, half).transpose(-3, -2)
    return x.reshape(*lead, d)


class ButterflyCayleyRotation(Rotation):
    """Product of ``n_factors`` butterfly-permuted block-diagonal Cayley rotations.

    Parameters: ``generators`` of shape ``(n_factors, n_stored_blocks, b(b-1)/2)`` (packed
    skew generators; ``n_stored_blocks`` is 1 with ``block_share``), zero at init.

    Args:
        dim: width rotated.
        block_size: ``b``.
        n_factors: butterfly factors (1 = OFT).
        neumann_terms: ``None`` for the exact Cayley transform, else the highest power kept
            in the Cayley-Neumann series (OFTv2).
        constraint: COFT bound on each block generator's Frobenius norm, or ``None``.
        block_share: one generator shared by all blocks of a factor.
        descending: factor ``k`` pairs half-blocks ``2^(n_factors-1-k)`` apart instead of
            ``2^k`` (the block-diagonal factor acts first: the order of LyCORIS' BOFT, kept
            so that its files convert exactly).
    """

    def __init__(
        self,
        dim: int,
        block_size: int,
        n_factors: int = 1,
        neumann_terms: int | None = None,
        constraint: float | None = None,
        block_share: bool = False,
        descending: bool = False,
    ) -> None:
        super().__init__()
        error = butterfly_error(dim, block_size, n_factors)
        if error:
            options = ", ".join(f"block_size={b}, n_factors={m}" for b, m in valid_layouts(dim, n_factors))
            raise ValueError(f"{error}. Valid choices for width {dim}: {options or 'none'}")
        if neumann_terms is not None and neumann_terms < 1:
            raise ValueError(f"neumann_terms must be at least 1, got {neumann_terms}")
        self.dim, self.block_size, self.n_factors = dim, block_size, n_factors
        self.n_blocks = dim // block_size
        self.neumann_terms, self.constraint, self.block_share = neumann_terms, constraint, block_share
        self.exact = neumann_terms is None
        self.descending = descending
        stored = 1 if block_share else self.n_blocks
        self.generators = nn.Parameter(torch.zeros(n_factors, stored, n_packed(block_size)))
        # Butterfly layouts as row indices, fixed by the shape: made once, not per call.
        # order_e[p]: the coordinate in slot p of to_blocks' layout for exponent e (> 0);
        # slot_e[c]: the slot holding coordinate c.
        for e in range(1, n_factors):
            order = to_blocks(torch.arange(dim), block_size, e).reshape(dim)
            self.register_buffer(f"order_{e}", order, persistent=False)
            self.register_buffer(f"slot_{e}", torch.argsort(order), persistent=False)

    def stride_exponent(self, k: int) -> int:
        """Factor ``k`` pairs half-blocks ``2^stride_exponent(k)`` apart."""
        return self.n_factors - 1 - k if self.descending else k

    def skew(self, scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The effective generators ``t Q`` after the constraint and the Neumann guard.

        Returns ``(n_factors, n_stored_blocks, b, b)`` in ``dtype`` (default: the compute dtype).
        """
        g = self.generators.to(dtype or compute_dtype(self.generators.dtype))
        q = unpack_skew(g, self.block_size)
        if self.constraint is not None:
            q = project_norm(q, self.constraint, dims=(-2, -1))
        if scale != 1.0:
            q = q * scale
        if self.neumann_terms is not None:
            q = project_norm(q, NEUMANN_MAX_NORM, dims=(-2, -1))
        return q

    def blocks(self, scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rotation blocks ``(n_factors, n_stored_blocks, b, b)`` in ``dtype`` (default: compute dtype)."""
        q = self.skew(scale, dtype)
        if self.neumann_terms is None:
            return cayley(q)
        return cayley_neumann(q, self.neumann_terms)

    @property
    def is_block_diagonal(self) -> bool:
        # Factor k mixes coordinates 2^k half-blocks apart, so factors 0 .. m-1 together mix
        # only within contiguous groups of b 2^(m-1): any product of them is block-diagonal.
        return True

    def _n_active(self, n_active_factors: int | None) -> int:
        """How many of the factors ``n_active_factors`` keeps (``None``: all)."""
        return self.n_factors if n_active_factors is None else max(0, min(n_active_factors, self.n_factors))

    def applies_as_blocks(self, n_active_factors: int | None = None) -> bool:
        active = self._n_active(n_active_factors)
        return (self.n_factors == 1 and active == 1) or (active > 1 and self.group_size <= DENSE_GROUP_MAX)

    @property
    def group_size(self) -> int:
        """``B = b 2^(n_factors - 1)``: the size of the diagonal blocks of the whole product."""
        return self.block_size * 2 ** (self.n_factors - 1)

    def block_diagonal(
        self, scale: float = 1.0, dtype: torch.dtype | None = None, n_active_factors: int | None = None
    ) -> torch.Tensor:
        """``(dim / B, B, B)`` with ``B`` = :attr:`group_size` (``b`` for OFT).

        With several factors, the blocks come from rotating ``B`` "comb" vectors (ones at
        ``j, B + j, 2B + j, ...``): the groups do not overlap, so the image of comb ``j``
        holds column ``j`` of every block at once.  Cost ``B * dim`` per factor.
        """
        dtype = dtype or compute_dtype(self.generators.dtype)
        if self.n_factors == 1:
            return self.blocks(scale, dtype)[0].expand(self.n_blocks, -1, -1)
        size = self.group_size
        active = self._n_active(n_active_factors)
        combs = torch.eye(size, dtype=dtype, device=self.generators.device).repeat(1, self.dim // size)
        images = self._apply_factors(combs, scale, active, Mode.FORWARD)  # (B, dim): row j = R comb_j
        return images.reshape(size, self.dim // size, size).permute(1, 2, 0)

    def apply(
        self,
        x: torch.Tensor,
        scale: float = 1.0,
        n_active_factors: int | None = None,
        mode: Mode = Mode.FORWARD,
    ) -> torch.Tensor:
        active = self._n_active(n_active_factors)
        if active > 1 and self.group_size <= DENSE_GROUP_MAX:
            # One pass with the product's dense blocks instead of one pass (and a gather) per
            # factor: 2-3x faster for forward plus backward at SD widths (B = 16 to 256).
            blocks = mode.orient(self.block_diagonal(scale, compute_dtype(self.generators.dtype, x.dtype), active))
            return apply_blocks(x, blocks)
        return self._apply_factors(x, scale, active, mode)

    def _apply_factors(self, x: torch.Tensor, scale: float, active: int, mode: Mode) -> torch.Tensor:
        """The first ``active`` factors, one pass each, on rows ``(..., dim)``."""
        blocks = mode.orient(self.blocks(scale, compute_dtype(self.generators.dtype, x.dtype)))
        factors = list(range(active)) if mode.reverses_factor_order else list(reversed(range(active)))
        if not factors:
            return x
        rows = x.to(blocks.dtype).reshape(-1, self.dim)
        if len(factors) == 1:
            y = self._apply_to_rows(rows, blocks[factors[0]], self.stride_exponent(factors[0]))
        elif torch.is_grad_enabled() and (rows.requires_grad or blocks.requires_grad):
            # Keep only the input for backward and recompute the factors there: one more
            # forward pass of the rotation instead of one activation-sized tensor per factor.
            y = checkpoint(self._apply_to_columns, rows.t(), blocks, factors, use_reentrant=False).t()
        else:
            y = self._apply_to_columns(rows.t(), blocks, factors).t()
        return y.reshape(x.shape).to(x.dtype)

    def _apply_to_rows(self, rows: torch.Tensor, blocks: torch.Tensor, exponent: int) -> torch.Tensor:
        """One factor on ``(n, dim)`` rows with blocks ``(n_stored, b, b)``.

        A strided view puts block ``r`` of every row in batch ``r`` of one ``bmm`` (no copy
        going in, one coming out): 10-35% faster here than the equivalent einsum.
        """
        n = rows.shape[0]
        xb = to_blocks(rows, self.block_size, exponent).transpose(0, 1)  # (r, n, b)
        yb = torch.bmm(xb, blocks.expand(self.n_blocks, -1, -1).transpose(-1, -2))
        return from_blocks(yb.transpose(0, 1), self.block_size, exponent).reshape(n, self.dim)

    def _apply_to_columns(self, cols: torch.Tensor, blocks: torch.Tensor, factors: list[int]) -> torch.Tensor:
        """Several factors on ``(dim, n)`` columns (a free view of the rows).

        In this layout every block is a contiguous ``(b, n)`` slab, so each factor is one
        ``bmm`` without copies, and the butterfly permutation between two factors is a single
        gather of whole rows (2-3x faster here than permuting rows twice per factor).
        """
        layout = 0  # exponent whose block layout the rows are in (0: the natural order)
        for k in factors:
            exponent = self.stride_exponent(k)
            if exponent != layout:
                cols = cols.index_select(0, self._regather(layout, exponent))
                layout = exponent
            n = cols.shape[-1]
            slabs = cols.reshape(self.n_blocks, self.block_size, n)
            cols = torch.bmm(blocks[k].expand(self.n_blocks, -1, -1), slabs).reshape(self.dim, n)
        if layout:
            cols = cols.index_select(0, self._regather(layout, 0))
        return cols

    def _regather(self, source: int, target: int) -> torch.Tensor:
        """``(dim,)`` row indices taking rows in the layout of exponent ``source`` to ``target``."""
        if source == 0:
            return getattr(self, f"order_{target}")
        slot = getattr(self, f"slot_{source}")
        return slot if target == 0 else slot[getattr(self, f"order_{target}")]

    def passes_per_vector(self) -> int:
        if self.n_factors > 1 and self.group_size <= DENSE_GROUP_MAX:
            # Measured: the dense-block pass costs about one factor pass per 32 of its width.
            return max(1, self.group_size // 32) * self.dim
        return self.n_factors * self.dim

    def extra_repr(self) -> str:
        kind = "cayley" if self.neumann_terms is None else f"cayley-neumann({self.neumann_terms})"
        return (
            f"dim={self.dim}, block_size={self.block_size}, n_factors={self.n_factors}, {kind}, "
            f"constraint={self.constraint}, block_share={self.block_share}"
            + (", descending" if self.descending else "")
        )


def default_block_size(dim: int, n_factors: int, preferred: int = 32) -> int:
    """Largest valid block size not above ``preferred`` (the default when none is given)."""
    for b in range(min(preferred, dim), 1, -1):
        if butterfly_error(dim, b, n_factors) is None:
            return b
    options = ", ".join(f"block_size={b}, n_factors={m}" for b, m in valid_layouts(dim, n_factors))
    raise ValueError(f"no block size fits width {dim} with {n_factors} factors. Valid: {options or 'none'}")


