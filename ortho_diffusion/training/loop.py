"""The optimisation loop every adapter training script shares.

Accelerate provides the processes (one, or several with ``accelerate launch``), device
placement, mixed precision and trackers.  Gradients are averaged across processes with one
all-reduce of the flattened adapter gradients per optimizer step: adapter parameters are a
tiny fraction of the model, so this is cheap, and it works the same for UNet, text encoder
and control-encoder parameters without wrapping frozen models in DDP.

Randomness is drawn from a generator seeded by ``(seed, step, micro-step, process)``, so a
run resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .common import CheckpointManager, TrainingError, check_finite


def make_accelerator(args: argparse.Namespace):
    """An ``Accelerator`` for these flags (CPU when no GPU; trackers only when installed)."""
    import importlib.util

    from accelerate import Accelerator

    log_with = None
    if args.report_to and args.report_to != "none":
        if args.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            log_with = None  # optional: validation grids are written to disk anyway
        else:
            log_with = args.report_to
    try:
        return Accelerator(
            mixed_precision=args.mixed_precision,
            log_with=log_with,
            project_dir=args.output_dir,
            cpu=not torch.cuda.is_available(),
        )
    except (ValueError, RuntimeError) as err:
        raise TrainingError(f"accelerate: {err}") from None


def init_trackers(accelerator, args: argparse.Namespace, project: str) -> None:
    """Start the trackers (TensorBoard...) with the run's scalar flags as hyperparameters."""
    if accelerator.is_main_process and accelerator.log_with:
        scalars = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(project, config=scalars)


def log_images(accelerator: Any, images: list, step: int) -> None:
    """Send validation images (PIL, all one size) to TensorBoard when it is a tracker."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": np.stack([np.asarray(i) for i in images])}, step, dataformats="NHWC")


def step_generator(seed: int, step: int, micro: int, process: int) -> torch.Generator:
    """A CPU generator that depends only on where we are in the run."""
    state = np.random.SeedSequence([seed, step, micro, process]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass
class LoopResult:
    """What a finished loop reports: steps done, loss per step, wall time of this process."""

    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    last_checkpoint: Path | None = None
    ranks_in_sync: bool = True


def train_loop(
    args: argparse.Namespace,
    accelerator: Any,
    params: list[torch.nn.Parameter],
    compute_loss: Callable[[int, int, torch.Generator], torch.Tensor],
    write_adapter: Callable[[Path], Any],
    restore_adapter: Callable[[Path], None],
    validate: Callable[[int], None] | None = None,
    modules_to_train: list[torch.nn.Module] = (),
    lr_scales: dict[int, float] | None = None,
) -> LoopResult:
    """Run ``args.max_train_steps`` optimizer steps over ``params``.

    Args:
        compute_loss: ``(step, micro_step, generator) -> scalar loss`` for one micro-batch.
        write_adapter: writes the current adapter to a path (for checkpoints).
        restore_adapter: loads adapter values from a checkpoint's adapter file.
        validate: called on the main process every ``--validation_steps`` and at the end.
        modules_to_train: put in train mode while training (dropout etc.).
        lr_scales: ``id(parameter) -> factor`` on ``--learning_rate`` for some parameters.
    """
    from diffusers.optimization import get_scheduler

    if args.max_train_steps < 1:
        raise TrainingError("--max_train_steps must be at least 1")
    scales = lr_scales or {}
    by_scale: dict[float, list[torch.nn.Parameter]] = {}
    for p in params:
        by_scale.setdefault(scales.get(id(p), 1.0), []).append(p)
    groups = [{"params": ps, "lr": args.learning_rate * s} for s, ps in by_scale.items()]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=1e-2)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
    )
    checkpoints = CheckpointManager(Path(args.output_dir), args.checkpoints_total_limit)
    result = LoopResult(steps=0)
    if args.resume_from_checkpoint:
        path = checkpoints.resolve(args.resume_from_checkpoint)
        state, tensors = checkpoints.load_state(path)
        restore_adapter(path / "adapter.safetensors")
        optimizer.load_state_dict(tensors["optimizer"])
        lr_scheduler.load_state_dict(tensors["lr_scheduler"])
        result.steps = int(state["step"])
        result.losses = [tuple(x) for x in state.get("losses", [])]
        result.last_checkpoint = path
        accelerator.print(f"resumed from {path} at step {result.steps}")

    for m in modules_to_train:
        m.train()
    bar = tqdm(
        total=args.max_train_steps,
        initial=result.steps,
        desc="training",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    accum = args.gradient_accumulation_steps
    try:
        while result.steps < args.max_train_steps:
            step = result.steps
            total = 0.0
            for micro in range(accum):
                g = step_generator(args.seed, step, micro, accelerator.process_index)
                with accelerator.autocast():
                    loss = compute_loss(step, micro, g) / accum
                loss.backward()
                total += loss.detach().float()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.as_tensor(total).reshape(1).float()])
            if accelerator.num_processes > 1:
                flat = accelerator.reduce(flat, reduction="mean")
            mean_loss = flat[-1]
            # Every process sees the same averaged loss, so all stop together on NaN.
            check_finite(mean_loss, step, result.last_checkpoint)
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
                offset += n
            if args.max_grad_norm and args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            result.steps += 1
            result.losses.append((result.steps, float(mean_loss)))
            bar.update(1)
            bar.set_postfix(loss=f"{float(mean_loss):.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
            accelerator.log({"loss": float(mean_loss), "lr": lr_scheduler.get_last_lr()[0]}, step=result.steps)

            at_end = result.steps == args.max_train_steps
            if args.checkpointing_steps and (result.steps % args.checkpointing_steps == 0) and not at_end:
                if accelerator.is_main_process:
                    result.last_checkpoint = checkpoints.save(
                        result.steps, write_adapter, optimizer, lr_scheduler, {"losses": result.losses}
                    )
                accelerator.wait_for_everyone()
            if validate and args.validation_steps and result.steps % args.validation_steps == 0 and not at_end:
                if accelerator.is_main_process:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        validate(result.steps)
                    for m in modules_to_train:
                        m.train()
                accelerator.wait_for_everyone()
    finally:
        bar.close()  # before any error message is printed
    for m in modules_to_train:
        m.eval()
    result.ranks_in_sync = ranks_in_sync(accelerator, params)
    return result


def ranks_in_sync(accelerator: Any, params: list[torch.nn.Parameter]) -> bool:
    """Whether every process ends with the same adapter (one model trained across ranks)."""
    if accelerator.num_processes == 1:
        return True
    checksum = torch.stack([p.detach().double().sum() for p in params]).reshape(1, -1)
    gathered = accelerator.gather(checksum.to(accelerator.device))
    return bool((gathered == gathered[0]).all())


__all__ = ["LoopResult", "TrainingError", "init_trackers", "make_accelerator", "step_generator", "train_loop"]
