"""Generation with control images in diffusers pipelines.

After ``od.load_adapter(pipe, "canny.safetensors")`` a ``StableDiffusionPipeline`` (or
``StableDiffusionXLPipeline``) becomes a :class:`StableDiffusionControlPipeline` (or
:class:`StableDiffusionXLControlPipeline`): the same object, components and scheduler, whose
call also takes the control image, as diffusers' ControlNet pipelines do::

    image = pipe("a red circle", image=control_image, control_scale=1.0).images[0]

Everything else (``guidance_scale``, ``num_images_per_prompt``, ``generator``, ...) is the
parent pipeline's.  ``od.set_scale(pipe, t)`` scales rotations and control encoder together.
The subclasses can also be built directly: ``StableDiffusionControlPipeline.from_pipe(pipe)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from .encoder import control_images, find_controlled

ControlImage = Image.Image | np.ndarray | torch.Tensor | list


def prepare_control_image(image: ControlImage, height: int, width: int) -> torch.Tensor:
    """Control image(s) to a float tensor ``(B, 3, height, width)`` in [0, 1].

    Accepts a PIL image, a ``(H, W[, 3])`` uint8 array, a float tensor ``(3, H, W)`` or
    ``(B, 3, H, W)`` in [0, 1], or a list of PIL images / arrays.  Images of another size are
    resized (nearest neighbour: control maps are crisp edges and flat labels).
    """
    if isinstance(image, torch.Tensor):
        t = image.float()
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[1] not in (1, 3):
            raise ValueError(f"a control tensor must be (B, 3, H, W) in [0, 1], got shape {tuple(image.shape)}")
        if t.shape[1] == 1:
            t = t.repeat(1, 3, 1, 1)
        if t.shape[-2:] != (height, width):
            t = torch.nn.functional.interpolate(t, size=(height, width), mode="nearest")
        return t
    items = image if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError("no control image given")
    out = []
    for item in items:
        if isinstance(item, np.ndarray):
            arr = item
            if arr.dtype != np.uint8:
                raise ValueError(f"control arrays must be uint8 (H, W, 3), got {arr.dtype}")
            item = Image.fromarray(arr)
        if not isinstance(item, Image.Image):
            raise ValueError(f"unsupported control image type {type(item).__name__}")
        item = item.convert("RGB")
        if item.size != (width, height):
            item = item.resize((width, height), Image.NEAREST)
        out.append(torch.from_numpy(np.asarray(item, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


def _batch_size(prompt: Any, kwargs: dict[str, Any]) -> int:
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)):
        return len(prompt)
    embeds = kwargs.get("prompt_embeds")
    return int(embeds.shape[0]) if embeds is not None else 1


class ControlPipelineMixin:
    """Adds ``image`` / ``control_scale`` to a text-to-image pipeline's ``__call__``."""

    def __call__(self, prompt: Any = None, image: ControlImage | dict[str, ControlImage] | None = None,
                 control_scale: float = 1.0, **kwargs: Any):
        """Generate like the parent pipeline, with the control encoders following ``image``.

        Args:
            prompt: as the parent pipeline.
            image: the control image(s): one for the whole batch, one per prompt, or one per
                generated image; or ``{adapter name: image(s)}`` when several control adapters
                are loaded.  ``None``: no control (the rotations still apply).
            control_scale: multiplies the control encoders' contribution (0 = no control).
            **kwargs: everything the parent pipeline's ``__call__`` accepts.
        """
        if image is None:
            return super().__call__(prompt, **kwargs)
        if find_controlled(self.unet) is None:
            raise ValueError("this pipeline has no control encoder: od.load_adapter a control adapter first")
        default = self.unet.config.sample_size * self.vae_scale_factor
        height = kwargs.pop("height", None) or default
        width = kwargs.pop("width", None) or default
        n = _batch_size(prompt, kwargs) * (kwargs.get("num_images_per_prompt") or 1)
        per_prompt = kwargs.get("num_images_per_prompt") or 1

        def fit(img: ControlImage) -> torch.Tensor:
            t = prepare_control_image(img, height, width)
            if t.shape[0] == n or t.shape[0] == 1:
                return t
            if t.shape[0] * per_prompt == n:
                return t.repeat_interleave(per_prompt, dim=0)  # latents are laid out prompt by prompt
            raise ValueError(f"{t.shape[0]} control images for {n} generated images: give 1, one per prompt or {n}")

        hints = {k: fit(v) for k, v in image.items()} if isinstance(image, dict) else fit(image)
        device = self.unet.device
        dtype = self.unet.dtype
        hints = {k: v.to(device, dtype) for k, v in hints.items()} if isinstance(hints, dict) else hints.to(device, dtype)
        with control_images(self.unet, hints, control_scale):
            return super().__call__(prompt, height=height, width=width, **kwargs)


class StableDiffusionControlPipeline(ControlPipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` whose call takes ``image=`` (control) and ``control_scale=``."""


class StableDiffusionXLControlPipeline(ControlPipelineMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` whose call takes ``image=`` (control) and ``control_scale=``."""


_UPGRADES = {
    StableDiffusionPipeline: StableDiffusionControlPipeline,
    StableDiffusionXLPipeline: StableDiffusionXLControlPipeline,
}


def enable_control(pipe: Any) -> Any:
    """Turn a plain SD / SDXL text-to-image pipeline into its control subclass, in place.

    The object keeps its components; only its class changes, so ``pipe(..., image=...)``
    works.  Other pipeline classes are left as they are (use
    :func:`~ortho_diffusion.control.encoder.control_images` around their call).
    """
    upgrade = _UPGRADES.get(type(pipe))
    if upgrade is not None:
        pipe.__class__ = upgrade
    return pipe


def disable_control(pipe: Any) -> Any:
    """Undo :func:`enable_control` (for example before ``save_pretrained``)."""
    for base, upgraded in _UPGRADES.items():
        if type(pipe) is upgraded:
            pipe.__class__ = base
    return pipe
