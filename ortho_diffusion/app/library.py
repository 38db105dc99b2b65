"""The adapter library of the app: a folder of native ``.safetensors`` adapter files.

``<data_dir>/adapters/<name>.safetensors`` are the user's adapters (trained in the app,
imported, renamed, deleted); adapter files shipped in the repository's ``assets/`` folder are
listed too, read-only.  Names are restricted to ``[A-Za-z0-9_-]`` (no dots, no slashes), and
every path is checked to stay inside its folder, so no name typed in the UI or sent through the
API can reach a file elsewhere.  Files are only ever read with ``safetensors`` (never
unpickled), and every write is a copy to a temporary name followed by a rename.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..files import atomic_file
from ..formats.native import FORMAT, AdapterFile, AdapterFileError

#: What a library name may look like: it becomes a file name and a pipeline adapter name.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SUFFIX = ".safetensors"


class LibraryError(ValueError):
    """A library operation that cannot be done; the message is shown to the user as is."""


def check_name(name: str) -> str:
    """Return ``name`` stripped, or raise :class:`LibraryError` when it is not a safe name."""
    name = (name or "").strip()
    if not NAME_PATTERN.match(name):
        raise LibraryError(
            f"{name!r} is not a valid adapter name: use 1-64 letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


def suggest_name(text: str, fallback: str = "adapter") -> str:
    """A valid name made from free text (``"My dog!"`` -> ``"My_dog"``)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", text or "").strip("_-")[:64]
    return name if name and NAME_PATTERN.match(name) else fallback


def inside(root: Path, path: Path) -> Path:
    """``path`` resolved, or :class:`LibraryError` if it lies outside ``root``."""
    root_r, path_r = root.resolve(), path.resolve()
    if path_r != root_r and root_r not in path_r.parents:
        raise LibraryError(f"{path} is outside {root}")
    return path_r


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to a temporary file beside ``dst``, then rename it into place."""
    with atomic_file(dst) as tmp:
        shutil.copyfile(src, tmp)


@dataclass
class AdapterInfo:
    """What the app shows about one adapter file (read from its header, no tensor data)."""

    name: str
    path: Path
    builtin: bool
    method: str = "?"
    task: str = "subject"
    control_task: str = ""
    components: list[str] = field(default_factory=list)
    parameters: int = 0
    n_factors: int = 1
    base_model: str = ""
    instance_prompt: str = ""
    fingerprints: dict[str, str] = field(default_factory=dict)
    size_bytes: int = 0
    created: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def is_control(self) -> bool:
        """Control adapters take a control image at generation time."""
        return self.task == "control"

    def fits(self, fingerprints: dict[str, str]) -> bool:
        """Whether every component of this adapter matches the loaded model's architecture."""
        # An empty fingerprint means "architecture unknown" (files converted from other
        # tools): loading then checks module names and shapes, so it is not refused here.
        return bool(self.fingerprints) and all(not fp or fingerprints.get(c) == fp for c, fp in self.fingerprints.items())

    def label(self) -> str:
        """One line for pickers: name, task, method."""
        extra = f", {self.n_factors} factors" if self.method == "boft" else ""
        task = f"{self.control_task} control" if self.is_control and self.control_task else self.task
        return f"{self.name} ({task}, {self.method}{extra}{', built-in' if self.builtin else ''})"


