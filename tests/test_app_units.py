"""The app's building blocks without a server: names, library, uploads, training jobs.

Jobs are exercised with small stand-in scripts (progress lines, crashes, refusals, a
grandchild process, checkpoints), so the process-group handling is tested in seconds.
"""

from __future__ import annotations

import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import ortho_diffusion as od
from ortho_diffusion.app.actions import TrainSettings
from ortho_diffusion.app.jobs import Job, JobError, JobManager, launch_command, parse_progress
from ortho_diffusion.app.library import AdapterLibrary, LibraryError, check_name, read_info, suggest_name
from ortho_diffusion.app.uploads import UploadError, extract_zip, save_images
from ortho_diffusion.formats.native import architecture_fingerprint
from ortho_diffusion.testing import tiny_unet


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory) -> Path:
    unet = tiny_unet("sd15")
    od.attach(unet, od.AdapterConfig(method="oft", block_size=8))
    path = tmp_path_factory.mktemp("adapter") / "a.safetensors"
    od.save_adapter(unet, path, extra_metadata={"instance_prompt": "a sks circle", "task": "subject"})
    return path


@pytest.fixture
def fingerprints() -> dict[str, str]:
    return {"unet": architecture_fingerprint(tiny_unet("sd15"))}


# ------------------------------------------------------------------ names
@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", ".hidden", "-x", "a b", "x" * 65, "a.safetensors", "é"])
def test_unsafe_names_are_refused(bad):
    with pytest.raises(LibraryError, match="not a valid adapter name"):
        check_name(bad)


def test_good_names_and_suggestions():
    assert check_name(" my-dog_2 ") == "my-dog_2"
    assert suggest_name("My dog!.v2") == "My_dog_v2"
    assert suggest_name("../..") == "adapter"


# ---------------------------------------------------------------- library
def test_library_add_rename_delete(tmp_path, adapter_file, fingerprints):
    lib = AdapterLibrary(tmp_path / "adapters")
    info = lib.add(adapter_file, "dog", fingerprints=fingerprints)
    assert info.method == "oft" and info.parameters > 0 and info.instance_prompt == "a sks circle"
    assert info.fits(fingerprints)
    with pytest.raises(LibraryError, match="already exists"):
        lib.add(adapter_file, "dog")
    assert lib.free_name("dog") == "dog-2"
    lib.add(adapter_file, "cat")
    with pytest.raises(LibraryError, match="already exists"):
        lib.rename("dog", "cat")
    lib.rename("dog", "puppy")
    assert [i.name for i in lib.list()] == ["cat", "puppy"]
    lib.delete("cat")
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == ["puppy.safetensors"]
    with pytest.raises(LibraryError, match="no adapter named"):
        lib.delete("cat")


def test_library_refuses_other_models_and_junk(tmp_path, adapter_file):
    lib = AdapterLibrary(tmp_path / "adapters")
    with pytest.raises(LibraryError, match="another base model"):
        lib.add(adapter_file, "x", fingerprints={"unet": "0000000000000000"})
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(od.AdapterFileError):
        lib.add(junk, "junk")
    assert list((tmp_path / "adapters").iterdir()) == []
    # Junk copied in by hand is skipped by the listing, not an error.
    (tmp_path / "adapters" / "junk.safetensors").write_bytes(b"junk")
    assert lib.list() == []


