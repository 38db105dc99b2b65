#!/usr/bin/env python
"""Control benchmark on the shapes world (the OFT paper's protocol, at 64x64).

    .venv/bin/python benchmarks/control_benchmark.py                      # shipped adapters vs no control
    .venv/bin/python benchmarks/control_benchmark.py --compare --compare_task landmarks --compare_steps 300

For held-out scenes (seeds from ``--first_eval_seed``, never in the training data) it
generates one image per scene from the scene's caption, once without control (the base
model) and once with each control adapter and the scene's ground-truth control map, and
measures:

* Canny: IoU and F1 between the Canny map of the generated image and the control map;
* segmentation: mIoU between the control's labels and those of the project's classical
  segmenter (:func:`ortho_diffusion.control.metrics.segment_shapes`) on the generated image;
* landmarks: mean L2 distance (pixels) between the control keypoints and the keypoints
  detected on the generated image.

The shapes world's captions name each object's shape, colour, size and side, so the caption
alone already places objects to within a few pixels. Each scene is therefore generated from
three prompts: the caption; the caption without sizes and places ("a red circle and a blue
square, on a white background": what to draw, as a photo's caption says, while where and how
large is left to the control map); and an empty prompt.

``--compare`` trains, on one task with the same data, steps, batch and learning rate, the
encoder alone, encoder + OFT, + BOFT, + OFTv2 and + peft LoRA, and reports the same metrics
with trainable parameters and training time.  ``--interpolation`` draws one control prompt
at strengths t = 0, 0.2, ..., 1 for each shipped adapter (and, with ``--compare``, BOFT
factor by factor).

Writes ``<results>/control.json`` and ``control.md`` (and ``control_interpolation.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ortho_diffusion as od  # noqa: E402
from ortho_diffusion import shapes  # noqa: E402
from ortho_diffusion.control import metrics  # noqa: E402
from ortho_diffusion.control.data import LAYOUT_FREE_CAPTIONS  # noqa: E402
from ortho_diffusion.control.preprocess import TASKS, shapes_control  # noqa: E402
from ortho_diffusion.default_model import DEFAULT_GUIDANCE_SCALE  # noqa: E402
from ortho_diffusion.diffusion import load_pipeline  # noqa: E402
from ortho_diffusion.files import atomic_write_bytes, atomic_write_json, save_image_atomic  # noqa: E402
from ortho_diffusion.images import image_grid, to_pil  # noqa: E402

PROMPTS = {
    "caption": shapes.caption,
    "no_layout": shapes.layout_free_caption,
    "empty": lambda scene: "",
}
"""The prompt conditions, each scene's prompt under it."""

SUFFIX = {"caption": "", "no_layout": "_no_layout", "empty": "_no_caption"}
"""Result keys: ``values`` + suffix (compared runs), ``control`` / ``no_control`` + suffix (shipped)."""

TARGETS = {"canny": ("canny_f1", ">=", 0.5), "segmentation": ("miou", ">=", 0.7), "landmarks": ("landmark_error_px", "<=", 3.0)}


def eval_scenes(n: int, first_seed: int) -> list:
    return [shapes.scene_from_seed(first_seed + i) for i in range(n)]


@torch.no_grad()
def generate(pipe, prompts, hints, seeds, steps, guidance, batch=32):
    """Images (uint8 arrays) for prompts, with control images ``hints`` (N, 3, 64, 64) or without (None)."""
    out = []
    for i in range(0, len(prompts), batch):
        sl = slice(i, i + batch)
        kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                  generator=[torch.Generator().manual_seed(s) for s in seeds[sl]])
        if hints is not None:
            kw["image"] = hints[sl]
        out += [np.asarray(img) for img in to_pil(pipe(prompts[sl], **kw).images)]
    return out


def control_tensor(maps: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(maps)).permute(0, 3, 1, 2).float() / 255.0


def score(task: str, images: list[np.ndarray], scenes: list) -> dict:
    """The task's metrics of generated images against the scenes' ground truth."""
    gts = [shapes.ground_truth(s) for s in scenes]
    if task == "canny":
        pairs = [metrics.canny_scores(img, gt.canny) for img, gt in zip(images, gts)]
        return {"canny_iou": float(np.mean([p[0] for p in pairs])), "canny_f1": float(np.mean([p[1] for p in pairs]))}
    if task == "segmentation":
        miou = metrics.MeanIoU()
        for img, gt in zip(images, gts):
            miou.add(metrics.segment_shapes(img), gt.labels)
        return {"miou": miou.value()}
    errors = [metrics.landmark_error(gt.keypoints, img) for img, gt in zip(images, gts)]
    return {"landmark_error_px": float(np.mean(errors)), "landmark_error_median_px": float(np.median(errors))}


