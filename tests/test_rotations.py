"""The rotation parameterizations on their own: orthogonality, identity, inverses, gradients."""

import math

import pytest
import torch
from conftest import randomize

from ortho_diffusion import AdapterConfig
from ortho_diffusion.rotations import (
    ButterflyCayleyRotation,
    GivensRotation,
    Mode,
    cayley,
    cayley_neumann,
    givens_stages,
    pack_skew,
    unpack_skew,
)

WIDTH = 48


def make(method: str, dim: int = WIDTH, **kw):
    if method in ("oft", "oftv2"):
        kw.setdefault("block_size", 8)
    if method == "boft":
        kw.setdefault("block_size", 4)
        kw.setdefault("n_factors", 3)
    return AdapterConfig(method=method, **kw).build_rotation(dim)


ALL = ["oft", "oftv2", "boft", "goft", "qgoft", "lroft"]
EXACT = ["oft", "boft", "goft", "lroft"]


def orthogonality_error(r, scale=1.0, dtype=torch.float32):
    m = r.matrix(scale, dtype=dtype)
    return (m @ m.T - torch.eye(m.shape[0], dtype=dtype)).abs().max().item()


@pytest.mark.parametrize("method", ALL)
def test_identity_at_init(method):
    r = make(method)
    assert torch.equal(r.matrix(), torch.eye(WIDTH))
    x = torch.randn(3, WIDTH)
    assert torch.equal(r(x), x)


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("scale", [0.3, 1.0, 1.7])
def test_exact_rotations_are_orthogonal(method, scale):
    r = make(method)
    randomize(r.parameters(), std=0.3)
    assert torch.linalg.matrix_norm(r.matrix() - torch.eye(WIDTH)) > 0.1  # really moved
    assert orthogonality_error(r, scale) < 1e-5


