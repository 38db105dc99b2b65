"""LyCORIS/kohya export, read back by the lycoris-lora package's own loader, and imports.

Reference: lycoris-lora's ``create_network_from_weights`` + ``merge_to`` (its merge maths
for ``diag-oft``, ``boft`` and full ``.diff`` modules) must give our merged weights; files
made by lycoris-lora's own ``DiagOFTModule`` / ``ButterflyOFTModule`` must load into
``od.load_adapter`` and give LyCORIS' merged weights.
"""

import pytest
import torch
from conftest import randomize
from safetensors import safe_open
from safetensors.torch import save_file

import ortho_diffusion as od
from ortho_diffusion.testing import tiny_pipeline, tiny_unet, unet_inputs

lycoris = pytest.importorskip("lycoris")


def adapted_weights(model):
    """``{module path: merged weight}`` of the adapted layers (the model itself is not touched)."""
    out = {}
    with torch.no_grad():
        for _, p, a in od.inject.iter_adapters(model):
            w = a.base_layer.weight
            out[p] = a.transform_weight(w.reshape(w.shape[0], -1).double(), a._active()).reshape(w.shape).float()
    return out


def lycoris_merge(path, unet, text_encoder=None):
    """Merge a kohya file into the models with lycoris-lora's own per-module loader.

    ``get_module`` + ``make_module`` are the calls ``create_network_from_weights`` makes for
    each module; its network constructor itself asserts on a diffusers UNet (it registers
    ``time_embedding.linear_1`` twice), so the modules are merged one by one here.
    """
    from lycoris.modules import get_module, make_module
    from safetensors.torch import load_file

    sd = load_file(str(path))
    names = {k.split(".")[0] for k in sd}
    found = 0
    for prefix, model in (("lora_unet", unet), ("lora_te", text_encoder)):
        for name, layer in (model.named_modules() if model is not None else []):
            # kohya names CLIP layers as in the checkpoints (text_model.encoder...), a level
            # transformers 5 no longer has.
            canonical = name if prefix == "lora_unet" or name.startswith("text_model.") else f"text_model.{name}"
            lora_name = f"{prefix}_{canonical}".replace(".", "_")
            if lora_name in names:
                lyco_type, params = get_module(sd, lora_name)
                module = make_module(lyco_type, params, lora_name, layer)
                module.merge_to(1.0)
                found += 1
    assert found == len(names)


def trained(tmp_path, **cfg):
    unet = tiny_unet("sd15")
    od.attach(unet, od.AdapterConfig(**cfg))
    randomize(od.adapter_parameters(unet), std=0.05)
    return unet, od.save_adapter(unet, tmp_path / "a.safetensors")


NATIVE = {
    "oft-rescale": dict(method="oft", block_size=4, side="output", rescale=True),
    "oft-constrained": dict(method="oft", block_size=4, side="output", constraint=0.05),
    "oftv2": dict(method="oftv2", block_size=4, side="output", neumann_terms=12),
    "boft-descending": dict(method="boft", block_size=4, n_factors=3, side="output", butterfly_order="descending",
                            rescale=True),
}


@pytest.mark.parametrize("case", list(NATIVE))
def test_lycoris_loads_native_keys_and_merges_our_weights(tmp_path, case):
    unet, path = trained(tmp_path, **NATIVE[case])
    out = tmp_path / "ly.safetensors"
    report = od.export(path, "lycoris", out, base=tiny_unet("sd15"))
    assert not any(".diff" in n for n in report.notes)
    with safe_open(str(out), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".oft_blocks") for k in keys)
    assert not any(k.endswith(".diff") for k in keys)
    assert meta["ss_network_module"] == "lycoris.kohya" and '"algo"' in meta["ss_network_args"]

    target = tiny_unet("sd15")
    lycoris_merge(out, target)
    ours = adapted_weights(unet)
    for p, w in ours.items():
        torch.testing.assert_close(target.get_submodule(p).weight, w, atol=1e-5, rtol=1e-5)
    assert max((w - tiny_unet("sd15").get_submodule(p).weight).abs().max() for p, w in ours.items()) > 1e-3


def test_input_side_adapters_export_as_exact_differences(tmp_path):
    unet, path = trained(tmp_path, method="boft", block_size=4, n_factors=2, rescale=True)
    with pytest.raises(od.ExportError, match="base model"):
        od.export(path, "lycoris", tmp_path / "x.safetensors")  # a .diff needs the base weights
    with pytest.raises(od.ExportError, match="input side"):
        od.export(path, "lycoris", tmp_path / "x.safetensors", base=tiny_unet("sd15"), mode="native")
    out = tmp_path / "ly.safetensors"
    report = od.export(path, "lycoris", out, base=tiny_unet("sd15"))
    assert any(".diff" in n for n in report.notes)
    target = tiny_unet("sd15")
    lycoris_merge(out, target)
    for p, w in adapted_weights(unet).items():
        torch.testing.assert_close(target.get_submodule(p).weight, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["input", "output"])
