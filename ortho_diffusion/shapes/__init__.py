"""The shapes world: procedural 64x64 scenes with captions and ground truth, and a classical
detector that scores images of it.

    from ortho_diffusion import shapes
    scene = shapes.scene_from_seed(0)
    image = shapes.render(scene)          # (64, 64, 3) uint8
    text = shapes.caption(scene)          # "a large red circle on the left, on a white background"
    gt = shapes.ground_truth(scene, image)  # canny / segmentation / landmarks / keypoints
    found = shapes.detect(image)          # background + objects read back from pixels
"""

from .captions import caption, layout_free_caption, object_phrase, partial_caption
from .detector import Detection, DetectedObject, detect
from .groundtruth import (
    SEGMENTATION_CLASSES,
    SEGMENTATION_PALETTE,
    GroundTruth,
    canny_map,
    ground_truth,
    label_map,
    landmark_map,
)
from .render import render
from .scene import Scene, ShapeObject, make_scene, sample_scene, scene_from_seed
from .world import BACKGROUNDS, COLORS, POSITIONS, RESERVED_TOKENS, SHAPES, SIZES

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "POSITIONS",
    "RESERVED_TOKENS",
    "SEGMENTATION_CLASSES",
    "SEGMENTATION_PALETTE",
    "SHAPES",
    "SIZES",
    "DetectedObject",
    "Detection",
    "GroundTruth",
    "Scene",
    "ShapeObject",
    "canny_map",
    "caption",
    "detect",
    "ground_truth",
    "label_map",
    "landmark_map",
    "layout_free_caption",
    "make_scene",
    "object_phrase",
    "partial_caption",
    "render",
    "sample_scene",
    "scene_from_seed",
]
