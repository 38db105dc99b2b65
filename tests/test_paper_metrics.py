"""DINO / CLIP-I / CLIP-T with tiny random encoders saved to local folders."""

import numpy as np
import pytest
import torch

from ortho_diffusion.paper_metrics import ClipScorer, DinoScorer, EncoderUnavailable
from ortho_diffusion.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    text = dict(vocab_size=82, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    clip.save_pretrained(root / "clip")
    image_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_proc, tokenizer=tiny_tokenizer(root / "clip")).save_pretrained(root / "clip")
    ViTModel(ViTConfig(**vision), add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    return root


def images(seed, n=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def test_scores_are_cosines_and_identical_sets_score_highest(encoders):
    clip, dino = ClipScorer(encoders / "clip"), DinoScorer(encoders / "dino")
    a, b = images(0), images(1)
    same_i, other_i = clip.clip_i(a[:1], a[:1]), clip.clip_i(a[:1], b[:1])
    assert same_i == pytest.approx(1.0, abs=1e-5) and -1 <= other_i < same_i
    assert dino.dino(a[:1], a[:1]) == pytest.approx(1.0, abs=1e-5)
    assert -1 <= dino.dino(a, b) < 1
    t = clip.clip_t(a, ["a red circle", "a blue square", "a star"])
    assert -1 <= t <= 1
    emb_img, emb_txt = clip.image_embeddings(a), clip.text_embeddings(["a red circle"] * 3)
    want = torch.nn.functional.cosine_similarity(emb_img, emb_txt).mean().item()
    assert clip.clip_t(a, ["a red circle"] * 3) == pytest.approx(want, abs=1e-6)


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(EncoderUnavailable, match="no local CLIP weights"):
        ClipScorer(tmp_path / "nowhere")
    with pytest.raises(EncoderUnavailable, match="no local DINO"):
        DinoScorer(tmp_path)
