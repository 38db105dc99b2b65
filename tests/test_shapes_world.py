"""The shapes world generator: determinism, coverage of the vocabulary, captions, and
ground-truth maps that line up with the rendered images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ortho_diffusion import shapes
from ortho_diffusion.shapes import world
from ortho_diffusion.shapes.geometry import outline
from ortho_diffusion.shapes.render import coverage

SEEDS = range(300)


@pytest.fixture(scope="module")
def scenes():
    return [shapes.scene_from_seed(s) for s in SEEDS]


def test_same_seed_same_scene_image_and_maps():
    for seed in (0, 7, 12345):
        a, b = shapes.scene_from_seed(seed), shapes.scene_from_seed(seed)
        assert a == b
        ia, ib = shapes.render(a), shapes.render(b)
        assert ia.dtype == np.uint8 and ia.shape == (64, 64, 3)
        assert np.array_equal(ia, ib)
        ga, gb = shapes.ground_truth(a), shapes.ground_truth(b)
        for name in ("canny", "labels", "segmentation", "landmarks"):
            assert np.array_equal(getattr(ga, name), getattr(gb, name)), name
        assert shapes.caption(a) == shapes.caption(b)


def test_different_seeds_give_different_scenes(scenes):
    captions = {shapes.caption(s) for s in scenes}
    assert len(captions) > 0.9 * len(scenes)


def test_every_word_of_the_world_occurs(scenes):
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(world.SHAPES)
    assert {o.color for o in objs} == set(world.COLORS)
    assert {o.size for o in objs} == set(world.SIZES)
    assert {o.position for o in objs} == set(world.POSITIONS)
    assert {s.background for s in scenes} == set(world.BACKGROUNDS)
    assert {len(s.objects) for s in scenes} == {1, 2}
    assert {"black", "white", "gray"} <= set(world.BACKGROUNDS)
    assert {"circle", "square", "triangle", "star"} <= set(world.SHAPES)


def test_objects_are_visible_and_never_overlap(scenes):
    for s in scenes:
        for o in s.objects:
            assert o.color != s.background
            lo, hi = world.SIZES[o.size]
            assert lo <= o.radius <= hi
        if len(s.objects) == 2:
            a, b = (outline(o).astype(np.float32) for o in s.objects)
            inter, _ = cv2.intersectConvexConvex(cv2.convexHull(a), cv2.convexHull(b))
            assert inter < 1e-3, s


def test_caption_wording():
    scene = shapes.make_scene(
        "white", [("large", "red", "circle", "left"), ("small", "blue", "square", "right")]
    )
    assert shapes.caption(scene) == (
        "a large red circle on the left and a small blue square on the right, on a white background"
    )
    assert shapes.layout_free_caption(scene) == "a red circle and a blue square, on a white background"
    single = shapes.make_scene("black", [("small", "yellow", "star", "center")])
    assert shapes.caption(single) == "a small yellow star in the center, on a black background"
    with pytest.raises(ValueError):
        shapes.make_scene("black", [("small", "orange", "star", "center")])


def test_caption_names_every_attribute(scenes):
    for s in scenes[:50]:
        text = shapes.caption(s)
        assert f"on a {s.background} background" in text
        for o in s.objects:
            assert f"{o.size} {o.color} {o.shape} {world.POSITION_PHRASES[o.position]}" in text


def test_partial_captions_always_name_the_shapes(scenes):
    rng = np.random.default_rng(0)
    texts = [shapes.partial_caption(s, rng) for s in scenes[:100]]
    for s, t in zip(scenes[:100], texts):
        for o in s.objects:
            assert o.shape in t
    assert any("background" not in t for t in texts) and any("background" in t for t in texts)


def test_image_pixels_have_the_colours_of_their_labels(scenes):
    """Pixels fully inside an object have its exact colour; fully outside, the background's."""
    for s in scenes[:100]:
        img = shapes.render(s)
        cov = coverage(s)
        bg_only = cov.sum(0) == 0
        assert (img[bg_only] == world.BACKGROUNDS[s.background]).all()
        for i, o in enumerate(s.objects):
            inside = cov[i] == 1.0
            assert inside.sum() > 30
            assert (np.abs(img[inside].astype(int) - world.COLORS[o.color]) <= 1).all()


