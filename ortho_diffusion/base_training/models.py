"""Architectures of the embedded base model (all standard diffusers / transformers classes).

Sizes are chosen for a 2-core CPU: a 64x64 image becomes an ``(8, 16, 16)`` latent, the
UNet has cross-attention at its 8x8 and 4x4 levels and in the middle block, and the text
encoder is a small CLIP transformer over 32 tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .tokenizer import MAX_LENGTH


@dataclass
class ModelSizes:
    """Widths and depths of the three networks (``tiny()`` is for smoke tests)."""

    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_norm_groups: int = 8
    latent_channels: int = 8
    """8, not SD's 4: with 4 channels the 16x16 latents blur 8-pixel stars and triangles
    (detector shape accuracy on reconstructions 84% vs 91% with 8, same training)."""
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers_per_block: int = 1
    unet_heads: int = 4
    unet_attention: tuple[bool, ...] = (False, True, True)
    """Per UNet level, whether it has (self + cross) attention. The 16x16 level has none: its
    transformer cost ~0.5 s of a 1.4 s training step here, and layout words are resolved at
    8x8 and below (a position region is 16+ pixels wide)."""
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    extra: dict = field(default_factory=dict)

    @classmethod
    def tiny(cls) -> "ModelSizes":
        return cls(vae_channels=(8, 16, 16), vae_norm_groups=4, unet_channels=(16, 32, 32),
                   unet_heads=2, text_width=32, text_layers=1, text_heads=2)

    def to_dict(self) -> dict:
        return asdict(self)


def make_vae(sizes: ModelSizes, image_size: int = 64) -> AutoencoderKL:
    """``AutoencoderKL``: ``(B, 3, 64, 64)`` in [-1, 1] <-> ``(B, 8, 16, 16)`` latents
    (one downsampling per block but the last: factor 4 for 3 blocks)."""
    n = len(sizes.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(sizes.vae_channels),
        layers_per_block=1,
        latent_channels=sizes.latent_channels,
        norm_num_groups=sizes.vae_norm_groups,
        sample_size=image_size,
        # No self-attention in the 16x16 middle block: a quarter of the VAE's step time, and
        # without it the VAE is fully convolutional, so it can train on crops.
        mid_block_add_attention=False,
    )


def make_text_encoder(sizes: ModelSizes, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A ``CLIPTextModel`` whose positions match the tokenizer's ``model_max_length``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.text_width,
        intermediate_size=4 * sizes.text_width,
        projection_dim=sizes.text_width,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_unet(sizes: ModelSizes, latent_size: int = 16) -> UNet2DConditionModel:
    """``UNet2DConditionModel`` on ``(B, 8, 16, 16)`` latents, cross-attention at the levels
    flagged in ``sizes.unet_attention`` and in the middle block, conditioned on
    ``(B, 32, text_width)`` text hidden states."""
    n = len(sizes.unet_channels)
    attn = tuple(sizes.unet_attention)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    if len(attn) != n:
        raise ValueError("unet_attention needs one flag per level")
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=sizes.latent_channels,
        out_channels=sizes.latent_channels,
        layers_per_block=sizes.unet_layers_per_block,
        block_out_channels=tuple(sizes.unet_channels),
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=sizes.text_width,
        attention_head_dim=sizes.unet_heads,
        norm_num_groups=min(32, sizes.unet_channels[0]),
    )


def make_scheduler() -> DDIMScheduler:
    """Sampling scheduler shipped with the model (also defines the training noise schedule).

    Zero terminal SNR (rescaled betas) with v-prediction: at the last timestep the latent is
    pure noise, so the model cannot read the background colour off leftover signal during
    training and must take it from the prompt (with SD's default schedule, flat images leak a
    mean colour through ``sqrt(alpha_bar_T) ~ 0.07``). ``clip_sample=False`` because latents
    have unit variance, not [-1, 1] range; "trailing" spacing starts sampling at t = 999.
    """
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
