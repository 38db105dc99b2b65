"""The app's building blocks without a server: names, library, uploads, training jobs.

Jobs are exercised with small stand-in scripts (progress lines, crashes, refusals, a
grandchild process, checkpoints), so the process-group handling is tested in seconds.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import ortho_diffusion as od
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
