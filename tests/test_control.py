"""Control encoder, its storage in the adapter file, the control pipelines, data, preprocessors, metrics."""

import csv
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import ortho_diffusion as od
from ortho_diffusion import control, shapes
from ortho_diffusion.control import data as cdata
from ortho_diffusion.control import metrics, preprocess
from ortho_diffusion.formats import AdapterFile
from ortho_diffusion.testing import tiny_pipeline, tiny_unet, unet_inputs
from ortho_diffusion.images import DataError

from conftest import randomize

KW = dict(num_inference_steps=2, height=32, width=32, output_type="np")


def hint_for(unet, batch=2, seed=3):
    """Random control images at 4x the tiny UNets' 8x8 latents."""
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def with_control(pipe, name="ctl", method="oft"):
    if method:
        od.attach(pipe, od.AdapterConfig(method=method, block_size=8), adapter_name=name)
    enc = control.attach_control(pipe, adapter_name=name, downscale=4, channels=(8, 16, 16))
    control.enable_control(pipe)
    return enc


# ----------------------------------------------------------------------- encoder
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_encoder_at_initialisation_and_zero_scales_change_nothing(kind):
    unet = tiny_unet(kind)
    inputs = unet_inputs(unet)
    with torch.no_grad():
        base = unet(**inputs).sample
    enc = control.attach_control(unet, downscale=4, channels=(8, 16, 16))
    assert isinstance(unet.conv_in, control.ControlledConvIn)
    hint = hint_for(unet)
    with torch.no_grad(), control.control_images(unet, hint):
        assert torch.equal(unet(**inputs).sample, base)  # zero last layer: bit for bit
    randomize(enc.parameters(), std=0.2)
    with torch.no_grad():
        with control.control_images(unet, hint):
            live = unet(**inputs).sample
        with control.control_images(unet, hint, scale=0.0):
            assert torch.equal(unet(**inputs).sample, base)
        assert torch.equal(unet(**inputs).sample, base)  # no control image set
        od.set_scale(unet, 0.0)
        with control.control_images(unet, hint):
            assert torch.equal(unet(**inputs).sample, base)
    assert (live - base).abs().max() > 1e-3


def test_encoder_shapes_and_clear_errors():
    cfg = control.ControlEncoderConfig(out_channels=32, downscale=8, channels=(4, 8, 8, 16))
    enc = control.ControlEncoder(cfg)
    assert enc(torch.rand(3, 3, 64, 48)).shape == (3, 32, 8, 6)
    with pytest.raises(ValueError, match="power of two"):
        control.ControlEncoderConfig(out_channels=32, downscale=6)
    with pytest.raises(ValueError, match="stride-2 steps"):
        control.ControlEncoderConfig(out_channels=32, downscale=16, channels=(4, 8))
    unet = tiny_unet()
    enc = control.attach_control(unet, downscale=4, channels=(8, 16, 16))
    randomize(enc.parameters())
    with pytest.raises(ValueError, match="must be 4x the latent size"), control.control_images(unet, torch.rand(1, 3, 16, 16)):
        unet(**unet_inputs(unet))
    with pytest.raises(ValueError, match="3 control images do not divide a batch of 2"):
        with control.control_images(unet, torch.rand(3, 3, 32, 32)):
            unet(**unet_inputs(unet))
    with pytest.raises(ValueError, match="already attached"):
        control.attach_control(unet, downscale=4, channels=(8, 16, 16))


