"""peft export, loaded by peft's own loader, and peft folders imported back.

The exported folder must reproduce our outputs through ``PeftModel.from_pretrained``;
a folder peft itself saved must load into ``od.load_adapter`` and reproduce peft's outputs.
"""

import json

import pytest
import torch
from conftest import randomize

import ortho_diffusion as od
from ortho_diffusion.testing import tiny_pipeline, tiny_text_encoder, tiny_unet, unet_inputs

peft = pytest.importorskip("peft")


class _CpuBlockDiag:
    """Stands in for peft's CUDA block-diagonal extension so BOFT keeps all its factors."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*factor) for factor in x])]

    @staticmethod
    def backward(grad, x):
        n, r, b, _ = x.shape
        idx = torch.arange(r * b).view(r, b)
        return [torch.stack([g[idx[:, :, None], idx[:, None, :]] for g in grad])]


@pytest.fixture(autouse=True)
def _boft_on_cpu(monkeypatch):
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: _CpuBlockDiag)


def run(unet):
    with torch.no_grad():
        return unet(**unet_inputs(unet)).sample


def trained(tmp_path, std=0.05, **cfg):
    unet = tiny_unet("sd15")
    od.attach(unet, od.AdapterConfig(**cfg))
    randomize(od.adapter_parameters(unet), std=std)
    return unet, od.save_adapter(unet, tmp_path / "a.safetensors")


CASES = {
    "oft": dict(method="oft", block_size=8),
    "oft-rescale-coft": dict(method="oft", block_size=8, rescale=True, constraint=0.05),
    "oftv2": dict(method="oftv2", block_size=8),
    "boft-2": dict(method="boft", block_size=4, n_factors=2, rescale=True),
    "oft-attn-ff": dict(method="oft", block_size=8, targets="unet-attn-ff"),  # 1x1 conv proj_in/out
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_the_export_and_reproduces_our_outputs(tmp_path, case):
    from peft import PeftModel

    unet, path = trained(tmp_path, **CASES[case])
    ours = run(unet)
    (folder,) = od.export(path, "peft", tmp_path / "peft").paths
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == ("BOFT" if "rescale" in CASES[case] or case.startswith("boft") else "OFT")
    theirs = PeftModel.from_pretrained(tiny_unet("sd15"), str(folder))
    torch.testing.assert_close(run(theirs.base_model.model), ours, atol=1e-5, rtol=1e-5)
    assert (ours - run(tiny_unet("sd15"))).abs().max() > 1e-3  # the adapter does something


def test_strength_is_baked_into_the_export(tmp_path):
    from peft import PeftModel

    unet, path = trained(tmp_path, method="oft", block_size=8)
    od.set_scale(unet, 0.5)
    folder = od.export(path, "peft", tmp_path / "peft", scale=0.5).paths[0]
    theirs = PeftModel.from_pretrained(tiny_unet("sd15"), str(folder))
    torch.testing.assert_close(run(theirs.base_model.model), run(unet), atol=1e-5, rtol=1e-5)


def test_pipeline_export_has_one_folder_per_component(tmp_path):
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    pipe = tiny_pipeline("sd15")
    od.attach(pipe, od.AdapterConfig(method="oft", block_size=8),
              text_encoder_config=od.AdapterConfig(method="oft", block_size=8, targets="text-attn"))
    randomize(od.adapter_parameters(pipe), std=0.05)
    path = od.save_adapter(pipe, tmp_path / "p.safetensors")
    report = od.export(path, "peft", tmp_path / "peft")
    assert sorted(p.name for p in report.paths) == ["text_encoder", "unet"]
    # The other loader peft offers (the one diffusers uses): inject, then set the state dict.
    te = tiny_text_encoder()
    config = peft.OFTConfig.from_pretrained(str(tmp_path / "peft" / "text_encoder"))
    inject_adapter_in_model(config, te)
    state = load_file(str(tmp_path / "peft" / "text_encoder" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(te, {k.removeprefix("base_model.model."): v for k, v in state.items()})
    assert not result.unexpected_keys
    ids = torch.tensor([[0, 5, 9, 1]])
    with torch.no_grad():
        torch.testing.assert_close(te(ids).last_hidden_state, pipe.text_encoder(ids).last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "cfg, reason",
    [
        (dict(method="goft"), "Givens"),
        (dict(method="lroft", rank=2), "low-rank Cayley"),
        (dict(method="oft", block_size=8, side="output"), "output side"),
        (dict(method="boft", block_size=2, n_factors=3), "one or two factors"),
    ],
)
def test_refusals_name_the_reason(tmp_path, cfg, reason):
    _, path = trained(tmp_path, **cfg)
    with pytest.raises(od.ExportError, match=reason):
        od.export(path, "peft", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


# ------------------------------------------------------------------------------ import
PEFT_CASES = {
    "oft": lambda: peft.OFTConfig(oft_block_size=8, r=0, target_modules=["to_q", "to_v"], use_cayley_neumann=False),
    "oft-neumann": lambda: peft.OFTConfig(oft_block_size=8, r=0, target_modules=["to_q", "to_out.0"],
                                          use_cayley_neumann=True, num_cayley_neumann_terms=5),
    "oft-coft": lambda: peft.OFTConfig(oft_block_size=8, r=0, target_modules=["to_k"], use_cayley_neumann=False,
                                       coft=True, eps=0.02),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["to_q", "to_k"]),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_a_peft_folder_imports_exactly(tmp_path, case):
    from peft import get_peft_model

    model = get_peft_model(tiny_unet("sd15"), PEFT_CASES[case]())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "oft_R" in name or "boft_R" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.03)
            elif "boft_s" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.05)
    theirs = run(model.base_model.model)
    model.save_pretrained(str(tmp_path / "peft_adapter"))

    mine = od.load_adapter(tiny_unet("sd15"), tmp_path / "peft_adapter")
    torch.testing.assert_close(run(mine), theirs, atol=1e-5, rtol=1e-5)
    base = run(tiny_unet("sd15"))
    od.set_scale(mine, 0.0)  # the slider works on it: zero is the base model
    assert torch.equal(run(mine), base)
    od.set_scale(mine, 0.5)
    assert 0 < (run(mine) - base).abs().max() < (theirs - base).abs().max()


def test_peft_import_refuses_other_tuners_and_other_models(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_unet("sd15"), LoraConfig(r=2, target_modules=["to_q"])).save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(od.AdapterFileError, match="LORA"):
        od.load_adapter(tiny_unet("sd15"), tmp_path / "lora")
    get_peft_model(tiny_unet("sd15"), PEFT_CASES["oft"]()).save_pretrained(str(tmp_path / "oft"))
    with pytest.raises(od.AdapterFileError, match="does not exist"):
        od.load_adapter(tiny_text_encoder(), tmp_path / "oft")
    weights = tmp_path / "oft" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    with pytest.raises(od.AdapterFileError, match="adapter_model.safetensors: not a readable safetensors file"):
        od.load_adapter(tiny_unet("sd15"), tmp_path / "oft")
