#!/usr/bin/env python
"""BOFT's rotation alone: factor by factor against the product's dense blocks.

    python benchmarks/bench_butterfly.py [--repeats 15] [--threads N] [--out benchmarks/results]

The product of BOFT's ``m`` butterfly factors (block ``b``) is block-diagonal with dense
``B x B`` blocks, ``B = b 2^(m-1)``.  The adapter applies those blocks in one batched product
(building them from the factors once per call) where ``B <= DENSE_GROUP_MAX``; this times one
forward plus backward of rotating ``N`` activation rows both ways, side by side (alternating,
same inputs), at SD 1.5's attention shapes (batch 2), and checks that both give the same
rows.  Writes ``butterfly_dense.md`` and ``butterfly_dense.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ortho_diffusion.rotations import ButterflyCayleyRotation
from ortho_diffusion.rotations.base import Mode

RESULTS = Path(__file__).resolve().parent / "results"

#: (width, rows, block size, factors): SD 1.5's three attention widths with batch 2 of their
#: image tokens, the layouts of the adapter benchmark (b = 8, 2 and 4 factors) and longer ones.
CASES = [
    (320, 8192, 8, 2), (320, 8192, 8, 4), (640, 2048, 8, 2), (640, 2048, 8, 4),
    (1280, 512, 8, 2), (1280, 512, 8, 4), (1280, 512, 16, 4), (1280, 512, 8, 6),
]


def time_pair(rotation: ButterflyCayleyRotation, x: torch.Tensor, repeats: int) -> tuple[list[float], list[float]]:
    """Forward plus backward seconds, factor by factor and with dense blocks, alternating."""

    def factors() -> None:
        rotation._apply_factors(x, 1.0, rotation.n_factors, Mode.FORWARD).sum().backward()

    def dense() -> None:
        rotation.apply(x).sum().backward()

    times: dict[str, list[float]] = {"factors": [], "dense": []}
    for i in range(repeats + 2):
        for name, fn in (("factors", factors), ("dense", dense)):
            t0 = time.perf_counter()
            fn()
            if i >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
    return times["factors"], times["dense"]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cases", default=None, help="override, e.g. '64:32:4:2' (width:rows:block:factors)")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cases = [tuple(int(v) for v in c.split(":")) for c in a.cases.split(",")] if a.cases else CASES
    rows = []
    for width, n, b, m in cases:
        torch.manual_seed(0)
        rotation = ButterflyCayleyRotation(width, b, m)
        with torch.no_grad():
            rotation.generators.normal_(std=0.1)
        x = torch.randn(n, width, requires_grad=True)
        with torch.no_grad():
            diff = (rotation._apply_factors(x, 1.0, m, Mode.FORWARD) - rotation.apply(x)).abs().max().item()
        t_fac, t_dense = time_pair(rotation, x, a.repeats)
        ratios = [f / d for f, d in zip(t_fac, t_dense)]
        rows.append({
            "width": width, "rows": n, "block_size": b, "n_factors": m, "group_size": rotation.group_size,
            "factors_ms": 1e3 * statistics.median(t_fac), "dense_ms": 1e3 * statistics.median(t_dense),
            "speedup_median": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "max_abs_diff": diff,
        })
        r = rows[-1]
        print(f"d={width} N={n} b={b} m={m} B={r['group_size']}: factors {r['factors_ms']:.1f} ms, "
              f"dense {r['dense_ms']:.1f} ms, x{r['speedup_median']:.2f}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "butterfly_dense.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# BOFT rotation: factor by factor against the product's dense blocks",
        "",
        f"Machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        f"One forward plus backward of rotating the rows; median of {a.repeats} alternating repeats "
        "after two warm-up rounds; `speedup` is per repeat (factors / dense), median and range.",
        "",
        "| width | rows | b | factors | B | factor by factor ms | dense blocks ms | speedup (range) | max abs diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']} | {r['rows']} | {r['block_size']} | {r['n_factors']} | {r['group_size']} | "
            f"{r['factors_ms']:.1f} | {r['dense_ms']:.1f} | {r['speedup_median']:.2f}x "
            f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {r['max_abs_diff']:.1e} |"
        )
    (out / "butterfly_dense.md").write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