def test_gradients_reach_encoder_and_rotations_only():
    unet = tiny_unet()
    od.attach(unet, od.AdapterConfig(method="oft", block_size=8))
    enc = control.attach_control(unet, adapter_name="default", downscale=4, channels=(8, 16, 16))
    params = od.adapter_parameters(unet)
    assert all(any(p is q for q in params) for p in enc.parameters())
    with control.control_images(unet, hint_for(unet)):
        unet(**unet_inputs(unet)).sample.square().mean().backward()
    assert enc.zero_conv.weight.grad.abs().max() > 0  # the zero layer gets a gradient at once
    frozen = [p for n, p in unet.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    row = [r for r in od.summary(unet).rows if r.method == "control"]
    assert len(row) == 1 and row[0].parameters == sum(p.numel() for p in enc.parameters())


def test_fresh_encoder_features_keep_a_sparse_maps_layout():
    """Regression: with PyTorch's default init, seven convolutions shrank a Canny map's spatial
    signal to ~1e-3 and the zero layer barely learned in 400 steps. The body now keeps it."""
    edges = torch.zeros(8, 3, 64, 64)
    edges[:, :, 20, 10:40] = 1.0  # a few thin white lines on black, like a Canny map
    edges[:, :, 10:50, 30] = 1.0
    cfg = control.ControlEncoderConfig(out_channels=64, downscale=4, channels=(16, 32, 64, 128))
    spreads = []
    for seed in range(5):
        torch.manual_seed(seed)
        with torch.no_grad():
            feat = control.ControlEncoder(cfg).body(edges)
        spreads.append(float(feat.std(dim=(2, 3)).mean()))  # variation across positions
    assert min(spreads) > 0.02, spreads


# ---------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_pipeline_control_image_batches_with_guidance(kind):
    pipe = tiny_pipeline(kind)
    enc = with_control(pipe)
    randomize(enc.parameters(), std=0.3)
    h = hint_for(pipe.unet, 2)
    pil = [Image.fromarray((h[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for i in range(2)]
    gens = lambda n: [torch.Generator().manual_seed(i) for i in range(n)]  # noqa: E731
    # One control image for the batch, one per prompt (PIL), one per generated image (tensor).
    one = pipe(["a", "b"], image=h[:1], num_images_per_prompt=2, generator=gens(4), **KW).images
    per_prompt = pipe(["a", "b"], image=pil, num_images_per_prompt=2, generator=gens(4), **KW).images
    per_image = pipe(["a", "b"], image=h[[0, 0, 1, 1]], num_images_per_prompt=2, generator=gens(4), **KW).images
    assert one.shape == per_prompt.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(per_prompt, per_image, atol=2e-3)  # PIL rounding only
    np.testing.assert_allclose(one[:2], per_image[:2], atol=1e-5)  # first prompt: same control image
    assert np.abs(one[2:] - per_image[2:]).max() > 1e-3  # second prompt follows its own control image
    # Same image as a batch of one: guidance's [uncond; cond] batch gets the right copies.
    alone = pipe("b", image=h[1:], generator=torch.Generator().manual_seed(2), **KW).images
    np.testing.assert_allclose(alone[0], per_image[2], atol=1e-5)
    no_control = pipe("b", generator=torch.Generator().manual_seed(2), **KW).images
    zero = pipe("b", image=h[1:], control_scale=0.0, generator=torch.Generator().manual_seed(2), **KW).images
    np.testing.assert_array_equal(no_control, zero)
    with pytest.raises(ValueError, match="3 control images for 4 generated images"):
        pipe(["a", "b"], image=h[[0, 1, 1]], num_images_per_prompt=2, **KW)


def test_save_load_round_trip_and_validation_before_touching(tmp_path):
    pipe = tiny_pipeline("sd15")
    enc = with_control(pipe, name="default")
    randomize(od.adapter_parameters(pipe), std=0.1)
    path = od.save_adapter(pipe, tmp_path / "canny.safetensors")
    file = AdapterFile(path)
    assert file.parts == ["control"]
    assert set(file.part_tensors("control")) == set(enc.state_dict())
    assert json.loads(file.metadata["control.config"])["downscale"] == 4
    h = hint_for(pipe.unet, 1)
    ref = pipe("a", image=h, generator=torch.Generator().manual_seed(0), **KW).images

    fresh = tiny_pipeline("sd15")
    od.load_adapter(fresh, path)
    assert type(fresh).__name__ == "StableDiffusionControlPipeline"
    out = fresh("a", image=h, generator=torch.Generator().manual_seed(0), **KW).images
    np.testing.assert_allclose(out, ref, atol=1e-6)

    # A UNet of another architecture: refused, nothing attached.
    other = tiny_pipeline("sd2")
    with pytest.raises(od.AdapterFileError, match="another"):
        od.load_adapter(other, path)
    assert not isinstance(other.unet.conv_in, control.ControlledConvIn) and not od.summary(other).rows
    # A damaged encoder tensor: refused before the rotations are attached.
    tensors = dict(file.tensors)
    tensors["control/zero_conv.weight"] = tensors["control/zero_conv.weight"][:, :-1].contiguous()
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "bad.safetensors", metadata=file.metadata)
    clean = tiny_pipeline("sd15")
    with pytest.raises(od.AdapterFileError, match="control encoder: tensor zero_conv.weight has shape"):
        od.load_adapter(clean, tmp_path / "bad.safetensors")
    assert not od.summary(clean).rows and not isinstance(clean.unet.conv_in, control.ControlledConvIn)
    # The encoder alone (no rotations) round-trips too.
    solo = tiny_unet()
    randomize(control.attach_control(solo, downscale=4, channels=(8, 16, 16)).parameters())
    od.save_adapter(solo, tmp_path / "solo.safetensors")
    again = tiny_unet()
    od.load_adapter(again, tmp_path / "solo.safetensors")
    inputs = unet_inputs(solo)
    with torch.no_grad(), control.control_images(solo, hint_for(solo)), control.control_images(again, hint_for(solo)):
        torch.testing.assert_close(again(**inputs).sample, solo(**inputs).sample)


def test_subject_and_control_adapters_compose_and_detach(tmp_path):
    pipe = tiny_pipeline("sd15")
    od.attach(pipe, od.AdapterConfig(method="boft", block_size=8, n_factors=2), adapter_name="subject")
    randomize(od.adapter_parameters(pipe), std=0.1)
    od.save_adapter(pipe, tmp_path / "subject.safetensors")
    ctl = tiny_pipeline("sd15")
    randomize(with_control(ctl, name="default").parameters(), std=0.2)
    randomize(od.adapter_parameters(ctl), std=0.1, seed=1)
    od.save_adapter(ctl, tmp_path / "canny.safetensors")

    both = tiny_pipeline("sd15")
    od.load_adapter(both, tmp_path / "subject.safetensors")
    od.load_adapter(both, tmp_path / "canny.safetensors")  # the fingerprint ignores adapters
    assert {r.adapter for r in od.summary(both).rows} == {"subject", "canny"}
    h = hint_for(both.unet, 1)
    run = lambda p: p("a", image=h, generator=torch.Generator().manual_seed(0), **KW).images  # noqa: E731
    composed = run(both)
    od.set_scale(both, 0.0, adapter_name="subject")
    only_control = run(ctl)
    np.testing.assert_allclose(run(both), only_control, atol=1e-5)
    od.set_scale(both, 1.0, adapter_name="subject")
    np.testing.assert_allclose(run(both), composed, atol=1e-6)
    od.detach(both, adapter_name="canny")
    assert not isinstance(both.unet.conv_in, control.ControlledConvIn)
    assert {r.adapter for r in od.summary(both).rows} == {"subject"}


# -------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    cdata.write_shapes_dataset(folder, "segmentation", 3)
    return folder


def test_shapes_dataset_leaves_the_layout_out_of_the_chosen_share_of_captions(tmp_path):
    def captions(layout_free):
        folder = tmp_path / str(layout_free)
        cdata.write_shapes_dataset(folder, "canny", 8, first_seed=40, layout_free=layout_free)
        return [json.loads(line)["text"] for line in (folder / "metadata.jsonl").read_text().splitlines()]

    scenes = [shapes.scene_from_seed(40 + i) for i in range(8)]
    assert captions(0.0) == [shapes.caption(s) for s in scenes]
    assert captions(1.0) == [shapes.layout_free_caption(s) for s in scenes]
    half = captions(0.5)
    assert half[1::2] == [shapes.layout_free_caption(s) for s in scenes[1::2]]
    assert half[0::2] == [shapes.caption(s) for s in scenes[0::2]]
    assert not any(word in text for text in half[1::2] for word in ("left", "right", "top", "bottom", "center", "small", "large"))
    with pytest.raises(ValueError, match="between 0 and 1"):
        cdata.write_shapes_dataset(tmp_path / "bad", "canny", 2, layout_free=1.5)
    assert not (tmp_path / "bad").exists()  # refused before writing anything


def test_dataset_formats_give_the_same_examples(shapes_dir, tmp_path):
    ref = cdata.load_control_data(cdata.read_rows(str(shapes_dir)), 32)
    assert ref.images.shape == (3, 3, 32, 32) and ref.hints.shape == (3, 3, 32, 32)
    assert -1 <= ref.images.min() and ref.images.max() <= 1 and 0 <= ref.hints.min() and ref.hints.max() <= 1
    rows = [json.loads(line) for line in (shapes_dir / "metadata.jsonl").read_text().splitlines()]
    assert ref.captions == [r["text"] for r in rows]
    # Nearest-neighbour resizing keeps segmentation colours exact.
    colours = {tuple(c) for c in (ref.hints.permute(0, 2, 3, 1).reshape(-1, 3) * 255).round().int().tolist()}
    assert colours <= set(shapes.SEGMENTATION_PALETTE.values())

    table = shapes_dir / "rows.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["photo", "map", "prompt"])
        for r in rows:
            w.writerow([r["image"], r["conditioning_image"], r["text"]])
    cols = cdata.Columns("photo", "map", "prompt")
    from_csv = cdata.load_control_data(cdata.read_rows(str(table), columns=cols), 32)
    assert from_csv.captions == ref.captions and torch.equal(from_csv.hints, ref.hints)

    plain = tmp_path / "plain"
    (plain / "images").mkdir(parents=True)
    (plain / "conditioning_images").mkdir()
    for r in rows:
        name = r["image"].split("/")[-1]
        (plain / "images" / name).write_bytes((shapes_dir / r["image"]).read_bytes())
        (plain / "images" / name).with_suffix(".txt").write_text(r["text"])
        (plain / "conditioning_images" / name).write_bytes((shapes_dir / r["conditioning_image"]).read_bytes())
    from_folder = cdata.load_control_data(cdata.read_rows(str(plain)), 32)
    assert from_folder.captions == ref.captions and torch.equal(from_folder.images, ref.images)

    import datasets

    ds = datasets.Dataset.from_dict({
        "img": [Image.open(shapes_dir / r["image"]) for r in rows],
        "cond": [Image.open(shapes_dir / r["conditioning_image"]) for r in rows],
        "caption": [r["text"] for r in rows],
    }).cast_column("img", datasets.Image()).cast_column("cond", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    from_hf = cdata.load_control_data(cdata.read_rows(dataset_name=str(tmp_path / "hf"),
                                                      columns=cdata.Columns("img", "cond", "caption")), 32)
    assert from_hf.captions == ref.captions and torch.equal(from_hf.hints, ref.hints)
    with pytest.raises(DataError, match="no column"):
        cdata.read_rows(dataset_name=str(tmp_path / "hf"))
    with pytest.raises(DataError, match="never downloaded"):
        cdata.read_rows(dataset_name="someone/fill50k")

    # Images plus a preprocessor: the Canny maps are made from the photos.
    canny = cdata.load_control_data(cdata.read_rows(str(plain / "images"), need_conditioning=False), 64,
                                    preprocess=preprocess.canny)
    gt = shapes.ground_truth(shapes.scene_from_seed(0)).canny
    np.testing.assert_array_equal((canny.hints[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), gt)


def test_bad_rows_are_named(shapes_dir, tmp_path):
    lines = (shapes_dir / "metadata.jsonl").read_text().splitlines()

    def table(name, edit):
        rows = [json.loads(line) for line in lines]
        edit(rows)
        path = shapes_dir / name
        path.write_text("\n".join(json.dumps(r) for r in rows))
        return path

    missing = table("missing.jsonl", lambda rows: rows[1].update(conditioning_image="conditioning_images/nope.png"))
    with pytest.raises(DataError, match=r"missing.jsonl line 2: conditioning image .*nope.png does not exist"):
        cdata.load_control_data(cdata.read_rows(str(missing)), 32)
    Image.new("RGB", (40, 40)).save(shapes_dir / "small.png")
    mismatched = table("mismatch.jsonl", lambda rows: rows[2].update(conditioning_image="small.png"))
    with pytest.raises(DataError, match="mismatch.jsonl line 3: image is 64x64 but its conditioning image is 40x40"):
        cdata.load_control_data(cdata.read_rows(str(mismatched)), 32)
    (shapes_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    broken = table("broken.jsonl", lambda rows: rows[0].update(image="broken.png"))
    with pytest.raises(DataError, match="broken.jsonl line 1: image: .*broken.png: not a readable image"):
        cdata.load_control_data(cdata.read_rows(str(broken)), 32)
    nocol = table("nocol.jsonl", lambda rows: rows[0].pop("conditioning_image"))
    with pytest.raises(DataError, match=r"nocol.jsonl line 1: missing column\(s\) \['conditioning_image'\]"):
        cdata.read_rows(str(nocol))
    with pytest.raises(DataError, match="images/ and conditioning_images/"):
        cdata.read_rows(str(tmp_path))


# ----------------------------------------------------------------- preprocessors
def synthetic_face(size=256):
    """A drawn face (skin oval, hair, eyes, brows, nose, lips) that mediapipe's face mesh finds."""
    img = np.full((size, size, 3), (90, 120, 160), np.uint8)
    c = lambda v: int(v * size / 256)  # noqa: E731
    aa = cv2.LINE_AA
    cv2.ellipse(img, (c(128), c(135)), (c(70), c(92)), 0, 0, 360, (205, 160, 135), -1, aa)
    cv2.ellipse(img, (c(128), c(60)), (c(74), c(40)), 0, 180, 360, (50, 35, 25), -1, aa)
    for x in (100, 156):
        cv2.ellipse(img, (c(x), c(118)), (c(15), c(8)), 0, 0, 360, (245, 245, 245), -1, aa)
        cv2.circle(img, (c(x), c(118)), c(6), (70, 45, 30), -1, aa)
        cv2.circle(img, (c(x), c(118)), c(3), (10, 10, 10), -1, aa)
        cv2.ellipse(img, (c(x), c(100)), (c(18), c(5)), 0, 180, 360, (60, 40, 30), c(3), aa)
    cv2.line(img, (c(128), c(120)), (c(122), c(160)), (170, 120, 100), c(3), aa)
    cv2.ellipse(img, (c(128), c(163)), (c(12), c(5)), 0, 0, 360, (175, 125, 105), -1, aa)
    cv2.ellipse(img, (c(128), c(190)), (c(26), c(9)), 0, 0, 360, (170, 60, 70), -1, aa)
    cv2.line(img, (c(104), c(190)), (c(152), c(190)), (110, 30, 40), c(2), aa)
    return cv2.GaussianBlur(img, (0, 0), 1.5 * size / 256)


def test_canny_preprocessor_matches_the_shapes_ground_truth_and_thresholds_matter():
    scene = shapes.scene_from_seed(7)
    image = shapes.render(scene)
    edges = np.asarray(preprocess.canny(Image.fromarray(image)))
    np.testing.assert_array_equal(edges, shapes.ground_truth(scene, image).canny)
    loose = np.asarray(preprocess.canny(image, low_threshold=5, high_threshold=10))
    assert loose.shape == edges.shape and (loose > 0).sum() >= (edges > 0).sum()
    with pytest.raises(preprocess.PreprocessError, match="thresholds"):
        preprocess.canny(image, low_threshold=50, high_threshold=10)


def test_face_landmarks_offline_and_face_landmark_error():
    face = synthetic_face()
    points = preprocess.face_keypoints(face)
    assert len(points) == 1 and points[0].shape == (468, 2)
    assert 40 < points[0][:, 0].mean() < 216 and 40 < points[0][:, 1].mean() < 216
    drawn = np.asarray(preprocess.face_landmarks(Image.fromarray(face)))
    assert drawn.shape == face.shape and (drawn > 0).any()
    assert metrics.face_landmark_error(points[0], face) < 1e-6
    shifted = np.roll(face, 6, axis=1)  # the face moved 6 pixels right
    assert 4 < metrics.face_landmark_error(points[0], shifted) < 8
    assert metrics.face_landmark_error(points[0], np.zeros_like(face)) is None
    assert not (np.asarray(preprocess.face_landmarks(np.zeros((64, 64, 3), np.uint8))) > 0).any()


def test_segmentation_maps_checked_and_segmenter_needs_local_weights(tmp_path):
    gt = shapes.ground_truth(shapes.scene_from_seed(3))
    preprocess.check_segmentation_map(gt.segmentation)
    np.testing.assert_array_equal(preprocess.map_to_labels(gt.segmentation), gt.labels)
    np.testing.assert_array_equal(np.asarray(preprocess.labels_to_map(gt.labels)), gt.segmentation)
    photo = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    with pytest.raises(preprocess.PreprocessError, match="not a segmentation map"):
        preprocess.check_segmentation_map(photo)
    with pytest.raises(preprocess.PreprocessError, match="local transformers segmentation model.*nothing is downloaded"):
        preprocess.segment(photo, None)
    with pytest.raises(preprocess.PreprocessError, match="local transformers segmentation model"):
        preprocess.segment(photo, tmp_path / "no-weights")


# ----------------------------------------------------------------------- metrics
def test_metrics_score_ground_truth_high_and_wrong_scenes_low():
    good_iou, wrong_iou = metrics.MeanIoU(), metrics.MeanIoU()
    good, wrong = [], []
    for seed in range(12):
        scene = shapes.scene_from_seed(seed)
        image = shapes.render(scene)
        other = shapes.render(shapes.scene_from_seed(seed + 500))
        gt = shapes.ground_truth(scene, image)
        assert metrics.canny_scores(image, gt.canny) == (1.0, 1.0)
        good_iou.add(metrics.segment_shapes(image), gt.labels)
        wrong_iou.add(metrics.segment_shapes(other), gt.labels)
        good.append(metrics.landmark_error(gt.keypoints, image))
        wrong.append(metrics.landmark_error(gt.keypoints, other))
        assert metrics.canny_scores(other, gt.canny)[1] < 0.5
    assert good_iou.value() > 0.9 and wrong_iou.value() < 0.5
    assert np.mean(good) < 1.0 and np.mean(wrong) > 5.0
    blank = np.zeros((64, 64, 3), np.uint8)
    gt = shapes.ground_truth(shapes.scene_from_seed(0))
    assert metrics.landmark_error(gt.keypoints, blank) == metrics.MISSING_PENALTY
