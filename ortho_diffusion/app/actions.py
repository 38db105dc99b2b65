"""What every button of the app does, as plain methods (no Gradio types).

:class:`AppContext` ties the model state, the adapter library and the job manager together;
``ui.py`` only lays out components and turns the exceptions raised here into messages.  The
methods take and return plain values, so they are easy to test and to script.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from ..config import SIDES
from . import integrations
from .integrations import NotAvailableError
from .jobs import Job, JobError, JobManager, launch_command
from .library import AdapterInfo, AdapterLibrary, LibraryError, check_name, suggest_name
from .state import GenerateRequest, GenerationError, ModelState
from .uploads import UploadError, copy_folder_upload, extract_zip, open_checked_image, save_images

#: Exceptions whose message is meant for the user (anything else is a bug, logged in full).
USER_ERRORS = (GenerationError, LibraryError, UploadError, JobError, NotAvailableError,
               *integrations.user_error_types())

METHOD_HELP = {
    "oft": "**OFT**: block-diagonal rotations (exact Cayley transform). The reference method and a good default.",
    "oftv2": "**OFTv2**: the same rotations computed without a matrix inverse: faster on large models, same quality.",
    "boft": "**BOFT**: a product of butterfly-permuted block rotations: denser rotations for few parameters. "
    "In the Generate tab its factors can be switched on one by one.",
    "goft": "**GOFT**: Givens rotations in log2(d) stages: the fewest parameters (d − 1 per layer).",
    "qgoft": "**qGOFT**: Givens pairs relaxed to free 2×2 matrices, kept near-orthogonal by a soft penalty: "
    "a little more freedom than GOFT.",
    "lroft": "**LR-OFT**: one rotation of a few learned directions (Cayley of a low-rank generator), the rest of "
    "each layer untouched: LoRA's selectivity with an exact rotation.",
}

PRESETS: dict[str, dict[str, Any]] = {
    "Quick try": dict(steps=150, lr=2e-3, batch=4, prior=False,
                      help="150 steps at a high learning rate: a first result in minutes; details may be rough."),
    "Standard": dict(steps=400, lr=1e-3, batch=4, prior=False,
                     help="The training script's defaults: a sound start for a simple subject or control."),
    "Careful": dict(steps=800, lr=5e-4, batch=4, prior=True,
                    help="Slower and gentler; for a subject also prior preservation (class images are generated "
                    "first), so the model keeps what it knew about the class."),
}

CONTROL_TYPES = {"Canny edges": "canny", "Face landmarks": "landmarks", "Segmentation map": "segmentation"}
_WORD = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_CLASS = re.compile(r"^[a-z0-9][a-z0-9 -]{0,63}$")


@dataclass
class AppConfig:
    """Where the app's model and files are."""

    model_path: Path
    data_dir: Path
    model_label: str = ""
    max_upload_mb: int = 100
    shapes_rows: int = 1000  # rows of the built-in shapes-world control datasets
    builtin_adapter_dirs: list[Path] = field(default_factory=lambda: [integrations.ASSETS])


@dataclass
class TrainSettings:
    """Hyperparameters shared by both training tabs."""

    method: str = "oft"
    steps: int = 400
    learning_rate: float = 1e-3
    batch_size: int = 4
    block_size: int = 0  # 0 = the largest valid size (the script's default)
    n_factors: int = 2
    train_text_encoder: bool = False
    checkpoint_every: int = 100
    validation_every: int = 100
    seed: int = 0
    #: Which side of each weight the rotation acts on: "input" (OFT paper, peft) or "output".
    side: str = "input"

    @classmethod
    def from_form(cls, method: Any, steps: Any, learning_rate: Any, batch_size: Any, block_size: Any,
                  n_factors: Any, train_text_encoder: Any, checkpoint_every: Any, validation_every: Any,
                  seed: Any, side: Any = "input") -> "TrainSettings":
        """Settings from a training tab's fields (or an API call), with readable errors.

        An empty field or a value that is not a number becomes a :class:`JobError` naming the
        field, not a ``TypeError`` deep inside; the ranges are checked when the job starts.
        """
        numbers = dict(steps=steps, learning_rate=learning_rate, batch_size=batch_size, block_size=block_size,
                       n_factors=n_factors, checkpoint_every=checkpoint_every, validation_every=validation_every,
                       seed=seed)
        out: dict[str, Any] = {}
        for key, value in numbers.items():
            what = key.replace("_", " ")
            try:
                out[key] = _number(what, value) if key == "learning_rate" else _whole(what, value)
            except GenerationError as err:
                raise JobError(str(err)) from None
        return cls(method=str(method or ""), train_text_encoder=bool(train_text_encoder), side=str(side or "input"), **out)


