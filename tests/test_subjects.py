"""The shipped subjects: deterministic, unseen patterns, and the fidelity measure."""

import json

import numpy as np
from PIL import Image

from ortho_diffusion.shapes import make_scene, render, world
from ortho_diffusion.subjects import (
    SUBJECTS,
    backgrounds_for,
    color_composition,
    reference_composition,
    render_subject,
    shape_matches,
    silhouette_shape,
    subject_similarity,
    subjects_root,
    write_subject_assets,
)


def test_shipped_assets_are_what_the_code_draws(tmp_path):
    write_subject_assets(tmp_path)
    shipped = subjects_root()
    assert json.loads((shipped / "subjects.json").read_text()) == json.loads((tmp_path / "subjects.json").read_text())
    for s in SUBJECTS:
        files = sorted(p.name for p in (tmp_path / s.name).iterdir())
        assert 4 <= len([f for f in files if f.endswith(".png")]) <= 6
        assert files == sorted(p.name for p in (shipped / s.name).iterdir())
        for f in files:
            if f.endswith(".png"):
                assert np.array_equal(np.asarray(Image.open(tmp_path / s.name / f)), np.asarray(Image.open(shipped / s.name / f)))
            else:
                assert (tmp_path / s.name / f).read_text() == (shipped / s.name / f).read_text()
                assert s.token in (shipped / s.name / f).read_text()


def test_fidelity_separates_the_subject_from_plain_shapes():
    for s in SUBJECTS:
        ref = reference_composition(s)
        bg = backgrounds_for(s)[0]
        img, _ = render_subject(s, "left", bg)
        assert subject_similarity(img, s, ref) > 0.9 and shape_matches(img, s)
        for color in ("red", "blue", "green"):
            plain = render(make_scene(bg, [("large", color, s.shape, "left")]))
            assert subject_similarity(plain, s, ref) < 0.6  # one colour: half the composition at most
        others = [o for o in SUBJECTS if o is not s]
        for o in others:  # another subject's pattern is not this subject
            img_o, _ = render_subject(o, "center", backgrounds_for(o)[0])
            assert subject_similarity(img_o, s, ref) < 0.75


def test_empty_image_has_no_subject():
    s = SUBJECTS[0]
    blank = np.zeros((64, 64, 3), np.uint8)
    assert color_composition(blank, s).tolist() == [0.0, 0.0, 1.0]
    assert not shape_matches(blank, s)


def test_subject_shape_survives_a_seam_between_its_colours():
    """The VAE can draw a thin line where a subject's two colours meet; the silhouette must
    still read one object of the subject's shape, even if the line is background-coloured."""
    for s in SUBJECTS:
        bg = "white" if "white" not in [n for n, c in world.COLORS.items() if tuple(c) in s.colors] else "gray"
        img, _ = render_subject(s, "center", bg)
        seamed = img.copy()
        fg = np.linalg.norm(img.astype(float) - img[0, 0].astype(float), axis=-1) > 60
        # Colour boundaries with object on both sides: the seam cuts the object in two.
        cols = (np.abs(np.diff(img.astype(int), axis=1)).sum(-1) > 100) & fg[:, 1:] & fg[:, :-1]
        rows = (np.abs(np.diff(img.astype(int), axis=0)).sum(-1) > 100) & fg[1:] & fg[:-1]
        inner = np.zeros(fg.shape, bool)
        inner[:, 1:] |= cols
        inner[1:] |= rows
        seamed[inner] = img[0, 0]  # the seam takes the background colour: the worst case
        assert inner.sum() > 0
        assert silhouette_shape(seamed) == s.shape, s.name
        assert shape_matches(seamed, s)
