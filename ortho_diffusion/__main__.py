"""Command line: ``python -m ortho_diffusion <command> ...``.

Commands register themselves in :data:`COMMANDS` (name -> (add_arguments, run)), so new
subcommands are one function pair each.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here works on local folders

#: name -> (function adding the subcommand's arguments, function running it; returns an exit code)
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``run(args) -> int`` as subcommand ``name``."""

    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (add_arguments, run)
        return run

    return register


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="native adapter file (.safetensors written by od.save_adapter)")
    p.add_argument("--format", required=True, choices=["peft", "lycoris", "merged"])
    p.add_argument("--out", required=True, help="folder (peft, merged) or .safetensors file (lycoris)")
    p.add_argument("--base", help="base pipeline or model folder (needed for merged and LyCORIS .diff layers)")
    p.add_argument("--scale", type=float, default=1.0, help="strength baked into the export (default 1)")
    p.add_argument("--mode", default="auto", choices=["auto", "native", "diff"],
                   help="LyCORIS: native keys where exact and .diff elsewhere (auto), native only, or all .diff")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="LyCORIS .diff tensors; merged weights (float32 keeps the base's dtype)")


@command("export", _export_arguments)
def _export(args: argparse.Namespace) -> int:
    from .formats.convert import ExportError
    from .formats.export import export
    from .formats.native import AdapterFileError

    try:
        report = export(args.adapter, args.format, args.out, base=args.base, scale=args.scale,
                        mode=args.mode, dtype=args.dtype)
    except (ExportError, AdapterFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ortho_diffusion", description="ortho-diffusion tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=(COMMANDS[name][1].__doc__ or "").strip() or None))
    args = parser.parse_args(argv)
    return COMMANDS[args.command][1](args)


_export.__doc__ = "write a native adapter as a peft folder, a LyCORIS/kohya file or a merged pipeline"

if __name__ == "__main__":
    sys.exit(main())