def test_low_rank_cayley_exports_as_exact_differences(tmp_path, side):
    unet, path = trained(tmp_path, method="lroft", rank=2, side=side)
    with pytest.raises(od.ExportError, match="not a block rotation"):
        od.export(path, "lycoris", tmp_path / "x.safetensors", base=tiny_unet("sd15"), mode="native")
    out = tmp_path / "ly.safetensors"
    od.export(path, "lycoris", out, base=tiny_unet("sd15"))
    target = tiny_unet("sd15")
    lycoris_merge(out, target)
    ours = adapted_weights(unet)
    for p, w in ours.items():
        torch.testing.assert_close(target.get_submodule(p).weight, w, atol=1e-5, rtol=1e-5)
    assert max((w - tiny_unet("sd15").get_submodule(p).weight).abs().max() for p, w in ours.items()) > 1e-3


def test_pipeline_export_covers_the_text_encoder(tmp_path):
    pipe = tiny_pipeline("sd15")
    cfg = od.AdapterConfig(method="oft", block_size=4, side="output")
    od.attach(pipe, cfg, text_encoder_config=od.AdapterConfig(method="oft", block_size=4, side="output",
                                                              targets="text-attn"))
    randomize(od.adapter_parameters(pipe), std=0.05)
    path = od.save_adapter(pipe, tmp_path / "p.safetensors")
    out = od.export(path, "lycoris", tmp_path / "ly.safetensors").paths[0]
    with safe_open(str(out), framework="pt") as f:
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in f.keys())
    fresh = tiny_pipeline("sd15")
    lycoris_merge(out, fresh.unet, fresh.text_encoder)
    od.merge(pipe)
    for _, p, a in od.inject.iter_adapters(pipe.text_encoder):
        torch.testing.assert_close(fresh.text_encoder.get_submodule(p).weight, a.base_layer.weight, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ import
def lycoris_file(tmp_path, algo, **kw):
    """A file made by lycoris-lora's own modules on the attention layers of a tiny UNet."""
    from lycoris.modules.boft import ButterflyOFTModule
    from lycoris.modules.diag_oft import DiagOFTModule

    cls = {"diag-oft": DiagOFTModule, "boft": ButterflyOFTModule}[algo]
    unet = tiny_unet("sd15")
    g = torch.Generator().manual_seed(5)
    state, merged = {}, {}
    for path, layer in unet.named_modules():
        if not path.endswith(("to_q", "to_v", "to_out.0")):
            continue
        name = "lora_unet_" + path.replace(".", "_")
        module = cls(name, layer, lora_dim=4, **kw)
        with torch.no_grad():
            module.oft_blocks.copy_(torch.randn(module.oft_blocks.shape, generator=g) * 0.05)
            if kw.get("rescaled"):
                module.rescale.copy_(1 + 0.05 * torch.randn(module.rescale.shape, generator=g))
            merged[path] = module.get_merged_weight(1.0, layer.weight.shape, "cpu")[0].detach()
        state.update({f"{name}.{k}": v.detach().half() for k, v in module.state_dict().items() if k != "org_weight"})
    save_file(state, str(tmp_path / f"{algo}.safetensors"))
    return tmp_path / f"{algo}.safetensors", merged


@pytest.mark.parametrize(
    "algo, kw",
    [("diag-oft", dict(rescaled=True)), ("diag-oft", dict(constraint=1e-4)), ("boft", dict(rescaled=True))],
)
def test_a_lycoris_file_imports_exactly(tmp_path, algo, kw):
    path, theirs = lycoris_file(tmp_path, algo, **kw)
    unet = od.load_adapter(tiny_unet("sd15"), path)
    rows = od.summary(unet).rows
    assert len(rows) == len(theirs) and all(r.side == "output" for r in rows)
    ours = adapted_weights(unet)
    for p, w in theirs.items():
        # The file is float16, LyCORIS merged from float32 values: compare at float16 precision.
        torch.testing.assert_close(ours[p], w, atol=2e-4, rtol=1e-3)
    base = run(tiny_unet("sd15"))
    od.set_scale(unet, 0.0)
    assert torch.equal(run(unet), base)  # the slider goes back to the base model exactly
    od.set_scale(unet, 0.5)
    assert (run(unet) - base).abs().max() > 0


def test_import_converts_lycoris_exactly_in_float32(tmp_path):
    """Our export, re-imported: the rotation comes back to float32 rounding."""
    unet, path = trained(tmp_path, **NATIVE["boft-descending"])
    out = od.export(path, "lycoris", tmp_path / "ly.safetensors").paths[0]
    back = od.load_adapter(tiny_unet("sd15"), out)
    torch.testing.assert_close(run(back), run(unet), atol=1e-5, rtol=1e-5)


def run(unet):
    with torch.no_grad():
        return unet(**unet_inputs(unet)).sample


def test_lycoris_import_refuses_other_algorithms_and_models(tmp_path):
    lora = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 4)}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    with pytest.raises(od.AdapterFileError, match="only diag-oft and boft"):
        od.load_adapter(tiny_unet("sd15"), tmp_path / "lora.safetensors")
    path, _ = lycoris_file(tmp_path, "diag-oft")
    with pytest.raises(od.AdapterFileError, match="does not exist in this model"):
        od.load_adapter(tiny_unet("sdxl"), path)