@pytest.mark.parametrize("method", ALL)
def test_apply_matches_dense_matrix_in_every_mode(method):
    r = make(method)
    randomize(r.parameters(), std=0.1)
    m = r.matrix(0.8, dtype=torch.float64)
    x = torch.randn(4, WIDTH, dtype=torch.float64)
    expected = {
        Mode.FORWARD: x @ m.T,
        Mode.TRANSPOSE: x @ m,
        Mode.INVERSE: x @ torch.linalg.inv(m).T,
        Mode.INVERSE_TRANSPOSE: x @ torch.linalg.inv(m),
    }
    for mode, want in expected.items():
        torch.testing.assert_close(r.apply(x, 0.8, mode=mode), want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("method", ALL)
def test_scale_zero_is_identity_and_scale_scales_the_generator(method):
    r = make(method)
    randomize(r.parameters(), std=0.1)
    assert torch.allclose(r.matrix(0.0, dtype=torch.float64), torch.eye(WIDTH, dtype=torch.float64), atol=1e-15)
    twice = make(method)
    with torch.no_grad():
        for (name, p), q in zip(twice.named_parameters(), r.parameters()):
            # lroft's generator U V^T - V U^T is linear in V alone.
            p.copy_(q if name == "u" else 2 * q)
    torch.testing.assert_close(twice.matrix(1.0), r.matrix(2.0), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ALL)
def test_gradcheck_float64(method):
    kw = {"oft": {"block_size": 4}, "oftv2": {"block_size": 4}, "boft": {"block_size": 4, "n_factors": 2}}
    r = make(method, dim=16, **kw.get(method, {})).double()
    randomize(r.parameters(), std=0.2)
    names = [n for n, _ in r.named_parameters()]

    def f(x, *values):
        return torch.func.functional_call(r, dict(zip(names, values)), (x, 0.9))

    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    inputs = (x, *[p.detach().clone().requires_grad_(True) for p in r.parameters()])
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_lroft_moves_only_the_span_of_its_factors():
    r = make("lroft", rank=3)
    randomize(r.parameters(), std=0.3)
    m = r.matrix(dtype=torch.float64)
    w = torch.cat([r.u, r.v], 1).detach().double()  # (48, 6)
    z = torch.randn(WIDTH, 5, dtype=torch.float64)
    z = z - w @ torch.linalg.lstsq(w, z).solution  # orthogonal to U and V
    torch.testing.assert_close(m @ z, z, atol=1e-12, rtol=0)
    moved = torch.linalg.matrix_rank(m - torch.eye(WIDTH, dtype=torch.float64)).item()
    assert moved == 6  # exactly the 2r directions
    with pytest.raises(ValueError, match="rank"):
        make("lroft", dim=6, rank=4)
    with pytest.raises(ValueError, match="lroft has a rank"):
        AdapterConfig(method="lroft", block_size=8)
    with pytest.raises(ValueError, match="rank only applies"):
        AdapterConfig(method="oft", rank=4)


def test_boft_with_one_factor_equals_oft():
    oft = make("oft", block_size=8)
    boft = make("boft", block_size=8, n_factors=1)
    randomize(oft.parameters(), std=0.2)
    with torch.no_grad():
        boft.generators.copy_(oft.generators)
    x = torch.randn(5, WIDTH)
    assert torch.equal(boft(x), oft(x))


def test_boft_full_butterfly_is_dense_and_uses_no_permutation_matrices():
    r = ButterflyCayleyRotation(32, block_size=4, n_factors=4)  # 1 + log2(32 / 4) factors
    randomize(r.parameters(), std=0.3)
    m = r.matrix(dtype=torch.float64)
    assert (m.abs() > 1e-12).all()
    assert all(t.numel() < 32 * 32 for t in list(r.parameters()) + list(r.buffers()))
    fewer = ButterflyCayleyRotation(32, block_size=4, n_factors=3)
    with torch.no_grad():
        fewer.generators.copy_(r.generators[:3])
    assert (fewer.matrix(dtype=torch.float64).abs() < 1e-15).any()


def test_boft_active_factors_keep_the_first_k():
    r = ButterflyCayleyRotation(32, block_size=4, n_factors=3)
    randomize(r.parameters(), std=0.2)
    two = ButterflyCayleyRotation(32, block_size=4, n_factors=2)
    with torch.no_grad():
        two.generators.copy_(r.generators[:2])
    torch.testing.assert_close(r.matrix(n_active_factors=2), two.matrix())
    assert torch.equal(r.matrix(n_active_factors=0), torch.eye(32))


def test_invalid_butterfly_layout_proposes_valid_ones():
    with pytest.raises(ValueError, match=r"Valid choices for width 48: block_size=2, n_factors=3"):
        ButterflyCayleyRotation(48, block_size=8, n_factors=3)
    with pytest.raises(ValueError, match="not divisible by block size 5"):
        ButterflyCayleyRotation(48, block_size=5)


@pytest.mark.parametrize("terms", [0, 1, 5])
def test_cayley_neumann_is_the_series_with_exact_gradients(terms):
    # Written-out backward (the Horner iterates walked back): values equal the plain series, and
    # float64 gradcheck holds for skew and general generators, batched as (factors, blocks).
    g = torch.Generator().manual_seed(terms)
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g)
    for q in (0.3 * (a - a.transpose(-1, -2)), 0.3 * a):
        q = q.requires_grad_(True)
        eye = torch.eye(4, dtype=torch.float64)
        series = sum(torch.linalg.matrix_power(q.detach(), i) for i in range(terms + 1)) + 0 * eye
        torch.testing.assert_close(cayley_neumann(q, terms), (eye + q.detach()) @ series)
        assert torch.autograd.gradcheck(lambda q: cayley_neumann(q, terms), (q,))