def meets(task: str, values: dict) -> bool:
    key, op, target = TARGETS[task]
    return values[key] >= target if op == ">=" else values[key] <= target


def evaluate_adapter(
    model: Path, adapter: Path | None, task: str, scenes, args, pipe=None, prompt: str = "caption"
) -> tuple[dict, list]:
    """Generate for every scene (with control when ``adapter`` or ``pipe`` has one) and score.

    ``prompt``: a key of :data:`PROMPTS` (the caption, the caption without sizes and places,
    or an empty prompt).
    """
    if pipe is None:
        pipe = load_pipeline(model)
        if adapter is not None:
            od.load_adapter(pipe, adapter)
    prompts = [PROMPTS[prompt](s) for s in scenes]
    seeds = [args.first_eval_seed + i for i in range(len(scenes))]
    hints = None
    if adapter is not None or pipe.__class__.__name__.endswith("ControlPipeline"):
        hints = control_tensor([shapes_control(s, task) for s in scenes])
    images = generate(pipe, prompts, hints, seeds, args.sample_steps, args.guidance_scale)
    return score(task, images, scenes), images


def fmt(task: str, values: dict) -> str:
    if task == "canny":
        return f"IoU {values['canny_iou']:.3f} / F1 {values['canny_f1']:.3f}"
    if task == "segmentation":
        return f"mIoU {values['miou']:.3f}"
    return f"{values['landmark_error_px']:.2f} px (median {values['landmark_error_median_px']:.2f})"


def shipped(args, model: Path, scenes) -> tuple[list[dict], dict]:
    rows, samples = [], {}
    base = load_pipeline(model)
    for task in args.tasks:
        adapter = Path(args.adapters) / f"{task}.safetensors"
        t0 = time.time()
        row = {"task": task, "eval_scenes": len(scenes)}
        images = {}
        controlled = None
        if adapter.is_file():
            controlled = load_pipeline(model)
            od.load_adapter(controlled, adapter)
        for kind, suffix in SUFFIX.items():
            row["no_control" + suffix], images["no_control" + suffix] = evaluate_adapter(
                model, None, task, scenes, args, pipe=base, prompt=kind)
            if controlled is not None:
                row["control" + suffix], images["control" + suffix] = evaluate_adapter(
                    model, adapter, task, scenes, args, pipe=controlled, prompt=kind)
        if controlled is not None:
            row.update(adapter=str(adapter.relative_to(ROOT) if adapter.is_relative_to(ROOT) else adapter),
                       meets_target=meets(task, row["control"]),
                       trainable_parameters=od.summary(controlled).total, file_kib=round(adapter.stat().st_size / 1024, 1))
            summary_file = adapter.with_suffix(".json")
            if summary_file.is_file():
                info = json.loads(summary_file.read_text())
                row.update(training_steps=info.get("steps"), training_seconds=info.get("wall_time_seconds"),
                           method=info.get("method"))
            maps = [shapes_control(scene, task) for scene in scenes[:6]]
            samples[task] = (maps, images["no_control_no_layout"][:6], images["control_no_layout"][:6])
        else:
            row["control"] = None
            print(f"[{task}] no shipped adapter at {adapter}", flush=True)
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        for kind, suffix in SUFFIX.items():
            ctl = row.get("control" + suffix)
            print(f"[{task}] {kind} prompt: no control: {fmt(task, row['no_control' + suffix])}"
                  + (f"; control: {fmt(task, ctl)}" if ctl else ""), flush=True)
    return rows, samples


