"""Attaching adapters to tiny UNets (SD 1.5 and SDXL layouts) and a CLIP text encoder."""

import pytest
import torch
from conftest import randomize
from torch import nn

import ortho_diffusion as od
from ortho_diffusion.testing import tiny_text_encoder, tiny_unet, unet_inputs

METHOD_KW = {
    "oft": {"block_size": 8},
    "oftv2": {"block_size": 8},
    "boft": {"block_size": 8, "n_factors": 2},
    "goft": {},
    "qgoft": {},
    "lroft": {"rank": 2},
}


def build(model_kind):
    if model_kind == "text":
        model = tiny_text_encoder()
        ids = torch.tensor([[0, 5, 9, 13, 1, 1], [0, 7, 1, 1, 1, 1]])
        return model, lambda m: m(input_ids=ids).last_hidden_state, "text-attn-mlp"
    model = tiny_unet(model_kind)
    inputs = unet_inputs(model)
    return model, lambda m: m(**inputs).sample, "unet-attn-ff"


@pytest.mark.parametrize("method", list(METHOD_KW))
@pytest.mark.parametrize("model_kind", ["sd15", "sdxl", "text"])
def test_adapter_contract_on_real_architectures(method, model_kind):
    model, run, preset = build(model_kind)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = run(model)
    od.attach(model, od.AdapterConfig(method=method, targets=preset, rescale=True, **METHOD_KW[method]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all((".rotations." in n or ".magnitudes." in n) for n in trainable)
    assert od.summary(model).total == sum(p.numel() for p in od.adapter_parameters(model))
    with torch.no_grad():
        # Identity at init, to float32 rounding: adapted layers add the bias after the product
        # (the base fuses it into addmm), an ulp apart per layer, grown through the network
        # (1.0e-6 seen on one thread).  A trained adapter moves the output by > 1e-3 (below).
        torch.testing.assert_close(run(model), base, atol=1e-5, rtol=0)

        randomize(od.adapter_parameters(model), std=0.05)
        for layer in model.modules():
            if isinstance(layer, od.OrthogonalAdapter) and layer.rotations["default"].exact:
                r = layer.rotations["default"].matrix()
                assert (r @ r.T - torch.eye(r.shape[0])).abs().max() < 1e-5
        live = run(model)
        assert (live - base).abs().max() > 1e-3
    # Training through the real blocks: every rotation and magnitude gets a finite gradient
    # (the magnitudes' backward reads the layer outputs, which these models must not
    # modify in place).
    run(model).square().mean().backward()
    grads = [p.grad for p in od.adapter_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        od.set_scale(model, 0.0)
        assert torch.equal(run(model), base)  # t = 0: the base model, bit for bit
        od.set_scale(model, 1.0)
        torch.testing.assert_close(run(model), live, atol=0, rtol=0)

        od.merge(model)
        torch.testing.assert_close(run(model), live, atol=1e-5, rtol=1e-5)
        od.unmerge(model)
        for name, layer in model.named_modules():
            if isinstance(layer, od.OrthogonalAdapter):
                w = layer.base_layer.weight
                ref = weights[name + ".weight"]
                assert (w - ref).norm() / ref.norm() < 1e-6

        od.detach(model)
    assert not any(isinstance(m, od.OrthogonalAdapter) for m in model.modules())
    assert set(model.state_dict()) == set(weights)
    with torch.no_grad():
        # unmerge restores each weight to float32 rounding (checked above: 1e-6 relative), so
        # the output after detach is the base's to about that, grown through the network.
        torch.testing.assert_close(run(model), base, atol=1e-5, rtol=1e-5)


def test_presets_find_the_expected_layers():
    def count(model, preset):
        return len(od.inject.find_targets(model, od.AdapterConfig(targets=preset)))

    sd15, sdxl, text = tiny_unet("sd15"), tiny_unet("sdxl"), tiny_text_encoder()
    n_attn = sum(1 for n, _ in sd15.named_modules() if n.endswith((".attn1", ".attn2")))
    assert count(sd15, "unet-attn") == 4 * n_attn
    assert count(sd15, "unet-attn-ff") == 4 * n_attn + n_attn // 2 * 2 + 2 * sum(
        1 for n, _ in sd15.named_modules() if n.endswith(".proj_in")
    )
    n_attn_xl = sum(1 for n, _ in sdxl.named_modules() if n.endswith((".attn1", ".attn2")))
    assert count(sdxl, "unet-attn") == 4 * n_attn_xl
    assert count(text, "text-attn") == 4 * 2 and count(text, "text-attn-mlp") == 6 * 2
    assert isinstance(sd15.get_submodule("down_blocks.0.attentions.0.proj_in"), nn.Conv2d)


def test_custom_patterns_reach_3x3_convs():
    unet = tiny_unet("sd15")
    inputs = unet_inputs(unet)
    od.attach(unet, od.AdapterConfig(method="oft", block_size=8, targets=["re:.*resnets\\.\\d+\\.conv1"]))
    adapted = [n for n, m in unet.named_modules() if isinstance(m, od.OrthogonalAdapter)]
    assert adapted and all(n.endswith("conv1") for n in adapted)
    randomize(od.adapter_parameters(unet), std=0.05)
    with torch.no_grad():
        live = unet(**inputs).sample
        od.merge(unet)
        torch.testing.assert_close(unet(**inputs).sample, live, atol=1e-5, rtol=1e-5)


def test_bad_targets_and_layouts_leave_the_model_unchanged():
    unet = tiny_unet("sd15")
    names = [n for n, _ in unet.named_modules()]
    with pytest.raises(ValueError, match="no layer of UNet2DConditionModel matches"):
        od.attach(unet, od.AdapterConfig(targets="text-attn"))
    with pytest.raises(ValueError, match="cannot attach boft to .*Valid choices"):
        od.attach(unet, od.AdapterConfig(method="boft", block_size=8, n_factors=4))
    assert [n for n, _ in unet.named_modules()] == names


def test_two_named_adapters_compose_and_detach_separately():
    unet = tiny_unet("sd15")
    inputs = unet_inputs(unet)
    with torch.no_grad():
        base = unet(**inputs).sample
    od.attach(unet, od.AdapterConfig(method="oft", block_size=8), adapter_name="subject")
    randomize(od.adapter_parameters(unet, "subject"), std=0.05)
    with torch.no_grad():
        subject_only = unet(**inputs).sample
    od.attach(unet, od.AdapterConfig(method="goft", side="output"), adapter_name="style")
    randomize(od.adapter_parameters(unet, "style"), std=0.05, seed=2)
    with torch.no_grad():
        both = unet(**inputs).sample
        assert (both - subject_only).abs().max() > 1e-4
        od.set_scale(unet, 0.0, adapter_name="style")
        torch.testing.assert_close(unet(**inputs).sample, subject_only, atol=0, rtol=0)
        od.detach(unet, adapter_name="subject")
        od.set_scale(unet, 0.0)
        torch.testing.assert_close(unet(**inputs).sample, base, atol=0, rtol=0)
    od.detach(unet)
    assert not any(isinstance(m, od.OrthogonalAdapter) for m in unet.modules())


def test_qgoft_penalty_is_weighted_and_differentiable():
    te = tiny_text_encoder()
    od.attach(te, od.AdapterConfig(method="qgoft", targets="text-attn", qgoft_lambda=0.5))
    assert od.orthogonality_penalty(te).item() == 0.0
    randomize(od.adapter_parameters(te), std=0.1)
    penalty = od.orthogonality_penalty(te)
    raw = sum(m.rotations["default"].penalty() for m in te.modules() if isinstance(m, od.OrthogonalAdapter))
    torch.testing.assert_close(penalty, 0.5 * raw)
    penalty.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in od.adapter_parameters(te))


@pytest.mark.parametrize("model_kind", ["sd15", "sdxl", "text"])
@pytest.mark.parametrize("rescale", [False, True])
def test_output_side_keeps_outputs_and_trains_like_autograd(model_kind, rescale, monkeypatch):
    # On the output side both compute paths keep each layer's rotated output for backward
    # instead of the unrotated one: the real blocks must not modify those outputs in place,
    # and values and gradients must equal plain autograd through the rotation.
    from ortho_diffusion.rotations import ButterflyCayleyRotation

    model, run, preset = build(model_kind)
    od.attach(model, od.AdapterConfig(method="oft", targets=preset, side="output", rescale=rescale, block_size=8))
    randomize(od.adapter_parameters(model), std=0.05)
    params = od.adapter_parameters(model)
    adapters = [m for m in model.modules() if isinstance(m, od.OrthogonalAdapter)]
    assert adapters and all(m._closed_form(m._active()) for m in adapters if not m.is_conv)

    def train_step(compute):
        for layer in adapters:
            layer.compute = compute
        out = run(model)
        return out.detach(), torch.autograd.grad(out.square().mean(), params)

    results = {compute: train_step(compute) for compute in ("input-centric", "weight-centric")}
    with monkeypatch.context() as m:
        m.setattr(ButterflyCayleyRotation, "applies_as_blocks", lambda self, k=None: False)
        y_ref, g_ref = train_step("input-centric")  # autograd through Rotation.apply
    for y, grads in results.values():
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        for g, gr in zip(grads, g_ref):
            torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-4)
