#!/usr/bin/env python
"""Generation speed of the default model: 25 steps at 64x64, batch 1, classifier-free guidance.

    python benchmarks/bench_speed.py [--model PATH] [--steps 25] [--repeats 10] [--threads N]

Prints and writes ``benchmarks/results/speed.md`` (median and spread of wall-clock seconds
per image, after one warm-up call).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

from ortho_diffusion.default_model import DEFAULT_GUIDANCE_SCALE, default_model_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS / "speed.md"))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    path = Path(a.model) if a.model else default_model_path()
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a large red circle on the left, on a white background"

    def once(seed: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            pipe(prompt, num_inference_steps=a.steps, guidance_scale=a.guidance_scale,
                 generator=torch.Generator().manual_seed(seed), output_type="np")
        return time.perf_counter() - t

    once(0)  # warm-up: first call allocates and picks kernels
    times = [once(i + 1) for i in range(a.repeats)]
    med, lo, hi = statistics.median(times), min(times), max(times)
    line = (f"| {a.steps} | 64x64 | 1 | {a.guidance_scale} | {med:.3f} | {lo:.3f} | {hi:.3f} | "
            f"{torch.get_num_threads()} |")
    table = "\n".join([
        "# Generation speed of the default model",
        "",
        f"Model: `{path.name}`, scheduler {type(pipe.scheduler).__name__}, CPU: {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}. Wall-clock seconds per image over {a.repeats} runs after a warm-up.",
        "",
        "| steps | size | batch | guidance | median s | min s | max s | threads |",
        "|---|---|---|---|---|---|---|---|",
        line,
        "",
    ])
    print(table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(table)


if __name__ == "__main__":
    main()
