"""The loaded pipeline, the adapters attached to it, and generation.

One pipeline is loaded per app.  Adapters from the library are attached under their library
names on first use and then only re-scaled with :func:`ortho_diffusion.set_scale` (no reload:
moving the strength slider costs one generation, nothing more).  Adapters not selected for a
request are set to strength 0, which skips them entirely, so a request without adapters
reproduces the base model bit for bit.  A lock serialises everything that touches the
pipeline; training runs in another process and never takes it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from .. import inject
from ..default_model import DEFAULT_GUIDANCE_SCALE
from ..diffusion import ModelFolderError, load_pipeline
from ..formats import AdapterFileError, architecture_fingerprint, load_adapter
from .integrations import NotAvailableError
from .library import AdapterInfo, AdapterLibrary, LibraryError

#: Pickle-based weight files: a model folder holding only these is refused.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
#: The safetensors weights diffusers and transformers load (without a variant) in preference to
#: pickles: a component folder with pickles must have one of these, or the pickle would be loaded.
SAFE_WEIGHT_NAMES = {
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors", "model.safetensors.index.json",
}
#: Adapters kept attached (at strength 0 when unused) before the least recently used goes.
MAX_LOADED = 6
#: Intermediate images are streamed only for generations that take longer than this.
STREAM_AFTER_SECONDS = 1.0


class GenerationError(ValueError):
    """A request that cannot be served; the message is shown to the user as is."""


def check_model_folder(path: Path) -> None:
    """Refuse model folders whose weights exist only as pickles (never unpickled here)."""
    if not (path / "model_index.json").is_file():
        raise ModelFolderError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        files = [f for f in sub.iterdir() if f.is_file()]
        pickles = [f for f in files if f.suffix.lower() in PICKLE_SUFFIXES]
        # Any other .safetensors file (a variant, a stray copy) would not stop the loader from
        # falling back to the pickle, so only the names it prefers count.
        if pickles and not any(f.name in SAFE_WEIGHT_NAMES for f in files):
            raise ModelFolderError(
                f"{sub}: weights only as {pickles[0].name} (a pickle); the app loads .safetensors "
                "weights only. Convert the model with diffusers' save_pretrained(safe_serialization=True)."
            )


@dataclass
class GenerateRequest:
    """Everything one image depends on."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25
    guidance: float = DEFAULT_GUIDANCE_SCALE
    width: int = 64
    height: int = 64
    adapters: list[str] = field(default_factory=list)
    t: float = 1.0
    per_factor: bool = False
    n_factors: int = 1
    control_image: np.ndarray | None = None
    control_scale: float = 1.0


@dataclass
class Limits:
    """Ranges the UI offers and the server enforces (API callers get the same checks)."""

    size_step: int
    native: int
    max_size: int
    max_steps: int = 150
    max_guidance: float = 30.0
    max_t: float = 1.5
    max_control_scale: float = 2.0


