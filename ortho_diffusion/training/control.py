"""Control training: a light control encoder plus orthogonal adapters (OFT paper, section 5).

The UNet's attention layers get rotations (``--method``), a control encoder is added to the
output of ``conv_in`` (:mod:`ortho_diffusion.control.encoder`), and both are trained with
the usual denoising loss on (image, conditioning image, caption) triples.  The result is
one native adapter file holding rotations and encoder; ``od.load_adapter`` restores both.
``--method none`` trains the encoder alone, ``--method lora`` puts peft's LoRA beside it
(baselines for comparisons).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import inject
from ..control.data import Columns, ControlData, load_control_data, read_rows
from ..control.encoder import ControlEncoderConfig, attach_control, control_images
from ..control.pipeline import enable_control, prepare_control_image
from ..control.preprocess import TASKS, PreprocessError, canny, preprocess
from ..diffusion import PromptEmbeddings, denoising_loss, encode_images, encode_prompts, load_pipeline
from ..formats import restore_adapter_values, save_adapter
from ..formats.native import AdapterFileError
from ..files import atomic_write_json, save_image_atomic
from .common import TrainingError, Timer, adapter_configs, add_adapter_args, add_common_args, resolve_model_path
from .lora_baseline import attach_lora, restore_lora, save_lora
from ..images import DataError, image_grid, open_image, to_pil
from .loop import init_trackers, log_images, make_accelerator, train_loop

ADAPTER_NAME = "default"


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``training/train_control.py`` (diffusers' ``train_controlnet.py`` names plus the adapter's)."""
    p = argparse.ArgumentParser(
        description="Train a control encoder with orthogonal adapters (Canny, segmentation, landmarks, ...).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        conflict_handler="resolve",  # --validation_prompt takes several values here
    )
    add_common_args(p)
    g = p.add_argument_group("control data")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="a .jsonl/.csv file, a folder with metadata.jsonl/.csv, or images/ + conditioning_images/")
    g.add_argument("--dataset_name", type=str, default=None, help="a local Hugging Face datasets folder")
    g.add_argument("--dataset_split", type=str, default="train")
    g.add_argument("--image_column", type=str, default="image")
    g.add_argument("--conditioning_image_column", type=str, default="conditioning_image")
    g.add_argument("--caption_column", type=str, default="text")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--encoder_lr_scale", type=float, default=1.0,
                   help="learning rate of the control encoder = this x --learning_rate (its last layer "
                        "starts at zero and must grow before the control map has any effect)")
    g.add_argument("--high_noise_share", type=float, default=0.0,
                   help="share of training timesteps drawn near pure noise, where the layout is decided "
                        "and must come from the control map")
    g.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="fraction of captions replaced by the empty prompt while training")
    g.add_argument("--preprocess", type=str, default=None, choices=["canny", "landmarks"],
                   help="make conditioning images from the images with this preprocessor")
    g.add_argument("--canny_low_threshold", type=int, default=100)
    g.add_argument("--canny_high_threshold", type=int, default=200)
    g.add_argument("--control_task", type=str, default=None,
                   help=f"what the control images show ({', '.join(TASKS)}, ...); stored in the file")
    g = p.add_argument_group("control encoder")
    g.add_argument("--control_channels", type=str, default="16,32,96,256",
                   help="stage widths of the encoder (the OFT paper's 16,32,96,256)")
    g.add_argument("--control_scale", type=float, default=1.0, help="control scale of validation and samples")
    g = p.add_argument_group("validation")
    g.add_argument("--validation_image", type=str, nargs="+", default=None,
                   help="control image(s) for validation (default: the first training rows')")
    g.add_argument("--validation_prompt", type=str, nargs="+", default=None,
                   help="one prompt per validation image, or one for all (default: their captions)")
    add_adapter_args(p, extra_methods=("none",))
    p.add_argument("--lora_rank", type=int, default=4, help="rank of the --method lora baseline (peft)")
    p.add_argument("--init_adapter", type=str, default=None,
                   help="start from the values of this control adapter file (same method and settings)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse inconsistent flags before anything is loaded or written."""
    if bool(args.train_data_dir) == bool(args.dataset_name):
        raise TrainingError("give exactly one of --train_data_dir and --dataset_name")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise TrainingError("--proportion_empty_prompts must be in [0, 1]")
    if args.encoder_lr_scale <= 0:
        raise TrainingError("--encoder_lr_scale must be positive")
    if not 0.0 <= args.high_noise_share <= 1.0:
        raise TrainingError("--high_noise_share must be in [0, 1]")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps"):
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name} must be at least 1")
    if args.validation_prompt and args.validation_image and len(args.validation_prompt) not in (1, len(args.validation_image)):
        raise TrainingError("give one --validation_prompt, or one per --validation_image")
    if args.train_text_encoder and args.method == "none":
        raise TrainingError("--method none trains no rotations: drop --train_text_encoder")
    encoder_channels(args)


