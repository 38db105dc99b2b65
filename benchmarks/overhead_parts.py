"""Where our OFT's training overhead over the frozen base goes, at one layer width.

    .venv/bin/python benchmarks/overhead_parts.py --width 1280 --tokens 256 --rounds 30

The layer benchmark's attention projections (``bench_adapters.py``), with parts of the
adapter taken away, every variant timed round-robin in one run (one training step each per
round; ratios per round against the base step of the same round, then the median):

* OFT and peft LoRA r=16 on all six projections, as in the layer benchmark;
* both on the self-attention's four projections only (no cross-attention ``to_k``/``to_v``,
  whose input-side rotation needs a gradient through the frozen weight);
* OFT with its rotation blocks held as plain parameters (no Cayley map per step);
* OFT on the output side.

Writes ``overhead_parts_<width>.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_adapters as bench  # noqa: E402

import ortho_diffusion as od  # noqa: E402
from ortho_diffusion.adapter import OrthogonalAdapter  # noqa: E402
from ortho_diffusion.files import atomic_write_bytes  # noqa: E402

SELF_ATTENTION = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"]


def _lora_self_attention(model: torch.nn.Module, rank: int):
    from peft import LoraConfig

    pattern = r".*attn1\.(to_q|to_k|to_v|to_out\.0)"
    return bench.attach_peft(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=pattern))


def _oft_self_attention(model: torch.nn.Module, block: int):
    od.attach(model, od.AdapterConfig(targets=SELF_ATTENTION, method="oft", block_size=block))
    return lambda: od.detach(model)


def _oft_fixed_blocks(model: torch.nn.Module, block: int):
    """OFT whose blocks are parameters themselves: the same products, no Cayley map (the unused
    generators stay in the optimizer, which skips them: they get no gradient)."""
    undo = bench.attach_ours(model, method="oft", block_size=block)
    for module in model.modules():
        if isinstance(module, OrthogonalAdapter):
            for rotation in module.rotations.values():
                with torch.no_grad():
                    rotation.register_parameter("fixed_blocks", torch.nn.Parameter(rotation.blocks().clone()))
                rotation.blocks = types.MethodType(lambda self, scale=1.0, dtype=None: self.fixed_blocks, rotation)
    return undo


def variants(s: bench.Settings) -> list[bench.Variant]:
    """The base first, then the full and reduced variants."""
    known = {v.key: v for v in bench.training_variants(s)}
    b, r = s.oft_block, s.lora_rank
    return [
        known["base"], known["peft/lora"], known["ours/oft/auto"],
        bench.Variant("peft/lora-self-attention", "peft", "LoRA, self-attention only", "", "",
                      lambda m: _lora_self_attention(m, r)),
        bench.Variant("ours/oft-self-attention", "ours", "OFT, self-attention only", "auto", "",
                      lambda m: _oft_self_attention(m, b)),
        bench.Variant("ours/oft-fixed-blocks", "ours", "OFT, blocks held fixed (no Cayley map)", "auto", "",
                      lambda m: _oft_fixed_blocks(m, b)),
        known["ours/oft-out/auto"],
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--tokens", type=int, default=256, help="image tokens per sample (batch 2)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    s = bench.make_settings(argparse.Namespace(
        quick=False, repeats=a.rounds, warmup=2, oft_block=32, boft_block=8, lora_rank=16, unet_batch=1,
        unet_repeats=1, widths=f"{a.width}:{a.tokens}", skip_unet=True, only=""))
    cases = [bench.prepare(v, bench.layer_model(s, a.width), bench.layer_inputs(s, a.width, a.tokens), bench.layer_loss)
             for v in variants(s)]
    bench.run_round_robin(cases, warmup=2, repeats=a.rounds, desc=f"parts d={a.width}")
    base = cases[0].times
    rows = []
    for c in cases:
        ratios = [t / b for t, b in zip(c.times, base)]
        rows.append({"key": c.variant.key, "method": c.variant.method,
                     "step_ms": 1e3 * statistics.median(c.times), "x_base": statistics.median(ratios)})
    lines = [
        f"# OFT's overhead by parts, width {a.width}, {a.tokens} image tokens, batch 2",
        "",
        f"Command: `python benchmarks/overhead_parts.py --width {a.width} --tokens {a.tokens} "
        f"--rounds {a.rounds} --threads {a.threads}`. {a.rounds} rounds, one training step per variant "
        "each; `x base`: median over rounds of the step over the same round's base step.",
        "",
        "| variant | step ms | x base |",
        "|---|---:|---:|",
        *[f"| {r['key']} ({r['method']}) | {r['step_ms']:.1f} | {r['x_base']:.3f} |" for r in rows],
        "",
    ]
    out = Path(a.out) / f"overhead_parts_{a.width}.md"
    atomic_write_bytes(out, "\n".join(lines).encode())
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
