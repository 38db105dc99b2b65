"""Training jobs: the project's own training scripts run as a child process group.

The app builds the same ``accelerate launch training/<script>.py --flags`` command a user could
type (it is shown in the UI), runs it in a new session so that Stop can kill the whole process
group (``accelerate`` starts the script as a grandchild), reads its tqdm progress from the
merged output stream, and, when the run ends, copies the finished adapter into the library.  A
run that is stopped keeps its last complete checkpoint, which is published as
``<name>-step<N>``.  Only one job runs at a time.
"""

from __future__ import annotations

import atexit
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..formats.native import AdapterFileError
from ..training.common import CheckpointManager
from .integrations import REPO_ROOT
from .library import AdapterLibrary, LibraryError

#: ``accelerate launch`` flags for one local process (CPU or one GPU), with no config file.
LAUNCH_FLAGS = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
STOP_GRACE_SECONDS = 5.0

_BAR = re.compile(r"^(?P<desc>[\w .-]+?):\s*\d+%\|.*?\|\s*(?P<n>\d+)/(?P<total>\d+)")
_LOSS = re.compile(r"loss=(?P<loss>[-+0-9.eE]+|nan|inf)")


class JobError(RuntimeError):
    """A job that cannot be started or stopped; shown to the user as is."""


@dataclass
class Job:
    """One training run and what is known about it (a snapshot is handed to the UI)."""

    kind: str
    name: str
    run_dir: Path
    argv: list[str]
    display_command: str
    state: str = "starting"  # starting, running, finished, failed, stopped
    phase: str = "starting"
    step: int = 0
    total: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    message: str = ""
    adapter: str | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    returncode: int | None = None
    log: deque = field(default_factory=lambda: deque(maxlen=400))
    stop_requested: bool = False
    done: threading.Event = field(default_factory=threading.Event, repr=False)  # set once fully wrapped up

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running")

    def samples(self) -> list[Path]:
        """Validation grids written so far (oldest first), then the final samples."""
        found = sorted((self.run_dir / "validation").glob("step-*.png"))
        final = self.run_dir / "samples.png"
        return found + ([final] if final.is_file() else [])

    def to_dict(self) -> dict:
        """The JSON the API returns."""
        return {
            "kind": self.kind,
            "name": self.name,
            "state": self.state,
            "phase": self.phase,
            "step": self.step,
            "total": self.total,
            "loss": self.losses[-1][1] if self.losses else None,
            "adapter": self.adapter,
            "message": self.message,
            "run_dir": str(self.run_dir),
            "command": self.display_command,
            "returncode": self.returncode,
            "elapsed_seconds": round((self.ended or time.time()) - self.started, 1),
        }


def launch_command(script: Path, flags: list[str]) -> tuple[list[str], str]:
    """``(argv to run, command to show)`` for ``accelerate launch script flags``.

    The app runs ``python -m accelerate.commands.launch`` with its own interpreter (no reliance
    on ``PATH``); the command shown is what a user types in the repository with the venv active.
    """
    argv = [sys.executable, "-m", "accelerate.commands.launch", *LAUNCH_FLAGS, str(script), *flags]
    try:
        shown_script = str(script.relative_to(REPO_ROOT))
    except ValueError:
        shown_script = str(script)
    display = shlex.join(["accelerate", "launch", *LAUNCH_FLAGS, shown_script, *flags])
    return argv, display


def parse_progress(job: Job, segment: str) -> None:
    """Update ``job`` from one line or carriage-return segment of the script's output."""
    m = _BAR.search(segment)
    if m:
        job.phase = m.group("desc").strip()
        if job.phase == "training":
            job.step, job.total = int(m.group("n")), int(m.group("total"))
            lm = _LOSS.search(segment)
            if lm and job.step > 0 and (not job.losses or job.losses[-1][0] != job.step):
                job.losses.append((job.step, float(lm.group("loss"))))
        return
    if segment.startswith("error: "):
        job.message = segment[len("error: ") :]


