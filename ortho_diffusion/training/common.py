"""What every training script shares: flags, config files, checkpoints, outputs, errors.

The scripts in ``training/`` stay thin: they build a parser from these pieces and call a
``run`` function of the package.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import SIDES, AdapterConfig
from ..default_model import DEFAULT_GUIDANCE_SCALE, default_model_path
from ..diffusion import ModelFolderError, pipeline_class_name
from ..files import atomic_folder


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the script prints its message as one line."""


def resolve_model_path(value: str | None) -> Path:
    """The model folder from the flag, or the embedded default model."""
    if value is None:
        return Path(default_model_path())
    path = Path(value)
    try:
        pipeline_class_name(path)
    except ModelFolderError as err:
        raise TrainingError(str(err)) from None
    return path


# --------------------------------------------------------------------------- flags
def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags every training script shares, named as in diffusers' example scripts."""
    p = parser
    p.add_argument("--config", type=str, default=None, help="YAML or TOML file holding any of these flags")
    p.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="local diffusers SD 1.x/2.x/SDXL folder (default: the embedded shapes model)",
    )
    p.add_argument("--output_dir", type=str, default="outputs/run")
    p.add_argument("--output_name", type=str, default="adapter", help="file name of the final adapter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    p.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--train_text_encoder", action="store_true")
    p.add_argument("--train_batch_size", type=int, default=4)
    p.add_argument("--max_train_steps", type=int, default=400)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    )
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--checkpointing_steps", type=int, default=100)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", type=str, default=None, help='a checkpoint folder or "latest"')
    p.add_argument("--validation_prompt", type=str, default=None)
    p.add_argument("--num_validation_images", type=int, default=4)
    p.add_argument("--validation_steps", type=int, default=100)
    p.add_argument("--sample_steps", type=int, default=25, help="denoising steps of validation and samples")
    p.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    p.add_argument("--report_to", type=str, default="tensorboard", help='"tensorboard" (when installed) or "none"')


def add_adapter_args(
    parser: argparse.ArgumentParser, unet_targets: str = "unet-attn", extra_methods: tuple[str, ...] = ()
) -> None:
    """Flags of the orthogonal adapter (see :class:`~ortho_diffusion.config.AdapterConfig`).

    ``extra_methods``: further ``--method`` choices a script handles itself (e.g. ``none``:
    no rotations, for a control encoder trained alone).
    """
    g = parser.add_argument_group("adapter")
    g.add_argument(
        "--method",
        type=str,
        default="oft",
        choices=["oft", "oftv2", "boft", "goft", "qgoft", "lroft", "lora", *extra_methods],
        help="orthogonal method, or lora: peft's LoRA as a baseline for comparisons",
    )
    g.add_argument("--block_size", type=int, default=None)
    g.add_argument("--n_blocks", type=int, default=None)
    g.add_argument("--n_factors", type=int, default=1)
    g.add_argument("--neumann_terms", type=int, default=5)
    g.add_argument("--side", type=str, default="input", choices=list(SIDES))
    g.add_argument("--unet_targets", type=str, default=unet_targets, help="preset or comma-separated patterns")
    g.add_argument("--text_encoder_targets", type=str, default="text-attn", help="preset or comma-separated patterns")
    g.add_argument("--constraint", type=float, default=None)
    g.add_argument("--rescale", action="store_true")
    g.add_argument("--block_share", action="store_true")
    g.add_argument("--qgoft_lambda", type=float, default=1e-2)
    g.add_argument("--rank", type=int, default=None, help="rank r of --method lroft (default 4)")


def parse_targets(value: str) -> str | list[str]:
    """A ``--*_targets`` flag value (a preset name or comma-separated patterns) for :class:`AdapterConfig`."""
    parts = [t.strip() for t in value.split(",") if t.strip()]
    return parts[0] if len(parts) == 1 else parts