def read_info(path: Path, name: str, builtin: bool) -> AdapterInfo:
    """Header-only read of an adapter file; :class:`AdapterFileError` if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as err:  # safetensors raises its own types for damaged files
        raise AdapterFileError(f"{path}: not a readable safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: not an ortho-diffusion adapter")
    try:
        comps = json.loads(meta.get("components", "[]"))
        configs = {c: json.loads(meta[f"config.{c}"]) for c in comps}
        fingerprints = {c: meta[f"fingerprint.{c}"] for c in comps}
    except (KeyError, ValueError, TypeError) as err:
        raise AdapterFileError(f"{path}: damaged metadata ({err})") from None
    first = configs[comps[0]] if comps else {}
    try:
        parts = list(json.loads(meta.get("parts", "[]")))
    except ValueError:
        parts = []
    # A control adapter carries a control encoder as a file part beside its rotations.
    task = meta.get("task") or ("control" if "control" in parts else "subject")
    n_params = 0
    for key, shape in shapes.items():
        if key.split("/", 1)[0] in comps + parts:  # adapter tensors and file parts
            count = 1
            for s in shape:
                count *= int(s)
            n_params += count
    stat = path.stat()
    base = meta.get("base_model") or next((meta[f"base_model.{c}"] for c in comps if meta.get(f"base_model.{c}")), "")
    return AdapterInfo(
        name=name,
        path=path,
        builtin=builtin,
        method=str(first.get("method", "?")),
        task=task,
        control_task=meta.get("control_task", ""),
        components=comps,
        parameters=n_params,
        n_factors=int(first.get("n_factors", 1) or 1),
        base_model=base,
        instance_prompt=meta.get("instance_prompt", ""),
        fingerprints=fingerprints,
        size_bytes=stat.st_size,
        created=float(meta["created"]) if meta.get("created", "").replace(".", "", 1).isdigit() else stat.st_mtime,
        metadata=meta,
    )


class AdapterLibrary:
    """The user's adapter folder plus read-only built-in adapters.

    Args:
        folder: ``<data_dir>/adapters``; created when missing.
        builtin_dirs: folders searched (non-recursively, and one level down) for shipped
            adapter files; files that are not ortho-diffusion adapters are ignored.
    """

    def __init__(self, folder: str | Path, builtin_dirs: list[Path] | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.builtin_dirs = [Path(d) for d in (builtin_dirs or []) if Path(d).is_dir()]
        self._lock = threading.Lock()  # rename/delete/import against each other

    # ------------------------------------------------------------------ listing
    def _builtin_files(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for root in self.builtin_dirs:
            candidates = list(root.glob(f"*{SUFFIX}")) + list(root.glob(f"*/*{SUFFIX}"))
            for path in sorted(candidates):
                name = suggest_name(path.stem)
                if name not in found:
                    found[name] = path
        return found

    def list(self) -> list[AdapterInfo]:
        """Every readable adapter, user adapters first (a user adapter hides a same-named built-in)."""
        infos: dict[str, AdapterInfo] = {}
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            name = path.name[: -len(SUFFIX)]
            if not NAME_PATTERN.match(name):
                continue  # a stray file copied in by hand with an unsafe name
            try:
                infos[name] = read_info(path, name, builtin=False)
            except AdapterFileError:
                continue
        for name, path in self._builtin_files().items():
            if name in infos:
                continue
            try:
                infos[name] = read_info(path, name, builtin=True)
            except AdapterFileError:
                continue  # model weights and other safetensors files under assets/
        return sorted(infos.values(), key=lambda i: (i.builtin, i.name.lower()))

    def get(self, name: str) -> AdapterInfo:
        """The adapter called ``name``, or :class:`LibraryError`."""
        name = check_name(name)
        for info in self.list():
            if info.name == name:
                return info
        raise LibraryError(f"no adapter named {name!r}")

    def user_path(self, name: str) -> Path:
        """Where the user adapter ``name`` lives (it may not exist)."""
        name = check_name(name)
        path = self.folder / f"{name}{SUFFIX}"
        inside(self.folder, path)
        return path

    def exists(self, name: str) -> bool:
        """Whether ``name`` is taken (by a user or a built-in adapter)."""
        try:
            self.get(name)
        except LibraryError:
            return False
        return True

    def free_name(self, name: str) -> str:
        """``name``, or ``name-2``, ``name-3``... the first that is not taken."""
        name = check_name(name)
        if not self.exists(name):
            return name
        for i in range(2, 1000):
            candidate = f"{name[:58]}-{i}"
            if not self.exists(candidate):
                return candidate
        raise LibraryError(f"too many adapters named {name}-N")

    # ---------------------------------------------------------------- changing
    def add(self, src: str | Path, name: str, fingerprints: dict[str, str] | None = None, overwrite: bool = False) -> AdapterInfo:
        """Validate ``src`` as an adapter file and copy it into the library as ``name``.

        Args:
            fingerprints: the loaded model's; when given, an adapter made for another base
                architecture is refused with a readable message.
            overwrite: replace an existing user adapter of that name.
        """
        src = Path(src)
        name = check_name(name)
        AdapterFile(src)  # full validation: format, metadata, every tensor readable
        info = read_info(src, name, builtin=False)
        if fingerprints is not None and not info.fits(fingerprints):
            raise LibraryError(
                f"{src.name} was made for another base model ({info.base_model or 'unknown'}); "
                "its architecture does not match the model this app runs"
            )
        with self._lock:
            dst = self.user_path(name)
            if not overwrite and self.exists(name):
                raise LibraryError(f"an adapter named {name!r} already exists; pick another name or delete it")
            atomic_copy(src, dst)
        return read_info(dst, name, builtin=False)

    def rename(self, old: str, new: str) -> AdapterInfo:
        """Rename a user adapter; refuses built-ins and names already taken."""
        info = self.get(old)
        new = check_name(new)
        if info.builtin:
            raise LibraryError(f"{old!r} is a built-in adapter and cannot be renamed (download or export it instead)")
        with self._lock:
            dst = self.user_path(new)
            if self.exists(new):
                raise LibraryError(f"an adapter named {new!r} already exists")
            try:
                # A hard link fails if the target exists, so no concurrent writer is clobbered;
                # then the old name goes.  Either name always points to the complete file.
                os.link(info.path, dst)
                os.unlink(info.path)
            except OSError:
                os.replace(info.path, dst)  # file systems without hard links
        return read_info(dst, new, builtin=False)

    def delete(self, name: str) -> None:
        """Delete a user adapter (built-ins are refused)."""
        info = self.get(name)
        if info.builtin:
            raise LibraryError(f"{name!r} is a built-in adapter and cannot be deleted")
        with self._lock:
            inside(self.folder, info.path).unlink(missing_ok=True)

    def download_copy(self, name: str, folder: Path) -> Path:
        """A copy of the adapter's file under ``folder`` (what the UI serves for download)."""
        info = self.get(name)
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / f"{info.name}{SUFFIX}"
        atomic_copy(info.path, dst)
        return dst


def describe(info: AdapterInfo, fingerprints: dict[str, str]) -> list[Any]:
    """One row of the Adapters table."""
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created)) if info.created else ""
    base = info.base_model
    if len(base) > 40:
        base = "…" + base[-39:]
    return [
        info.name,
        f"{info.control_task} control" if info.is_control and info.control_task else info.task,
        info.method + (f" ×{info.n_factors}" if info.method == "boft" else ""),
        f"{info.parameters:,}",
        base,
        "yes" if info.fits(fingerprints) else "NO (other base model)",
        f"{info.size_bytes / 1024:.1f} KiB",
        created,
        "built-in" if info.builtin else "yours",
    ]


TABLE_HEADERS = ["name", "task", "method", "parameters", "base model", "fits this model", "size", "created", "source"]
