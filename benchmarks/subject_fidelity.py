#!/usr/bin/env python
"""Subject-driven training benchmark: orthogonal methods against peft LoRA on the shipped subjects.

    .venv/bin/python benchmarks/subject_fidelity.py            # default model, all methods
    .venv/bin/python benchmarks/subject_fidelity.py --steps 200 --methods oft,lora --subjects split-circle
    .venv/bin/python benchmarks/subject_fidelity.py --methods oft@3e-4,oft@1e-3,lora@1e-3 --seeds 0,1

A method may carry its learning rate (``oft@1e-3``); the same method at several rates is a
learning-rate sweep, one row per rate.  Adapter options follow a ``+``
(``oft@3e-3+constraint=0.1``: COFT, each block's generator kept within norm 0.1).

For every (subject, method, seed) it trains with the project's DreamBooth code (prior
preservation on, the same steps, batch and data for all) and measures, with the classical
shapes-world detector:

* subject fidelity: colour composition of the generated object against the instance images
  (histogram intersection, 0..1), and whether the object's silhouette has the subject's shape;
* prompt fidelity: for subject prompts, whether the requested background and position
  appear;
* forgetting: the model's accuracy on ordinary prompts (shape, colour, background and
  position all right) after training, minus before; and class-prompt drift, how much the
  subject's look leaks into images of its class prompt (similarity after minus before).

Writes ``benchmarks/results/subject_fidelity.md`` (table), ``subject_fidelity.json`` and
``subject_fidelity.png`` (one sample row per method and subject) and ``subject_tradeoff.png``
(subject similarity against ordinary-prompt accuracy, one line per method through its
learning rates), rewritten after every run
(seeds outermost), so an interrupted sweep keeps every finished run.
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

from ortho_diffusion.default_model import DEFAULT_GUIDANCE_SCALE  # noqa: E402
from ortho_diffusion.diffusion import load_pipeline  # noqa: E402
from ortho_diffusion.shapes import caption, detect, make_scene  # noqa: E402
from ortho_diffusion.shapes.world import POSITION_PHRASES  # noqa: E402
from ortho_diffusion.subjects import (  # noqa: E402
    SUBJECTS,
    backgrounds_for,
    reference_composition,
    shape_matches,
    subject_similarity,
    subjects_root,
)
from ortho_diffusion.files import atomic_write_bytes, atomic_write_json, save_image_atomic  # noqa: E402
from ortho_diffusion.images import image_grid  # noqa: E402
from ortho_diffusion.training.dreambooth import build_parser, train  # noqa: E402

#: Per method: adapter flags giving comparable parameter counts (see the table's column) and
#: the default learning rate (``method@rate`` overrides it). Defaults from the sweep on the
#: current model (README): the rate with the most subject fidelity before forgetting takes
#: off (1e-3 for the Cayley methods; GOFT's few angles need 1e-2; LoRA at 3e-4 matched its
#: fidelity at 1e-3 with half the forgetting).
METHOD_FLAGS = {
    "oft": ["--method", "oft", "--block_size", "8", "--learning_rate", "1e-3"],
    "oftv2": ["--method", "oftv2", "--block_size", "8", "--learning_rate", "1e-3"],
    "boft": ["--method", "boft", "--block_size", "4", "--n_factors", "2", "--learning_rate", "1e-3"],
    "goft": ["--method", "goft", "--learning_rate", "1e-2"],
    "qgoft": ["--method", "qgoft", "--learning_rate", "1e-3"],
    "lroft": ["--method", "lroft", "--rank", "2", "--learning_rate", "3e-3"],
    "lora": ["--method", "lora", "--lora_rank", "2", "--learning_rate", "3e-4"],
}

ORDINARY = [
    ("large", "red", "square", "left", "white"),
    ("small", "blue", "circle", "right", "black"),
    ("large", "green", "triangle", "center", "gray"),
    ("large", "yellow", "star", "top", "black"),
    ("small", "purple", "square", "bottom", "white"),
    ("large", "white", "circle", "center", "brown"),
    ("large", "blue", "star", "left", "pink"),
    ("small", "red", "triangle", "right", "gray"),
]


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> list[np.ndarray]:
    """One image per (prompt, seed), batched; ``(64, 64, 3)`` uint8 arrays."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np").images
    return [(np.clip(a, 0, 1) * 255).round().astype(np.uint8) for a in out]