def test_segmentation_matches_the_image_and_uses_the_palette(scenes):
    for s in scenes[:100]:
        img = shapes.render(s)
        gt = shapes.ground_truth(s, img)
        assert gt.labels.shape == (64, 64) and gt.segmentation.shape == (64, 64, 3)
        bg = np.asarray(world.BACKGROUNDS[s.background])
        cov = coverage(s)
        for i, o in enumerate(s.objects):
            cls = shapes.SEGMENTATION_CLASSES.index(o.shape)
            mask = cov[i] >= 0.5  # this object's pixels (two objects may share a class)
            assert mask.any() and (gt.labels[mask] == cls).all()
            # Labelled pixels are at least half object colour: not nearer the background (+ rounding).
            px = img[mask].astype(float)
            assert (np.linalg.norm(px - world.COLORS[o.color], axis=1) <= np.linalg.norm(px - bg, axis=1) + 3).all()
            assert (gt.segmentation[mask] == shapes.SEGMENTATION_PALETTE[o.shape]).all()
        assert (gt.segmentation[gt.labels == 0] == shapes.SEGMENTATION_PALETTE["background"]).all()
    colours = list(shapes.SEGMENTATION_PALETTE.values())
    assert len(set(colours)) == len(colours)


def test_canny_edges_lie_on_object_outlines(scenes):
    for s in scenes[:100]:
        img = shapes.render(s)
        gt = shapes.ground_truth(s, img)
        edges = gt.canny[..., 0] > 0
        assert gt.canny.shape == (64, 64, 3) and edges.any()
        boundary = cv2.morphologyEx((gt.labels > 0).astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
        near = cv2.dilate(boundary, np.ones((3, 3), np.uint8)) > 0
        assert (edges & ~near).sum() == 0  # no edge away from an outline
        # and most of each outline is found (low-contrast pairs still give colour edges)
        assert (near & edges).sum() >= 0.5 * boundary.sum() / 2


def test_keypoints_and_landmark_map(scenes):
    for s in scenes[:100]:
        gt = shapes.ground_truth(s)
        assert len(gt.keypoints) == len(s.objects)
        for o, pts in zip(s.objects, gt.keypoints):
            expected = {"circle": 4, "square": 4, "triangle": 3, "star": 10}[o.shape]
            assert pts.shape == (expected + 1, 2)
            assert np.allclose(pts[0], o.center)
            x, y = (int(np.floor(v)) for v in pts[0])
            # the centre dot has the class colour and sits inside the object's segment
            assert tuple(gt.landmarks[y, x]) == shapes.SEGMENTATION_PALETTE[o.shape]
            assert gt.labels[y, x] == shapes.SEGMENTATION_CLASSES.index(o.shape)
            # every vertex is at the circumradius (outer tips) or on the outline, and is drawn
            d = np.hypot(*(pts[1:] - pts[0]).T)
            assert np.isclose(d.max(), o.radius)
            for vx, vy in pts[1:]:
                vx, vy = int(np.clip(np.floor(vx), 0, 63)), int(np.clip(np.floor(vy), 0, 63))
                assert gt.landmarks[vy, vx].any()
        # nothing is drawn far from a keypoint
        lit = np.argwhere(gt.landmarks.any(-1))
        allpts = np.vstack(gt.keypoints)
        dmin = np.min(np.hypot(lit[:, 1, None] + 0.5 - allpts[None, :, 0], lit[:, 0, None] + 0.5 - allpts[None, :, 1]), axis=1)
        assert dmin.max() < 2.5
