"""training/train_control.py on tiny pipelines and small shapes-world datasets."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ortho_diffusion as od
from ortho_diffusion.control.data import write_shapes_dataset
from ortho_diffusion.diffusion import load_pipeline
from ortho_diffusion.formats import AdapterFile
from ortho_diffusion.testing import tiny_pipeline
from ortho_diffusion.training.common import run_main
from ortho_diffusion.training.control import build_parser, run

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_control.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for kind in ("sd15", "sdxl"):
        tiny_pipeline(kind, folder=root / kind)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("canny")
    write_shapes_dataset(folder, "canny", 6)
    return folder


def train(args):
    return run_main(run, build_parser(), args)


def base_args(model, data, out, steps=3, **extra):
    args = [
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(data),
        "--output_dir", str(out),
        "--max_train_steps", str(steps),
        "--train_batch_size", "2",
        "--resolution", "32",
        "--sample_steps", "2",
        "--num_validation_images", "2",
        "--report_to", "none",
        "--block_size", "8",
        "--control_channels", "8,16,16",
        "--control_task", "canny",
    ]
    for k, v in extra.items():
        args += [f"--{k}"] + ([] if v is True else [str(v)])
    return args


def test_run_writes_a_control_adapter_that_loads_into_a_pipeline(models, data, tmp_path):
    out = tmp_path / "out"
    args = base_args(models / "sd15", data, out, steps=4, validation_steps=2, checkpointing_steps=2,
                     proportion_empty_prompts=0.5, learning_rate=1e-2)
    assert train(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["control_task"] == "canny" and summary["training_examples"] == 6
    assert 0 < summary["encoder_parameters"] < summary["trainable_parameters"]
    assert (out / "validation" / "step-000002.png").is_file()
    grid = Image.open(out / "samples.png")
    assert grid.size == (3 * 32, 2 * 32)  # per validation row: the control image, then 2 samples
    file = AdapterFile(out / "adapter.safetensors")
    assert file.parts == ["control"] and file.metadata["control_task"] == "canny"
    pipe = load_pipeline(models / "sd15")
    od.load_adapter(pipe, out / "adapter.safetensors")
    assert od.summary(pipe).total == summary["trainable_parameters"]
    hint = Image.open(data / "conditioning_images" / "000000.png")
    image = pipe("a red circle", image=hint, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    assert np.abs(np.asarray(file.part_tensors("control")["zero_conv.weight"])).max() > 0  # it trained


def test_resume_from_a_checkpoint_gives_the_same_adapter(models, data, tmp_path):
    common = dict(checkpointing_steps=3, learning_rate=0.01, lr_scheduler="cosine", validation_steps=1000,
                  proportion_empty_prompts=0.3)
    straight = tmp_path / "straight"
    assert train(base_args(models / "sd15", data, straight, steps=6, **common)) == 0
    cut = tmp_path / "cut"
    shutil.copytree(straight / "checkpoints", cut / "checkpoints")  # as if killed after step 3
    assert train(base_args(models / "sd15", data, cut, steps=6, resume_from_checkpoint="latest", **common)) == 0
    a = AdapterFile(straight / "adapter.safetensors").tensors
    b = AdapterFile(cut / "adapter.safetensors").tensors
    assert a.keys() == b.keys() and any(k.startswith("control/") for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.mark.parametrize("method", ["none", "lora"])
def test_baselines_encoder_alone_and_lora(models, data, tmp_path, method):
    out = tmp_path / method
    assert train(base_args(models / "sd15", data, out, steps=2, method=method, lora_rank=2)) == 0
    summary = json.loads((out / "summary.json").read_text())
    if method == "none":
        assert summary["trainable_parameters"] == summary["encoder_parameters"]
        assert not AdapterFile(out / "adapter.safetensors").components
    else:
        assert summary["trainable_parameters"] > summary["encoder_parameters"]
        # The file holds exactly the trained tensors: LoRA's and the encoder's, no frozen weights.
        from safetensors.torch import load_file

        saved = load_file(str(out / "adapter.safetensors"))
        assert sum(t.numel() for t in saved.values()) == summary["trainable_parameters"]


@pytest.mark.parametrize("method", ["oft", "lora"])
def test_load_trained_rebuilds_the_finished_run(models, data, tmp_path, method):
    # The benchmark re-scores finished runs from their files, LoRA ones included (peft tensors
    # that od.load_adapter does not read): the rebuilt pipeline must give the trained one's images.
    from ortho_diffusion.training.control import load_trained
    from ortho_diffusion.training.control import train as train_pipeline

    out = tmp_path / method
    args = base_args(models / "sd15", data, out, steps=2, method=method, lora_rank=2, learning_rate=1e-2)
    trained, _ = train_pipeline(build_parser().parse_args(args))
    loaded = load_trained(build_parser().parse_args(args), out / "adapter.safetensors")
    hint = Image.open(data / "conditioning_images" / "000000.png")

    def image(pipe):
        return pipe("a red circle", image=hint, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = load_pipeline(models / "sd15")
    assert np.abs(image(trained) - image(base)).max() > 1e-3  # it trained
    np.testing.assert_allclose(image(loaded), image(trained), atol=1e-5)

    # benchmarks/weight_change.py reads the file; check it against the trained layers' own
    # weights: probed through the layer's forward (OFT), or peft's delta weight (LoRA).
    weight_change = load_script("benchmarks/weight_change.py")
    base_weights = {n: m.weight for n, m in base.unet.named_modules() if isinstance(m, torch.nn.Linear)}
    if method == "lora":
        deltas = weight_change.lora_deltas(out / "adapter.safetensors")
    else:
        deltas = weight_change.native_deltas(out / "adapter.safetensors", models / "sd15", base_weights)
    changes = weight_change.relative_changes(deltas, base_weights)
    assert len(changes) == 8 * sum(1 for n in base_weights if n.endswith("attn1.to_q"))  # attn1, attn2: q k v out
    layers = dict(trained.unet.named_modules())
    with torch.no_grad():
        for name, value in changes.items():
            layer, w = layers[name], base_weights[name]
            if method == "lora":
                delta = layer.get_delta_weight("default")
            else:
                eye = torch.eye(w.shape[1])
                delta = (layer(eye) - layer.base_layer(eye)).t()  # the bias cancels
            assert value == pytest.approx(float(delta.norm() / w.norm()), rel=1e-4)
            assert value > 0


def test_sdxl_and_hf_dataset_columns(models, data, tmp_path):
    import datasets

    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_dict({
        "target": [str(data / r["image"]) for r in rows],
        "source": [str(data / r["conditioning_image"]) for r in rows],
        "prompt": [r["text"] for r in rows],
    })
    ds.save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "xl"
    args = base_args(models / "sdxl", data, out, steps=2, image_column="target", conditioning_image_column="source",
                     caption_column="prompt", train_text_encoder=True)
    args[args.index("--train_data_dir"):args.index("--train_data_dir") + 2] = ["--dataset_name", str(tmp_path / "hf")]
    assert train(args) == 0
    pipe = load_pipeline(models / "sdxl")
    od.load_adapter(pipe, out / "adapter.safetensors")
    assert {r.component for r in od.summary(pipe).rows} == {"unet", "text_encoder", "text_encoder_2"}
    out = pipe(["a", "b"], image=Image.open(data / rows[0]["conditioning_image"]), num_inference_steps=2,
               height=32, width=32, output_type="np").images
    assert out.shape == (2, 32, 32, 3)


def run_script(args, **kw):
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=ENV, capture_output=True, text=True, **kw)


def test_bad_data_gives_one_error_line_and_writes_nothing(models, data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    Image.new("RGB", (48, 48)).save(bad / "conditioning_images" / "000004.png")
    (bad / "images" / "000002.png").write_bytes(b"not a png")
    mismatch = bad / "mismatch.jsonl"  # rows 1, 2 and 5 (whose conditioning image is now 48x48)
    rows = (data / "metadata.jsonl").read_text().splitlines()
    mismatch.write_text("\n".join([rows[0], rows[1], rows[4]]))
    cases = {
        "unreadable": (base_args(models / "sd15", bad, tmp_path / "o1"),
                       r"metadata.jsonl line 3: image: .*000002.png: not a readable image"),
        "mismatch": (base_args(models / "sd15", mismatch, tmp_path / "o2"),
                     "mismatch.jsonl line 3: image is 64x64 but its conditioning image is 48x48"),
        "missing": (base_args(models / "sd15", tmp_path / "nowhere", tmp_path / "o3"), "nowhere: no such file or folder"),
        "both": (base_args(models / "sd15", data, tmp_path / "o4") + ["--dataset_name", str(data)],
                 "exactly one of --train_data_dir and --dataset_name"),
    }
    for i, (name, (args, message)) in enumerate(cases.items(), 1):
        proc = run_script(args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, name
        assert lines[-1].startswith("error: ") and re.search(message, lines[-1]), (name, lines[-1])
        assert not (tmp_path / f"o{i}").exists(), name


def test_two_process_launch_trains_one_model(models, data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(SCRIPT), *base_args(models / "sd15", data, out, steps=3),
    ]
    proc = subprocess.run(cmd, env={**ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["ranks_in_sync"] is True
    pipe = load_pipeline(models / "sd15")
    od.load_adapter(pipe, out / "adapter.safetensors")
    assert torch.isfinite(AdapterFile(out / "adapter.safetensors").tensors["control/zero_conv.weight"]).all()


def test_encoder_learning_rate_scale(models, data, tmp_path):
    """After one AdamW step every parameter with a gradient moves by about its learning rate:
    the zero-initialised last encoder layer by lr x scale, the rotation generators by lr."""
    from safetensors.torch import load_file

    out = tmp_path / "scaled"
    assert train(base_args(models / "sd15", data, out, steps=1, learning_rate=1e-3, encoder_lr_scale=10,
                           lr_warmup_steps=0, validation_steps=0)) == 0
    tensors = load_file(str(out / "adapter.safetensors"))
    zero_conv = tensors["control/zero_conv.bias"].abs()
    assert 9e-3 < float(zero_conv.max()) < 1.1e-2
    generators = [t.abs().max() for k, t in tensors.items() if not k.startswith("control/")]
    assert generators and 9e-4 < float(max(generators)) < 1.1e-3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--encoder_lr_scale", "x"])
    assert train(base_args(models / "sd15", data, tmp_path / "bad", encoder_lr_scale=0)) != 0
