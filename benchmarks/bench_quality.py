#!/usr/bin/env python
"""Prompt fidelity of the base model, measured by the shapes-world detector.

    python benchmarks/bench_quality.py [--model PATH] [--n_single 200] [--n_two 100]
                                       [--guidance_scale 3.0] [--steps 25]

Generates one image per prompt (fixed seeds: prompt ``i`` uses generator seed ``i``), scores
it with :func:`ortho_diffusion.shapes.detect`, and writes
``benchmarks/results/base_model_quality.md`` (table), ``base_model_quality.json`` (numbers)
and ``base_model_samples.png`` (a grid: 40 single-object then 20 two-object samples).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from ortho_diffusion.default_model import DEFAULT_GUIDANCE_SCALE, default_model_path  # noqa: E402
from ortho_diffusion.shapes.fidelity import evaluate, image_grid, prompt_scenes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"shape": 0.90, "color": 0.90, "background": 0.90, "position": 0.80}
COLUMNS = ("shape", "color", "size", "position", "background", "count", "all")


def _row(name: str, n: int, scores: dict[str, float]) -> str:
    return f"| {name} | {n} | " + " | ".join(f"{100 * scores[c]:.1f}%" for c in COLUMNS) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--n_single", type=int, default=200)
    p.add_argument("--n_two", type=int, default=100)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    p.add_argument("--batch_size", type=int, default=25)
    p.add_argument("--out_dir", default=str(RESULTS))
    p.add_argument("--prefix", default="base_model")
    a = p.parse_args()
    path = Path(a.model) if a.model else default_model_path()
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    single = evaluate(pipe, prompt_scenes(a.n_single, 1), a.steps, a.guidance_scale, batch_size=a.batch_size)
    two = evaluate(pipe, prompt_scenes(a.n_two, 2), a.steps, a.guidance_scale, batch_size=a.batch_size) if a.n_two else None
    seconds = time.time() - t0
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid_name = f"{a.prefix}_samples.png"
    samples = [single.images[:40]] + ([two.images[:20]] if two else [])
    Image.fromarray(image_grid(np.concatenate(samples), cols=10)).save(out / grid_name)
    checks = ", ".join(
        f"{k} {100 * single.scores[k]:.1f}% (target >= {100 * v:.0f}%: {'met' if single.scores[k] >= v else 'NOT met'})"
        for k, v in TARGETS.items()
    )
    lines = [
        f"Detector-scored prompt fidelity of `{path.name}`: {a.steps} DDIM steps, guidance {a.guidance_scale}, "
        f"64x64, prompt i uses seed i ({seconds / 60:.1f} min to generate and score).",
        "",
        "| prompts | n | shape | colour | size | position | background | object count | all correct |",
        "|---|---|---|---|---|---|---|---|---|",
        _row("one object", single.n, single.scores),
    ]
    if two:
        lines.append(_row("two objects", two.n, two.scores))
    lines += ["", f"Single-object targets: {checks}.", "",
              f"Samples (first 40 single-object prompts, then 20 two-object prompts): `{grid_name}`.", ""]
    text = "\n".join(lines)
    print(text)
    (out / f"{a.prefix}_quality.md").write_text(text)
    record = {"model": str(path), "steps": a.steps, "guidance_scale": a.guidance_scale,
              "single": single.scores, "n_single": single.n,
              "two": two.scores if two else None, "n_two": two.n if two else 0,
              "prompts_single_first10": single.prompts[:10]}
    (out / f"{a.prefix}_quality.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
