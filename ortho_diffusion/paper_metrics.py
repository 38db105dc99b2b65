"""The DreamBooth papers' embedding metrics, computed with local encoder weights.

* DINO: mean cosine similarity between the ViT ``[CLS]`` embeddings of generated images
  and of the real subject images (all pairs).
* CLIP-I: the same with CLIP image embeddings.
* CLIP-T: mean cosine similarity between each generated image and its prompt (CLIP).

Nothing is downloaded: the encoders load from local folders (``local_files_only``); a
missing or unreadable folder is a clear :class:`EncoderUnavailable` error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


class EncoderUnavailable(ValueError):
    """No usable local encoder weights at the given path."""


def _as_pil(images) -> list[Image.Image]:
    return [i if isinstance(i, Image.Image) else Image.fromarray(np.asarray(i)) for i in images]


def _mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return float((a @ b.T).mean())


class ClipScorer:
    """CLIP-I and CLIP-T with a local ``CLIPModel`` folder (model, tokenizer, image processor)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise EncoderUnavailable(f"{path}: no local CLIP weights ({err})") from None

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        """``(N, D)`` image embeddings."""
        inputs = self.processor(images=_as_pil(images), return_tensors="pt")
        out = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """``(N, D)`` text embeddings."""
        inputs = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True)
        out = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def clip_i(self, generated, real) -> float:
        """Mean cosine similarity of all (generated, real) image pairs."""
        return _mean_pairwise_cosine(self.image_embeddings(generated), self.image_embeddings(real))

    def clip_t(self, generated, prompts: list[str]) -> float:
        """Mean cosine similarity of each generated image with its own prompt."""
        img = torch.nn.functional.normalize(self.image_embeddings(generated).float(), dim=-1)
        txt = torch.nn.functional.normalize(self.text_embeddings(prompts).float(), dim=-1)
        return float((img * txt).sum(-1).mean())


class DinoScorer:
    """DINO similarity with a local ViT / DINOv2 folder (model and image processor)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoImageProcessor, AutoModel

        try:
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
            self.processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise EncoderUnavailable(f"{path}: no local DINO/ViT weights ({err})") from None

    @torch.no_grad()
    def embeddings(self, images) -> torch.Tensor:
        """``(N, D)`` ``[CLS]`` embeddings."""
        inputs = self.processor(images=_as_pil(images), return_tensors="pt")
        return self.model(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0]

    def dino(self, generated, real) -> float:
        """Mean cosine similarity of all (generated, real) pairs."""
        return _mean_pairwise_cosine(self.embeddings(generated), self.embeddings(real))