def _compare_argv(args, model: Path, data: Path, out: Path, variant: str, seed: int) -> list[str]:
    """Training flags of one compared run; ``variant`` is a method with optional ``+flag`` or
    ``+flag=value`` options (``oft+rescale``: OFT with learnable per-output magnitudes;
    ``oft+side=output``: OFT rotating the outputs); a variant's flags win over the recipe's."""
    method, *options = variant.split("+")
    flags = [part for o in options for part in (f"--{o}".split("=", 1))]
    argv = [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
        "--method", method, "--max_train_steps", str(args.compare_steps), "--train_batch_size", str(args.batch),
        "--learning_rate", str(args.learning_rate), "--control_task", args.compare_task,
        "--control_channels", args.control_channels,
        "--checkpointing_steps", "0", "--validation_steps", "0", "--num_validation_images", "2",
        "--sample_steps", str(args.sample_steps), "--report_to", "none",
        "--proportion_empty_prompts", str(args.proportion_empty_prompts), "--seed", str(seed),
        "--high_noise_share", str(args.high_noise_share),
    ]
    if method in ("oft", "oftv2"):
        argv += ["--block_size", str(args.block_size)]
    if method == "boft":
        argv += ["--block_size", str(args.boft_block_size), "--n_factors", str(args.boft_factors)]
    if method == "lora":
        argv += ["--lora_rank", str(args.lora_rank)]
    return argv + flags  # last, so that a variant's own value wins over the recipe


def _trained_with(summary_file: Path, argv: list[str]) -> bool:
    """True when ``summary_file`` records a finished run of exactly these training arguments."""
    from ortho_diffusion.training.control import build_parser

    if not summary_file.is_file():
        return False
    try:
        recorded = json.loads(summary_file.read_text()).get("arguments", {})
    except (OSError, ValueError):
        return False
    wanted = vars(build_parser().parse_args(argv))
    keys = ("method", "max_train_steps", "train_batch_size", "learning_rate", "seed", "block_size", "n_factors",
            "lora_rank", "control_channels", "proportion_empty_prompts", "control_task", "rescale", "side",
            "unet_targets", "encoder_lr_scale", "high_noise_share", "rank")
    return all(str(recorded.get(k)) == str(wanted.get(k)) for k in keys if k in wanted)


def compare(args, model: Path, scenes, work: Path) -> list[dict]:
    """Train every variant on one task with identical settings, for every seed; evaluate on the held-out scenes.

    Each run leaves ``<work>/<task>-<method>[-seed<k>]/``: the adapter, its training summary and
    ``compare_row.json`` with the scores.  A run whose summary records the same training arguments
    is not trained again (and its scores are reused), so an interrupted or extended comparison
    (more seeds, more methods) only does the missing work.
    """
    from ortho_diffusion.control.data import write_shapes_dataset
    from ortho_diffusion.training.control import build_parser, load_trained, train

    task = args.compare_task
    data = work / (f"data-{task}" + (f"-layout_free{args.layout_free:g}" if args.layout_free else ""))
    if not (data / "metadata.jsonl").is_file():
        write_shapes_dataset(data, task, args.compare_rows, layout_free=args.layout_free)
    rows = []
    for seed in args.compare_seeds:
        for method in args.compare_methods:
            out = work / (f"{task}-{method}" if seed == 0 else f"{task}-{method}-seed{seed}")
            argv = _compare_argv(args, model, data, out, method, seed)
            row_file = out / "compare_row.json"
            finished = _trained_with(out / "summary.json", argv)
            row = json.loads(row_file.read_text()) if finished and row_file.is_file() else {}
            missing = [kind for kind, suffix in SUFFIX.items() if "values" + suffix not in row]
            if not missing:
                rows.append(row)
                print(f"[compare {task}] {method} seed {seed}: reused {row_file}", flush=True)
                continue
            run_args = build_parser().parse_args(argv)
            if finished and (out / "adapter.safetensors").is_file():
                summary = json.loads((out / "summary.json").read_text())
                pipe = load_trained(run_args, out / "adapter.safetensors")
            else:
                pipe, summary = train(run_args)
                row, missing = {}, list(SUFFIX)
            for kind in missing:  # scores of a prompt condition added since the run was scored
                row["values" + SUFFIX[kind]], _ = evaluate_adapter(model, None, task, scenes, args, pipe=pipe, prompt=kind)
            row.update({"task": task, "method": method, "seed": seed, "meets_target": meets(task, row["values"]),
                        "trainable_parameters": summary["trainable_parameters"],
                        "adapter_parameters": summary["adapter_parameters"],
                        "encoder_parameters": summary["encoder_parameters"],
                        "steps": summary["steps"], "training_seconds": round(summary["wall_time_seconds"], 1),
                        "adapter": str(out / "adapter.safetensors")})
            atomic_write_json(row_file, row)
            rows.append(row)
            print(f"[compare {task}] {method} seed {seed}: " + "; ".join(
                f"{kind} prompt {fmt(task, row['values' + suffix])}" for kind, suffix in SUFFIX.items())
                + f"; {summary['trainable_parameters']:,} params, {summary['wall_time_seconds']:.0f} s", flush=True)
    return rows