def encoder_channels(args: argparse.Namespace) -> tuple[int, ...]:
    try:
        channels = tuple(int(c) for c in str(args.control_channels).split(",") if c.strip())
    except ValueError:
        raise TrainingError(f"--control_channels {args.control_channels!r}: expected comma-separated widths") from None
    if not channels or min(channels) < 1:
        raise TrainingError(f"--control_channels {args.control_channels!r}: expected positive widths")
    return channels


def load_data(args: argparse.Namespace, resolution: int) -> ControlData:
    """Every training row, decoded and checked (raises :class:`DataError` naming the row)."""
    columns = Columns(args.image_column, args.conditioning_image_column, args.caption_column)
    rows = read_rows(args.train_data_dir, args.dataset_name, columns, need_conditioning=not args.preprocess,
                     split=args.dataset_split)
    fn = None
    if args.preprocess == "canny":
        def fn(img):
            return canny(img, args.canny_low_threshold, args.canny_high_threshold)
    elif args.preprocess == "landmarks":
        def fn(img):
            return preprocess(img, "landmarks")
    return load_control_data(rows, resolution, args.center_crop, fn, args.max_train_samples)


def encode_captions(pipe: Any, captions: list[str], resolution: int, batch: int = 64) -> PromptEmbeddings:
    """Frozen text conditioning of every caption, ``hidden`` (N, T, D) (+ SDXL's ``added``)."""
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    hidden, added = [], []
    with torch.no_grad():
        for i in range(0, len(unique), batch):
            e = encode_prompts(pipe, unique[i : i + batch], resolution)
            hidden.append(e.hidden)
            added.append(e.added)
    order = torch.tensor([index[c] for c in captions])
    h = torch.cat(hidden)[order]
    if added[0] is None:
        return PromptEmbeddings(h)
    return PromptEmbeddings(h, {k: torch.cat([a[k] for a in added])[order] for k in added[0]})


def _select(e: PromptEmbeddings, idx: torch.Tensor) -> PromptEmbeddings:
    return PromptEmbeddings(e.hidden[idx], None if e.added is None else {k: v[idx] for k, v in e.added.items()})


def _where(e: PromptEmbeddings, mask: torch.Tensor, other: PromptEmbeddings) -> PromptEmbeddings:
    """Row-wise choice: ``other`` (batch 1, broadcast) where ``mask`` (B,) is true."""
    m = mask.view(-1, 1, 1).to(e.hidden.device)
    hidden = torch.where(m, other.hidden.expand_as(e.hidden), e.hidden)
    if e.added is None:
        return PromptEmbeddings(hidden)
    added = {}
    for k, v in e.added.items():
        mk = mask.view(-1, *([1] * (v.dim() - 1))).to(v.device)
        added[k] = torch.where(mk, other.added[k].expand_as(v), v)
    return PromptEmbeddings(hidden, added)


@torch.no_grad()
def generate_controlled(
    pipe: Any,
    prompts: list[str],
    hints: torch.Tensor,
    seeds: list[int],
    steps: int,
    guidance: float,
    resolution: int,
    control_scale: float = 1.0,
    batch: int = 16,
) -> list:
    """One image per (prompt, control image ``(3, R, R)`` in [0, 1], seed), as PIL images.

    Batched: each batch gets one generator per image, so an image does not depend on the
    batch it falls in.
    """
    images = []
    for i in range(0, len(prompts), batch):
        sl = slice(i, i + batch)
        gens = [torch.Generator().manual_seed(s) for s in seeds[sl]]
        out = pipe(
            prompts[sl],
            image=hints[sl],
            control_scale=control_scale,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
            generator=gens,
        )
        images += to_pil(out.images)
    return images


