"""One adapted layer: both sides, all computation paths, convs, merge, strength, dtypes."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize
from torch import nn

from ortho_diffusion import AdapterConfig, OrthogonalAdapter

METHOD_KW = {
    "oft": {"block_size": 4},
    "oftv2": {"block_size": 4},
    "boft": {"block_size": 4, "n_factors": 2},
    "goft": {},
    "qgoft": {},
    "lroft": {"rank": 2},
}
ALL = list(METHOD_KW)


def config(method, **kw):
    return AdapterConfig(method=method, **{**METHOD_KW[method], **kw})


def layers():
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(16, 24), torch.randn(2, 5, 16)),
        "conv1x1": (nn.Conv2d(16, 24, 1), torch.randn(2, 16, 6, 6)),
        "conv3x3": (nn.Conv2d(8, 16, 3, stride=2, padding=1, dilation=1), torch.randn(2, 8, 9, 9)),
        "conv3x3-dilated": (nn.Conv2d(8, 16, (3, 2), stride=(1, 2), padding=(2, 1), dilation=2), torch.randn(2, 8, 7, 8)),
        "conv3x3-reflect": (nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"), torch.randn(1, 8, 6, 6)),
    }


def adapted(layer, method, **kw):
    a = OrthogonalAdapter(layer, "a", config(method, **kw))
    randomize(list(a.rotations.parameters()) + list(a.magnitudes.parameters()), std=0.2)
    return a


def dense_reference(layer, adapter, x):
    """The layer run with the explicitly rotated dense weight M * (R_out W R_in)."""
    w = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    name = "a"
    r = adapter.rotations[name].matrix(adapter.scales[name], dtype=torch.float64)
    w = w @ r if adapter.configs[name].side == "input" else r @ w
    if name in adapter.magnitudes:
        w = w * (1 + adapter.scales[name] * (adapter.magnitudes[name].double() - 1))[:, None]
    w = w.reshape(layer.weight.shape).float()
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, w, layer.bias)
    return F.linear(x, w, layer.bias)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("kind", list(layers()))
@pytest.mark.parametrize("side", ["input", "output"])
def test_every_path_matches_the_dense_reference(method, kind, side):
    layer, x = layers()[kind]
    a = adapted(layer, method, side=side, rescale=True)
    with torch.no_grad():
        ref = dense_reference(layer, a, x)
        for path in ("input-centric", "weight-centric", "auto"):
            a.compute = path
            torch.testing.assert_close(a(x), ref, atol=1e-5, rtol=1e-5, msg=f"{path} differs")
    assert (ref - layer(x)).abs().max() > 1e-2  # the adapter really changes the layer


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_identity_at_init_and_scale_zero_is_exact(method, kind):
    layer, x = layers()[kind]
    with torch.no_grad():
        base = layer(x)
        a = OrthogonalAdapter(layer, "a", config(method))
        for path in ("input-centric", "weight-centric"):
            a.compute = path
            torch.testing.assert_close(a(x), base, atol=1e-6, rtol=0)
        randomize(a.rotations.parameters(), std=0.2)
        a.set_scale(0.0)
        assert torch.equal(a(x), base)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("side", ["input", "output"])
def test_merge_equals_unmerged_and_unmerge_restores(method, side):
    layer, x = layers()["conv3x3"]
    original = layer.weight.detach().clone()
    a = adapted(layer, method, side=side, rescale=True)
    with torch.no_grad():
        live = a(x)
        a.merge()
        assert a.merged
        torch.testing.assert_close(a(x), live, atol=1e-5, rtol=1e-5)
        assert not torch.equal(layer.weight, original)
        a.unmerge()
    rel = (layer.weight - original).norm() / original.norm()
    assert rel < 1e-6


def test_set_scale_while_merged_remerges_at_the_new_strength():
    layer, x = layers()["linear"]
    a = adapted(layer, "oft")
    with torch.no_grad():
        a.set_scale(0.5)
        half = a(x)
        a.set_scale(1.0)
        a.merge()
        a.set_scale(0.5)
        torch.testing.assert_close(a(x), half, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["oft", "boft", "goft"])
def test_strength_keeps_rotations_orthogonal_and_extrapolates(method):
    layer, _ = layers()["linear"]
    a = adapted(layer, method)
    r = a.rotations["a"]
    for t in (0.25, 0.5, 1.0, 1.5):
        m = r.matrix(t)
        torch.testing.assert_close(m @ m.T, torch.eye(16), atol=1e-5, rtol=0)
    steps = [torch.linalg.matrix_norm(r.matrix(t) - torch.eye(16)).item() for t in (0.0, 0.5, 1.0, 1.5)]
    assert steps == sorted(steps) and steps[0] == 0


def test_two_adapters_compose_in_both_paths():
    layer, x = layers()["linear"]
    a = adapted(layer, "oft")
    a.add_adapter("b", config("goft", side="output", rescale=True))
    randomize(list(a.rotations["b"].parameters()) + [a.magnitudes["b"]], std=0.2, seed=3)
    ra, rb = a.rotations["a"].matrix(dtype=torch.float64), a.rotations["b"].matrix(dtype=torch.float64)
    w = torch.diag(a.magnitudes["b"].double()) @ rb @ layer.weight.double() @ ra
    ref = F.linear(x.double(), w, layer.bias.double()).float()
    with torch.no_grad():
        for path in ("input-centric", "weight-centric"):
            a.compute = path
            torch.testing.assert_close(a(x), ref, atol=1e-5, rtol=1e-5)
        a.set_scale(0.0, name="b")
        a.compute = "input-centric"
        torch.testing.assert_close(a(x), F.linear(x.double(), layer.weight.double() @ ra, layer.bias.double()).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_layers(dtype):
    layer, x = layers()["linear"]
    a = adapted(layer, "boft", rescale=True)
    with torch.no_grad():
        ref = a(x)
    a.base_layer.to(dtype)
    assert a.rotations["a"].generators.dtype == torch.float32  # rotation maths stays in fp32
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    with torch.no_grad():
        for path in ("input-centric", "weight-centric"):
            a.compute = path
            out = a(x.to(dtype))
            assert out.dtype == dtype
            torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    out = a(x.to(dtype))
    out.float().sum().backward()
    assert a.rotations["a"].generators.grad is not None and torch.isfinite(a.rotations["a"].generators.grad).all()


@pytest.mark.parametrize("kw", [{"method": "oft"}, {"method": "oftv2"}, {"method": "oft", "block_share": True},
                                {"method": "oft", "rescale": True}, {"method": "boft"},
                                {"method": "boft", "rescale": True, "n_factors": 3, "block_size": 2},
                                {"method": "boft", "butterfly_order": "descending", "neumann_terms": 5},
                                {"method": "boft", "block_share": True, "active_factors": 1},
                                {"method": "oft", "side": "output"}, {"method": "oftv2", "side": "output"},
                                {"method": "oft", "side": "output", "rescale": True},
                                {"method": "boft", "side": "output", "butterfly_order": "descending", "n_factors": 3,
                                 "block_size": 2}])
def test_weight_centric_training_gradients_match_input_centric(kw):
    # OFT, OFTv2 and BOFT on a Linear layer, on either side, train weight-centric without the
    # full weight gradient (closed-form block gradients); values and gradients must equal the
    # input-centric path.
    kw = dict(kw)
    active_factors = kw.pop("active_factors", None)
    layer, x = layers()["linear"]
    layer.requires_grad_(False)  # frozen, as od.attach leaves it
    a = adapted(layer, kw.pop("method"), **kw)
    assert a._closed_form(a._active())
    a.set_scale(0.7, n_active_factors=active_factors)
    params = list(a.rotations.parameters()) + list(a.magnitudes.parameters())
    results = {}
    for path in ("input-centric", "weight-centric"):
        a.compute = path
        xx = x.clone().requires_grad_(True)
        out = a(xx)
        grads = torch.autograd.grad(out.square().sum(), [xx, *params])
        results[path] = (out.detach(), grads)
    (y_in, g_in), (y_w, g_w) = results["input-centric"], results["weight-centric"]
    torch.testing.assert_close(y_w, y_in, atol=1e-5, rtol=1e-5)
    for gw, gi in zip(g_w, g_in):
        torch.testing.assert_close(gw, gi, atol=1e-4, rtol=1e-4)


def test_closed_form_applies_only_where_exact():
    def frozen(layer):
        return layer.requires_grad_(False)

    lin = OrthogonalAdapter(frozen(nn.Linear(16, 8)), "a", config("oft"))
    assert lin._closed_form(lin._active())
    boft = OrthogonalAdapter(frozen(nn.Linear(16, 8)), "a", config("boft"))  # factors multiply into blocks
    assert boft._closed_form(boft._active())
    out = OrthogonalAdapter(frozen(nn.Linear(8, 16)), "a", config("oft", side="output"))
    assert out._closed_form(out._active())
    for other in (OrthogonalAdapter(frozen(nn.Linear(16, 8)), "a", config("goft")),
                  OrthogonalAdapter(frozen(nn.Conv2d(16, 8, 1)), "a", config("oft"))):
        assert not other._closed_form(other._active())
    two = OrthogonalAdapter(frozen(nn.Linear(16, 8)), "a", config("oft"))
    two.add_adapter("b", config("oft"))
    assert not two._closed_form(two._active())
    lin.base_layer.weight.requires_grad_(True)  # a trainable base weight needs its own gradient
    assert not lin._closed_form(lin._active())


def test_auto_follows_the_measured_regimes():
    # Measured (benchmarks/bench_adapters.py): in training, OFT at width 1280 with 512 tokens
    # is fastest input-centric; 4-factor BOFT at width 320 with 8192 tokens, weight-centric
    # (closed form: one pass over the activations instead of three).
    wide = OrthogonalAdapter(nn.Linear(1280, 1280), "a", AdapterConfig(method="oft", block_size=32))
    wide.base_layer.requires_grad_(False)
    assert wide.choose_compute(torch.empty(512, 1280), wide._active()) == "input-centric"
    # With closed-form gradients, rotating the weight wins once the tokens outnumber its rows.
    narrow = OrthogonalAdapter(nn.Linear(320, 320), "a", AdapterConfig(method="oft", block_size=32))
    narrow.base_layer.requires_grad_(False)
    assert narrow.choose_compute(torch.empty(8192, 320), narrow._active()) == "weight-centric"
    assert narrow.choose_compute(torch.empty(154, 320), narrow._active()) == "input-centric"
    boft = OrthogonalAdapter(nn.Linear(320, 320), "a", AdapterConfig(method="boft", block_size=8, n_factors=4))
    assert boft.choose_compute(torch.empty(8192, 320), boft._active()) == "weight-centric"
    # Inference has no weight gradient: rotate whichever is smaller, the tokens or the rows.
    with torch.no_grad():
        assert wide.choose_compute(torch.empty(4, 1280), wide._active()) == "input-centric"
        assert wide.choose_compute(torch.empty(4096, 1280), wide._active()) == "weight-centric"


def test_rejected_layers_give_clear_errors():
    with pytest.raises(TypeError, match="nn.Linear or nn.Conv2d"):
        OrthogonalAdapter(nn.Embedding(4, 4), "a", config("oft"))
    with pytest.raises(ValueError, match="grouped"):
        OrthogonalAdapter(nn.Conv2d(8, 8, 3, groups=2), "a", config("oft"))
    with pytest.raises(ValueError, match="Valid choices for width 18"):
        OrthogonalAdapter(nn.Linear(18, 4), "a", AdapterConfig(method="boft", block_size=4, n_factors=2))