def compare_means(rows: list[dict]) -> list[dict]:
    """Per method: mean and sample standard deviation of each score over the seeds of ``rows``."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    means = []
    for method, runs in by_method.items():
        entry = {"method": method, "seeds": [r["seed"] for r in runs]}
        for field in ("values" + suffix for suffix in SUFFIX.values()):
            if all(field in r for r in runs):
                keys = runs[0][field].keys()
                entry[field] = {k: float(np.mean([r[field][k] for r in runs])) for k in keys}
                entry[field + "_std"] = {k: float(np.std([r[field][k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0
                                         for k in keys}
        for k in ("trainable_parameters", "encoder_parameters", "adapter_parameters"):
            entry[k] = runs[0][k]
        entry["training_seconds"] = float(np.mean([r["training_seconds"] for r in runs]))
        means.append(entry)
    return means


EVALUATION_KEYS = ("model", "eval_scenes", "first_eval_seed", "sample_steps", "guidance_scale")


def include_rows(rows: list[dict], files: list[Path], result: dict) -> list[dict]:
    """``rows`` plus the compared runs recorded in earlier result ``files`` (``control_compare.json``
    of other invocations), for means over seeds whose run folders are no longer at hand.

    A file must come from the same task, training recipe and evaluation (model, held-out scenes,
    sampling) as ``result``, otherwise its numbers would not be comparable: ``SystemExit`` names
    what differs.  A (method, seed) already in ``rows`` keeps the row measured now.  The rows come
    back ordered by seed.
    """
    task = rows[0]["task"] if rows else None
    seen = {(r["method"], r["seed"]) for r in rows}
    merged = list(rows)
    for file in files:
        try:
            earlier = json.loads(Path(file).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--compare_include: cannot read {file}: {exc}") from None
        if "compare" not in earlier:
            raise SystemExit(f"--compare_include: {file} has no compared runs")
        differ = [k for k in EVALUATION_KEYS if earlier.get(k) != result.get(k)]
        if earlier.get("compare_recipe") != result.get("compare_recipe"):
            differ.append("compare_recipe")
        tasks = {r["task"] for r in earlier["compare"]}
        if task is not None and tasks != {task}:
            differ.append(f"task ({', '.join(sorted(tasks))} instead of {task})")
        if differ:
            raise SystemExit(f"--compare_include: {file} differs from this comparison in {', '.join(differ)}")
        for r in earlier["compare"]:
            if (r["method"], r["seed"]) not in seen:
                seen.add((r["method"], r["seed"]))
                merged.append(r)
                task = r["task"]
    return sorted(merged, key=lambda r: r["seed"])  # stable: within a seed, the order the runs came in


@torch.no_grad()
def interpolation(args, model: Path, out: Path) -> None:
    """Rows: one control prompt at t = 0, 0.2, ..., 1 per shipped adapter; BOFT factor by factor.

    The prompt names the shapes, colours and background but not their size or place, so that
    the layout visibly moves from the model's own choice (t = 0) to the control map's.
    """
    scene = shapes.scene_from_seed(args.first_eval_seed + 3)
    prompt = shapes.layout_free_caption(scene)
    ts = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    cells, labels = [], []
    for task in args.tasks:
        adapter = Path(args.adapters) / f"{task}.safetensors"
        if not adapter.is_file():
            continue
        pipe = load_pipeline(model)
        od.load_adapter(pipe, adapter)
        hint = control_tensor([shapes_control(scene, task)])
        cells.append(Image.fromarray(shapes_control(scene, task)))
        for t in ts:
            od.set_scale(pipe, t)
            cells += to_pil(pipe(prompt, image=hint, num_inference_steps=args.sample_steps, guidance_scale=args.guidance_scale,
                                 generator=torch.Generator().manual_seed(0)).images)
        labels.append(task)
    if args.boft_adapter:
        boft = load_pipeline(model)
        od.load_adapter(boft, args.boft_adapter)
        task = args.compare_task
        hint = control_tensor([shapes_control(scene, task)])
        cells.append(Image.fromarray(shapes_control(scene, task)))
        # BOFT paper: switch the trained factors on one at a time (0, 1, 2 of 2), encoder at full strength.
        for k in range(args.boft_factors + 1):
            od.set_scale(boft, 1.0, n_active_factors=k)
            cells += to_pil(boft(prompt, image=hint, num_inference_steps=args.sample_steps, guidance_scale=args.guidance_scale,
                                 generator=torch.Generator().manual_seed(0)).images)
        cells += [Image.new("RGB", (64, 64), "white")] * (len(ts) - args.boft_factors - 1)
        labels.append(f"boft factors ({task})")
    if cells:
        grid = image_grid([c.resize((128, 128), Image.NEAREST) for c in cells], cols=len(ts) + 1)
        save_image_atomic(grid, out / "control_interpolation.png")
        atomic_write_json(out / "control_interpolation.json", {"prompt": prompt, "rows": labels, "columns": ["control"] + ts})


def save_samples(samples: dict, out: Path) -> None:
    """Per task three rows for the first scenes: control map, no control, control (captions without sizes and places)."""
    cells = []
    for task, rows in samples.items():
        cells += [Image.fromarray(a) for row in rows for a in row]
    if cells:
        grid = image_grid([c.resize((96, 96), Image.NEAREST) for c in cells], cols=len(next(iter(samples.values()))[0]))
        save_image_atomic(grid, out / "control_samples.png")


def _mean_cell(mean: dict, field: str, key: str) -> str:
    if field not in mean:
        return "-"
    return f"{mean[field][key]:.3f} ± {mean[field + '_std'][key]:.3f}"


def markdown(result: dict) -> str:
    lines = ["# Control benchmark (shapes world, 64x64)", "", f"Model: `{result['model']}`; {result['eval_scenes']} held-out "
             f"scenes (seeds from {result['first_eval_seed']}); {result['sample_steps']} sampling steps, guidance "
             f"{result['guidance_scale']}; {result['machine']}.", ""]
    if result.get("shipped"):
        lines += ["## Shipped adapters", "", "With the scene's caption (the papers' protocol):", "",
                  "| task | metric | no control | with the control adapter | target | met | params | file |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["shipped"]:
            key, op, target = TARGETS[r["task"]]
            ctl = fmt(r["task"], r["control"]) if r.get("control") else "(no adapter)"
            lines.append(f"| {r['task']} | {key} | {fmt(r['task'], r['no_control'])} | {ctl} | {op} {target} | "
                         f"{'yes' if r.get('meets_target') else 'no'} | {r.get('trainable_parameters', 0):,} | "
                         f"{r.get('file_kib', '-')} KiB |")
        for suffix, heading in (("_no_layout", "With the caption without sizes and places (what to draw, not where):"),
                                ("_no_caption", "With an empty prompt (the layout can only come from the control map):")):
            measured = [r for r in result["shipped"] if r.get("control" + suffix)]
            if measured:
                lines += ["", heading, "", "| task | no control | with the control adapter | target met |", "|---|---|---|---|"]
                lines += [f"| {r['task']} | {fmt(r['task'], r['no_control' + suffix])} | {fmt(r['task'], r['control' + suffix])} | "
                          f"{'yes' if meets(r['task'], r['control' + suffix]) else 'no'} |" for r in measured]
        lines.append("")
    if result.get("compare"):
        task = result["compare"][0]["task"]
        key = TARGETS[task][0]
        recipe = result.get("compare_recipe")
        lines += [f"## Methods compared on {task} (same data, steps, batch, learning rate)", ""]
        if recipe:
            lines += [f"{recipe['steps']} steps of batch {recipe['batch']} at learning rate {recipe['learning_rate']:g}, "
                      f"{recipe['proportion_empty_prompts']:.0%} empty prompts, "
                      f"{recipe.get('layout_free', 0.0):.0%} of the training captions without sizes and places"
                      + (f", {recipe['high_noise_share']:.0%} of the timesteps near pure noise"
                         if recipe.get("high_noise_share") else "") + ".", ""]
        lines += [f"Mean ± standard deviation of {key} over the training seeds, for each prompt condition.", "",
                  "| method | seeds | with the caption | caption without sizes and places | empty prompt | "
                  "trainable params (encoder + adapter) | training time |",
                  "|---|---|---|---|---|---|---|"]
        for m in result["compare_means"]:
            lines.append(f"| {m['method']} | {len(m['seeds'])} | {_mean_cell(m, 'values', key)} | "
                         f"{_mean_cell(m, 'values_no_layout', key)} | {_mean_cell(m, 'values_no_caption', key)} | "
                         f"{m['trainable_parameters']:,} ({m['encoder_parameters']:,} + {m['adapter_parameters']:,}) | "
                         f"{m['training_seconds']:.0f} s |")
        lines += ["", "Each run:", "", "| method | seed | with the caption | caption without sizes and places | empty prompt |",
                  "|---|---|---|---|---|"]
        for r in result["compare"]:
            cells = [fmt(task, r["values" + suffix]) if "values" + suffix in r else "-" for suffix in SUFFIX.values()]
            lines.append(f"| {r['method']} | {r['seed']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded shapes model)")
    p.add_argument("--adapters", default=str(ROOT / "assets" / "control"), help="folder of <task>.safetensors")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--eval_scenes", type=int, default=96)
    p.add_argument("--first_eval_seed", type=int, default=900_000)
    p.add_argument("--sample_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    p.add_argument("--no_shipped", action="store_true", help="skip the shipped adapters")
    p.add_argument("--compare", action="store_true")
    p.add_argument("--compare_task", default="landmarks", choices=TASKS)
    p.add_argument("--compare_methods", default="none,oft,boft,oftv2,lora",
                   help="comma-separated; a method may carry flags, e.g. oft+rescale")
    p.add_argument("--compare_steps", type=int, default=300)
    p.add_argument("--compare_rows", type=int, default=2000)
    p.add_argument("--layout_free", type=float, default=LAYOUT_FREE_CAPTIONS,
                   help="fraction of the compared runs' training rows captioned without sizes and places")
    p.add_argument("--compare_seeds", default="0", help="training seeds of the compared runs (comma-separated)")
    p.add_argument("--compare_include", default="",
                   help="comma-separated earlier control_compare.json files (same task, recipe and evaluation) whose "
                        "runs join the means")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--block_size", type=int, default=8)
    p.add_argument("--boft_block_size", type=int, default=4, help="with 2 factors: about OFT's parameter count at --block_size 8")
    p.add_argument("--boft_factors", type=int, default=2)
    p.add_argument("--lora_rank", type=int, default=2, help="2: about OFT's parameter count at block size 8")
    p.add_argument("--control_channels", default="16,32,64,128")
    p.add_argument("--proportion_empty_prompts", type=float, default=0.5)
    p.add_argument("--high_noise_share", type=float, default=0.0,
                   help="share of the compared runs' training timesteps drawn near pure noise")
    p.add_argument("--interpolation", action="store_true")
    p.add_argument("--boft_adapter", default=None, help="a BOFT control adapter (for --compare_task) for the factor-by-factor row")
    p.add_argument("--work_dir", default=str(ROOT / "runs" / "control_benchmark"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.compare_methods = [m for m in args.compare_methods.split(",") if m]
    args.compare_seeds = [int(k) for k in args.compare_seeds.split(",") if k]
    args.compare_include = [Path(f) for f in args.compare_include.split(",") if f]
    if args.model is None:
        from ortho_diffusion.default_model import default_model_path

        model = default_model_path()
    else:
        model = Path(args.model)
    torch.manual_seed(0)
    out = Path(args.results)
    scenes = eval_scenes(args.eval_scenes, args.first_eval_seed)
    result = {
        "model": str(model.resolve().relative_to(ROOT) if model.resolve().is_relative_to(ROOT) else model),
        "eval_scenes": len(scenes), "first_eval_seed": args.first_eval_seed, "sample_steps": args.sample_steps,
        "guidance_scale": args.guidance_scale, "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "targets": TARGETS,
    }
    samples: dict = {}
    if not args.no_shipped:
        result["shipped"], samples = shipped(args, model, scenes)
    if args.compare:
        result["compare_recipe"] = {"steps": args.compare_steps, "batch": args.batch, "learning_rate": args.learning_rate,
                                    "proportion_empty_prompts": args.proportion_empty_prompts, "layout_free": args.layout_free,
                                    "high_noise_share": args.high_noise_share}
        result["compare"] = include_rows(compare(args, model, scenes, Path(args.work_dir)), args.compare_include, result)
        result["compare_means"] = compare_means(result["compare"])
        boft_runs = [r for r in result["compare"] if r["method"] == "boft"]
        if boft_runs and not args.boft_adapter:
            args.boft_adapter = boft_runs[0]["adapter"]
    if args.interpolation:
        interpolation(args, model, out)
    if "shipped" in result or "compare" in result:  # not for a picture-only run
        name = "control" if not args.no_shipped else "control_compare"
        atomic_write_json(out / f"{name}.json", result)
        atomic_write_bytes(out / f"{name}.md", markdown(result).encode())
        save_samples(samples, out)
        print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
