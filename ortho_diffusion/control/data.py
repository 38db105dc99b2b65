"""Control training data: (image, conditioning image, caption) rows from several sources.

* a ``.jsonl`` or ``.csv`` file, or a folder holding ``metadata.jsonl`` / ``metadata.csv``:
  one row per example, columns named by ``image_column`` / ``conditioning_image_column`` /
  ``caption_column`` (diffusers' flags; defaults ``image``, ``conditioning_image``,
  ``text``), paths relative to the file;
* a folder with ``images/`` and ``conditioning_images/`` holding files of the same names,
  captions in ``images/<name>.txt``;
* a local Hugging Face ``datasets`` dataset (a ``save_to_disk`` folder, or a folder
  ``datasets.load_dataset`` reads), with the same column flags; nothing is downloaded;
* images only, with a preprocessor (``canny`` or ``landmarks``) making each conditioning
  image from its photo.

Every row is decoded and checked before training starts: a missing file, an unreadable
image, an image and conditioning image of different sizes, an empty source: each raises
:class:`~ortho_diffusion.images.DataError` naming the row.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..images import IMAGE_SUFFIXES, DataError, open_image

TABLE_NAMES = ("metadata.jsonl", "metadata.csv")


@dataclass
class Row:
    """One example before decoding: image and conditioning (a path or an in-memory image)."""

    image: Any
    conditioning: Any
    caption: str
    where: str  # "metadata.jsonl line 3": used in error messages


@dataclass
class ControlData:
    """Decoded examples: ``images`` (N, 3, R, R) in [-1, 1], ``hints`` (N, 3, R, R) in [0, 1]."""

    images: torch.Tensor
    hints: torch.Tensor
    captions: list[str]
    rows: list[str]

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class Columns:
    image: str = "image"
    conditioning: str = "conditioning_image"
    caption: str = "text"


def _table_rows(path: Path, cols: Columns, need_conditioning: bool) -> list[Row]:
    base = path.parent
    rows: list[Row] = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    if path.suffix.lower() == ".jsonl":
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as err:
                raise DataError(f"{path} line {i}: not JSON ({err})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path} line {i}: expected a JSON object")
            records.append((f"{path} line {i}", rec))
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        records = [(f"{path} row {i}", rec) for i, rec in enumerate(reader, 1)]
    else:
        raise DataError(f"{path}: expected a .jsonl or .csv file")
    for where, rec in records:
        wanted = [cols.image] + ([cols.conditioning] if need_conditioning else [])
        missing = [c for c in wanted if not rec.get(c)]
        if missing:
            raise DataError(f"{where}: missing column(s) {missing} (have {sorted(rec)})")
        caption = rec.get(cols.caption) or ""
        if not isinstance(caption, str):
            raise DataError(f"{where}: caption column {cols.caption!r} is not text")
        cond = base / str(rec[cols.conditioning]) if need_conditioning else None
        rows.append(Row(base / str(rec[cols.image]), cond, caption, where))
    return rows


def _folder_rows(folder: Path, need_conditioning: bool) -> list[Row]:
    for name in TABLE_NAMES:
        if (folder / name).is_file():
            return []  # handled as a table by the caller
    images_dir = folder / "images" if (folder / "images").is_dir() else folder
    cond_dir = folder / "conditioning_images"
    if need_conditioning and not cond_dir.is_dir():
        raise DataError(
            f"{folder}: expected metadata.jsonl, metadata.csv, or images/ and conditioning_images/ folders "
            "(or use --preprocess to make conditioning images)"
        )
    rows = []
    for path in sorted(images_dir.iterdir()):
        if path.is_dir() or path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else ""
        cond = None
        if need_conditioning:
            matches = [p for p in cond_dir.glob(path.stem + ".*") if p.suffix.lower() in IMAGE_SUFFIXES]
            if not matches:
                raise DataError(f"{path}: no conditioning image {cond_dir / path.stem}.* for it")
            cond = matches[0]
        rows.append(Row(path, cond, caption, str(path)))
    return rows


def _hf_rows(name: str, cols: Columns, need_conditioning: bool, split: str) -> list[Row]:
    path = Path(name)
    if not path.exists():
        raise DataError(f"--dataset_name {name}: not a local folder (datasets are never downloaded here)")
    try:
        import datasets
    except ImportError:
        raise DataError("the datasets package is not installed (./install.sh installs it)") from None
    try:
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{name}: no split {split!r} (have {list(ds)})")
            ds = ds[split]
    except DataError:
        raise
    except Exception as err:  # datasets raises many error types for unreadable folders
        raise DataError(f"{name}: not a readable datasets dataset ({err})") from None
    wanted = [cols.image] + ([cols.conditioning] if need_conditioning else [])
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise DataError(f"{name}: no column(s) {missing}; columns are {ds.column_names} (see --image_column, ...)")
    rows = []
    for i, rec in enumerate(ds):
        caption = rec.get(cols.caption) or "" if cols.caption in ds.column_names else ""
        if isinstance(caption, list):  # diffusers accepts several captions; take the first
            caption = caption[0] if caption else ""
        cond = rec[cols.conditioning] if need_conditioning else None
        rows.append(Row(rec[cols.image], cond, str(caption), f"{name} row {i}"))
    return rows


def read_rows(
    train_data_dir: str | None = None,
    dataset_name: str | None = None,
    columns: Columns | None = None,
    need_conditioning: bool = True,
    split: str = "train",
) -> list[Row]:
    """The rows of one source (see the module docstring); raises :class:`DataError`."""
    cols = columns or Columns()
    if bool(train_data_dir) == bool(dataset_name):
        raise DataError("give exactly one of --train_data_dir and --dataset_name")
    if dataset_name:
        rows = _hf_rows(dataset_name, cols, need_conditioning, split)
    else:
        path = Path(train_data_dir)
        if path.is_file():
            rows = _table_rows(path, cols, need_conditioning)
        elif path.is_dir():
            table = next((path / n for n in TABLE_NAMES if (path / n).is_file()), None)
            rows = _table_rows(table, cols, need_conditioning) if table else _folder_rows(path, need_conditioning)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not rows:
        raise DataError(f"{train_data_dir or dataset_name}: no examples found")
    return rows


def _decode(value: Any, where: str, what: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # datasets' Image feature, undecoded
        if value.get("bytes"):
            try:
                return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
            except Exception as err:
                raise DataError(f"{where}: {what} is not a readable image ({err})") from None
        value = value.get("path")
    path = Path(str(value))
    if not path.is_file():
        raise DataError(f"{where}: {what} {path} does not exist")
    try:
        return open_image(path)
    except DataError as err:
        raise DataError(f"{where}: {what}: {err}") from None


def _fit(img: Image.Image, resolution: int, center_crop: bool, resample: int) -> np.ndarray:
    """Shorter side to ``resolution`` then centre crop (or squash): ``(R, R, 3)`` uint8."""
    if center_crop:
        scale = resolution / min(img.size)
        w, h = max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))
        img = img.resize((w, h), resample) if (w, h) != img.size else img
        left, top = (w - resolution) // 2, (h - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    elif img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), resample)
    return np.asarray(img, dtype=np.uint8)


def load_control_data(
    rows: list[Row],
    resolution: int,
    center_crop: bool = True,
    preprocess: Callable[[Image.Image], Image.Image] | None = None,
    max_samples: int | None = None,
) -> ControlData:
    """Decode, check and resize every row (conditioning maps with nearest-neighbour resampling).

    With ``preprocess`` the conditioning image is computed from the photo (at the photo's
    size, before resizing).  Raises :class:`DataError` naming the first bad row.
    """
    rows = rows[:max_samples] if max_samples else rows
    images, hints = [], []
    for row in rows:
        img = _decode(row.image, row.where, "image")
        if preprocess is not None:
            try:
                cond = preprocess(img).convert("RGB")
            except DataError as err:
                raise DataError(f"{row.where}: preprocessing failed: {err}") from None
        else:
            cond = _decode(row.conditioning, row.where, "conditioning image")
        if cond.size != img.size:
            raise DataError(
                f"{row.where}: image is {img.width}x{img.height} but its conditioning image is "
                f"{cond.width}x{cond.height}; they must be the same size"
            )
        images.append(_fit(img, resolution, center_crop, Image.BICUBIC))
        hints.append(_fit(cond, resolution, center_crop, Image.NEAREST))
    img_t = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    hint_t = torch.from_numpy(np.stack(hints)).permute(0, 3, 1, 2).float() / 255.0
    return ControlData(img_t, hint_t, [r.caption for r in rows], [r.where for r in rows])


LAYOUT_FREE_CAPTIONS = 0.5
"""Share of a shapes-world control dataset's rows captioned without sizes and places."""


