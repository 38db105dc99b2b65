"""The app driven through its API with gradio_client, against a server started as `python app.py`.

Covers the acceptance checks: t=0 reproduces the base model exactly and t=1 differs; a short
subject training produces an adapter that then shows up and generates; a running job can be
stopped (its process group is gone, its last checkpoint kept); bad input gets a readable
error and the server keeps serving; names cannot leave the data directory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _app_server import MAX_UPLOAD_MB, app_server

gradio_client = pytest.importorskip("gradio_client")  # a dev dependency; see pyproject's [dev]
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

STEPS = 3  # denoising steps: enough to test exactness, cheap on a loaded CPU


@pytest.fixture(scope="module")
def server():
    return app_server()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


def generate(client, adapters=(), t=1.0, per_factor=False, n_factors=1, control=None, seed=0, prompt="a sks circle"):
    path, status = client.predict(
        prompt, "", seed, STEPS, 5.0, 32, 32, list(adapters), t, per_factor, n_factors, control, "Canny edges", 1.0,
        api_name="/generate",
    )
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16), status


def pixels_differ(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def subject_args(name, files, steps=4, method="oft", ckpt=2, source="upload", builtin=None, block=0):
    # name, source, files, builtin, token, class, method, preset, steps, lr, batch, block, factors,
    # text encoder, checkpoint every, previews every, seed, prior preservation
    return [name, source, files, builtin, "sks", "circle", method, "Standard", steps, 1e-3, 1, block, 2, False,
            ckpt, ckpt, 0, False]


def adapter_names(client) -> list[str]:
    picker, table, _ = client.predict(None, None, api_name="/list_adapters")
    return [row[0] for row in table["data"]]


def test_api_names(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name in ("/generate", "/sweep", "/train_subject", "/train_control", "/stop_training", "/training_status",
                 "/list_adapters", "/rename_adapter", "/delete_adapter", "/download_adapter", "/export_adapter",
                 "/import_adapter", "/preview_control"):
        assert name in endpoints, name


def test_t0_is_the_base_model_and_t1_is_not(client):
    base, status = generate(client)
    assert "base model" in status
    zero, status0 = generate(client, ["rand-oft"], t=0.0)
    assert "t = 0" in status0
    assert np.array_equal(base, zero), "t=0 must reproduce the base model's image exactly"
    one, _ = generate(client, ["rand-oft"], t=1.0)
    assert pixels_differ(base, one) > 1.0
    again, _ = generate(client)  # the adapter, now attached at t=0, leaves the base intact
    assert np.array_equal(base, again)


def test_sweep_uses_one_seed_across_t(client):
    items, status = client.predict(
        "a sks circle", "", 0, STEPS, 5.0, 32, 32, ["rand-boft"], 1.0, False, 1, None, "Canny edges", 1.0,
        3, 1.0, "t", api_name="/sweep",
    )
    assert [i["caption"] for i in items] == ["t = 0.00", "t = 0.50", "t = 1.00"]
    images = [np.asarray(Image.open(i["image"]).convert("RGB")).astype(np.int16) for i in items]
    base, _ = generate(client)
    one, _ = generate(client, ["rand-boft"], t=1.0)
    assert np.array_equal(images[0], base)
    assert np.array_equal(images[2], one)
    assert pixels_differ(images[1], images[0]) > 0 and pixels_differ(images[1], images[2]) > 0

    # Per-factor sweep of the BOFT adapter: 0 factors is the base, all factors is t=1.
    items, _ = client.predict(
        "a sks circle", "", 0, STEPS, 5.0, 32, 32, ["rand-boft"], 1.0, True, 2, None, "Canny edges", 1.0,
        3, 1.0, "factors", api_name="/sweep",
    )
    assert [i["caption"] for i in items] == ["0 factors", "1 factor", "2 factors"]
    factors = [np.asarray(Image.open(i["image"]).convert("RGB")).astype(np.int16) for i in items]
    assert np.array_equal(factors[0], base) and np.array_equal(factors[2], one)
    assert pixels_differ(factors[1], base) > 0


def test_adapter_for_another_model_is_refused(client, server):
    other = server.model_dir.parent / "other-model.safetensors"
    with pytest.raises(AppError, match="another base model"):
        client.predict(handle_file(str(other)), "other", None, api_name="/import_adapter")
    assert not (server.data_dir / "adapters" / "other.safetensors").exists()
    # Placed in the folder by hand, it is listed as not fitting and refused at generation.
    target = server.data_dir / "adapters" / "other.safetensors"
    target.write_bytes(other.read_bytes())
    try:
        _, table, _ = client.predict(None, None, api_name="/list_adapters")
        row = next(r for r in table["data"] if r[0] == "other")
        assert row[5].startswith("NO")
        with pytest.raises(AppError, match="another base model"):
            generate(client, ["other"])
    finally:
        target.unlink()


def test_bad_uploads_get_readable_errors_and_the_server_stays_up(client, server, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image")
    with pytest.raises(AppError, match="notes.png: not a readable image"):
        client.predict(*subject_args("bad1", [handle_file(str(not_image))]), api_name="/train_subject")
    with pytest.raises(AppError, match="no images were uploaded"):
        client.predict(*subject_args("bad2", []), api_name="/train_subject")
    huge = tmp_path / "huge.png"
    Image.new("RGB", (5000, 4000), "white").save(huge)  # 20 MP, a few KB as PNG
    with pytest.raises(AppError, match="too large"):
        client.predict(*subject_args("bad3", [handle_file(str(huge))]), api_name="/train_subject")
    with pytest.raises(AppError, match="not a readable image"):
        generate(client, control=handle_file(str(not_image)))
    with pytest.raises(AppError, match="Invalid file type"):  # Gradio's own check of the suffix
        client.predict(handle_file(str(not_image)), "junk", None, api_name="/import_adapter")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(AppError, match="junk.safetensors is not a usable ortho-diffusion adapter"):
        client.predict(handle_file(str(junk)), "junk", None, api_name="/import_adapter")
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom((MAX_UPLOAD_MB + 1) * 1024 * 1024))
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(*subject_args("bad4", [handle_file(str(big))]), api_name="/train_subject")
    # Nothing half-written: no run folder and no adapter for any of these.
    runs = sorted(p.name for p in (server.data_dir / "runs").glob("*"))
    assert not [r for r in runs if r.startswith(("bad1", "bad2", "bad3", "bad4"))], runs
    assert not {"bad1", "bad2", "bad3", "bad4", "junk"} & set(adapter_names(client))
    assert server.alive()
    image, _ = generate(client)
    assert image.shape == (32, 32, 3)


def test_names_cannot_escape_the_data_directory(client, server):
    for bad in ("../escape", "a/b", "..", ".hidden", "x" * 65):
        with pytest.raises(AppError, match="not a valid adapter name"):
            client.predict("rand-oft", bad, None, api_name="/rename_adapter")
        with pytest.raises(AppError, match="not a valid adapter name"):
            client.predict(bad, None, api_name="/delete_adapter")
        with pytest.raises(AppError, match="not a valid adapter name"):
            client.predict(bad, api_name="/download_adapter")
    with pytest.raises(AppError, match="not a valid adapter name"):
        client.predict(*subject_args("../../evil", []), api_name="/train_subject")
    assert {p.name for p in server.data_dir.iterdir()} <= {"adapters", "runs"}
    assert (server.data_dir / "adapters" / "rand-oft.safetensors").is_file()


def test_rename_download_delete(client, server, tmp_path):
    src = server.data_dir / "adapters" / "rand-oft.safetensors"
    (server.data_dir / "adapters" / "copy-a.safetensors").write_bytes(src.read_bytes())
    message, *_ = client.predict("copy-a", "copy-b", None, api_name="/rename_adapter")
    assert "renamed" in message
    names = adapter_names(client)
    assert "copy-b" in names and "copy-a" not in names
    with pytest.raises(AppError, match="already exists"):
        client.predict("copy-b", "rand-oft", None, api_name="/rename_adapter")
    path = client.predict("copy-b", api_name="/download_adapter")
    assert Path(path).read_bytes() == src.read_bytes()
    client.predict("copy-b", None, api_name="/delete_adapter")
    assert "copy-b" not in adapter_names(client)
    assert not (server.data_dir / "adapters" / "copy-b.safetensors").exists()


def test_train_subject_then_generate_with_it(client, server, tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i in range(2):
        p = tmp_path / f"subject{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(p)
        files.append(handle_file(str(p)))
    outputs = client.predict(*subject_args("trained-sks", files, steps=4), api_name="/train_subject")
    job = outputs[-1]
    assert job["state"] == "finished", job
    assert job["adapter"] == "trained-sks" and job["step"] == 4
    assert job["command"].startswith("accelerate launch ") and "training/train_dreambooth.py" in job["command"]
    assert "trained-sks" in adapter_names(client)
    assert (server.data_dir / "adapters" / "trained-sks.safetensors").is_file()
    assert outputs[3], "sample previews are shown"
    base, _ = generate(client)
    zero, _ = generate(client, ["trained-sks"], t=0.0)
    one, status = generate(client, ["trained-sks"], t=1.0)
    assert "trained-sks" in status
    assert np.array_equal(base, zero)
    assert not np.array_equal(base, one)
    # The same name cannot be trained twice (nothing would be overwritten).
    with pytest.raises(AppError, match="already exists"):
        client.predict(*subject_args("trained-sks", files), api_name="/train_subject")


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_stop_kills_the_job_keeps_the_checkpoint_and_generation_stays_usable(client, server, tmp_path):
    p = tmp_path / "one.png"
    Image.new("RGB", (32, 32), "red").save(p)
    job = client.submit(*subject_args("long-run", [handle_file(str(p))], steps=2000, ckpt=3), api_name="/train_subject")
    deadline = time.time() + 120
    status = {}
    while time.time() < deadline:
        status = client.predict(api_name="/training_status")
        if status.get("name") == "long-run" and status.get("step", 0) >= 4:
            break
        assert status.get("state") != "failed", status
        if job.done():
            job.result()  # raises the app's error if the job was refused
            pytest.fail(f"the training call ended early: {status}")
        time.sleep(0.5)
    assert status.get("step", 0) >= 4, status
    run_dir = status["run_dir"]
    assert _processes_mentioning(run_dir), "the training processes are running"
    # One job at a time, and the model keeps serving while it trains.
    with pytest.raises(AppError, match="already running"):
        client.predict(*subject_args("second", [handle_file(str(p))]), api_name="/train_subject")
    image, _ = generate(client)
    assert image.shape == (32, 32, 3)

    message = client.predict(api_name="/stop_training")
    assert "stopped at step" in message
    status = client.predict(api_name="/training_status")
    assert status["state"] == "stopped"
    time.sleep(0.5)
    assert not _processes_mentioning(run_dir), "Stop must kill the whole process group"
    kept = status["adapter"]
    assert kept and kept.startswith("long-run-step")
    assert kept in adapter_names(client)
    assert "long-run" not in adapter_names(client)
    generate(client, [kept])
    job.result(timeout=30)  # the streaming call ends with the job


def test_train_control_from_a_zip_then_generate_with_a_control_image(client, server, tmp_path):
    import zipfile

    from ortho_diffusion.control.data import write_shapes_dataset

    write_shapes_dataset(tmp_path / "pairs", "canny", 4)
    archive = tmp_path / "pairs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((tmp_path / "pairs").rglob("*")):
            if f.is_file():
                zf.write(f, Path("pairs") / f.relative_to(tmp_path / "pairs"))
    # name, source, zip, folder, control type, method, preset, steps, lr, batch, block, factors,
    # text encoder, checkpoint every, previews every, seed, rotation side
    outputs = client.predict("edges", "zip", handle_file(str(archive)), None, "Canny edges", "oft", "Standard", 3,
                             1e-3, 2, 0, 2, False, 3, 3, 0, "output", api_name="/train_control")
    job = outputs[-1]
    assert job["state"] == "finished", job
    assert "training/train_control.py" in job["command"] and "--control_task canny" in job["command"]
    assert "--side output" in job["command"]
    _, table, _ = client.predict(None, None, api_name="/list_adapters")
    row = next(r for r in table["data"] if r[0] == "edges")
    assert row[1] == "canny control"
    with pytest.raises(AppError, match="upload a control image"):
        generate(client, ["edges"])
    control = tmp_path / "control.png"
    Image.open(tmp_path / "pairs" / "images" / "000000.png").save(control)
    preview = client.predict(handle_file(str(control)), "Canny edges", 32, 32, api_name="/preview_control")
    edges = np.asarray(Image.open(preview).convert("RGB"))
    assert edges.shape == (32, 32, 3) and set(np.unique(edges)) <= {0, 255} and edges.max() == 255
    base, _ = generate(client)
    zero, _ = generate(client, ["edges"], t=0.0, control=handle_file(str(control)))
    one, status = generate(client, ["edges"], t=1.0, control=handle_file(str(control)))
    assert "control strength" in status
    assert np.array_equal(base, zero)
    assert not np.array_equal(base, one)