class ModelState:
    """The app's pipeline and its attached adapters, behind one lock.

    Args:
        model_path: a local diffusers SD 1.x/2.x/SDXL folder.
        library: where adapters are looked up by name.
        model_label: how the model is named in the UI and in error messages.
    """

    def __init__(self, model_path: str | Path, library: AdapterLibrary, model_label: str | None = None) -> None:
        self.model_path = Path(model_path)
        check_model_folder(self.model_path)
        self.pipe = load_pipeline(self.model_path)
        self.library = library
        self.label = model_label or self.model_path.name
        self.lock = threading.RLock()
        self._loaded: OrderedDict[str, tuple[str, int, int]] = OrderedDict()  # name -> file key
        self.fingerprints = {c: architecture_fingerprint(m) for c, m in inject.components(self.pipe).items()}
        vsf = int(getattr(self.pipe, "vae_scale_factor", 8))
        depth = len(self.pipe.unet.config.block_out_channels)
        step = vsf * 2 ** (depth - 1)
        native = int(self.pipe.unet.config.sample_size) * vsf
        self.limits = Limits(size_step=step, native=native, max_size=max(native, min(4 * native, 1024)))

    # ---------------------------------------------------------------- adapters
    def fits(self, info: AdapterInfo) -> bool:
        """Whether ``info`` was made for this model's architecture."""
        return info.fits(self.fingerprints)

    def _attach(self, names: list[str]) -> list[AdapterInfo]:
        """Make exactly ``names`` available on the pipeline (others stay attached at t=0)."""
        infos = []
        for name in names:
            try:
                info = self.library.get(name)
            except LibraryError as err:
                raise GenerationError(str(err)) from None
            if not self.fits(info):
                raise GenerationError(
                    f"adapter {name!r} was made for another base model ({info.base_model or 'unknown'}), "
                    f"not for {self.label}"
                )
            st = info.path.stat()
            key = (str(info.path), st.st_mtime_ns, st.st_size)
            if self._loaded.get(name) != key:
                if name in self._loaded:  # the file changed (retrained, replaced): reload it
                    inject.detach(self.pipe, adapter_name=name)
                    del self._loaded[name]
                try:
                    load_adapter(self.pipe, info.path, scale=0.0, adapter_name=name)
                except AdapterFileError as err:
                    raise GenerationError(f"cannot use adapter {name!r}: {err}") from None
                self._loaded[name] = key
            self._loaded.move_to_end(name)
            infos.append(info)
        for name in list(self._loaded):
            if name not in names:
                inject.set_scale(self.pipe, 0.0, adapter_name=name)
        while len(self._loaded) > MAX_LOADED:
            oldest = next(n for n in self._loaded if n not in names)
            inject.detach(self.pipe, adapter_name=oldest)
            del self._loaded[oldest]
        return infos

    def forget(self, name: str) -> None:
        """Detach ``name`` (after it was renamed or deleted in the library)."""
        with self.lock:
            if name in self._loaded:
                inject.detach(self.pipe, adapter_name=name)
                del self._loaded[name]

    def _set_scales(self, infos: list[AdapterInfo], t: float, per_factor: bool, n_factors: int) -> None:
        for info in infos:
            k = None
            if per_factor and info.method == "boft":
                k = max(0, min(int(n_factors), info.n_factors))
            inject.set_scale(self.pipe, t, adapter_name=info.name, n_active_factors=k)

    # -------------------------------------------------------------- generation
    def validate(self, req: GenerateRequest) -> None:
        """Raise :class:`GenerationError` for out-of-range settings (API callers included)."""
        lim = self.limits
        if not (req.prompt or "").strip():
            raise GenerationError("the prompt is empty: describe the image you want")
        for side, value in (("width", req.width), ("height", req.height)):
            if value % lim.size_step or not lim.size_step <= value <= lim.max_size:
                raise GenerationError(
                    f"{side} {value} is not allowed: use a multiple of {lim.size_step} "
                    f"between {lim.size_step} and {lim.max_size}"
                )
        if not 1 <= int(req.steps) <= lim.max_steps:
            raise GenerationError(f"steps must be between 1 and {lim.max_steps}")
        if not 0.0 <= float(req.guidance) <= lim.max_guidance:
            raise GenerationError(f"guidance must be between 0 and {lim.max_guidance}")
        if not 0.0 <= float(req.t) <= lim.max_t:
            raise GenerationError(f"t must be between 0 and {lim.max_t}")
        if not 0 <= int(req.seed) < 2**32:
            raise GenerationError("the seed must be between 0 and 4294967295")
        if not 0.0 <= float(req.control_scale) <= lim.max_control_scale:
            raise GenerationError(f"the control strength must be between 0 and {lim.max_control_scale}")
        if int(req.n_factors) < 0:
            raise GenerationError("the number of active BOFT factors cannot be negative")

    def _call_kwargs(self, req: GenerateRequest, infos: list[AdapterInfo]) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or None,
            num_inference_steps=int(req.steps),
            guidance_scale=float(req.guidance),
            width=int(req.width),
            height=int(req.height),
            generator=torch.Generator().manual_seed(int(req.seed)),
        )
        controls = [i.name for i in infos if i.is_control]
        if controls:
            if req.control_image is None:
                raise GenerationError("a control adapter is selected: upload a control image (and pick its preprocessor)")
            control = Image.fromarray(req.control_image).convert("RGB").resize((int(req.width), int(req.height)))
            # Keyed by adapter: control encoders attached but not selected get no image.
            kwargs.update(image={name: control for name in controls}, control_scale=float(req.control_scale))
        return kwargs

    def _run(self, kwargs: dict[str, Any], on_latents=None) -> Image.Image:
        if on_latents is not None:

            def callback(pipe, step, timestep, tensors):
                on_latents(step, tensors["latents"].detach().clone())
                return {}

            kwargs = {**kwargs, "callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}
        try:
            with torch.no_grad():
                out = self.pipe(**kwargs)
        except TypeError as err:
            if "image" in kwargs and ("image" in str(err) or "control_scale" in str(err)):
                raise NotAvailableError("control adapters are not available in this version yet") from None
            raise
        return out.images[0]

    def decode_preview(self, latents: torch.Tensor) -> Image.Image:
        """An intermediate image from the current (noisy) latents."""
        vae = self.pipe.vae
        with torch.no_grad():
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            image = vae.decode(latents / vae.config.scaling_factor + shift).sample
        return self.pipe.image_processor.postprocess(image, output_type="pil")[0]

    def generate(self, req: GenerateRequest) -> Image.Image:
        """One image (blocking, no intermediate images)."""
        return list(self.generate_stream(req, stream=False))[-1][0]

    def generate_stream(self, req: GenerateRequest, stream: bool = True) -> Iterator[tuple[Image.Image, str, bool]]:
        """Yield ``(image, status, final)``: intermediate images after the first second, then the result."""
        self.validate(req)
        latest: dict[str, Any] = {}
        done: queue.Queue = queue.Queue()

        def on_latents(step: int, latents: torch.Tensor) -> None:
            latest["value"] = (step, latents)

        def work() -> None:
            try:
                with self.lock:
                    infos = self._attach(list(req.adapters))
                    self._set_scales(infos, float(req.t), req.per_factor, req.n_factors)
                    kwargs = self._call_kwargs(req, infos)
                    done.put(("ok", self._run(kwargs, on_latents if stream else None)))
            except BaseException as err:  # handed to the caller's thread and raised there
                done.put(("error", err))

        start = time.perf_counter()
        thread = threading.Thread(target=work, name="generate", daemon=True)
        thread.start()
        last_shown = -1
        while True:
            try:
                kind, value = done.get(timeout=0.25)
                break
            except queue.Empty:
                pass
            if not stream or time.perf_counter() - start < STREAM_AFTER_SECONDS:
                continue
            step, latents = latest.get("value", (-1, None))
            if latents is not None and step != last_shown:
                last_shown = step
                yield self.decode_preview(latents), f"step {step + 1} of {req.steps}…", False
        thread.join()
        if kind == "error":
            raise value
        yield value, f"done in {time.perf_counter() - start:.1f} s", True

    def sweep(self, req: GenerateRequest, values: list[float], over: str = "t") -> list[tuple[Image.Image, str]]:
        """The same seed and settings at each value of ``t`` (or of BOFT's active factors)."""
        self.validate(req)
        if not req.adapters:
            raise GenerationError("pick at least one adapter to sweep across its strength")
        out = []
        with self.lock:
            infos = self._attach(list(req.adapters))
            kwargs = self._call_kwargs(req, infos)
            for v in values:
                if over == "factors":
                    self._set_scales(infos, float(req.t), True, int(v))
                    caption = f"{int(v)} factor{'s' if int(v) != 1 else ''}"
                else:
                    self._set_scales(infos, float(v), req.per_factor, req.n_factors)
                    caption = f"t = {v:.2f}"
                kwargs["generator"] = torch.Generator().manual_seed(int(req.seed))
                out.append((self._run(dict(kwargs)), caption))
        return out
