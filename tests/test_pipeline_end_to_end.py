"""End to end on tiny diffusers pipelines built offline: train, save, load, generate."""

import torch
import torch.nn.functional as F
from conftest import randomize

import ortho_diffusion as od
from ortho_diffusion.testing import tiny_pipeline


def generate(pipe, seed=7):
    out = pipe(
        "a red circle",
        num_inference_steps=3,
        height=32,
        width=32,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )
    return out.images


def denoising_step(pipe, images, prompt_ids):
    latents = pipe.vae.encode(images).latent_dist.sample() * pipe.vae.config.scaling_factor
    noise = torch.randn_like(latents)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (latents.shape[0],))
    noisy = pipe.scheduler.add_noise(latents, noise, t)
    context = pipe.text_encoder(prompt_ids)[0]
    pred = pipe.unet(noisy, t, context).sample
    return F.mse_loss(pred, noise)


def test_train_save_load_generate_identically(tmp_path):
    pipe = tiny_pipeline("sd15")
    base_image = generate(tiny_pipeline("sd15"))
    od.attach(
        pipe,
        od.AdapterConfig(method="oft", block_size=8, targets="unet-attn"),
        text_encoder_config=od.AdapterConfig(method="boft", block_size=8, n_factors=2, targets="text-attn"),
    )
    params = od.adapter_parameters(pipe)
    assert {p.requires_grad for p in pipe.unet.parameters() if all(p is not q for q in params)} == {False}
    opt = torch.optim.AdamW(params, lr=3e-2)
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    ids = pipe.tokenizer(["a red circle"] * 4, padding="max_length", return_tensors="pt").input_ids
    for _ in range(20):
        loss = denoising_step(pipe, images, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.abs().sum() > 0 for p in params)  # every adapter moved away from the identity

    pipe.unet.eval()
    trained_image = generate(pipe)
    assert (trained_image - base_image).abs().max() > 1e-3
    path = od.save_adapter(pipe, tmp_path / "subject.safetensors")

    fresh = tiny_pipeline("sd15")
    od.load_adapter(fresh, path)
    assert torch.equal(generate(fresh), trained_image)
    od.set_scale(fresh, 0.0)
    assert torch.equal(generate(fresh), base_image)
    od.set_scale(fresh, 1.0)
    od.merge(fresh)
    torch.testing.assert_close(generate(fresh), trained_image, atol=1e-4, rtol=0)
    od.detach(fresh)
    torch.testing.assert_close(generate(fresh), base_image, atol=1e-5, rtol=0)


def test_sdxl_pipeline_with_both_text_encoders(tmp_path):
    pipe = tiny_pipeline("sdxl")
    od.attach(
        pipe,
        od.AdapterConfig(method="goft", targets="unet-attn"),
        text_encoder_config=od.AdapterConfig(method="oftv2", block_size=8, targets="text-attn"),
    )
    comps = {r.component for r in od.summary(pipe).rows}
    assert comps == {"unet", "text_encoder", "text_encoder_2"}
    randomize(od.adapter_parameters(pipe), std=0.05)
    image = generate(pipe)
    path = od.save_adapter(pipe, tmp_path / "xl.safetensors")
    fresh = tiny_pipeline("sdxl")
    od.load_adapter(fresh, path)
    assert torch.equal(generate(fresh), image)
    od.set_scale(fresh, 0.0)
    assert torch.equal(generate(fresh), generate(tiny_pipeline("sdxl")))
