"""Checking what users upload before anything reaches a model or a training script.

Images are opened with Pillow, checked against a pixel limit *before* decoding (a small PNG
can decode to gigabytes), converted to RGB and re-saved as PNG, so a training run only ever
sees clean image files.  Zip archives are extracted member by member with limits on count and
total size, and with every path component checked, so no archive can write outside its
folder.  Everything is first written to a temporary folder that is renamed into place only
when all of it succeeded.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..files import atomic_folder
from ..images import IMAGE_SUFFIXES

#: Largest image accepted (pixels), far above any training resolution.
MAX_IMAGE_PIXELS = 4096 * 4096
_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.,()+-]{0,127}$")


class UploadError(ValueError):
    """An upload that cannot be used; the message names the file."""


def display_name(path: str | Path) -> str:
    """The name a user knows a file by (Gradio keeps the original base name)."""
    return Path(path).name


def open_checked_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None) -> Image.Image:
    """Open ``path`` as an RGB image, refusing non-images and images over ``max_pixels``.

    ``name`` is how the user knows the file (default: its base name) for messages.
    """
    name = name or display_name(path)
    try:
        with Image.open(path) as img:
            # The header is read, the pixels are not yet: refuse decompression bombs here.
            if img.width * img.height > max_pixels:
                raise UploadError(
                    f"{name}: {img.width}x{img.height} is too large (at most {max_pixels:,} pixels, "
                    "e.g. 4096x4096); resize it first"
                )
            img.load()
            return img.convert("RGB")
    except UploadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UploadError(f"{name}: not a readable image ({type(err).__name__})") from None


def check_image_header(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None) -> None:
    """Refuse a file that is not an image or is larger than ``max_pixels``, reading only its header.

    Cheap enough for every file of a training archive; the pixels are decoded later by the
    training script, which then meets no non-image and no decompression bomb.
    """
    name = name or display_name(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UploadError(f"{name}: not a readable image ({type(err).__name__})") from None
    if width * height > max_pixels:
        raise UploadError(
            f"{name}: {width}x{height} is too large (at most {max_pixels:,} pixels, e.g. 4096x4096); resize it first"
        )


def save_images(files: list[str | Path], dest: Path, max_images: int = 200, max_pixels: int = MAX_IMAGE_PIXELS) -> list[Path]:
    """Check every uploaded file and write them as ``dest/NN.png``, all or nothing.

    Raises:
        UploadError: no files, too many, or one that is not an acceptable image (named).
    """
    files = [f for f in (files or []) if f]
    if not files:
        raise UploadError("no images were uploaded: add a few pictures of your subject")
    if len(files) > max_images:
        raise UploadError(f"{len(files)} files uploaded; at most {max_images} are accepted")
    out = []
    with atomic_folder(dest) as tmp:
        for i, f in enumerate(files):
            img = open_checked_image(f, max_pixels)
            path = tmp / f"{i:03d}.png"
            img.save(path, format="PNG")
            out.append(dest / path.name)
    return out


def _safe_member_path(name: str) -> Path | None:
    """Relative path of a zip member if every component is plain, else ``None`` (skipped)."""
    name = name.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return None  # absolute paths have no business in an upload
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." or not _SAFE_PART.match(p) for p in parts):
        return None
    if parts[0] == "__MACOSX":
        return None
    return Path(*parts)


def extract_zip(
    archive: str | Path,
    dest: Path,
    max_files: int = 50_000,
    max_total_bytes: int = 2 * 1024**3,
    allowed_suffixes: set[str] | None = None,
) -> list[Path]:
    """Extract the image/caption files of a zip archive into ``dest``, all or nothing.

    Members with unsafe paths (absolute, ``..``, odd characters) or other suffixes are
    skipped; the archive's declared sizes are checked before extracting and the bytes actually
    written are counted while extracting (a lying header cannot exceed the limit).
    """
    allowed = allowed_suffixes or (IMAGE_SUFFIXES | {".txt", ".json", ".jsonl", ".csv"})
    name = display_name(archive)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise UploadError(f"{name}: not a readable zip archive ({err})") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > max_files:
            raise UploadError(f"{name}: {len(members)} files; at most {max_files} are accepted")
        if sum(m.file_size for m in members) > max_total_bytes:
            raise UploadError(f"{name}: unpacks to more than {max_total_bytes // 1024**2} MiB")
        written, out = 0, []
        try:
            with atomic_folder(dest) as tmp:
                for m in members:
                    rel = _safe_member_path(m.filename)
                    if rel is None or rel.suffix.lower() not in allowed:
                        continue
                    target = tmp / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(m) as src, open(target, "wb") as dst:
                        while chunk := src.read(1 << 20):
                            written += len(chunk)
                            if written > max_total_bytes:
                                raise UploadError(f"{name}: unpacks to more than {max_total_bytes // 1024**2} MiB")
                            dst.write(chunk)
                    if rel.suffix.lower() in IMAGE_SUFFIXES:
                        check_image_header(target, name=f"{name}: {rel.as_posix()}")
                    out.append(dest / rel)
                if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in out):
                    raise UploadError(f"{name}: no images inside (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            return out
        except zipfile.BadZipFile as err:
            raise UploadError(f"{name}: damaged zip archive ({err})") from None


def copy_folder_upload(files: list[str | Path], dest: Path, max_files: int = 50_000) -> list[Path]:
    """Files of an uploaded folder (Gradio flattens it to a list) copied by base name, all or nothing."""
    files = [Path(f) for f in (files or []) if f]
    if not files:
        raise UploadError("the folder upload is empty")
    if len(files) > max_files:
        raise UploadError(f"{len(files)} files uploaded; at most {max_files} are accepted")
    out = []
    with atomic_folder(dest) as tmp:
        for f in files:
            rel = _safe_member_path(f.name)
            if rel is None or rel.suffix.lower() not in IMAGE_SUFFIXES | {".txt", ".json", ".jsonl", ".csv"}:
                continue
            if (tmp / rel.name).exists():
                # Uploaded folders arrive flattened: images/001.png and conditioning_images/001.png
                # would overwrite each other and silently break the pairs.
                raise UploadError(
                    f"two files are named {rel.name} (in different subfolders?): a folder upload keeps only "
                    "file names, so upload a dataset with subfolders as a zip archive"
                )
            if rel.suffix.lower() in IMAGE_SUFFIXES:
                check_image_header(f, name=rel.name)
            shutil.copyfile(f, tmp / rel.name)
            out.append(dest / rel.name)
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in out):
            raise UploadError("the uploaded folder holds no images")
    return out