def subject_prompts(subject) -> list[tuple[str, str, str]]:
    """``(prompt, background, position)`` of the subject prompts."""
    out = []
    for bg in backgrounds_for(subject)[:2]:
        for pos in ("left", "right", "center"):
            out.append((f"a large {subject.token} {subject.shape} {POSITION_PHRASES[pos]}, on a {bg} background", bg, pos))
    return out


def class_prompts(subject) -> list[str]:
    return [f"a large {subject.shape} {POSITION_PHRASES[p]}, on a {b} background" for p, b in [("center", "black"), ("left", "gray")]]


def ordinary_accuracy(images: list[np.ndarray], per_prompt: int = 1) -> float:
    """Fraction of ordinary-prompt images with shape, colour, background and position right.

    ``images``: ``per_prompt`` consecutive images for each entry of :data:`ORDINARY`.
    """
    ok = 0
    expected = [spec for spec in ORDINARY for _ in range(per_prompt)]
    for img, (size, color, shape, pos, bg) in zip(images, expected, strict=True):
        d = detect(img, max_objects=1)
        o = d.objects[0] if d.objects else None
        ok += bool(o and o.shape == shape and o.color == color and o.position == pos and d.background == bg)
    return ok / len(images)


def instance_images(subject) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted((subjects_root() / subject.name).glob("*.png"))]


def evaluate(pipe, subject, reference, seeds: list[int], steps: int, guidance: float, scorers=None) -> dict:
    """All metrics of one model (trained or base) for one subject.

    ``scorers``: optional ``(ClipScorer | None, DinoScorer | None)`` for the papers' metrics.
    """
    sp = subject_prompts(subject)
    prompts = [p for p, _, _ in sp for _ in seeds]
    sub_imgs = generate(pipe, prompts, [s for _ in sp for s in seeds], steps, guidance)
    expected = [(bg, pos) for _, bg, pos in sp for _ in seeds]
    sims = [subject_similarity(img, subject, reference) for img in sub_imgs]
    shapes_ok = [shape_matches(img, subject) for img in sub_imgs]
    dets = [detect(img, max_objects=1) for img in sub_imgs]
    bg_ok = [d.background == bg for d, (bg, _) in zip(dets, expected)]
    pos_ok = [bool(d.objects) and d.objects[0].position == pos for d, (_, pos) in zip(dets, expected)]
    ordinary_prompts = [caption(make_scene(bg, [(size, color, shape, pos)])) for size, color, shape, pos, bg in ORDINARY]
    ord_imgs = generate(pipe, [p for p in ordinary_prompts for _ in seeds], [s for _ in ordinary_prompts for s in seeds],
                        steps, guidance)
    cls = class_prompts(subject)
    cls_imgs = generate(pipe, [c for c in cls for _ in seeds], [s for _ in cls for s in seeds], steps, guidance)
    paper = {}
    clip, dino = scorers or (None, None)
    if clip is not None:
        paper["clip_i"] = clip.clip_i(sub_imgs, instance_images(subject))
        paper["clip_t"] = clip.clip_t(sub_imgs, prompts)
    if dino is not None:
        paper["dino"] = dino.dino(sub_imgs, instance_images(subject))
    return {
        **paper,
        "subject_similarity": float(np.mean(sims)),
        "subject_shape": float(np.mean(shapes_ok)),
        "prompt_background": float(np.mean(bg_ok)),
        "prompt_position": float(np.mean(pos_ok)),
        "ordinary_accuracy": ordinary_accuracy(ord_imgs, len(seeds)),
        "class_similarity": float(np.mean([subject_similarity(i, subject, reference) for i in cls_imgs])),
        "samples": sub_imgs[: len(seeds) * 3 : len(seeds)],
    }


#: Adapter options a variant may set after ``+`` (``oft@3e-3+constraint=0.1``).
VARIANT_OPTIONS = ("constraint", "block_size", "n_factors", "lora_rank", "rank", "neumann_terms", "qgoft_lambda")
# Options with words for values; ";" separates target patterns (the method list uses ",").
TEXT_OPTIONS = {"side": ("input", "output"), "unet_targets": None}
# Switches without a value (``lora@5e-4+train_text_encoder``).
SWITCH_OPTIONS = ("train_text_encoder",)


