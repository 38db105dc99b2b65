"""One app server per test session, started as a user would: ``python app.py --model ...``.

Both app test files (gradio_client and browser) use :func:`app_server`; the first call builds
a tiny SD 1.x pipeline and two hand-made adapters (random OFT and BOFT rotations, so t=1
visibly differs from t=0) plus one adapter made for another architecture, starts the app on
a free port in its own process group, and waits for it to answer.  The process group is
killed when the test session ends.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_UPLOAD_MB = 3
_server: "AppServer | None" = None


@dataclass
class AppServer:
    url: str
    proc: subprocess.Popen
    root: Path
    data_dir: Path
    model_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def alive(self) -> bool:
        return self.proc.poll() is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_adapters(model_dir: Path, adapters_dir: Path) -> None:
    import torch

    import ortho_diffusion as od
    from ortho_diffusion.testing import tiny_pipeline

    def randomized(pipe, cfg, name, path, seed):
        od.attach(pipe, cfg, adapter_name=name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in od.adapter_parameters(pipe):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        od.save_adapter(pipe, path, adapter_name=name, extra_metadata={"instance_prompt": "a sks circle"})
        od.detach(pipe)

    pipe = tiny_pipeline("sd15", folder=model_dir)
    adapters_dir.mkdir(parents=True, exist_ok=True)
    randomized(pipe, od.AdapterConfig(method="oft", block_size=8), "rand-oft", adapters_dir / "rand-oft.safetensors", 1)
    randomized(pipe, od.AdapterConfig(method="boft", block_size=4, n_factors=2), "rand-boft",
               adapters_dir / "rand-boft.safetensors", 2)
    # An adapter for another architecture (SD 2.x layout), kept outside the library.
    other = tiny_pipeline("sd2")
    randomized(other, od.AdapterConfig(method="oft", block_size=8), "other", model_dir.parent / "other-model.safetensors", 3)


def app_server(timeout: float = 150.0) -> AppServer:
    """The session's running app (started on first use)."""
    global _server
    if _server is not None:
        if not _server.alive():
            raise RuntimeError(f"the app server died; its output:\n{_server.log()}")
        return _server
    root = Path(tempfile.mkdtemp(prefix="od-app-test-"))
    model_dir, data_dir = root / "model", root / "data"
    _make_adapters(model_dir, data_dir / "adapters")
    port = _free_port()
    log_path = root / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "app.py"), "--model", str(model_dir), "--data-dir", str(data_dir),
           "--port", str(port), "--max-upload-mb", str(MAX_UPLOAD_MB), "--quiet"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    server = AppServer(f"http://127.0.0.1:{port}/", proc, root, data_dir, model_dir, log_path)
    atexit.register(_stop, server)
    deadline = time.time() + timeout
    while True:
        if not server.alive():
            raise RuntimeError(f"the app exited with code {proc.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(server.url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            _stop(server)
            raise RuntimeError(f"the app did not answer within {timeout:.0f} s:\n{server.log()}")
        time.sleep(0.5)
    _server = server
    return server


def _stop(server: AppServer) -> None:
    if server.proc.poll() is None:
        try:
            os.killpg(server.proc.pid, signal.SIGTERM)
            server.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(server.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