def adapter_configs(args: argparse.Namespace) -> tuple[AdapterConfig | None, AdapterConfig | None]:
    """UNet and (with ``--train_text_encoder``) text-encoder configs from parsed flags.

    ``(None, None)`` for ``--method lora`` (the peft baseline has no orthogonal config) and
    ``--method none`` (no rotations).
    """
    if args.method in ("lora", "none"):
        return None, None
    common = dict(
        method=args.method,
        block_size=args.block_size,
        n_blocks=args.n_blocks,
        n_factors=args.n_factors,
        neumann_terms=args.neumann_terms,
        side=args.side,
        constraint=args.constraint,
        rescale=args.rescale,
        block_share=args.block_share,
        qgoft_lambda=args.qgoft_lambda,
        rank=args.rank,
    )
    try:
        unet = AdapterConfig(targets=parse_targets(args.unet_targets), **common)
        text = AdapterConfig(targets=parse_targets(args.text_encoder_targets), **common) if args.train_text_encoder else None
    except ValueError as err:
        raise TrainingError(f"adapter settings: {err}") from None
    return unet, text


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Flags from a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: no such config file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as err:
        raise TrainingError(f"{path}: cannot parse ({err})") from None
    if not isinstance(data, dict):
        raise TrainingError(f"{path}: expected a mapping of flag names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; values from ``--config`` become defaults, so the command line wins."""
    args = parser.parse_args(argv)
    if args.config:
        values = read_config_file(args.config)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainingError(f"{args.config}: unknown flags {unknown}")
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
    return args


def run_main(run: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse, run, and turn expected failures into one ``error: ...`` line and exit code 2."""
    from ..formats import AdapterFileError
    from ..images import DataError

    try:
        args = parse_with_config(parser, argv)
        run(args)
    except (TrainingError, DataError, AdapterFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# -------------------------------------------------------------------- checkpoints
CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class CheckpointManager:
    """Atomic training checkpoints in ``<output_dir>/checkpoints/checkpoint-<step>/``.

    A checkpoint holds ``adapter.safetensors`` (native adapter file), ``training_state.pt``
    (optimizer and LR scheduler state, loaded with ``weights_only=True``) and ``state.json``
    (step, loss history).  It is written to a temporary folder and renamed, so a kill leaves
    either the whole checkpoint or none.
    """

    output_dir: Path
    total_limit: int | None = None
    folder: Path = field(init=False)

    def __post_init__(self) -> None:
        self.folder = Path(self.output_dir) / "checkpoints"

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
        found = [p for p in found if p.name[len(CHECKPOINT_PREFIX) :].isdigit() and (p / "state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))

    def resolve(self, value: str) -> Path:
        """``"latest"`` or a path to a checkpoint folder."""
        if value == "latest":
            found = self.all()
            if not found:
                raise TrainingError(f"--resume_from_checkpoint latest: no checkpoint in {self.folder}")
            return found[-1]
        path = Path(value)
        if not (path / "state.json").is_file():
            path = self.folder / value
        if not (path / "state.json").is_file():
            raise TrainingError(f"{value}: not a checkpoint folder")
        return path

    def save(
        self,
        step: int,
        write_adapter: Callable[[Path], Any],
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        state: dict[str, Any],
    ) -> Path:
        """Write checkpoint ``step`` atomically and prune old ones beyond ``total_limit``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{CHECKPOINT_PREFIX}{step:06d}"
        with atomic_folder(final) as tmp:
            write_adapter(tmp / "adapter.safetensors")
            torch.save(
                {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()},
                tmp / "training_state.pt",
            )
            (tmp / "state.json").write_text(json.dumps({**state, "step": step}, default=str))
        if self.total_limit:
            for old in self.all()[: -self.total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(state.json, {"optimizer": ..., "lr_scheduler": ...})`` of a checkpoint."""
        try:
            state = json.loads((path / "state.json").read_text())
            tensors = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
        except Exception as err:
            raise TrainingError(f"{path}: damaged checkpoint ({err})") from None
        return state, tensors


def check_finite(loss: torch.Tensor, step: int, last_checkpoint: Path | None) -> None:
    """Stop the run with a clear message when the loss is NaN or infinite."""
    if not torch.isfinite(loss).all():
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        raise TrainingError(
            f"loss became {loss.item()} at step {step}; stopping ({where}). "
            "Lower --learning_rate or set --max_grad_norm."
        )


class Timer:
    """Wall time since creation, in seconds."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