def parse_variant(text: str) -> tuple[str, str, tuple[str, ...]]:
    """A variant: method, learning rate and extra adapter flags.

    ``"oft@1e-3"`` -> ``("oft", "1e-3", ())``; ``"oft"`` -> ``("oft", <METHOD_FLAGS' rate>, ())``;
    ``"oft@3e-3+constraint=0.1"`` -> ``("oft", "3e-3", ("--constraint", "0.1"))``;
    ``"oft+unet_targets=attn2.to_k;attn2.to_v"`` -> ``("oft", "1e-3", ("--unet_targets", "attn2.to_k,attn2.to_v"))``;
    ``"lora@5e-4+train_text_encoder"`` -> ``("lora", "5e-4", ("--train_text_encoder",))``.
    """
    head, *options = text.split("+")
    method, _, rate = head.partition("@")
    if method not in METHOD_FLAGS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHOD_FLAGS)}")
    if not rate:
        flags = METHOD_FLAGS[method]
        rate = flags[flags.index("--learning_rate") + 1]
    float(rate)  # a clear ValueError for a malformed rate
    extra: list[str] = []
    for option in options:
        key, _, value = option.partition("=")
        if key in SWITCH_OPTIONS and not value:
            extra.append(f"--{key}")
            continue
        if key in TEXT_OPTIONS and value:
            choices = TEXT_OPTIONS[key]
            if choices and value not in choices:
                raise ValueError(f"bad variant option {option!r}; {key} is one of {', '.join(choices)}")
            extra += [f"--{key}", value.replace(";", ",")]
            continue
        if key not in VARIANT_OPTIONS or not value:
            names = ", ".join((*VARIANT_OPTIONS, *TEXT_OPTIONS))
            raise ValueError(
                f"bad variant option {option!r}; use name=value with a name from {names}, or {', '.join(SWITCH_OPTIONS)} alone"
            )
        float(value)
        extra += [f"--{key}", value]
    return method, rate, tuple(extra)


