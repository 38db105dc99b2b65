"""The classical detector is the measuring stick of prompt fidelity: it must read the
generator's own images almost perfectly, and tolerate the noise and blur of generated ones."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ortho_diffusion import shapes
from ortho_diffusion.shapes import world
from ortho_diffusion.shapes.fidelity import ATTRIBUTES, score

N = 600


def _accuracy(images, scenes):
    per = [score(s, shapes.detect(img)) for s, img in zip(scenes, images)]
    return {k: float(np.mean([p[k] for p in per])) for k in per[0]}


@pytest.fixture(scope="module")
def data():
    scenes = [shapes.scene_from_seed(50_000 + i) for i in range(N)]
    return scenes, [shapes.render(s) for s in scenes]


def test_detector_reads_rendered_scenes(data):
    scenes, images = data
    acc = _accuracy(images, scenes)
    for key in ("background", "count", *ATTRIBUTES):
        assert acc[key] >= 0.98, (key, acc)


def test_detector_tolerates_noise_and_blur(data):
    """Generated images are not flat: add Gaussian noise and a slight blur."""
    scenes, images = data
    rng = np.random.default_rng(0)
    degraded = []
    for img in images[:300]:
        x = cv2.GaussianBlur(img.astype(np.float32), (3, 3), 0.6) + rng.normal(0, 8, img.shape)
        degraded.append(np.clip(x, 0, 255).astype(np.uint8))
    acc = _accuracy(degraded, scenes[:300])
    for key in ("background", *ATTRIBUTES):
        assert acc[key] >= 0.95, (key, acc)


@pytest.mark.parametrize("shape", world.SHAPES)
@pytest.mark.parametrize("size", ["small", "large"])
def test_each_shape_and_size_at_every_position(shape, size):
    for position in world.POSITIONS:
        for bg, color in (("white", "blue"), ("black", "yellow"), ("gray", "green"), ("pink", "red")):
            scene = shapes.make_scene(bg, [(size, color, shape, position)])
            found = shapes.detect(shapes.render(scene))
            assert found.background == bg
            assert len(found.objects) == 1
            obj = found.objects[0]
            assert (obj.shape, obj.color, obj.size, obj.position) == (shape, color, size, position)


def test_plain_background_has_no_object():
    for name, rgb in world.BACKGROUNDS.items():
        img = np.empty((64, 64, 3), np.uint8)
        img[:] = rgb
        found = shapes.detect(img)
        assert found.background == name and found.objects == []


def test_wrong_prompt_scores_zero():
    """The fidelity score can fail: a red circle is not a blue square on the right."""
    drawn = shapes.make_scene("white", [("large", "red", "circle", "left")])
    asked = shapes.make_scene("black", [("small", "blue", "square", "right")])
    s = score(asked, shapes.detect(shapes.render(drawn)))
    assert s["background"] == 0 and s["shape"] == 0 and s["color"] == 0 and s["size"] == 0
    assert s["position"] == 0 and s["all"] == 0
    assert score(drawn, shapes.detect(shapes.render(drawn)))["all"] == 1