class JobManager:
    """Runs at most one training job; publishes finished adapters to ``library``.

    Args:
        library: where finished adapters go.
        fingerprints: the app model's architecture (adapters that do not fit are refused).
        on_published: called with the adapter name after one is added to the library.
    """

    def __init__(
        self,
        library: AdapterLibrary,
        fingerprints: dict[str, str] | None = None,
        on_published: Callable[[str], None] | None = None,
    ) -> None:
        self.library = library
        self.fingerprints = fingerprints
        self.on_published = on_published
        self._lock = threading.Lock()
        self.job: Job | None = None
        self._proc: subprocess.Popen | None = None
        atexit.register(self._kill_on_exit)

    # ---------------------------------------------------------------- control
    def start(self, kind: str, name: str, run_dir: Path, argv: list[str], display: str) -> Job:
        """Start a job; :class:`JobError` while another is running."""
        with self._lock:
            if self.job is not None and self.job.active:
                raise JobError(
                    f"a training job ({self.job.kind} {self.job.name!r}) is already running; "
                    "wait for it or press Stop (one job at a time)"
                )
            job = Job(kind=kind, name=name, run_dir=run_dir, argv=argv, display_command=display)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "command.txt").write_text(display + "\n")
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
            env.setdefault("TQDM_MININTERVAL", "0.5")
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=str(REPO_ROOT),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # its own process group: Stop kills every descendant
                )
            except OSError as err:
                raise JobError(f"cannot start the training command: {err}") from None
            job.state = "running"
            self.job, self._proc = job, proc
        threading.Thread(target=self._follow, args=(job, proc), name="job-follow", daemon=True).start()
        return job

    def stop(self) -> str:
        """Kill the running job's process group; returns what happened."""
        with self._lock:
            job, proc = self.job, self._proc
            if job is None or not job.active or proc is None:
                return "no training job is running"
            job.stop_requested = True
        self._kill_group(proc)
        self.wait(timeout=STOP_GRACE_SECONDS + 10)
        return job.message or "stopped"

    def wait(self, timeout: float | None = None) -> Job | None:
        """Block until the current job has ended (and was published), or ``timeout``."""
        job = self.job
        if job is not None:
            job.done.wait(timeout)
        return job

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        try:  # SIGTERM may leave a grandchild behind: make sure the whole group is gone
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _kill_on_exit(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._kill_group(self._proc)

    # ---------------------------------------------------------------- follow
    def _follow(self, job: Job, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        buf = b""
        read = proc.stdout.read1  # returns what is there, so progress is seen as it happens
        with open(job.run_dir / "train.log", "ab") as log:
            while chunk := read(4096):
                log.write(chunk)
                log.flush()
                buf += chunk
                *segments, buf = re.split(rb"[\r\n]", buf)
                for raw in segments:
                    text = raw.decode("utf-8", "replace").strip()
                    if text:
                        self._segment(job, text)
            if buf.strip():
                self._segment(job, buf.decode("utf-8", "replace").strip())
        job.returncode = proc.wait()
        try:
            self._finish(job)
        except Exception as err:  # never leave a job "running" because publishing failed
            job.message, job.state = f"the run ended but its adapter could not be published: {err}", "failed"
        job.ended = time.time()
        job.done.set()

    @staticmethod
    def _segment(job: Job, text: str) -> None:
        parse_progress(job, text)
        if not _BAR.search(text):  # progress bars would flood the log view
            job.log.append(text)

    def _publish(self, src: Path, name: str) -> str:
        final = self.library.free_name(name)
        self.library.add(src, final, fingerprints=self.fingerprints)
        if self.on_published:
            self.on_published(final)
        return final

    def _finish(self, job: Job) -> None:
        rc = job.returncode
        if job.stop_requested:
            checkpoints = CheckpointManager(job.run_dir).all()
            if checkpoints:
                last = checkpoints[-1]
                step = int(last.name.split("-")[-1])
                try:
                    job.adapter = self._publish(last / "adapter.safetensors", f"{job.name}-step{step}")
                    job.message = (
                        f"stopped at step {job.step}; the last checkpoint (step {step}) was kept "
                        f"as adapter {job.adapter!r}"
                    )
                except (AdapterFileError, LibraryError) as err:
                    job.message = f"stopped at step {job.step}; the last checkpoint could not be kept: {err}"
            else:
                job.message = f"stopped at step {job.step}, before the first checkpoint: no adapter was kept"
            job.state = "stopped"  # last: whoever sees the new state also sees the message
            return
        if rc == 0:
            adapter = job.run_dir / "adapter.safetensors"
            if not adapter.is_file():
                job.message, job.state = f"the run ended without writing {adapter}", "failed"
                return
            try:
                job.adapter = self._publish(adapter, job.name)
            except (AdapterFileError, LibraryError) as err:
                job.message, job.state = f"the trained adapter could not be added: {err}", "failed"
                return
            job.step = max(job.step, job.total)
            job.message = f"finished: adapter {job.adapter!r} is ready in the Generate tab"
            job.state = "finished"
            return
        if rc == 2 and job.message:
            job.message = f"the training script refused the run: {job.message}"
        else:
            tail = [line for line in job.log if line.strip()][-3:]
            job.message = f"training crashed (exit code {rc}). Last output: " + " | ".join(tail)
        job.state = "failed"