def validation_set(args: argparse.Namespace, data: ControlData, resolution: int) -> tuple[list[str], torch.Tensor]:
    """Prompts and control images ``(V, 3, R, R)`` of the validation grids."""
    if args.validation_image:
        imgs = []
        for path in args.validation_image:
            imgs.append(prepare_control_image(open_image(Path(path)), resolution, resolution))
        hints = torch.cat(imgs)
        prompts = list(args.validation_prompt or [""])
    else:
        n = min(2, len(data))
        hints = data.hints[:n]
        prompts = list(args.validation_prompt or data.captions[:n])
    if len(prompts) == 1:
        prompts = prompts * len(hints)
    return prompts, hints


def attach_trainable(pipe: Any, args: argparse.Namespace, unet_cfg: Any, text_cfg: Any) -> ControlEncoderConfig:
    """Attach the run's adapters (or peft LoRA) and its control encoder, and switch control on.

    Returns the encoder's configuration.
    Raises :class:`TrainingError` for a method or encoder that does not fit the model, before
    anything is written.
    """
    try:
        if args.method == "lora":
            attach_lora(pipe, args)
        elif args.method == "none":
            for p in pipe.unet.parameters():
                p.requires_grad_(False)
        else:
            inject.attach(pipe, unet_cfg, text_encoder_config=text_cfg, adapter_name=ADAPTER_NAME)
        encoder_cfg = ControlEncoderConfig(
            out_channels=pipe.unet.conv_in.out_channels,
            downscale=pipe.vae_scale_factor,
            channels=encoder_channels(args),
            task=args.control_task or args.preprocess or "",
        )
        attach_control(pipe, encoder_cfg, ADAPTER_NAME)
    except ValueError as err:
        raise TrainingError(str(err)) from None
    enable_control(pipe)
    return encoder_cfg


def load_trained(args: argparse.Namespace, path: Path) -> Any:
    """The pipeline of a finished run of ``args`` with its trained tensors from ``path``.

    Also for ``--method lora`` runs, whose files hold peft LoRA tensors that
    :func:`ortho_diffusion.load_adapter` does not read.
    """
    check_args(args)
    unet_cfg, text_cfg = adapter_configs(args)
    pipe = load_pipeline(resolve_model_path(args.pretrained_model_name_or_path))
    attach_trainable(pipe, args, unet_cfg, text_cfg)
    restore_trained(pipe, args.method, path)
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    return pipe