class AppContext:
    """The running app: one model, one library, one job manager."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir).resolve()
        self.runs_dir = self.data_dir / "runs"
        self.library = AdapterLibrary(self.data_dir / "adapters", config.builtin_adapter_dirs)
        self.state = ModelState(config.model_path, self.library, config.model_label or Path(config.model_path).name)
        self.jobs = JobManager(self.library, self.state.fingerprints)
        # Downloads and exports are copied here: Gradio serves files from the temp dir only.
        self.tmp = Path(tempfile.mkdtemp(prefix="ortho-diffusion-app-"))

    # ----------------------------------------------------------------- library
    def adapters(self, fitting_only: bool = False) -> list[AdapterInfo]:
        """Adapters in the library (only those made for this model, if asked)."""
        infos = self.library.list()
        return [i for i in infos if self.state.fits(i)] if fitting_only else infos

    def picker_choices(self) -> list[tuple[str, str]]:
        """``(label, name)`` of every adapter the Generate tab can use."""
        return [(i.label(), i.name) for i in self.adapters(fitting_only=True)]

    def max_factors(self, names: list[str]) -> int:
        """The largest BOFT factor count among ``names`` (0 when none is BOFT)."""
        counts = [i.n_factors for i in self.adapters() if i.name in (names or []) and i.method == "boft"]
        return max(counts, default=0)

    # -------------------------------------------------------------- generation
    def control_map(self, control_file: str | None, preprocessor: str, width: int, height: int) -> np.ndarray | None:
        """The control image after preprocessing, at the generation size (``None`` without upload)."""
        if not control_file:
            return None
        img = open_checked_image(control_file)
        img = _center_fit(img, int(width), int(height))
        return integrations.preprocess(preprocessor, np.asarray(img))

    def request(
        self,
        prompt: str,
        negative_prompt: str,
        seed: float,
        steps: float,
        guidance: float,
        width: float,
        height: float,
        adapters: list[str] | None,
        t: float,
        per_factor: bool,
        n_factors: float,
        control_file: str | None,
        preprocessor: str,
        control_scale: float,
    ) -> GenerateRequest:
        """A validated generation request from the Generate tab's fields."""
        if isinstance(adapters, str):  # an API caller naming one adapter without a list
            adapters = [adapters]
        names = [check_name(a) for a in (adapters or [])]
        if len(set(names)) != len(names):
            raise GenerationError("an adapter is selected twice")
        ints = {k: _whole(what, v) for k, what, v in (
            ("seed", "seed", seed), ("steps", "steps", steps), ("width", "width", width),
            ("height", "height", height), ("n_factors", "number of active BOFT factors", n_factors))}
        reals = {k: _number(what, v) for k, what, v in (
            ("guidance", "guidance", guidance), ("t", "rotation strength t", t),
            ("control_strength", "control strength", control_scale))}
        req = GenerateRequest(
            prompt=prompt or "",
            negative_prompt=negative_prompt or "",
            seed=ints["seed"],
            steps=ints["steps"],
            guidance=reals["guidance"],
            width=ints["width"],
            height=ints["height"],
            adapters=names,
            t=reals["t"],
            per_factor=bool(per_factor),
            n_factors=ints["n_factors"],
            control_scale=reals["control_strength"],
        )
        self.state.validate(req)
        req.control_image = self.control_map(control_file, preprocessor, req.width, req.height)
        return req

    def describe(self, req: GenerateRequest) -> str:
        """One line saying what the image shows (so nobody has to guess)."""
        if not req.adapters:
            what = "base model (no adapter selected)"
        elif req.t == 0:
            what = f"t = 0: base rotations (adapters {', '.join(req.adapters)} switched off)"
        else:
            what = f"t = {req.t:.2f} · {', '.join(req.adapters)}"
            top = self.max_factors(req.adapters)
            if req.per_factor and top:
                k = max(0, min(int(req.n_factors), top))
                what += f" · first {k} of {top} BOFT factors"
        controls = [i for i in self.adapters() if i.name in req.adapters and i.is_control]
        if req.control_image is not None and controls:
            what += f" · control strength {req.control_scale:.2f}"
        elif req.control_image is not None:
            what += " · control image unused (no control adapter selected)"
        return f"{what} · seed {req.seed} · {req.steps} steps · {req.width}×{req.height}"

    def generate(self, req: GenerateRequest, stream: bool = True) -> Iterator[tuple[Image.Image, str]]:
        """Intermediate images (for slow generations), then the final one, each with a status line."""
        for image, status, final in self.state.generate_stream(req, stream=stream):
            yield image, (f"**Done**: {self.describe(req)} · {status}" if final else f"Generating: {status}")

    def sweep(self, req: GenerateRequest, count: int, t_end: float, over: str) -> list[tuple[Image.Image, str]]:
        """Images across ``t`` from 0 to ``t_end`` (or across BOFT factors), same seed."""
        count = int(count)
        if not 2 <= count <= 12:
            raise GenerationError("a sweep has 2 to 12 images")
        if over == "factors":
            top = self.max_factors(req.adapters)
            if not top:
                raise GenerationError("a factor sweep needs a BOFT adapter among the selected ones")
            return self.state.sweep(req, list(range(0, top + 1)), over="factors")
        t_end = float(t_end)
        if not 0 < t_end <= self.state.limits.max_t:
            raise GenerationError(f"the sweep ends at a t between 0 and {self.state.limits.max_t}")
        values = [round(float(v), 4) for v in np.linspace(0.0, t_end, count)]
        return self.state.sweep(req, values, over="t")

    # ---------------------------------------------------------------- training
    def _new_run_dir(self, name: str) -> Path:
        run = self.runs_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        i = 1
        while run.exists():
            i += 1
            run = self.runs_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{i}"
        return run

    def _check_new_name(self, name: str) -> str:
        name = check_name(name)
        if self.library.exists(name):
            raise LibraryError(f"an adapter named {name!r} already exists: pick another name or delete it first")
        if self.jobs.job is not None and self.jobs.job.active:
            raise JobError(
                f"a training job ({self.jobs.job.kind} {self.jobs.job.name!r}) is already running; "
                "wait for it or press Stop (one job at a time)"
            )
        return name

    @staticmethod
    def _adapter_flags(s: TrainSettings) -> list[str]:
        if s.method not in METHOD_HELP:
            raise JobError(f"unknown method {s.method!r}; choose one of {', '.join(METHOD_HELP)}")
        checks = [
            (1 <= int(s.steps) <= 100_000, "steps must be between 1 and 100000"),
            (0 < float(s.learning_rate) <= 1.0, "the learning rate must be between 0 and 1"),
            (1 <= int(s.batch_size) <= 64, "the batch size must be between 1 and 64"),
            (0 <= int(s.block_size) <= 1024, "the block size must be between 0 (automatic) and 1024"),
            (1 <= int(s.n_factors) <= 12, "BOFT factors must be between 1 and 12"),
            (int(s.checkpoint_every) >= 1, "checkpoints must be every 1 step or more"),
            (int(s.validation_every) >= 1, "sample previews must be every 1 step or more"),
            (0 <= int(s.seed) < 2**32, "the training seed must be between 0 and 4294967295"),
            (s.side in SIDES, f"the rotation side must be one of {', '.join(SIDES)}, not {s.side!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise JobError(message)
        flags = ["--method", s.method, "--max_train_steps", str(int(s.steps)), "--learning_rate", f"{float(s.learning_rate):g}",
                 "--train_batch_size", str(int(s.batch_size)), "--seed", str(int(s.seed))]
        if int(s.block_size) > 0:
            flags += ["--block_size", str(int(s.block_size))]
        if s.side == "output":
            flags += ["--side", "output"]
        if s.method == "boft":
            flags += ["--n_factors", str(int(s.n_factors))]
        if s.train_text_encoder:
            flags += ["--train_text_encoder"]
        every = max(1, int(s.checkpoint_every))
        flags += ["--checkpointing_steps", str(every), "--checkpoints_total_limit", "2",
                  "--validation_steps", str(max(1, int(s.validation_every))), "--report_to", "none"]
        return flags

    def start_subject(
        self,
        name: str,
        source: str,
        files: list[str] | None,
        builtin: str | None,
        token: str,
        class_word: str,
        settings: TrainSettings,
        prior: bool = False,
    ) -> Job:
        """Check everything, prepare the data, and start ``train_dreambooth.py``."""
        script = integrations.subject_training_script()
        name = self._check_new_name(name)
        flags_adapter = self._adapter_flags(settings)
        run = self._new_run_dir(name)
        try:
            return self._start_subject(script, name, run, source, files, builtin, token, class_word, flags_adapter, prior)
        except BaseException:
            shutil.rmtree(run, ignore_errors=True)  # a refused run leaves nothing behind
            raise

    def _start_subject(self, script: Path, name: str, run: Path, source: str, files: list[str] | None,
                       builtin: str | None, token: str, class_word: str, flags_adapter: list[str], prior: bool) -> Job:
        if source == "builtin":
            subject = next((s for s in integrations.builtin_subjects() if s.name == builtin), None)
            if subject is None:
                raise UploadError(f"no built-in subject named {builtin!r}")
            data_dir = subject.folder
            token, class_word = subject.token, subject.class_word
        else:
            token, class_word = (token or "").strip().lower(), (class_word or "").strip().lower()
            if not _WORD.match(token):
                raise JobError("the token must be one short word of lowercase letters or digits, e.g. sks")
            if not _CLASS.match(class_word):
                raise JobError("the class must be a short lowercase noun, e.g. circle, dog")
            data_dir = run / "instance"
            save_images(files or [], data_dir)
        instance_prompt, class_prompt = f"a {token} {class_word}", f"a {class_word}"
        flags = [
            "--pretrained_model_name_or_path", str(self.state.model_path),
            "--instance_data_dir", str(data_dir),
            "--instance_prompt", instance_prompt,
            "--class_prompt", class_prompt,
            "--output_dir", str(run),
            "--num_validation_images", "4",
            *flags_adapter,
        ]
        if prior:
            class_dir = self.data_dir / "class_images" / suggest_name(self.state.label) / suggest_name(class_word)
            flags += ["--with_prior_preservation", "--class_data_dir", str(class_dir), "--num_class_images", "20"]
        argv, display = launch_command(script, flags)
        return self.jobs.start("subject", name, run, argv, display)

    def start_control(
        self,
        name: str,
        source: str,
        archive: str | None,
        folder_files: list[str] | None,
        control_type: str,
        settings: TrainSettings,
    ) -> Job:
        """Check everything, prepare the data, and start ``train_control.py``.

        ``source``: ``"builtin"`` (a shapes-world dataset with ground-truth maps, written once
        and cached), ``"zip"`` (pairs as ``metadata.jsonl``/``.csv`` or ``images/`` +
        ``conditioning_images/``, or plain images for Canny / face landmarks, which the
        script then preprocesses) or ``"folder"`` (plain images).
        """
        script = integrations.control_training_script()
        name = self._check_new_name(name)
        if control_type not in CONTROL_TYPES:
            raise JobError(f"unknown control type {control_type!r}; choose one of {', '.join(CONTROL_TYPES)}")
        task = CONTROL_TYPES[control_type]
        adapter_flags = self._adapter_flags(settings)
        run = self._new_run_dir(name)
        try:
            if source == "builtin":
                data_flags = ["--train_data_dir", str(self.shapes_control_data(task))]
            elif source in ("zip", "folder"):
                data = run / "data"
                if source == "zip":
                    if not archive:
                        raise UploadError("no zip archive was uploaded")
                    extract_zip(archive, data)
                else:
                    copy_folder_upload(folder_files or [], data)
                data_flags = control_data_flags(data, task)
            else:
                raise JobError(f"unknown data source {source!r}")
            flags = ["--pretrained_model_name_or_path", str(self.state.model_path), "--output_dir", str(run),
                     *data_flags, "--control_task", task, "--num_validation_images", "4", *adapter_flags]
            argv, display = launch_command(script, flags)
            return self.jobs.start("control", name, run, argv, display)
        except BaseException:
            shutil.rmtree(run, ignore_errors=True)  # a refused run leaves nothing behind
            raise

    def shapes_control_data(self, task: str, rows: int | None = None) -> Path:
        """A shapes-world control dataset for ``task`` under the data dir (written once, atomically)."""
        rows = rows or self.config.shapes_rows
        folder = self.data_dir / "control_data" / f"shapes-{task}-{rows}"
        if (folder / "metadata.jsonl").is_file():
            return folder
        try:
            from ..control.data import write_shapes_dataset
        except ImportError:
            raise NotAvailableError("the built-in shapes-world control task is not available in this version") from None
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            write_shapes_dataset(tmp, task, rows)
            if folder.exists():  # written meanwhile by another request: keep that one
                shutil.rmtree(tmp)
            else:
                tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    def stop(self) -> str:
        """Stop the running job (its last checkpoint is kept as an adapter)."""
        return self.jobs.stop()

    # ------------------------------------------------------------ adapters tab
    def rename(self, old: str, new: str) -> str:
        """Rename a user adapter."""
        info = self.library.rename(old, new)
        self.state.forget(old)
        return f"renamed {old!r} to {info.name!r}"

    def delete(self, name: str) -> str:
        """Delete a user adapter."""
        self.library.delete(name)
        self.state.forget(name)
        return f"deleted {name!r}"

    def download(self, name: str) -> Path:
        """A copy of the adapter file to download."""
        return self.library.download_copy(name, Path(tempfile.mkdtemp(dir=self.tmp)))

    def export(self, name: str, fmt: str, scale: float = 1.0) -> Path:
        """The adapter in another tool's format at strength ``scale`` (one file; folders are zipped)."""
        info = self.library.get(name)
        formats = integrations.export_formats()
        if not formats:
            raise NotAvailableError("export (peft / LyCORIS / merged) is not available in this version yet")
        if fmt not in formats:  # checked before the name is used in a path
            raise NotAvailableError(f"unknown export format {fmt!r}; choose one of {', '.join(formats)}")
        if not 0.0 <= float(scale) <= self.state.limits.max_t:
            raise GenerationError(f"the exported strength must be between 0 and {self.state.limits.max_t}")
        folder = Path(tempfile.mkdtemp(dir=self.tmp))
        out = folder / (f"{info.name}-{fmt}.safetensors" if fmt == "lycoris" else f"{info.name}-{fmt}")
        paths = integrations.export(info.path, fmt, out, base=self.state.model_path, scale=float(scale))
        if len(paths) == 1 and paths[0].is_file():
            return paths[0]
        # Folders (peft, merged) travel as one zip.
        return Path(shutil.make_archive(str(out), "zip", root_dir=out if out.is_dir() else folder))

    def import_file(self, path: str | None, name: str) -> str:
        """Add an uploaded adapter file (refused if it was made for another base model)."""
        if not path:
            raise UploadError("no file was uploaded")
        name = check_name(name or suggest_name(Path(path).stem))
        from ..formats.native import AdapterFileError

        try:
            info = self.library.add(path, name, fingerprints=self.state.fingerprints)
        except AdapterFileError as err:
            raise UploadError(f"{Path(path).name} is not a usable ortho-diffusion adapter: {err}") from None
        return f"imported {info.name!r} ({info.method}, {info.parameters:,} parameters)"


def control_data_flags(data: Path, task: str) -> list[str]:
    """``train_control.py`` data flags for an uploaded folder (unwrapping one top folder).

    Pairs (a ``metadata.jsonl``/``.csv`` table, or ``conditioning_images/``) are used as they
    are; plain images are preprocessed by the script for Canny and face landmarks, while a
    segmentation task needs the maps.
    """
    root = data
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in ("images", "conditioning_images"):
        root = entries[0]
    paired = any((root / n).is_file() for n in ("metadata.jsonl", "metadata.csv")) or (root / "conditioning_images").is_dir()
    if paired:
        return ["--train_data_dir", str(root)]
    if task in ("canny", "landmarks"):
        return ["--train_data_dir", str(root), "--preprocess", task]
    raise UploadError(
        "a segmentation dataset needs its maps: a metadata.jsonl (image, conditioning_image, text) or "
        "images/ and conditioning_images/ folders"
    )


def _center_fit(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover ``width``×``height``, then crop the center (keeps the aspect ratio)."""
    scale = max(width / img.width, height / img.height)
    w, h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - width) // 2, (h - height) // 2
    return img.crop((left, top, left + width, top + height))


def _number(what: str, value: Any) -> float:
    """``value`` as a finite float, or a :class:`GenerationError` naming the field."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise GenerationError(f"the {what} must be a number, not {value!r}") from None
    if not np.isfinite(out):
        raise GenerationError(f"the {what} must be a finite number, not {value!r}")
    return out


def _whole(what: str, value: Any) -> int:
    """``value`` as an int (a float such as 25.0 is fine, 2.5 is not), or a :class:`GenerationError`."""
    out = _number(what, value)
    if out != int(out):
        raise GenerationError(f"the {what} must be a whole number, not {value!r}")
    return int(out)