def write_shapes_dataset(
    folder: str | Path, task: str, n: int, first_seed: int = 0, layout_free: float = LAYOUT_FREE_CAPTIONS
) -> Path:
    """Write a shapes-world control dataset: ``images/``, ``conditioning_images/``, ``metadata.jsonl``.

    Row ``i`` is the scene of seed ``first_seed + i``, its caption, and its ground-truth
    ``task`` map (``canny``, ``segmentation`` or ``landmarks``).  A fraction ``layout_free``
    of the rows, spread evenly, get the caption without sizes and places ("a red circle, on a
    white background"): the world's full captions place every object to within a few pixels,
    so a model trained on them only learns to follow the control map where the text leaves the
    layout open, as real captions do.  Returns the metadata path.
    """
    from ..shapes import caption, layout_free_caption, render, scene_from_seed
    from ..files import atomic_write_bytes, save_image_atomic
    from .preprocess import shapes_control

    if not 0.0 <= layout_free <= 1.0:
        raise ValueError(f"layout_free is a fraction of the rows, between 0 and 1; got {layout_free}")
    folder = Path(folder)
    lines = []
    for i in range(n):
        seed = first_seed + i
        scene = scene_from_seed(seed)
        image = render(scene)
        name = f"{seed:06d}.png"
        save_image_atomic(Image.fromarray(image), folder / "images" / name)
        save_image_atomic(Image.fromarray(shapes_control(scene, task, image)), folder / "conditioning_images" / name)
        without_layout = int((i + 1) * layout_free) > int(i * layout_free)
        text = layout_free_caption(scene) if without_layout else caption(scene)
        lines.append(json.dumps({"image": f"images/{name}", "conditioning_image": f"conditioning_images/{name}",
                                 "text": text, "seed": seed}))
    meta = folder / "metadata.jsonl"
    atomic_write_bytes(meta, ("\n".join(lines) + "\n").encode())
    return meta


def main(argv: list[str] | None = None) -> int:
    """``python -m ortho_diffusion.control.data canny out/canny --rows 4000``: write a shapes-world dataset."""
    import argparse

    from .preprocess import TASKS

    p = argparse.ArgumentParser(description="Write a shapes-world control dataset (deterministic from the seeds).")
    p.add_argument("task", choices=TASKS)
    p.add_argument("folder")
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--first_seed", type=int, default=0)
    p.add_argument("--layout_free", type=float, default=LAYOUT_FREE_CAPTIONS,
                   help="fraction of rows captioned without sizes and places (0: every caption names them)")
    args = p.parse_args(argv)
    try:
        meta = write_shapes_dataset(args.folder, args.task, args.rows, args.first_seed, args.layout_free)
    except ValueError as err:
        p.error(str(err))
    print(f"{args.rows} rows written: {meta}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