@pytest.mark.parametrize("size, spread", [(4, 0.001), (8, 0.002), (32, 0.0005), (32, 0.5)])
def test_exact_cayley_matches_the_inverse_on_both_paths(size, spread):
    # Small generators take the product series (CPU), large ones the batched inverse; both
    # give (I + Q)(I - Q)^-1 to float precision with exact float64 gradients.
    from ortho_diffusion.rotations.cayley import _inverse_by_series

    g = torch.Generator().manual_seed(size)
    q = unpack_skew(spread * torch.randn(2, 3, size * (size - 1) // 2, dtype=torch.float64, generator=g), size)
    eye = torch.eye(size, dtype=torch.float64)
    reference = (eye + q) @ torch.linalg.inv(eye - q)
    assert (_inverse_by_series(q.reshape(-1, size, size), eye) is None) == (spread == 0.5)
    torch.testing.assert_close(cayley(q), reference, rtol=0, atol=1e-13)
    torch.testing.assert_close(cayley(q.float()), reference.float(), rtol=0, atol=2e-6)
    rotation = cayley(q.float()).double()
    assert (rotation @ rotation.transpose(-1, -2) - eye).abs().max() < 2e-6
    small = q[0, :1].clone().requires_grad_(True) if size == 32 else q.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(cayley, (small,))


def test_float32_series_covers_trained_generators():
    # Spectral norms of 0.3-0.6 still take the series in float32, accurate to float32 rounding
    # (the shipped control adapters' largest blocks reach 0.9-1.04, where the batched inverse
    # takes over).
    from ortho_diffusion.rotations.cayley import _inverse_by_series

    q = unpack_skew(0.04 * torch.randn(40, 496, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), 32)
    assert 0.3 < torch.linalg.matrix_norm(q, 2).max() < 0.6
    eye = torch.eye(32, dtype=torch.float64)
    assert _inverse_by_series(q.float(), eye.float()) is not None
    torch.testing.assert_close(cayley(q.float()).double(), (eye + q) @ torch.linalg.inv(eye - q), rtol=0, atol=2e-6)


def test_cayley_neumann_approaches_exact_cayley():
    torch.manual_seed(0)
    q = unpack_skew(torch.randn(6, 28, dtype=torch.float64) * 0.06, 8)
    exact = cayley(q)
    errors = [(cayley_neumann(q, k) - exact).abs().max().item() for k in range(1, 9)]
    assert all(b < a for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-3 * errors[0]


def test_neumann_guard_keeps_blocks_in_the_convergent_range():
    r = make("oftv2", block_size=8)
    with torch.no_grad():
        r.generators.normal_(0, 5.0)  # far outside ||Q|| < 1
    norms = torch.linalg.matrix_norm(r.skew(1.0), ord=2)
    assert norms.max() <= 0.5 + 1e-6
    assert orthogonality_error(r) < 0.06  # the documented bound at the guard


def test_packing_round_trip_and_skew():
    v = torch.randn(3, 10)
    q = unpack_skew(v, 5)
    assert torch.equal(q, -q.transpose(-1, -2))
    assert torch.equal(pack_skew(q), v)


@pytest.mark.parametrize("dim", [2, 3, 7, 10, 16, 33])
def test_givens_layout_any_width(dim):
    stages = givens_stages(dim)
    assert len(stages) == math.ceil(math.log2(dim))
    assert sum(len(f) for f, _ in stages) == dim - 1
    for first, second in stages:  # pairs within a stage are disjoint
        idx = torch.cat([first, second])
        assert len(set(idx.tolist())) == len(idx)
    r = GivensRotation(dim)
    randomize(r.parameters(), std=1.0)
    assert orthogonality_error(r) < 1e-5


def test_qgoft_penalty_measures_non_orthogonality():
    r = GivensRotation(16, relaxed=True)
    randomize([r.angles], std=0.5)
    assert r.penalty().item() == 0.0
    assert orthogonality_error(r) < 1e-5
    randomize([r.relax], std=0.2, seed=1)
    assert r.penalty().item() > 1e-4
    assert orthogonality_error(r) > 1e-3


def test_constraint_bounds_the_generator_norm():
    r = make("oft", block_size=8, constraint=0.05)
    randomize(r.parameters(), std=1.0)
    assert torch.linalg.matrix_norm(r.skew(1.0)).max() <= 0.05 + 1e-6
    g = make("goft", constraint=0.01)
    randomize(g.parameters(), std=1.0)
    m = g.pair_matrices()
    assert torch.asin(m[:, 1, 0].abs()).max() <= 0.01 + 1e-6


def test_block_share_uses_one_block_per_factor():
    r = make("boft", block_size=4, n_factors=2, block_share=True)
    assert r.generators.shape == (2, 1, 6)
    randomize(r.parameters(), std=0.3)
    blocks = r.matrix()[:4, :4]
    torch.testing.assert_close(r.matrix(n_active_factors=1)[4:8, 4:8], r.matrix(n_active_factors=1)[:4, :4])
    assert orthogonality_error(r) < 1e-5 and blocks.abs().sum() > 0


def test_float64_parameters_compute_in_float64():
    r = make("oft").double()
    randomize(r.parameters(), std=0.2)
    assert orthogonality_error(r, dtype=torch.float64) < 1e-13


def test_block_rotated_linear_values_gradients_and_shape_errors():
    from ortho_diffusion.rotations import block_rotated_linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 12, dtype=torch.float64, generator=g)
    blocks = torch.randn(3, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)  # any blocks, not only rotations
    x = torch.randn(2, 5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    dense = torch.block_diag(*blocks.detach())
    torch.testing.assert_close(block_rotated_linear(x, w, blocks), x.detach() @ dense.T @ w.T)
    assert torch.autograd.gradcheck(lambda x, b: block_rotated_linear(x, w, b), (x, blocks), eps=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="do not tile"):
        block_rotated_linear(x, w, blocks[:2])


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("through_weight", [True, False])
def test_output_rotations_values_gradients_and_what_they_keep(with_bias, through_weight):
    # output_rotated_linear (R folded into the weight) and rotate_outputs (R applied to x W^T).
    from ortho_diffusion.rotations import output_rotated_linear, rotate_outputs

    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 6, dtype=torch.float64, generator=g)
    blocks = torch.randn(3, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)  # any invertible blocks
    bias = torch.randn(12, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)

    def layer(x, blocks, *b):
        b = b[0] if b else None
        return output_rotated_linear(x, w, blocks, b) if through_weight else rotate_outputs(x @ w.T, blocks, b)

    dense = torch.block_diag(*blocks.detach())
    expected = x.detach() @ w.T @ dense.T + (bias.detach() if with_bias else 0)
    inputs = (x, blocks, bias) if with_bias else (x, blocks)
    torch.testing.assert_close(layer(*inputs), expected)
    assert torch.autograd.gradcheck(layer, inputs, eps=1e-6, atol=1e-6)
    # Backward keeps the layer's output (which the next operation keeps anyway) and no
    # activation-sized tensor besides: neither x nor the unrotated x W^T.
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = (output_rotated_linear(x, w, blocks, bias) if through_weight
               else rotate_outputs((x @ w.T).detach(), blocks, bias))
    big = [t for t in kept if t.numel() >= out.numel()]
    assert len(big) == 1 and big[0].data_ptr() == out.data_ptr()
    assert x.data_ptr() not in [t.data_ptr() for t in kept]
    with pytest.raises(ValueError, match="do not tile"):
        output_rotated_linear(x, w, blocks[:2]) if through_weight else rotate_outputs(x @ w.T, blocks[:2])


@pytest.mark.parametrize("kind", ["input", "output through the weight", "output"])
def test_orthogonal_blocks_take_their_gradient_without_a_solve(kind, monkeypatch):
    # For exact rotations B^-T = B: the flag swaps the solve for a product and nothing else.
    from ortho_diffusion.rotations import block_rotated_linear, output_rotated_linear, rotate_outputs
    from ortho_diffusion.rotations.cayley import cayley, unpack_skew

    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 12, dtype=torch.float64, generator=g)
    bias = torch.randn(12, dtype=torch.float64, generator=g)
    x = torch.randn(2, 5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    packed = (0.4 * torch.randn(3, 6, dtype=torch.float64, generator=g)).requires_grad_(True)

    def layer(x, packed, orthogonal):
        blocks = cayley(unpack_skew(packed, 4))
        if kind == "input":
            return block_rotated_linear(x, w, blocks, orthogonal)
        if kind == "output through the weight":
            return output_rotated_linear(x, w, blocks, bias, orthogonal)
        return rotate_outputs(x @ w.T, blocks, bias, orthogonal)

    def grads(orthogonal):
        out = layer(x, packed, orthogonal)
        return [out, *torch.autograd.grad(out.square().sum(), (x, packed))]

    expected = grads(False)
    solves = []
    real_solve = torch.linalg.solve
    monkeypatch.setattr(torch.linalg, "solve", lambda *a, **k: solves.append(1) or real_solve(*a, **k))
    for got, want in zip(grads(True), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not solves
    # Perturbing the generator keeps the blocks orthogonal, so gradcheck holds with the flag on.
    assert torch.autograd.gradcheck(lambda x, p: layer(x, p, True), (x, packed), eps=1e-6, atol=1e-6)


def test_adapters_skip_the_solve_only_for_exact_rotations(monkeypatch):
    import torch.nn as nn

    import ortho_diffusion as od

    solves = []
    real_solve = torch.linalg.solve
    monkeypatch.setattr(torch.linalg, "solve", lambda *a, **k: solves.append(1) or real_solve(*a, **k))
    x = torch.randn(4, 16)
    # Input side: the closed form (weight-centric); output side: that and rotate_outputs.
    for method, extra, side, compute, expect_solve in [
        ("oft", {}, "input", "weight-centric", False), ("boft", dict(n_factors=2), "input", "weight-centric", False),
        ("oftv2", {}, "input", "weight-centric", True),
        ("oft", {}, "output", "weight-centric", False), ("oft", {}, "output", "input-centric", False),
        ("oftv2", {}, "output", "weight-centric", True), ("oftv2", {}, "output", "input-centric", True),
    ]:
        model = nn.Sequential(nn.Linear(16, 16))
        od.attach(model, od.AdapterConfig(targets=["0"], method=method, block_size=4, side=side,
                                          compute=compute, **extra))
        solves.clear()
        model(x).square().sum().backward()
        assert bool(solves) == expect_solve, (method, side, compute)


@pytest.mark.parametrize("layout", [
    dict(dim=32, block_size=4, n_factors=2), dict(dim=64, block_size=4, n_factors=4),
    dict(dim=48, block_size=2, n_factors=3, descending=True), dict(dim=32, block_size=4, n_factors=3, block_share=True),
    dict(dim=24, block_size=4, n_factors=2, neumann_terms=5),
])
def test_butterfly_product_is_block_diagonal_with_the_returned_blocks(layout):
    # Factors 0 .. m-1 mix only within contiguous groups of b 2^(m-1) coordinates, so the
    # closed-form (weight-centric) path can train BOFT like OFT with larger blocks.
    r = ButterflyCayleyRotation(**layout).double()
    randomize([r.generators], std=0.3)
    size = layout["block_size"] * 2 ** (layout["n_factors"] - 1)
    assert r.is_block_diagonal and r.group_size == size
    for k in (None, 1, layout["n_factors"] - 1):
        dense = r.matrix(0.8, n_active_factors=k)
        blocks = r.block_diagonal(0.8, n_active_factors=k)
        assert blocks.shape == (layout["dim"] // size, size, size)
        torch.testing.assert_close(torch.block_diag(*blocks), dense, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape,channel_dim", [((2, 5, 6), -1), ((2, 6, 3, 4), 1)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("magnitude_floor", [0.5, 0.0])  # 0.0: a zero magnitude takes the fallback
def test_scale_shift_values_gradients_and_what_it_keeps(shape, channel_dim, with_bias, magnitude_floor):
    from ortho_diffusion.rotations import scale_shift

    g = torch.Generator().manual_seed(0)
    c = shape[channel_dim]
    y = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
    m = (magnitude_floor + torch.rand(c, dtype=torch.float64, generator=g))
    if magnitude_floor == 0.0:
        m[0] = 0.0
    m.requires_grad_(True)
    b = torch.randn(c, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    view = [1] * len(shape)
    view[channel_dim] = -1
    expected = y * m.view(view) + (b.view(view) if with_bias else 0)
    torch.testing.assert_close(scale_shift(y, m, b, channel_dim), expected)
    with torch.no_grad():
        torch.testing.assert_close(scale_shift(y, m, b, channel_dim), expected)
    inputs = (y, m, b) if with_bias else (y, m)
    assert torch.autograd.gradcheck(lambda y, m, *b: scale_shift(y, m, b[0] if b else None, channel_dim), inputs)

    # Backward reads the output (which the next operation keeps anyway), not a copy of y,
    # unless a magnitude is too small to divide by.
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.data_ptr()) or t, lambda t: t):
        out = scale_shift(y, m, b, channel_dim)
    assert (out.data_ptr() in kept) == (magnitude_floor > 0)
    assert (y.data_ptr() in kept) == (magnitude_floor == 0)
    with pytest.raises(ValueError, match="must both be"):
        scale_shift(y, m[:-1], None, channel_dim)


@pytest.mark.parametrize("layout,factors,expected", [
    (dict(dim=32, block_size=8), None, True),
    (dict(dim=32, block_size=8, neumann_terms=5), None, True),
    (dict(dim=32, block_size=4, n_factors=3), None, True),
    (dict(dim=32, block_size=4, n_factors=3), 2, True),
    (dict(dim=32, block_size=4, n_factors=3), 1, False),  # one factor of several: its own smaller blocks
    (dict(dim=1024, block_size=128, n_factors=3), None, False),  # product blocks of 512: factor by factor
])
def test_applies_as_blocks_says_when_apply_is_one_block_pass(layout, factors, expected):
    from ortho_diffusion.rotations.block_linear import apply_blocks

    r = ButterflyCayleyRotation(**layout).double()
    randomize([r.generators], std=0.3)
    assert r.applies_as_blocks(factors) == expected
    if expected:
        x = torch.randn(3, layout["dim"], dtype=torch.float64)
        blocks = r.block_diagonal(0.7, n_active_factors=factors)
        torch.testing.assert_close(apply_blocks(x, blocks), r.apply(x, 0.7, factors), atol=1e-12, rtol=0)
    assert not GivensRotation(16).applies_as_blocks()