def option_pairs(extra: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """``("--side", "output", "--train_text_encoder")`` -> ``[("side", "output"), ("train_text_encoder", None)]``."""
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(extra):
        key = extra[i][2:]
        if key in SWITCH_OPTIONS:
            pairs.append((key, None))
            i += 1
        else:
            pairs.append((key, extra[i + 1]))
            i += 2
    return pairs


def variant_label(method: str, rate: str, extra: tuple[str, ...] = ()) -> str:
    options = "".join(f" + {k}" if v is None else f" + {k}={v}" for k, v in option_pairs(extra))
    return f"{method} @ {rate}{options}"


def run_name(method: str, rate: str, extra: tuple[str, ...], seed: int) -> str:
    """Folder name of one run: the method, rate, option values (switches by name) and seed."""
    tags = "".join((k if v is None else v).replace(",", "+") for k, v in option_pairs(extra))
    return f"{method}-{rate}{tags}-{seed}"


def run_one(args, subject, method: str, rate: str, extra: tuple[str, ...], seed: int, work: Path) -> tuple[dict, object]:
    flags = [
        "--pretrained_model_name_or_path", str(args.model),
        "--instance_data_dir", str(subjects_root() / subject.name),
        "--instance_prompt", subject.instance_prompt,
        "--with_prior_preservation",
        "--class_data_dir", str(work / "class" / subject.name),
        "--class_prompt", subject.class_prompt,
        "--num_class_images", str(args.class_images),
        "--output_dir", str(work / f"{subject.name}-{run_name(method, rate, extra, seed)}"),
        "--max_train_steps", str(args.steps),
        "--train_batch_size", str(args.batch),
        "--seed", str(seed),
        "--checkpointing_steps", "0",
        "--validation_steps", "0",
        "--num_validation_images", "2",
        "--report_to", "none",
        *METHOD_FLAGS[method],
        "--learning_rate", rate,
        *extra,
    ]
    start = time.perf_counter()
    pipe, summary = train(build_parser().parse_args(flags))
    summary["train_seconds"] = time.perf_counter() - start
    return summary, pipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--methods", default=",".join(METHOD_FLAGS),
                   help="methods, each optionally with its learning rate: oft,oft@1e-3,lora@3e-3")
    p.add_argument("--subjects", default=",".join(s.name for s in SUBJECTS))
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    p.add_argument("--eval_seeds", type=int, default=2, help="images per prompt")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--class_images", type=int, default=20)
    p.add_argument("--sample_steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE)
    p.add_argument("--clip_model", default=None, help="local CLIP folder: adds CLIP-I and CLIP-T")
    p.add_argument("--dino_model", default=None, help="local DINO/ViT folder: adds DINO")
    p.add_argument("--work_dir", default="outputs/bench-subjects")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--resume", action="store_true",
                   help="keep the finished runs in <results>/subject_fidelity.json and do only the others")
    args = p.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.methods.split(",") if v]
    except ValueError as e:
        p.error(str(e))
    if args.model is None:
        from ortho_diffusion.default_model import default_model_path

        args.model = default_model_path()
    subjects = [s for s in SUBJECTS if s.name in args.subjects.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    eval_seeds = list(range(100, 100 + args.eval_seeds))
    work = Path(args.work_dir)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores; torch {torch.__version__}")

    from ortho_diffusion.paper_metrics import ClipScorer, DinoScorer

    scorers = (
        ClipScorer(args.clip_model) if args.clip_model else None,
        DinoScorer(args.dino_model) if args.dino_model else None,
    )
    base = load_pipeline(args.model)
    labels = [variant_label(*v) for v in variants]
    rows, samples, base_metrics = [], {}, {}
    done = previous_runs(Path(args.results)) if args.resume else []
    for subject in subjects:
        reference = reference_composition(subject)
        base_metrics[subject.name] = evaluate(base, subject, reference, eval_seeds, args.sample_steps, args.guidance, scorers)
        samples[(subject.name, "base")] = base_metrics[subject.name].pop("samples")
        rows.append({"subject": subject.name, "method": "base", **base_metrics[subject.name], "parameters": 0})
    rows += done
    finished = {(r["subject"], r["method"], r["seed"]) for r in done}
    trained_now = False
    # Seeds outermost: an interrupted sweep still has whole seeds over every subject and method.
    for seed in seeds:
        for subject in subjects:
            reference = reference_composition(subject)
            before = base_metrics[subject.name]
            for (method, rate, extra), label in zip(variants, labels):
                if (subject.name, label, seed) in finished:
                    continue
                summary, pipe = run_one(args, subject, method, rate, extra, seed, work)
                m = evaluate(pipe, subject, reference, eval_seeds, args.sample_steps, args.guidance, scorers)
                samples[(subject.name, label)] = m.pop("samples")
                m["forgetting"] = before["ordinary_accuracy"] - m["ordinary_accuracy"]
                m["class_drift"] = m["class_similarity"] - before["class_similarity"]
                rows.append({
                    "subject": subject.name, "method": label, "learning_rate": float(rate), "seed": seed, **m,
                    "parameters": summary["trainable_parameters"], "train_seconds": round(summary["train_seconds"], 1),
                })
                print(json.dumps(rows[-1]), flush=True)
                write_results(Path(args.results), rows, samples, labels, subjects, args)
                trained_now = True
    if not trained_now:  # everything was finished already: rewrite the tables from the kept runs
        write_results(Path(args.results), rows, samples, labels, subjects, args)
    return 0


def previous_runs(out: Path) -> list[dict]:
    """The trained rows of an earlier (interrupted) run's ``subject_fidelity.json``."""
    path = out / "subject_fidelity.json"
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: cannot resume from {path}: {e}") from None
    return [r for r in rows if r.get("method") != "base"]


def write_results(out: Path, rows: list[dict], samples: dict, methods: list[str], subjects, args) -> None:
    """Markdown table (means over subjects and seeds), JSON rows and a sample grid."""
    out.mkdir(parents=True, exist_ok=True)
    # Variants resumed from an earlier run keep their rows in the table.
    methods = list(dict.fromkeys([*(r["method"] for r in rows if r["method"] != "base"), *methods]))
    cols = ["subject_similarity", "subject_shape", "prompt_background", "prompt_position", "ordinary_accuracy",
            "forgetting", "class_drift", "parameters", "train_seconds"]
    seeds = ",".join(str(s) for s in sorted({r["seed"] for r in rows if "seed" in r}))
    lines = [
        f"Subject benchmark: {len(subjects)} subjects, {args.steps} steps at batch {args.batch} with prior preservation, "
        f"training seeds {seeds}, {args.eval_seeds} images per prompt, {args.sample_steps} sampling steps, "
        f"guidance {args.guidance}. Means over subjects and finished seeds; ordinary prompts: "
        f"{len(ORDINARY)} prompts x {args.eval_seeds} images.",
        "",
        "| method @ learning rate | runs | subject similarity | subject shape | background | position | ordinary prompts | forgetting | class drift | parameters | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    extra_lines: list[str] = []
    for method in ["base", *methods]:
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            continue
        mean = {c: np.mean([r.get(c, 0.0) for r in sel]) for c in cols}
        trained = method != "base"
        forgetting = f"{mean['forgetting']:+.0%}" if trained else "-"
        drift = f"{mean['class_drift']:+.3f}" if trained else "-"
        seconds = f"{mean['train_seconds']:.0f}" if trained else "-"
        paper = " ".join(f"{k}={np.mean([r[k] for r in sel]):.3f}" for k in ("dino", "clip_i", "clip_t") if k in sel[0])
        if paper:
            extra_lines.append(f"- {method}: {paper}")
        lines.append(
            f"| {method} | {len(sel)} | {mean['subject_similarity']:.3f} | {mean['subject_shape']:.0%} | "
            f"{mean['prompt_background']:.0%} | {mean['prompt_position']:.0%} | {mean['ordinary_accuracy']:.0%} | "
            f"{forgetting} | {drift} | {int(mean['parameters']):,} | {seconds} |"
        )
    if extra_lines:
        lines += ["", "Paper metrics (local encoders):", *extra_lines]
    lines += tradeoff_lines(rows)
    atomic_write_bytes(out / "subject_fidelity.md", ("\n".join(lines) + "\n").encode())
    atomic_write_json(out / "subject_fidelity.json", rows)
    # Only variants with samples from this invocation (resumed rows have none); base alone
    # would replace an earlier picture with nothing to compare.
    shown = [m for m in ["base", *methods] if any((subject.name, m) in samples for subject in subjects)]
    if shown == ["base"]:
        shown = []
    tiles = [Image.fromarray(img).resize((96, 96), Image.NEAREST)
             for subject in subjects for m in shown for img in samples.get((subject.name, m), [])]
    if tiles:
        save_image_atomic(image_grid(tiles, cols=3 * len(shown)), out / "subject_fidelity.png")
    write_tradeoff_plot(out / "subject_tradeoff.png", rows)
    print("\n".join(lines))


def tradeoff_points(rows: list[dict]) -> dict[str, list[dict]]:
    """Per family (method plus option names, any learning rate or option value): one point per
    variant, by rate.

    A point holds the variant's mean subject similarity and ordinary-prompt accuracy over all
    its runs, and their standard deviations over training seeds (each seed first averaged over
    the subjects, so the bars show how much a whole training run moves).
    """
    families: dict[str, list[dict]] = {}
    for label in dict.fromkeys(r["method"] for r in rows if r["method"] != "base"):
        sel = [r for r in rows if r["method"] == label]
        head, _, rate_and_options = label.partition(" @ ")
        rate, _, options = rate_and_options.partition(" + ")
        # A number (COFT's bound, a block size) is swept like the rate: one family for every
        # value. A side or a set of layers is a different adapter: its own family.
        names, swept = [], []
        for option in options.split(" + ") if options else []:
            key, has_value, _ = option.partition("=")
            if has_value and key not in TEXT_OPTIONS:
                names.append(key)
                swept.append(option)
            else:
                names.append(option)
        family = f"{head} + " + ", ".join(names) if names else head
        per_seed = {}
        for r in sel:
            per_seed.setdefault(r.get("seed", 0), []).append((r["subject_similarity"], r["ordinary_accuracy"]))
        seed_means = np.array([np.mean(v, axis=0) for v in per_seed.values()])
        families.setdefault(family, []).append({
            # The point's label in the plot: its rate and the numbers swept with it.
            "label": label, "rate": float(rate), "tag": ", ".join([f"{float(rate):g}", *swept]),
            "similarity": float(np.mean([r["subject_similarity"] for r in sel])),
            "ordinary": float(np.mean([r["ordinary_accuracy"] for r in sel])),
            "similarity_std": float(seed_means[:, 0].std()), "ordinary_std": float(seed_means[:, 1].std()),
            "seeds": len(per_seed),
        })
    for points in families.values():
        points.sort(key=lambda q: (q["rate"], q["tag"]))
    return families


def frontier(points: list[dict]) -> list[tuple[float, float]]:
    """The best trade-offs of one family: ``(similarity, ordinary)`` points that no other point
    beats on both (more subject and less forgetting), by rising similarity."""
    pts = sorted(((q["similarity"], q["ordinary"]) for q in points), key=lambda p: (-p[0], -p[1]))
    best, out = -1.0, []
    for sim, ordinary in pts:  # from the most similar down: keep a point if it forgets less than all above it
        if ordinary > best:
            out.append((sim, ordinary))
            best = ordinary
    return out[::-1]


def ordinary_at(front: list[tuple[float, float]], similarity: float) -> float | None:
    """Ordinary-prompt accuracy on a frontier at ``similarity`` (linear between its points),
    or ``None`` outside the frontier's span: no extrapolation."""
    if not front or not front[0][0] <= similarity <= front[-1][0]:
        return None
    for (s0, o0), (s1, o1) in zip(front, front[1:]):
        if s0 <= similarity <= s1:
            return o0 if s1 == s0 else o0 + (o1 - o0) * (similarity - s0) / (s1 - s0)
    return front[-1][1]


def tradeoff_lines(rows: list[dict], baseline: str = "lora", step: float = 0.025) -> list[str]:
    """Markdown: each family's ordinary-prompt accuracy against the baseline's at equal
    subject similarity, on a grid over the span both frontiers cover (families with at least
    two rates only: one point has no span).

    A family with options (``oft + unet_targets=unet-cross-kv``) is compared with the
    baseline under the same options (``lora + unet_targets=unet-cross-kv``) when that has two
    rates or more, else with the plain baseline.
    """
    families = tradeoff_points(rows)
    lines = []
    for family, points in families.items():
        if family == baseline or len(points) < 2:
            continue
        _, sep, options = family.partition(" + ")
        against = f"{baseline}{sep}{options}"
        if against == family or len(families.get(against, [])) < 2:
            against = baseline
        if len(families.get(against, [])) < 2:
            continue
        front, base_front = frontier(points), frontier(families[against])
        lo, hi = max(front[0][0], base_front[0][0]), min(front[-1][0], base_front[-1][0])
        if hi <= lo:
            continue
        grid = [lo + i * step for i in range(int((hi - lo) / step + 1e-9) + 1)]
        if hi - grid[-1] > 1e-9:
            grid.append(hi)
        cells = []
        for sim in grid:
            a, b = ordinary_at(front, sim), ordinary_at(base_front, sim)
            cells.append(f"{sim:.3f}: {a:.0%} vs {b:.0%}")
        lines.append(f"- {family} vs {against}: " + "; ".join(cells))
    if lines:
        lines = ["", f"Ordinary prompts right at equal subject similarity (each method's best trade-offs over its "
                     f"learning rates, linear between rates; method vs {baseline}):", *lines]
    return lines


def _shorten(text: str, most: int = 44) -> str:
    """A legend label of at most ``most`` characters (a long layer list would squeeze the plot)."""
    return text if len(text) <= most else text[: most - 3] + "..."


def write_tradeoff_plot(path: Path, rows: list[dict]) -> None:
    """Subject similarity against ordinary-prompt accuracy, one line per method through its
    learning rates: up and to the right is better (more of the subject, less forgetting)."""
    families = tradeoff_points(rows)
    if not families:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6))
    # More families than the ten-colour cycle: marker and line style change with each pass
    # through the colours, so no two lines look alike.
    colours, markers, dashes = plt.get_cmap("tab10").colors, "osD^v", ("-", "--", ":", "-.")
    for i, (family, points) in enumerate(families.items()):
        x = [q["similarity"] for q in points]
        y = [100 * q["ordinary"] for q in points]
        style = (dict(lw=2.5, color="k", marker="o") if family == "lora"
                 else dict(lw=1.2, color=colours[i % 10], marker=markers[i // 10 % len(markers)], ls=dashes[i // 10 % len(dashes)]))
        line = ax.errorbar(x, y, xerr=[q["similarity_std"] for q in points],
                           yerr=[100 * q["ordinary_std"] for q in points], capsize=2,
                           label=f"{family} (peft)" if family == "lora" else _shorten(family), **style)
        for q in points:
            ax.annotate(q["tag"], (q["similarity"], 100 * q["ordinary"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points", color=line[0].get_color())
    base = [r for r in rows if r["method"] == "base"]
    if base:
        ax.scatter([np.mean([r["subject_similarity"] for r in base])],
                   [100 * np.mean([r["ordinary_accuracy"] for r in base])], marker="*", s=150, c="k", label="base model")
    ax.set_xlabel("subject similarity (higher: more of the subject)")
    ax.set_ylabel("ordinary prompts right after training, % (higher: less forgetting)")
    ax.set_title("Subject fidelity against forgetting, by learning rate\n(means over subjects and seeds; bars: std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    sys.exit(main())
