#!/usr/bin/env python
"""Start the ortho-diffusion web app.

    .venv/bin/python app.py                       # embedded model, http://127.0.0.1:7860
    .venv/bin/python app.py --model path/to/sd15  # any local diffusers SD 1.x/2.x/XL folder
    .venv/bin/python app.py --port 7861 --data-dir ~/ortho-data

All the logic lives in ``ortho_diffusion/app/``; this file only reads the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ortho-diffusion web app: generate, slide between rotations, train.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: localhost only; 0.0.0.0 exposes the app to your network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default=None, help="local diffusers pipeline folder (default: the embedded model)")
    p.add_argument("--data-dir", default="data", help="where adapters and training runs are stored")
    p.add_argument("--max-upload-mb", type=int, default=100, help="largest accepted upload")
    p.add_argument("--quiet", action="store_true", help="less start-up output")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Offline by design: a hub lookup would only spend time retrying before failing.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ortho_diffusion.app import AppConfig, launch
    from ortho_diffusion.app.integrations import NotAvailableError, default_model_path
    from ortho_diffusion.diffusion import ModelFolderError

    try:
        if args.model:
            model = Path(args.model).expanduser()
            label = model.resolve().name
        else:
            model = default_model_path()
            label = f"{model.name} (embedded)"
        config = AppConfig(model_path=model, data_dir=Path(args.data_dir).expanduser(), model_label=label,
                           max_upload_mb=args.max_upload_mb)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: binding to {args.host}: anyone who can reach this address can use the app "
                  "(and start training jobs)", file=sys.stderr)
        launch(config, host=args.host, port=args.port, quiet=args.quiet)
    except (NotAvailableError, ModelFolderError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
