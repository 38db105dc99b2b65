"""Merged export: a plain diffusers pipeline folder that reproduces the adapter's images."""

import numpy as np
import pytest
import torch
from conftest import randomize
from torch import nn

import ortho_diffusion as od
from ortho_diffusion.__main__ import main
from ortho_diffusion.testing import tiny_pipeline


def images(pipe):
    g = torch.Generator().manual_seed(0)
    return pipe("a red square", num_inference_steps=3, height=32, width=32, generator=g, output_type="np",
                guidance_scale=3.0).images


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "sd"
    pipe = tiny_pipeline("sd15", folder=folder)
    od.attach(pipe, od.AdapterConfig(method="boft", block_size=4, n_factors=2, rescale=True, targets="unet-attn-ff"),
              text_encoder_config=od.AdapterConfig(method="oft", block_size=8, side="output", targets="text-attn"))
    randomize(od.adapter_parameters(pipe), std=0.1)
    path = od.save_adapter(pipe, folder.parent / "adapter.safetensors")
    return folder, pipe, path


def test_merged_folder_loads_with_plain_diffusers_and_reproduces_the_images(adapted, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    folder, pipe, path = adapted
    out = tmp_path / "merged"
    assert main(["export", str(path), "--format", "merged", "--base", str(folder), "--out", str(out)]) == 0
    assert "merged" in capsys.readouterr().out
    merged = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    merged.set_progress_bar_config(disable=True)
    assert not any(isinstance(m, od.OrthogonalAdapter) for m in merged.unet.modules())
    assert isinstance(merged.unet.get_submodule("down_blocks.0.attentions.0.proj_in"), nn.Conv2d)
    ours, theirs = images(pipe), images(merged)
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    base = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    base.set_progress_bar_config(disable=True)
    assert np.abs(images(base) - ours).max() > 1e-3  # the adapter changes the images


def test_strength_is_folded_in(adapted, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder, pipe, path = adapted
    od.export(path, "merged", tmp_path / "half", base=folder, scale=0.5)
    merged = StableDiffusionPipeline.from_pretrained(str(tmp_path / "half"), safety_checker=None)
    merged.set_progress_bar_config(disable=True)
    od.set_scale(pipe, 0.5)
    try:
        np.testing.assert_allclose(images(merged), images(pipe), atol=1e-4)
    finally:
        od.set_scale(pipe, 1.0)


def test_merged_export_needs_a_pipeline_and_the_right_model(adapted, tmp_path):
    folder, _, path = adapted
    with pytest.raises(od.ExportError, match="base pipeline"):
        od.export(path, "merged", tmp_path / "m")
    other = tiny_pipeline("sd2", folder=tmp_path / "sd2")
    del other
    with pytest.raises(od.AdapterFileError, match="another base architecture"):
        od.export(path, "merged", tmp_path / "m", base=tmp_path / "sd2")
    assert not (tmp_path / "m").exists()
    assert main(["export", str(path), "--format", "peft", "--out", str(tmp_path / "p")]) == 2  # output side: refused