def test_builtin_adapters_are_read_only(tmp_path, adapter_file):
    shipped = tmp_path / "assets" / "control"
    shipped.mkdir(parents=True)
    (shipped / "canny.safetensors").write_bytes(adapter_file.read_bytes())
    (tmp_path / "assets" / "weights.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # not an adapter
    lib = AdapterLibrary(tmp_path / "adapters", [tmp_path / "assets"])
    (info,) = lib.list()
    assert info.name == "canny" and info.builtin
    for action in (lambda: lib.rename("canny", "x"), lambda: lib.delete("canny")):
        with pytest.raises(LibraryError, match="built-in"):
            action()
    assert (shipped / "canny.safetensors").is_file()
    copy = lib.download_copy("canny", tmp_path / "dl")
    assert copy.read_bytes() == adapter_file.read_bytes()


def test_read_info_counts_parameters(adapter_file):
    info = read_info(adapter_file, "a", builtin=False)
    unet = tiny_unet("sd15")
    od.attach(unet, od.AdapterConfig(method="oft", block_size=8))
    assert info.parameters == sum(p.numel() for p in od.adapter_parameters(unet))


# ---------------------------------------------------------------- uploads
def test_save_images_is_all_or_nothing(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (20, 30), "red").save(good)
    bad = tmp_path / "bad.png"
    bad.write_text("text")
    dest = tmp_path / "run" / "instance"
    with pytest.raises(UploadError, match="bad.png: not a readable image"):
        save_images([str(good), str(bad)], dest)
    assert not dest.exists() and list((tmp_path / "run").iterdir()) == []
    out = save_images([str(good)], dest)
    assert [p.name for p in out] == ["000.png"] and Image.open(out[0]).size == (20, 30)


def test_huge_images_are_refused_before_decoding(tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("L", (6000, 6000)).save(huge)
    with pytest.raises(UploadError, match="huge.png: 6000x6000 is too large"):
        save_images([str(huge)], tmp_path / "out")


def test_zip_members_cannot_escape_and_bombs_are_refused(tmp_path):
    img = tmp_path / "i.png"
    Image.new("RGB", (8, 8), "blue").save(img)
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(img, "data/images/ok.png")
        # writestr keeps member names as given (write() would sanitise them).
        zf.writestr("../../evil.png", img.read_bytes())
        zf.writestr("/tmp/abs.png", img.read_bytes())
        zf.writestr("data/run.sh", "rm -rf /")
    out = extract_zip(archive, tmp_path / "x" / "data")
    assert [p.relative_to(tmp_path / "x" / "data").as_posix() for p in out] == ["data/images/ok.png"]
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/abs.png").exists()
    assert {p.name for p in (tmp_path / "x").iterdir()} == {"data"}

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.png", b"\0" * (3 * 1024 * 1024))
    with pytest.raises(UploadError, match="unpacks to more than"):
        extract_zip(bomb, tmp_path / "y" / "data", max_total_bytes=1024 * 1024)
    assert not (tmp_path / "y" / "data").exists()
    (tmp_path / "n.zip").write_bytes(b"PK but not really")
    with pytest.raises(UploadError, match="not a readable zip"):
        extract_zip(tmp_path / "n.zip", tmp_path / "z")


# ------------------------------------------------------------------- jobs
def test_parse_progress_reads_tqdm_segments():
    job = Job("subject", "x", Path("/tmp"), [], "")
    parse_progress(job, "class images:  40%|####      | 8/20 [00:01<00:02,  6.1it/s]")
    assert job.phase == "class images" and job.step == 0
    parse_progress(job, "training:  17%|#6        | 1/6 [00:00<00:00,  5.96it/s, loss=1.1580, lr=1.00e-03]")
    parse_progress(job, "training:  33%|###3      | 2/6 [00:00<00:00,  6.95it/s, loss=1.0977, lr=1.00e-03]")
    parse_progress(job, "training:  33%|###3      | 2/6 [00:00<00:00,  6.95it/s, loss=1.0977, lr=1.00e-03]")
    assert (job.phase, job.step, job.total) == ("training", 2, 6)
    assert job.losses == [(1, 1.158), (2, 1.0977)]
    parse_progress(job, "error: --instance_data_dir is required")
    assert job.message == "--instance_data_dir is required"


def test_launch_command_is_what_a_user_types(tmp_path):
    argv, shown = launch_command(Path(od.__file__).parents[1] / "training" / "train_dreambooth.py",
                                 ["--instance_prompt", "a sks dog"])
    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert shown.startswith("accelerate launch --num_processes 1 ")
    assert shown.endswith("training/train_dreambooth.py --instance_prompt 'a sks dog'")


def _alive(pid: int) -> bool:
    """Running (a zombie left for a parent that is gone does not count)."""
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.1)
    return True


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "fake_train.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def _run(manager: JobManager, tmp_path: Path, body: str, name: str = "job") -> Job:
    job = manager.start("subject", name, tmp_path / "run", _script(tmp_path, body), "fake")
    return job


def test_crash_and_refusal_publish_nothing(tmp_path):
    lib = AdapterLibrary(tmp_path / "adapters")
    manager = JobManager(lib)
    job = _run(manager, tmp_path, """
        import sys
        print("training:  50%|#####     | 1/2 [00:00<00:00, loss=0.5000, lr=1e-3]", file=sys.stderr, flush=True)
        raise RuntimeError("boom")
    """)
    manager.wait(30)
    assert job.state == "failed" and "crashed (exit code 1)" in job.message and "boom" in job.message
    assert job.losses == [(1, 0.5)]
    job = _run(manager, tmp_path, """
        import sys
        print("error: --learning_rate must be positive", file=sys.stderr)
        sys.exit(2)
    """)
    manager.wait(30)
    assert job.state == "failed"
    assert job.message == "the training script refused the run: --learning_rate must be positive"
    assert lib.list() == []


def test_success_publishes_the_adapter(tmp_path, adapter_file, fingerprints):
    lib = AdapterLibrary(tmp_path / "adapters")
    published = []
    manager = JobManager(lib, fingerprints, on_published=published.append)
    job = _run(manager, tmp_path, f"""
        import shutil
        shutil.copyfile({str(adapter_file)!r}, {str(tmp_path / 'run' / 'adapter.safetensors')!r})
    """, name="dog")
    manager.wait(30)
    assert job.state == "finished" and job.adapter == "dog" and published == ["dog"]
    assert [i.name for i in lib.list()] == ["dog"]


def test_one_job_at_a_time_and_stop_kills_the_group_keeping_the_checkpoint(tmp_path, adapter_file):
    lib = AdapterLibrary(tmp_path / "adapters")
    manager = JobManager(lib)
    run = tmp_path / "run"
    job = _run(manager, tmp_path, f"""
        import json, os, shutil, subprocess, sys, time
        ckpt = os.path.join({str(run)!r}, "checkpoints", "checkpoint-000003")
        os.makedirs(ckpt)
        shutil.copyfile({str(adapter_file)!r}, os.path.join(ckpt, "adapter.safetensors"))
        open(os.path.join(ckpt, "state.json"), "w").write(json.dumps({{"step": 3}}))
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open(os.path.join({str(run)!r}, "child.pid"), "w").write(str(child.pid))
        print("training:  50%|#####     | 4/8 [00:00<00:00, loss=0.4000]", file=sys.stderr, flush=True)
        time.sleep(600)
    """, name="dog")
    deadline = time.time() + 30
    while job.step < 4 and time.time() < deadline:
        time.sleep(0.1)
    assert job.step == 4 and job.active
    with pytest.raises(JobError, match="already running"):
        manager.start("control", "other", tmp_path / "run2", [sys.executable, "-c", "pass"], "x")
    child = int((run / "child.pid").read_text())
    message = manager.stop()
    assert job.state == "stopped"
    assert message == "stopped at step 4; the last checkpoint (step 3) was kept as adapter 'dog-step3'"
    assert [i.name for i in lib.list()] == ["dog-step3"]
    assert not _alive(child), "the grandchild must go with the process group"
    assert manager.stop() == "no training job is running"


def test_stop_before_a_checkpoint_keeps_nothing(tmp_path):
    lib = AdapterLibrary(tmp_path / "adapters")
    manager = JobManager(lib)
    job = _run(manager, tmp_path, """
        import sys, time
        print("training:   0%|          | 1/8 [00:00<00:00, loss=0.4000]", file=sys.stderr, flush=True)
        time.sleep(600)
    """)
    deadline = time.time() + 30
    while job.step < 1 and time.time() < deadline:
        time.sleep(0.1)
    assert "before the first checkpoint" in manager.stop()
    assert lib.list() == []


def test_adapter_values_survive_the_library(tmp_path, adapter_file):
    """What the library stores is the file itself: the tensors load back unchanged."""
    lib = AdapterLibrary(tmp_path / "adapters")
    info = lib.add(adapter_file, "x")
    unet = tiny_unet("sd15")
    od.load_adapter(unet, info.path)
    ref = tiny_unet("sd15")
    od.load_adapter(ref, adapter_file)
    for a, b in zip(od.adapter_parameters(unet), od.adapter_parameters(ref)):
        assert torch.equal(a, b)


# ------------------------------------------------- model folders, requests
def test_model_folders_with_pickle_weights_are_refused(tmp_path):
    from ortho_diffusion.app.state import check_model_folder
    from ortho_diffusion.diffusion import ModelFolderError

    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "unet" / "config.json").write_text("{}")
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelFolderError, match="a pickle"):
        check_model_folder(model)
    # A stray or variant safetensors file would not stop diffusers from loading the pickle.
    (model / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"x")
    with pytest.raises(ModelFolderError, match="a pickle"):
        check_model_folder(model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    check_model_folder(model)  # the loader prefers this file over the pickle


def _context(tmp_path: Path, fingerprints: dict[str, str] | None = None):
    """An AppContext with a library and the real checks, but no pipeline (nothing is generated)."""
    from ortho_diffusion.app.actions import AppConfig, AppContext
    from ortho_diffusion.app.jobs import JobManager
    from ortho_diffusion.app.state import Limits, ModelState

    ctx = AppContext.__new__(AppContext)
    ctx.config = AppConfig(model_path=tmp_path / "model", data_dir=tmp_path / "data", builtin_adapter_dirs=[])
    ctx.data_dir = (tmp_path / "data").resolve()
    ctx.runs_dir = ctx.data_dir / "runs"
    ctx.library = AdapterLibrary(ctx.data_dir / "adapters")
    state = ModelState.__new__(ModelState)
    state.limits = Limits(size_step=8, native=64, max_size=256)
    state.fingerprints = fingerprints or {}
    state.model_path = tmp_path / "model"
    state.label = "tiny"
    ctx.state = state
    ctx.jobs = JobManager(ctx.library, state.fingerprints)
    ctx.tmp = tmp_path / "tmp"
    ctx.tmp.mkdir()
    return ctx


def _req_args(**over):
    args = dict(prompt="a sks circle", negative_prompt="", seed=0, steps=4, guidance=5.0, width=64, height=64,
                adapters=[], t=1.0, per_factor=False, n_factors=1, control_file=None, preprocessor="Canny edges",
                control_scale=1.0)
    args.update(over)
    return args


@pytest.mark.parametrize("field, value, message", [
    ("seed", None, "seed must be a number"),
    ("steps", float("inf"), "steps must be a finite number"),
    ("steps", 2.5, "steps must be a whole number"),
    ("guidance", "lots", "guidance must be a number"),
    ("t", float("nan"), "rotation strength t must be a finite number"),
    ("control_scale", 5.0, "control strength must be between 0 and 2"),
    ("control_scale", None, "control strength must be a number"),
    ("n_factors", -1, "cannot be negative"),
    ("width", 60, "width 60 is not allowed"),
    ("prompt", "  ", "the prompt is empty"),
])
def test_bad_generation_settings_get_readable_messages(tmp_path, field, value, message):
    from ortho_diffusion.app.state import GenerationError

    ctx = _context(tmp_path)
    with pytest.raises(GenerationError, match=message):
        ctx.request(**_req_args(**{field: value}))


def test_request_takes_one_adapter_name_as_a_string(tmp_path):
    ctx = _context(tmp_path)
    assert ctx.request(**_req_args(adapters="dog", steps=25.0)).adapters == ["dog"]
    assert ctx.request(**_req_args(adapters=None)).adapters == []
    with pytest.raises(LibraryError, match="not a valid adapter name"):
        ctx.request(**_req_args(adapters=["../dog"]))


def test_status_line_says_what_was_rendered(tmp_path, fingerprints):
    import numpy as np

    unet = tiny_unet("sd15")
    od.attach(unet, od.AdapterConfig(method="boft", block_size=4, n_factors=2))
    boft = tmp_path / "boft.safetensors"
    od.save_adapter(unet, boft, extra_metadata={"task": "subject"})
    ctx = _context(tmp_path, fingerprints)
    ctx.library.add(boft, "bf", fingerprints=fingerprints)
    req = ctx.request(**_req_args(adapters=["bf"], per_factor=True, n_factors=0, t=0.5))
    assert "t = 0.50 · bf · first 0 of 2 BOFT factors" in ctx.describe(req)
    req.n_factors = 7
    assert "first 2 of 2 BOFT factors" in ctx.describe(req)
    req.control_image = np.zeros((64, 64, 3), np.uint8)
    assert "control image unused (no control adapter selected)" in ctx.describe(req)
    assert "base model (no adapter selected)" in ctx.describe(ctx.request(**_req_args()))


def test_export_checks_the_format_before_using_it_in_a_path(tmp_path, adapter_file, fingerprints):
    from ortho_diffusion.app.integrations import NotAvailableError

    ctx = _context(tmp_path, fingerprints)
    ctx.library.add(adapter_file, "dog", fingerprints=fingerprints)
    with pytest.raises(NotAvailableError, match="unknown export format"):
        ctx.export("dog", "../../escape", 1.0)
    assert list(ctx.tmp.iterdir()) == [] and not (tmp_path / "escape").exists()


# -------------------------------------------------------- training forms
def test_training_form_values_get_readable_errors():
    from ortho_diffusion.app.actions import PRESETS, AppContext, TrainSettings

    s = TrainSettings.from_form("boft", 300.0, "1e-3", 4, 0, 2, 1, 75, 75, 7)
    assert (s.method, s.steps, s.learning_rate, s.batch_size, s.seed, s.train_text_encoder) == ("boft", 300, 1e-3, 4, 7, True)
    assert "--n_factors" in AppContext._adapter_flags(s)
    assert "--side" not in AppContext._adapter_flags(s)  # the input side is the scripts' default
    flags = AppContext._adapter_flags(TrainSettings.from_form("oft", 10, 1e-3, 4, 0, 2, False, 5, 5, 0, "output"))
    assert flags[flags.index("--side") + 1] == "output"
    with pytest.raises(JobError, match="steps must be a number"):
        TrainSettings.from_form("oft", None, 1e-3, 4, 0, 2, False, 100, 100, 0)
    with pytest.raises(JobError, match="batch size must be a whole number"):
        TrainSettings.from_form("oft", 10, 1e-3, 2.5, 0, 2, False, 100, 100, 0)
    with pytest.raises(JobError, match="learning rate must be a finite number"):
        TrainSettings.from_form("oft", 10, float("nan"), 4, 0, 2, False, 100, 100, 0)
    for bad, message in ((dict(checkpoint_every=0), "checkpoints"), (dict(validation_every=-1), "previews"),
                         (dict(seed=2**40), "seed"), (dict(method="lora"), "unknown method"),
                         (dict(side="left"), "rotation side")):
        with pytest.raises(JobError, match=message):
            AppContext._adapter_flags(TrainSettings(**bad))
    # Every preset says what it does and sets what its help promises.
    for preset in PRESETS.values():
        assert preset["help"] and {"steps", "lr", "batch", "prior"} <= set(preset)
    assert PRESETS["Careful"]["prior"] and "prior preservation" in PRESETS["Careful"]["help"]


def test_refused_training_requests_leave_no_run(tmp_path):
    ctx = _context(tmp_path)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(UploadError, match="notes.png: not a readable image"):
        ctx.start_subject("dog", "upload", [str(bad)], None, "sks", "circle", TrainSettings())
    with pytest.raises(JobError, match="the token must be"):
        ctx.start_subject("dog", "upload", [str(bad)], None, "two words", "circle", TrainSettings())
    assert not ctx.runs_dir.exists() or list(ctx.runs_dir.iterdir()) == []
    assert ctx.jobs.job is None


# --------------------------------------------------- control data uploads
def test_zip_and_folder_uploads_check_every_image(tmp_path):
    from ortho_diffusion.app.uploads import copy_folder_upload

    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), "blue").save(good)
    huge = tmp_path / "huge.png"
    Image.new("L", (5000, 4000)).save(huge)
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(good, "images/000.png")
        zf.writestr("images/001.png", b"not an image")
    with pytest.raises(UploadError, match=r"a.zip: images/001.png: not a readable image"):
        extract_zip(archive, tmp_path / "x" / "data")
    assert list((tmp_path / "x").iterdir()) == []
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(huge, "images/huge.png")
    with pytest.raises(UploadError, match="huge.png: 5000x4000 is too large"):
        extract_zip(archive, tmp_path / "x" / "data")

    notes = tmp_path / "notes" / "001.png"
    notes.parent.mkdir()
    notes.write_text("text")
    with pytest.raises(UploadError, match="001.png: not a readable image"):
        copy_folder_upload([good, notes], tmp_path / "f" / "data")
    same = tmp_path / "maps" / "good.png"
    same.parent.mkdir()
    same.write_bytes(good.read_bytes())
    with pytest.raises(UploadError, match="two files are named good.png.*as a zip"):
        copy_folder_upload([good, same], tmp_path / "f" / "data")
    assert list((tmp_path / "f").iterdir()) == []
    out = copy_folder_upload([good], tmp_path / "f" / "data")
    assert [p.name for p in out] == ["good.png"]


# ------------------------------------------------------------------ the page
def test_page_wiring_without_a_model(tmp_path):
    """The Blocks build over a model-less context: every action is named, presets fill the form."""
    from ortho_diffusion.app.actions import PRESETS
    from ortho_diffusion.app.ui import build_ui

    demo = build_ui(_context(tmp_path))
    fns = {d.api_name: d.fn for d in demo.fns.values() if d.api_name}
    assert {"generate", "sweep", "train_subject", "train_control", "stop_training", "training_status",
            "list_adapters", "rename_adapter", "delete_adapter", "download_adapter", "export_adapter",
            "import_adapter", "preview_control"} <= set(fns)
    assert all(d.api_name for d in demo.fns.values()), "every event has an explicit api_name"
    careful = PRESETS["Careful"]
    assert fns["subject_preset"]("Careful")[1:4] == (careful["steps"], careful["lr"], careful["batch"])
    assert fns["subject_preset_prior"]("Careful") is True and fns["subject_preset_prior"]("Quick try") is False
