"""From-scratch training of the embedded shapes-world model, in four resumable phases:

1. ``AutoencoderKL``: ``(B, 3, 64, 64)`` images <-> ``(B, 8, 16, 16)`` latents.
2. Pre-encoding: every training image -> its latent *mean*, scaled to unit variance (the
   factor is stored as the VAE's ``scaling_factor``), so phase 3 never runs the encoder.
3. ``UNet2DConditionModel`` + ``CLIPTextModel`` jointly, v-prediction on a zero-terminal-SNR
   schedule, caption dropout for classifier-free guidance, EMA of both networks.
4. Export: a standard ``StableDiffusionPipeline`` folder, written to a temporary folder and
   renamed into place (a crash never leaves a half-written model).

Each phase leaves its result in ``work_dir`` (``vae/``, ``latents.pt``, ``checkpoint-*``), and a
rerun skips what is done, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from ..diffusion import sample_timesteps
from ..files import atomic_file, atomic_folder, commit_folder
from .data import ShapesData, build_data, to_tensor, tokenize
from .models import ModelSizes, make_scheduler, make_text_encoder, make_unet, make_vae
from .threads import ThreadGovernor
from .tokenizer import build_tokenizer


@dataclass
class TrainConfig:
    """Everything that defines a run (``training/train_base.py`` maps its flags onto this)."""

    output_dir: str = "assets/shapes-sd"
    work_dir: str = "runs/train_base"
    seed: int = 0
    num_images: int = 24000
    p_single: float = 0.7
    model_size: str = "default"  # or "tiny"
    # Phase 1 (VAE)
    vae_train_steps: int = 600
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_crop_size: int = 32
    """Phase 1 trains on random crops of this size (the VAE is fully convolutional: a 32x32
    crop costs a quarter of a full image) until ``vae_full_size_share`` of it is left."""
    vae_full_size_share: float = 0.2
    """Last share of phase 1 on whole 64x64 images, so the group norms see full-image
    statistics, as at encoding time."""
    vae_edge_loss_weight: float = 1.0
    """Weight of an L1 loss on horizontal and vertical pixel differences: plain L1/MSE
    rounds the corners of 8-pixel shapes (stars and triangles read as circles and squares)."""
    vae_time_limit_minutes: float | None = None
    """Wall-clock cap of phase 1 (its cosine decay follows time too, as in phase 3)."""
    # Phase 3 (UNet + text encoder)
    max_train_steps: int = 3000
    train_batch_size: int = 32
    learning_rate: float = 5e-4
    text_encoder_lr_scale: float = 2.0
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 200
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    uncond_prob: float = 0.1
    partial_caption_prob: float = 0.1
    use_ema: bool = True
    ema_max_decay: float = 0.9995
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 2
    resume_from_checkpoint: str | None = None  # a path or "latest"
    mixed_precision: str = "no"
    num_threads: int | None = None
    adaptive_threads: bool = True
    time_limit_minutes: float | None = None
    """Wall-clock cap of the whole run: phase 3 ends early (keeping ``export_reserve_s``
    for the export), and its learning-rate decay follows ``max(step / max_train_steps,
    elapsed / remaining budget)``, so a slower machine still anneals before stopping."""
    export_reserve_s: float = 60.0
    init_from: str | None = None
    """A pipeline folder to continue from: its VAE (phase 1 skipped, its ``scaling_factor``
    kept), text encoder, UNet and tokenizer. Phase 3 then fine-tunes instead of starting from
    random weights."""
    high_noise_share: float = 0.0
    """Share of each batch whose timesteps are drawn from ``[high_noise_min_timestep, T)``
    instead of uniformly (:func:`ortho_diffusion.diffusion.sample_timesteps`). Measured: a
    model trained with uniform timesteps ignores the side words left / right / top / bottom
    (the noise decides where the object goes); 400 steps on t >= 960 teach them."""
    high_noise_min_timestep: int = 960
    extra: dict = field(default_factory=dict)

    def sizes(self) -> ModelSizes:
        return ModelSizes.tiny() if self.model_size == "tiny" else ModelSizes()


def warmup_cosine(step: int, warmup: int, progress: float, floor: float) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then a cosine from 1 down to
    ``floor`` as ``progress`` (steps or time used, clipped to [0, 1]) goes from 0 to 1."""
    if step < warmup:
        return (step + 1) / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class BaseTrainer:
    """Runs the phases of :mod:`ortho_diffusion.base_training` for one :class:`TrainConfig`."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.work = Path(cfg.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)
        self.log: dict = {"config": asdict(cfg), "phases": {}}
        set_seed(cfg.seed)
        self.tokenizer = (CLIPTokenizer.from_pretrained(Path(cfg.init_from) / "tokenizer") if cfg.init_from
                          else build_tokenizer())
        self.sizes = cfg.sizes()
        self.t_start = time.time()
        self.governor = ThreadGovernor(max_threads=cfg.num_threads, enabled=cfg.adaptive_threads)

    # ------------------------------------------------------------------ utilities
    def _print(self, msg: str) -> None:
        self.accelerator.print(msg, flush=True)

    def _phase_time(self, name: str, seconds: float, **info) -> None:
        self.log["phases"][name] = {"seconds": round(seconds, 1), **info}
        if self.accelerator.is_main_process:
            (self.work / "train_log.json").write_text(json.dumps(self.log, indent=2))

    # ------------------------------------------------------------------ phase 1
    def train_vae(self, data: ShapesData) -> AutoencoderKL:
        """Train (or load the finished) VAE. Loss: L1 + MSE reconstruction, an edge term and a
        tiny KL."""
        cfg, acc = self.cfg, self.accelerator
        done = self.work / "vae"
        if done.exists():
            self._print(f"[vae] reusing {done}")
            return AutoencoderKL.from_pretrained(done)
        t0 = time.time()
        vae = make_vae(self.sizes)
        images = to_tensor(data.images)
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate, weight_decay=0.0)
        warmup = min(50, cfg.vae_train_steps // 10 + 1)
        limit_s = cfg.vae_time_limit_minutes * 60 if cfg.vae_time_limit_minutes else None
        t_phase = time.time()

        def progress(step: int) -> float:
            p = step / cfg.vae_train_steps
            return max(p, (time.time() - t_phase) / limit_s) if limit_s else p

        def lr_lambda(step: int) -> float:
            return warmup_cosine(step, warmup, progress(step), floor=0.02)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        vae, opt, sched = acc.prepare(vae, opt, sched)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        bar = tqdm(range(cfg.vae_train_steps), desc="vae", disable=not acc.is_local_main_process, mininterval=5)
        self.governor.start()
        steps_done = 0
        for step in bar:
            if progress(step) >= 1.0:
                self._print(f"[vae] time limit reached at step {step}")
                break
            idx = torch.randint(0, len(images), (cfg.vae_batch_size,), generator=gen)
            x = images[idx]
            crop = cfg.vae_crop_size
            if crop and crop < x.shape[-1] and progress(step) < 1.0 - cfg.vae_full_size_share:
                i, j = torch.randint(0, x.shape[-1] - crop + 1, (2,), generator=gen).tolist()
                x = x[:, :, i : i + crop, j : j + crop]
            x = x.to(acc.device)
            with acc.autocast():
                posterior = acc.unwrap_model(vae).encode(x).latent_dist
                recon = acc.unwrap_model(vae).decode(posterior.sample()).sample.float()
            rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
            edges = F.l1_loss(recon.diff(dim=-1), x.diff(dim=-1)) + F.l1_loss(recon.diff(dim=-2), x.diff(dim=-2))
            loss = rec + cfg.vae_edge_loss_weight * edges + cfg.vae_kl_weight * posterior.kl().mean()
            acc.backward(loss)
            acc.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix(rec=f"{rec.item():.4f}", threads=torch.get_num_threads())
            self.governor.step_done()
            steps_done = step + 1
        vae = acc.unwrap_model(vae).eval()
        # Forget the VAE phase: the diffusion checkpoints must list the same models whether
        # the VAE was trained in this process or reused from work_dir.
        acc.free_memory()
        if acc.is_main_process:
            with atomic_folder(done) as tmp:
                vae.save_pretrained(tmp)
        acc.wait_for_everyone()
        self._phase_time("vae", time.time() - t0, steps=steps_done, final_rec_loss=rec.item())
        return vae

    # ------------------------------------------------------------------ phase 2
    @torch.no_grad()
    def encode_latents(self, vae: AutoencoderKL, data: ShapesData) -> torch.Tensor:
        """``(N, 8, 16, 16)`` scaled latent means; sets ``vae.config.scaling_factor``."""
        path = self.work / "latents.pt"
        if path.exists():
            saved = torch.load(path)
            vae.register_to_config(scaling_factor=saved["scaling_factor"])
            return saved["latents"]
        t0 = time.time()
        vae.eval()
        chunks = []
        for i in tqdm(range(0, len(data.images), 256), desc="encode", disable=not self.accelerator.is_local_main_process,
                      mininterval=5):
            x = to_tensor(data.images[i : i + 256])
            chunks.append(vae.encode(x).latent_dist.mean)
        raw = torch.cat(chunks)
        recon_acc = self._reconstruction_check(vae, raw[:400], data)
        # Unit variance keeps the noise schedule's signal-to-noise meaning what it says; a
        # continued model keeps the factor its UNet was trained with.
        scaling = float(vae.config.scaling_factor) if self.cfg.init_from else float(1.0 / raw.std())
        vae.register_to_config(scaling_factor=scaling)
        latents = raw * scaling
        if self.accelerator.is_main_process:
            with atomic_file(path) as tmp:
                torch.save({"latents": latents, "scaling_factor": scaling}, tmp)
            with atomic_folder(self.work / "vae") as tmp:
                vae.save_pretrained(tmp)
        self.accelerator.wait_for_everyone()
        self._phase_time("encode", time.time() - t0, scaling_factor=scaling, latent_mean=float(latents.mean()),
                         reconstruction_detector_accuracy=recon_acc)
        self._print(f"[encode] scaling_factor={scaling:.4f}, detector on VAE reconstructions: {recon_acc}")
        return latents

    @torch.no_grad()
    def _reconstruction_check(self, vae: AutoencoderKL, raw: torch.Tensor, data: ShapesData) -> dict:
        """Detector accuracy on decoded latent means of the first images: the diffusion model
        can be no better than this, so a weak VAE shows here before an hour of phase 3."""
        import numpy as np

        from ..shapes import detect, sample_scene
        from ..shapes.fidelity import score

        imgs = vae.decode(raw).sample.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()
        per = []
        for i, img in enumerate(imgs):
            scene = sample_scene(np.random.default_rng([self.cfg.seed, i]), p_single=self.cfg.p_single)
            per.append(score(scene, detect(img)))
        return {k: round(float(np.mean([p[k] for p in per])), 4) for k in per[0]}

    # ------------------------------------------------------------------ phase 3
    def _latest_checkpoint(self) -> Path | None:
        ckpts = sorted(self.work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        return ckpts[-1] if ckpts else None

    def _save_checkpoint(self, step: int) -> None:
        acc = self.accelerator
        final = self.work / f"checkpoint-{step}"
        tmp = self.work / f".checkpoint-{step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            (tmp / "step.json").write_text(json.dumps({"step": step}))
            commit_folder(tmp, final)
            ckpts = sorted(self.work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            for old in ckpts[: -self.cfg.checkpoints_total_limit]:
                shutil.rmtree(old)
        acc.wait_for_everyone()

    def _timesteps(self, b: int, n_train: int, gen: torch.Generator) -> torch.Tensor:
        """``(b,)`` int64 training timesteps (:func:`ortho_diffusion.diffusion.sample_timesteps`)."""
        return sample_timesteps(b, n_train, gen, self.cfg.high_noise_share, self.cfg.high_noise_min_timestep)

    def train_diffusion(self, latents: torch.Tensor, data: ShapesData):
        """Train UNet + text encoder; returns them (EMA weights when EMA is on)."""
        cfg, acc = self.cfg, self.accelerator
        t0 = time.time()
        if cfg.init_from:
            unet = UNet2DConditionModel.from_pretrained(Path(cfg.init_from) / "unet")
            text_encoder = CLIPTextModel.from_pretrained(Path(cfg.init_from) / "text_encoder")
        else:
            unet = make_unet(self.sizes, latent_size=latents.shape[-1])
            text_encoder = make_text_encoder(self.sizes, self.tokenizer)
        noise_scheduler = make_scheduler()
        params = [
            {"params": list(unet.parameters()), "lr": cfg.learning_rate},
            {"params": list(text_encoder.parameters()), "lr": cfg.learning_rate * cfg.text_encoder_lr_scale},
        ]
        opt = torch.optim.AdamW(params, weight_decay=cfg.adam_weight_decay)
        # Progress in [0, 1]: steps done, or the share of the time budget used if that is more.
        budget_s = None
        if cfg.time_limit_minutes:
            budget_s = cfg.time_limit_minutes * 60 - (time.time() - self.t_start) - cfg.export_reserve_s
            budget_s = max(budget_s, 1.0)
        self.progress = 0.0

        def lr_lambda(step: int) -> float:
            # "constant" stays at the top of the cosine (progress 0) after the warm-up.
            p = 0.0 if cfg.lr_scheduler == "constant" else max(self.progress, step / cfg.max_train_steps)
            return warmup_cosine(step, cfg.lr_warmup_steps, p, floor=0.05)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        ema_unet = ema_text = None
        if cfg.use_ema:
            # Warm-up EMA: decay grows as 1 - (1 + step)^-3/4, so short runs still average.
            ema_unet = EMAModel(unet.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True, power=0.75)
            ema_text = EMAModel(text_encoder.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True, power=0.75)
            acc.register_for_checkpointing(ema_unet)
            acc.register_for_checkpointing(ema_text)
        dataset = torch.utils.data.TensorDataset(latents, data.ids, data.partial_ids)
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train_batch_size, shuffle=True, drop_last=True,
                                             generator=torch.Generator().manual_seed(cfg.seed + 2))
        unet, text_encoder, opt, sched, loader = acc.prepare(unet, text_encoder, opt, sched, loader)
        empty_ids = tokenize(self.tokenizer, [""]).to(acc.device)

        step = 0
        resume = cfg.resume_from_checkpoint
        if resume:
            path = self._latest_checkpoint() if resume == "latest" else Path(resume)
            if path is not None and path.exists():
                acc.load_state(str(path))
                step = json.loads((path / "step.json").read_text())["step"]
                self._print(f"[diffusion] resumed from {path} at step {step}")
            else:
                self._print("[diffusion] no checkpoint to resume from; starting fresh")
        t_phase = time.time()
        step0 = step
        steps_per_epoch = len(loader)
        epoch, skip = divmod(step, steps_per_epoch)
        bar = tqdm(total=cfg.max_train_steps, initial=step, desc="unet+text", disable=not acc.is_local_main_process,
                   mininterval=10)
        unet.train()
        text_encoder.train()
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 3 + step)
        losses: list[float] = []
        self.governor.start()
        stop = False
        while step < cfg.max_train_steps and not stop:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            epoch_loader = acc.skip_first_batches(loader, skip) if skip else loader
            skip = 0
            for z0, ids, partial in epoch_loader:
                b = z0.shape[0]
                # Per sample: 10% empty prompt (classifier-free guidance), some partial captions.
                u = torch.rand(b, generator=gen).to(acc.device)
                ids = torch.where((u < cfg.uncond_prob + cfg.partial_caption_prob)[:, None], partial, ids)
                ids = torch.where((u < cfg.uncond_prob)[:, None], empty_ids.expand(b, -1), ids)
                noise = torch.randn(z0.shape, generator=gen).to(acc.device)
                t = self._timesteps(b, noise_scheduler.config.num_train_timesteps, gen).to(acc.device)
                zt = noise_scheduler.add_noise(z0, noise, t)
                target = noise_scheduler.get_velocity(z0, noise, t)
                with acc.accumulate(unet), acc.autocast():
                    hidden = text_encoder(ids)[0]
                    pred = unet(zt, t, hidden).sample
                    loss = F.mse_loss(pred.float(), target.float())
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), cfg.max_grad_norm)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                if cfg.use_ema:
                    ema_unet.step(unet.parameters())
                    ema_text.step(text_encoder.parameters())
                step += 1
                losses.append(loss.item())
                bar.update(1)
                self.governor.step_done()
                if budget_s is not None:
                    self.progress = (time.time() - t_phase) / budget_s
                    if self.progress >= 1.0:
                        self._print(f"[diffusion] time limit reached at step {step}")
                        stop = True
                        break
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", lr=f"{sched.get_last_lr()[0]:.2e}",
                                    threads=torch.get_num_threads())
                if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0 and step < cfg.max_train_steps:
                    self._save_checkpoint(step)
                if step >= cfg.max_train_steps:
                    break
            epoch += 1
        bar.close()
        unet, text_encoder = acc.unwrap_model(unet), acc.unwrap_model(text_encoder)
        if cfg.use_ema:
            ema_unet.copy_to(unet.parameters())
            ema_text.copy_to(text_encoder.parameters())
        tail = losses[-200:] or [float("nan")]
        self._phase_time("diffusion", time.time() - t0, steps=step, steps_this_session=step - step0,
                         final_loss=sum(tail) / len(tail), thread_choices=self.governor.history[-20:])
        return unet.eval(), text_encoder.eval()

    # ------------------------------------------------------------------ phase 4
    def export(self, vae, unet, text_encoder) -> Path:
        """Write the ``StableDiffusionPipeline`` folder (safetensors, no safety checker)."""
        out = Path(self.cfg.output_dir)
        if self.accelerator.is_main_process:
            out.parent.mkdir(parents=True, exist_ok=True)
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=self.tokenizer, unet=unet,
                scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
            with atomic_folder(out) as tmp:
                pipe.save_pretrained(tmp, safe_serialization=True)
        self.accelerator.wait_for_everyone()
        return out

    def run(self) -> Path:
        """All phases; returns the exported pipeline folder."""
        t0 = self.t_start
        t = time.time()
        data = build_data(self.cfg.num_images, self.cfg.seed, self.tokenizer, p_single=self.cfg.p_single)
        self._phase_time("data", time.time() - t, images=len(data.images))
        if self.cfg.init_from:
            vae = AutoencoderKL.from_pretrained(Path(self.cfg.init_from) / "vae")
        else:
            vae = self.train_vae(data)
        latents = self.encode_latents(vae, data)
        unet, text_encoder = self.train_diffusion(latents, data)
        out = self.export(vae, unet, text_encoder)
        self._phase_time("total", time.time() - t0)
        self._print(f"[done] pipeline written to {out} in {(time.time() - t0) / 60:.1f} min")
        return out


def train(cfg: TrainConfig) -> Path:
    """Run a whole training; see :class:`TrainConfig`."""
    return BaseTrainer(cfg).run()
