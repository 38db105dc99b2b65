"""training/train_dreambooth.py on tiny SD 1.x / 2.x / SDXL folders built offline."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ortho_diffusion as od
from ortho_diffusion.diffusion import load_pipeline
from ortho_diffusion.testing import tiny_pipeline
from ortho_diffusion.training.common import run_main
from ortho_diffusion.training.dreambooth import build_parser, run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_dreambooth.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for kind in ("sd15", "sd2", "sdxl"):
        tiny_pipeline(kind, folder=root / kind)
    return root


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 48), (64, 64), (33, 70)]):
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        img.save(folder / f"img{i}.{'png' if i != 1 else 'jpg'}")
    (folder / "img0.txt").write_text("a sks circle on a white background")
    (folder / "notes.md").write_text("not an image")
    return folder


def train(args):
    return run_main(run, build_parser(), args)


def base_args(model, instance_dir, out, steps=3, **extra):
    args = [
        "--pretrained_model_name_or_path", str(model),
        "--instance_data_dir", str(instance_dir),
        "--instance_prompt", "a sks circle",
        "--output_dir", str(out),
        "--max_train_steps", str(steps),
        "--train_batch_size", "2",
        "--sample_steps", "2",
        "--num_validation_images", "2",
        "--report_to", "none",
        "--block_size", "8",
    ]
    for k, v in extra.items():
        args += [f"--{k}"] + ([] if v is True else [str(v)])
    return args


def test_prior_preservation_run_writes_a_loadable_adapter(models, instance_dir, tmp_path):
    out = tmp_path / "out"
    args = base_args(
        models / "sd15", instance_dir, out, steps=4,
        with_prior_preservation=True, class_data_dir=tmp_path / "class", class_prompt="a circle",
        num_class_images=2, validation_steps=2, checkpointing_steps=2,
    )
    with pytest.warns(UserWarning, match="notes.md: not an image"):
        assert train(args) == 0
    assert len(list((tmp_path / "class").glob("*.png"))) == 2  # generated and cached
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["loss_curve"]) == 4
    assert summary["trainable_parameters"] == od.summary(_loaded(models / "sd15", out)).total > 0
    assert summary["class_images"] == 2 and summary["arguments"]["method"] == "oft"
    assert (out / "samples.png").is_file() and (out / "validation" / "step-000002.png").is_file()
    assert (out / "checkpoints" / "checkpoint-000002" / "adapter.safetensors").is_file()


def _loaded(model_dir, out):
    pipe = load_pipeline(model_dir)
    od.load_adapter(pipe, out / "adapter.safetensors")
    return pipe


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_other_architectures_with_text_encoder_training(models, instance_dir, tmp_path, kind):
    out = tmp_path / kind
    assert train(base_args(models / kind, instance_dir, out, steps=2, train_text_encoder=True, method="boft",
                           n_factors=2)) == 0
    pipe = _loaded(models / kind, out)
    comps = {r.component for r in od.summary(pipe).rows}
    assert {"unet", "text_encoder"} <= comps
    base = load_pipeline(models / kind)
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    a = pipe("a sks circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = base("a sks circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(a - b).max() > 0  # the adapter changed the model


def test_config_file_and_command_line_precedence(models, instance_dir, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('method = "goft"\nmax_train_steps = 2\nlearning_rate = 0.01\n')
    out = tmp_path / "out"
    args = base_args(models / "sd15", instance_dir, out, steps=1) + ["--config", str(config)]
    args = [a for a in args if a != "--block_size" and a != "8"]
    assert train(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arguments"]["method"] == "goft"  # from the file
    assert summary["steps"] == 1  # the command line wins


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(models, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = base_args(models / "sd15", instance_dir, out, steps=50, rescale=True, learning_rate=1e30,
                     max_grad_norm=0, checkpointing_steps=1)
    assert train(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: loss became") and "last good checkpoint" in err
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert checkpoints and not (out / "adapter.safetensors").exists()
    od.load_adapter(load_pipeline(models / "sd15").unet, checkpoints[-1] / "adapter.safetensors")


def run_script(args, **kw):
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=ENV, capture_output=True, text=True, **kw)


def test_bad_inputs_give_one_error_line_and_write_nothing(models, instance_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    cases = {
        "empty": (base_args(models / "sd15", empty, tmp_path / "o1"), "no images found"),
        "corrupt": (base_args(models / "sd15", corrupt, tmp_path / "o2"), "a.png: not a readable image"),
        "model": (base_args(tmp_path / "nowhere", instance_dir, tmp_path / "o3"), "not a diffusers pipeline folder"),
        "method": (base_args(models / "sd15", instance_dir, tmp_path / "o4") + ["--block_size", "5"],
                   "cannot attach oft to .* not divisible by block size 5"),
    }
    for name, (args, message) in cases.items():
        proc = run_script(args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, name
        import re

        assert lines[-1].startswith("error: ") and re.search(message, lines[-1]), (name, lines[-1])
        assert not (tmp_path / f"o{list(cases).index(name) + 1}").exists(), name


def test_killed_run_resumes_to_the_same_adapter(models, instance_dir, tmp_path):
    common = dict(checkpointing_steps=3, learning_rate=0.01, lr_scheduler="cosine", validation_steps=1000)
    straight = tmp_path / "straight"
    assert run_script(base_args(models / "sd15", instance_dir, straight, steps=30, **common)).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *base_args(models / "sd15", instance_dir, killed, steps=30, **common)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "checkpoints").glob("checkpoint-*")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter.safetensors").exists(), "the run ended before it could be killed"
    done = [p for p in (killed / "checkpoints").glob("checkpoint-*") if (p / "state.json").is_file()]
    assert done

    resumed = run_script(base_args(models / "sd15", instance_dir, killed, steps=30, resume_from_checkpoint="latest",
                                   **common))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a = od.formats.AdapterFile(straight / "adapter.safetensors").tensors
    b = od.formats.AdapterFile(killed / "adapter.safetensors").tensors
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert max(a[k].abs().max().item() for k in a) > 1e-3  # it did train


def test_two_process_launch_trains_one_model(models, instance_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(SCRIPT), *base_args(models / "sd15", instance_dir, out, steps=3),
    ]
    proc = subprocess.run(cmd, env={**ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["ranks_in_sync"] is True
    _loaded(models / "sd15", out)


def test_lora_baseline_trains_and_resumes_its_own_tensors(models, instance_dir, tmp_path):
    out = tmp_path / "lora"
    args = base_args(models / "sd15", instance_dir, out, steps=4, method="lora", lora_rank=2, checkpointing_steps=2)
    assert train(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    n_lora = sum(p.numel() for n, p in load_pipeline(models / "sd15").unet.named_parameters() if "attn" in n and
                 n.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")))
    assert 0 < summary["trainable_parameters"] < n_lora
    resumed = base_args(models / "sd15", instance_dir, out, steps=6, method="lora", lora_rank=2,
                        resume_from_checkpoint="latest")
    assert train(resumed) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_lora_baseline_trains_the_text_encoder_too(models, instance_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "lora-te"
    args = base_args(models / "sd15", instance_dir, out, steps=3, method="lora", lora_rank=2, train_text_encoder=True,
                     checkpointing_steps=2, learning_rate=1e-2)
    assert train(args) == 0
    tensors = load_file(str(out / "adapter.safetensors"))
    text_b = [v for k, v in tensors.items() if k.startswith("text_encoder.") and ".lora_B." in k]
    assert text_b and any(v.abs().sum() > 0 for v in text_b)  # zero at initialisation: trained
    resumed = base_args(models / "sd15", instance_dir, out, steps=4, method="lora", lora_rank=2, train_text_encoder=True,
                        resume_from_checkpoint="latest")
    assert train(resumed) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_default_model_and_a_shipped_subject_with_prior_preservation(tmp_path):
    from ortho_diffusion.default_model import default_model_path
    from ortho_diffusion.subjects import SUBJECTS, subjects_root

    subject = SUBJECTS[0]
    out = tmp_path / "out"
    args = [
        "--instance_data_dir", str(subjects_root() / subject.name),
        "--instance_prompt", subject.instance_prompt,
        "--with_prior_preservation", "--class_data_dir", str(tmp_path / "class"),
        "--class_prompt", subject.class_prompt, "--num_class_images", "2",
        "--output_dir", str(out), "--max_train_steps", "3", "--train_batch_size", "2",
        "--sample_steps", "2", "--num_validation_images", "1", "--report_to", "none",
    ]
    assert train(args) == 0  # no model flag: the embedded default
    summary = json.loads((out / "summary.json").read_text())
    assert Path(summary["base_model"]) == Path(default_model_path())
    pipe = load_pipeline(default_model_path())
    od.load_adapter(pipe, out / "adapter.safetensors")
    image = pipe(subject.instance_prompt, num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


@pytest.mark.parametrize(
    "targets, suffixes",
    [
        ("unet-attn", ("to_q", "to_k", "to_v", "to_out.0")),
        ("unet-cross-kv", ("attn2.to_k", "attn2.to_v")),
        ("attn2.to_k,attn2.to_v", ("attn2.to_k", "attn2.to_v")),
        (r"re:.*attn1\.to_q,attn2.to_v", ("attn1.to_q", "attn2.to_v")),
    ],
)
def test_lora_baseline_adapts_the_layers_the_target_flag_names(targets, suffixes):
    from ortho_diffusion.training.lora_baseline import attach_lora

    pipe = tiny_pipeline("sd15")
    args = build_parser().parse_args(
        ["--instance_data_dir", "x", "--output_dir", "y", "--method", "lora", "--lora_rank", "2", "--unet_targets", targets]
    )
    expected = {n for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)}
    attach_lora(pipe, args)
    adapted = {n.split(".lora_A.")[0] for n, _ in pipe.unet.named_parameters() if ".lora_A." in n}
    assert expected and adapted == expected


def test_lora_baseline_checkpoint_round_trip_and_a_truncated_one(tmp_path):
    from ortho_diffusion.formats.native import AdapterFileError
    from ortho_diffusion.training.lora_baseline import attach_lora, restore_lora, save_lora

    pipe = tiny_pipeline("sd15")
    args = build_parser().parse_args(["--instance_data_dir", "x", "--output_dir", "y", "--method", "lora", "--lora_rank", "2"])
    params = attach_lora(pipe, args)
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    saved = [p.detach().clone() for p in params]
    path = tmp_path / "lora.safetensors"
    save_lora(pipe, path)
    with torch.no_grad():
        for p in params:
            p.zero_()
    restore_lora(pipe, path)
    assert all(torch.equal(p, s) for p, s in zip(params, saved))

    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        restore_lora(pipe, path)
