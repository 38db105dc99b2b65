"""Tiny random models with the module names of real ones, built offline from configs.

Used by the test suite, the benchmarks' smoke runs and the training scripts' dry runs.
SD 1.x: conv ``proj_in``/``proj_out``, one text encoder.  SD 2.x: linear projections,
``v_prediction``.  SDXL: two text encoders, ``text_time`` conditioning, several
transformer layers per block.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

TEXT_WIDTH = 32


def tiny_tokenizer(folder: str | Path, max_length: int = 16):
    """A ``CLIPTokenizer`` over single characters, written to ``folder`` (no merges)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ",.'-")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)
    return tok


def tiny_text_encoder(seed: int = 0, with_projection: bool = False, vocab_size: int = 82, max_length: int = 16):
    """A 2-layer CLIP text encoder of width 32 (``CLIPTextModelWithProjection`` if asked)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        projection_dim=TEXT_WIDTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def tiny_unet(kind: str = "sd15", seed: int = 0):
    """A tiny ``UNet2DConditionModel`` with the layout of ``kind`` (``sd15``, ``sd2``, ``sdxl``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
    )
    if kind == "sd15":
        unet = UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_WIDTH,
            attention_head_dim=8,
        )
    elif kind == "sd2":
        unet = UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_WIDTH,
            attention_head_dim=(4, 8),
            use_linear_projection=True,
        )
    elif kind == "sdxl":
        unet = UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2 * TEXT_WIDTH,
            attention_head_dim=(4, 8),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH,
        )
    else:
        raise ValueError(f"unknown tiny UNet kind {kind!r}")
    return unet.eval()


def unet_inputs(unet, batch: int = 2, seed: int = 1) -> dict:
    """Random inputs for :func:`tiny_unet` models: ``sample`` (B,4,8,8), timesteps, context."""
    g = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim
    inputs = {
        "sample": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10, 500][:batch] * (batch // 2 + 1))[:batch],
        "encoder_hidden_states": torch.randn(batch, 5, width, generator=g),
    }
    if unet.config.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, TEXT_WIDTH, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1),
        }
    return inputs


def tiny_vae(seed: int = 0):
    """A tiny ``AutoencoderKL``: 32x32 RGB to 8x8x4 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()


def tiny_pipeline(kind: str = "sd15", folder: str | Path | None = None, seed: int = 0):
    """A complete tiny pipeline (SD 1.x, SD 2.x or SDXL); saved to ``folder`` when given."""
    import tempfile

    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    with tempfile.TemporaryDirectory(prefix="tiny-tokenizer-") as tok_dir:
        tokenizer = tiny_tokenizer(tok_dir)  # loaded into memory; the files can go
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if kind == "sd2" else "epsilon",
    )
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=tiny_vae(seed),
            text_encoder=tiny_text_encoder(seed),
            text_encoder_2=tiny_text_encoder(seed + 1, with_projection=True),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=tiny_unet("sdxl", seed),
            scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=tiny_vae(seed),
            text_encoder=tiny_text_encoder(seed),
            tokenizer=tokenizer,
            unet=tiny_unet(kind, seed),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(folder)
    return pipe