def restore_trained(pipe: Any, method: str, path: Path) -> None:
    """Copy a run's saved tensors from ``path`` into the adapters :func:`attach_trainable` made.

    Raises :class:`~ortho_diffusion.formats.native.AdapterFileError` when the file does not fit.
    """
    if method == "lora":
        restore_lora(pipe, path)
    else:
        restore_adapter_values(pipe, path, ADAPTER_NAME)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train a control adapter; returns the summary also written to ``summary.json``."""
    return train(args)[1]


def train(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Train a control adapter; returns the adapted pipeline (in memory) and the summary."""
    timer = Timer()
    check_args(args)
    model_path = resolve_model_path(args.pretrained_model_name_or_path)
    unet_cfg, text_cfg = adapter_configs(args)
    accelerator = make_accelerator(args)
    torch.manual_seed(args.seed)

    pipe = load_pipeline(model_path)
    pipe.to(accelerator.device)
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if resolution % pipe.vae_scale_factor:
        raise TrainingError(f"--resolution {resolution} is not a multiple of the VAE factor {pipe.vae_scale_factor}")
    try:
        data = load_data(args, resolution)
        prompts, val_hints = validation_set(args, data, resolution)
    except PreprocessError as err:
        raise DataError(str(err)) from None

    encoder_cfg = attach_trainable(pipe, args, unet_cfg, text_cfg)
    if args.method == "lora":
        modules = [pipe.unet] + ([pipe.text_encoder] if args.train_text_encoder else [])
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
    else:
        params = inject.adapter_parameters(pipe)
    n_params = sum(p.numel() for p in params)
    encoder = pipe.unet.conv_in.adapter_modules[ADAPTER_NAME]
    n_encoder = sum(p.numel() for p in encoder.parameters())

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    init_trackers(accelerator, args, "control")

    device = accelerator.device
    latents = torch.cat([encode_images(pipe.vae, data.images[i : i + 32]) for i in range(0, len(data), 32)])
    hints = data.hints
    text_frozen = not args.train_text_encoder
    if text_frozen:
        cond_all = encode_captions(pipe, data.captions, resolution)
        with torch.no_grad():
            empty = encode_prompts(pipe, [""], resolution)
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()

    bs = args.train_batch_size

    def compute_loss(step: int, micro: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(data), (bs,), generator=g)
        drop = torch.rand(bs, generator=g) < args.proportion_empty_prompts
        if text_frozen:
            cond = _where(_select(cond_all, idx), drop, empty)
        else:
            captions = ["" if d else data.captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
            cond = encode_prompts(pipe, captions, resolution)
        with control_images(pipe.unet, hints[idx].to(device)):
            loss = denoising_loss(pipe.unet, pipe.scheduler, latents[idx].to(device), cond, g,
                                  high_noise_share=args.high_noise_share)
        if args.method == "qgoft":
            loss = loss + inject.orthogonality_penalty(pipe).to(loss.device)
        return loss

    seeds = list(range(args.num_validation_images))

    def grid() -> Any:
        # One row per validation control image: the control image, then the samples.
        cells = []
        for prompt, hint in zip(prompts, val_hints):
            samples = generate_controlled(pipe, [prompt] * len(seeds), hint[None].repeat(len(seeds), 1, 1, 1), seeds,
                                          args.sample_steps, args.guidance_scale, resolution, args.control_scale)
            cells += to_pil((hint.permute(1, 2, 0)[None].numpy())) + samples
        return image_grid(cells, cols=len(seeds) + 1), cells

    def validate(step: int) -> None:
        img, cells = grid()
        save_image_atomic(img, out / "validation" / f"step-{step:06d}.png")
        log_images(accelerator, cells, step)

    def write_adapter(path: Path) -> None:
        if args.method == "lora":
            save_lora(pipe, path)  # LoRA tensors and the encoder's (all trainable UNet tensors)
        else:
            save_adapter(pipe, path, adapter_name=ADAPTER_NAME, extra_metadata=metadata(args, model_path, encoder_cfg))

    def restore(path: Path) -> None:
        try:
            restore_trained(pipe, args.method, path)
        except AdapterFileError as err:
            raise TrainingError(f"cannot resume: {err}") from None

    if args.init_adapter and not args.resume_from_checkpoint:
        if args.method == "lora":
            raise TrainingError("--init_adapter is for orthogonal or encoder-only adapters")
        try:
            restore_adapter_values(pipe, args.init_adapter, ADAPTER_NAME)
        except AdapterFileError as err:
            raise TrainingError(f"--init_adapter: {err}") from None

    trained = [pipe.unet] + ([] if text_frozen else [pipe.text_encoder])
    lr_scales = {id(p): args.encoder_lr_scale for p in encoder.parameters()}
    result = train_loop(args, accelerator, params, compute_loss, write_adapter, restore, validate, trained,
                        lr_scales=lr_scales)

    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        adapter_path = out / f"{args.output_name}.safetensors"
        write_adapter(adapter_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img, _ = grid()
        save_image_atomic(img, out / "samples.png")
        summary = {
            "task": "control",
            "control_task": encoder_cfg.task,
            "adapter": str(adapter_path),
            "samples": str(out / "samples.png"),
            "base_model": str(model_path),
            "method": args.method,
            "steps": result.steps,
            "trainable_parameters": n_params,
            "encoder_parameters": n_encoder,
            "adapter_parameters": n_params - n_encoder,
            "training_examples": len(data),
            "wall_time_seconds": round(timer(), 2),
            "processes": accelerator.num_processes,
            "ranks_in_sync": result.ranks_in_sync,
            "loss_curve": result.losses,
            "arguments": vars(args),
        }
        atomic_write_json(out / "summary.json", summary)
        accelerator.print(f"adapter written to {adapter_path} ({n_params:,} parameters, {timer():.0f} s)")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return pipe, summary


def metadata(args: argparse.Namespace, model_path: Path, encoder_cfg: ControlEncoderConfig) -> dict[str, str]:
    """Informative metadata stored in the adapter file (shown by the app)."""
    return {"task": "control", "control_task": encoder_cfg.task, "base_model": str(model_path)}


__all__ = ["DataError", "build_parser", "generate_controlled", "run", "train"]
