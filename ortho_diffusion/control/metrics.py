"""Control metrics (the OFT / ControlNet protocol), classical and reproducible.

* Canny: IoU and F1 between the Canny map of the generated image (same thresholds as the
  control) and the control map, pixel by pixel.
* Segmentation: mean IoU over classes between the control's labels and the labels that the
  shapes world's classical segmenter (:func:`segment_shapes`) reads off the generated
  image; intersections and unions are summed over the whole evaluation set per class.
* Landmarks: mean L2 distance in pixels between the control keypoints and the keypoints
  detected on the generated image (:func:`detect_shape_keypoints` on the shapes world,
  mediapipe's face mesh on faces: :func:`face_landmark_error`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from ..shapes import SEGMENTATION_CLASSES
from ..shapes.detector import FOREGROUND_DISTANCE, MIN_AREA, background_rgb, classify_shape
from ..shapes.groundtruth import CANNY_HIGH, CANNY_LOW

MISSING_PENALTY = 32.0
"""Landmark error (pixels) charged for a control keypoint when nothing at all was detected
on the generated image: half the image width."""


def canny_edges(image: np.ndarray, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> ``(H, W)`` bool edges (OpenCV's Canny on the RGB image)."""
    return cv2.Canny(np.ascontiguousarray(image[..., :3]), low, high) > 0


def canny_scores(generated: np.ndarray, control: np.ndarray) -> tuple[float, float]:
    """``(IoU, F1)`` of the generated image's Canny edges against a control edge map.

    ``control``: ``(H, W)`` bool or an ``(H, W, 3)`` uint8 edge map (edges > 127).
    """
    target = control if control.dtype == bool else (control[..., 0] if control.ndim == 3 else control) > 127
    pred = canny_edges(generated)
    inter = float((pred & target).sum())
    union = float((pred | target).sum())
    iou = inter / union if union else 1.0
    denom = float(pred.sum() + target.sum())
    f1 = 2 * inter / denom if denom else 1.0
    return iou, f1


def _blobs(image: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Foreground blobs of a shapes-world image: ``(contour, mask)`` pairs, largest first."""
    img = np.ascontiguousarray(image[..., :3])
    bg = background_rgb(img)
    dist = np.sqrt(((img.astype(np.float32) - bg) ** 2).sum(-1))
    mask = (dist > FOREGROUND_DISTANCE).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = []
    for c in contours:
        blob = np.zeros_like(mask)
        cv2.drawContours(blob, [c], -1, 1, thickness=-1)
        blob &= mask  # holes inside a contour stay background
        if blob.sum() >= MIN_AREA:
            out.append((c, blob.astype(bool)))
    out.sort(key=lambda cb: -int(cb[1].sum()))
    return out


def segment_shapes(image: np.ndarray) -> np.ndarray:
    """The project's classical segmenter: ``(H, W)`` class ids of a shapes-world image.

    Foreground = pixels far from the border colour; each blob gets the shape class the
    shapes detector's contour rules give it (ids index :data:`SEGMENTATION_CLASSES`).
    """
    labels = np.zeros(image.shape[:2], np.uint8)
    for contour, blob in _blobs(image):
        labels[blob] = SEGMENTATION_CLASSES.index(classify_shape(contour, float(blob.sum())))
    return labels


@dataclass
class MeanIoU:
    """Accumulates per-class intersections and unions over many images."""

    n_classes: int = len(SEGMENTATION_CLASSES)
    inter: np.ndarray = field(init=False)
    union: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.inter = np.zeros(self.n_classes)
        self.union = np.zeros(self.n_classes)

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        for k in range(self.n_classes):
            p, t = pred == k, target == k
            self.inter[k] += (p & t).sum()
            self.union[k] += (p | t).sum()

    def value(self) -> float:
        """Mean over the classes that occur (in prediction or target) of IoU."""
        seen = self.union > 0
        return float((self.inter[seen] / self.union[seen]).mean()) if seen.any() else 1.0


def _unit_area(shape: str) -> float:
    """Area of a shape of circumradius 1, from the world's own outline."""
    from ..shapes.geometry import outline
    from ..shapes.scene import ShapeObject

    pts = outline(ShapeObject(shape, "red", "small", "center", (0.0, 0.0), 1.0))
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def detect_shape_keypoints(image: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Keypoints of each object of a shapes-world image: ``(shape, (K + 1, 2))`` per blob.

    The shape class comes from the contour rules; the centre from the blob's moments; the
    circumradius from its area (the world's shapes have fixed orientations, so centre,
    class and size fix every vertex); vertices then follow the world's geometry, in the
    order of :func:`ortho_diffusion.shapes.groundtruth.keypoints` (centre first).
    """
    from ..shapes.geometry import vertices
    from ..shapes.scene import ShapeObject

    found = []
    for contour, blob in _blobs(image):
        area = float(blob.sum())
        shape = classify_shape(contour, area)
        m = cv2.moments(blob.astype(np.uint8), binaryImage=True)
        cx, cy = m["m10"] / m["m00"] + 0.5, m["m01"] / m["m00"] + 0.5  # continuous coordinates
        radius = float(np.sqrt(area / _unit_area(shape)))
        obj = ShapeObject(shape, "red", "small", "center", (cx, cy), radius)
        found.append((shape, np.vstack([[cx, cy], vertices(obj)])))
    return found


def landmark_error(control_keypoints: list[np.ndarray], image: np.ndarray) -> float:
    """Mean L2 distance (pixels) from each control keypoint to the generated image's keypoints.

    Each control object (centre first, then vertices) is matched to the detected object with
    the nearest centre; each of its keypoints is then compared with the nearest keypoint of
    that object (the same vertex when the shapes agree).  When nothing is detected, each
    keypoint costs :data:`MISSING_PENALTY`.
    """
    detected = detect_shape_keypoints(image)
    errors: list[float] = []
    for pts in control_keypoints:
        pts = np.asarray(pts, dtype=np.float64)
        if not detected:
            errors += [MISSING_PENALTY] * len(pts)
            continue
        match = min(detected, key=lambda d: float(np.linalg.norm(d[1][0] - pts[0])))[1]
        d = np.linalg.norm(pts[:, None, :] - match[None, :, :], axis=-1).min(axis=1)
        errors += d.tolist()
    return float(np.mean(errors)) if errors else 0.0


def face_landmark_error(control_points: np.ndarray, image: np.ndarray) -> float | None:
    """Mean L2 (pixels) between control face-mesh points ``(468, 2)`` and those mediapipe
    finds on ``image`` (same index = same landmark); ``None`` when no face is found."""
    from .preprocess import face_keypoints

    faces = face_keypoints(image)
    if not faces:
        return None
    pred = faces[0]
    return float(np.linalg.norm(pred - np.asarray(control_points, dtype=np.float64), axis=1).mean())

