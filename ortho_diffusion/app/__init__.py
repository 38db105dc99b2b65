"""The Gradio app: generate with adapters, slide between base and finetuned rotations, train.

    from ortho_diffusion.app import AppConfig, launch
    launch(AppConfig(model_path=..., data_dir="data"), host="127.0.0.1", port=7860)

``app.py`` at the repository root parses the command line and calls :func:`launch`.
Modules: ``state`` (the pipeline and its adapters, behind a lock), ``library`` (the adapter
folder), ``jobs`` (training subprocesses), ``uploads`` (checks on uploaded files),
``integrations`` (feature detection), ``actions`` (what each button does), ``ui`` (the Blocks).
"""

from __future__ import annotations

import os
import signal

from .actions import AppConfig, AppContext

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def create_app(config: AppConfig):
    """``(blocks, context)``: the app's Gradio Blocks (queued, not launched) and its state."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from .ui import build_ui

    context = AppContext(config)
    demo = build_ui(context)
    # Generation is serialised by its own concurrency id; this default covers the small events.
    demo.queue(default_concurrency_limit=4)
    return demo, context


def launch(config: AppConfig, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, quiet: bool = False) -> None:
    """Build the app and serve it (blocks until interrupted)."""
    import gradio as gr

    from .ui import CSS

    demo, context = create_app(config)

    def terminate(signum, frame):  # SIGTERM ends the app like Ctrl-C: atexit then stops any job
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=f"{int(config.max_upload_mb)}mb",
        share=False,  # never tunnel to the internet from here
        show_error=True,
        quiet=quiet,
        theme=gr.themes.Soft(),
        css=CSS,
        footer_links=["api"],
        ssr_mode=False,
    )


__all__ = ["AppConfig", "AppContext", "DEFAULT_HOST", "DEFAULT_PORT", "create_app", "launch"]
