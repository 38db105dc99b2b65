"""The Gradio page: four tabs laid out over :class:`~ortho_diffusion.app.actions.AppContext`.

Every event has an explicit ``api_name`` so the app can be scripted with ``gradio_client``
(``/generate``, ``/sweep``, ``/train_subject``, ``/train_control``, ``/stop_training``,
``/training_status``, ``/list_adapters``, ``/rename_adapter``, ``/delete_adapter``,
``/download_adapter``, ``/export_adapter``, ``/import_adapter``, ``/preview_control``...).
Errors meant for the user become ``gr.Error`` messages; anything unexpected is logged with its
traceback and reported as one line, and the server keeps serving.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import time
from typing import Any, Callable

import gradio as gr
import pandas as pd
from PIL import Image

from ..default_model import DEFAULT_GUIDANCE_SCALE
from ..formats.native import AdapterFileError
from . import integrations
from .actions import CONTROL_TYPES, METHOD_HELP, PRESETS, USER_ERRORS, AppContext, TrainSettings
from .jobs import Job
from .library import TABLE_HEADERS, describe
from .uploads import UploadError, open_checked_image

log = logging.getLogger("ortho_diffusion.app")

CSS = """
.od-progress {width: 100%; height: 14px; background: var(--block-background-fill);
  border: 1px solid var(--border-color-primary); border-radius: 7px; overflow: hidden;}
.od-progress > div {height: 100%; background: var(--color-accent); transition: width .4s;}
.od-note {font-size: 0.9em; opacity: 0.85;}
/* Generated images are small (64x64 for the embedded model): show them large and crisp. */
#output-image img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;}
#sweep-gallery img, .od-samples img {image-rendering: pixelated;}
"""


def user_error(message: str) -> gr.Error:
    """The app's error message: no traceback in the log, and it stays on screen until
    dismissed, since one that vanished while the user looked elsewhere would leave them
    guessing what happened."""
    return gr.Error(message, print_exception=False, duration=None)


class CheckedImage(gr.Image):
    """``gr.Image`` whose uploads are checked by the app before Gradio decodes them.

    A non-image or an oversized image then gets the same short message as everywhere else in
    the app instead of Gradio's generic preprocessing error.
    """

    is_template = True  # rendered by the frontend as a plain Image

    def preprocess(self, payload):
        if payload is not None and getattr(payload, "path", None):
            try:
                open_checked_image(payload.path, name=getattr(payload, "orig_name", None))
            except UploadError as err:
                raise user_error(str(err)) from None
        return super().preprocess(payload)


def _message(err: BaseException) -> str:
    if isinstance(err, (*USER_ERRORS, AdapterFileError)):
        return str(err)
    log.exception("unexpected error in the app", exc_info=err)
    return f"Unexpected error ({type(err).__name__}: {err}). The server keeps running; details are in its log."


def user_errors(fn: Callable) -> Callable:
    """Turn exceptions into :func:`user_error` messages (plain and generator functions alike)."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as err:
                raise user_error(_message(err)) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as err:
            raise user_error(_message(err)) from None

    return wrapper


# ----------------------------------------------------------------- job panel
def _progress_html(job: Job | None) -> str:
    if job is None:
        return '<div class="od-progress"><div style="width:0%"></div></div>'
    pct = 100.0 * job.step / job.total if job.total else 0.0
    if job.state == "finished":
        pct = 100.0
    return f'<div class="od-progress" title="{pct:.0f}%"><div style="width:{pct:.1f}%"></div></div>'


def _status_markdown(job: Job | None, kind: str) -> str:
    if job is None:
        return "No training job yet. Fill in the form and press **Start training**."
    if job.kind != kind:
        if job.active:
            return f"A **{job.kind}** training job (`{job.name}`) is running; only one job runs at a time."
        return "No training job in this tab yet. Fill in the form and press **Start training**."
    elapsed = (job.ended or time.time()) - job.started
    parts = [f"**{job.state.capitalize()}**: {job.kind} adapter `{job.name}`"]
    if job.active:
        if job.phase == "training" and job.total:
            parts.append(f"step {job.step} / {job.total}")
        else:
            parts.append(f"{job.phase}…")
    if job.losses:
        parts.append(f"loss {job.losses[-1][1]:.4f}")
    parts.append(f"{elapsed:.0f} s")
    text = " · ".join(parts)
    if job.message:
        text += f"\n\n{job.message}"
    return text


def _loss_frame(job: Job | None) -> pd.DataFrame:
    if job is None or not job.losses:
        return pd.DataFrame({"step": [], "loss": []})
    steps, losses = zip(*job.losses[-2000:])
    return pd.DataFrame({"step": list(steps), "loss": list(losses)})


def _samples(job: Job | None) -> list[tuple[Image.Image, str]]:
    if job is None:
        return []
    out = []
    for path in job.samples()[-6:]:
        try:
            with Image.open(path) as img:
                out.append((img.convert("RGB"), "final samples" if path.name == "samples.png" else path.stem))
        except OSError:
            continue  # a file being replaced right now; it is shown on the next tick
    return out


def job_panel(job: Job | None, kind: str) -> tuple:
    """The seven values of a training tab's status panel."""
    mine = job if job is not None and job.kind == kind else None
    return (
        _status_markdown(job, kind),
        _progress_html(mine),
        _loss_frame(mine),
        _samples(mine),
        mine.display_command if mine else "",
        "\n".join(list(mine.log)[-40:]) if mine else "",
        mine.to_dict() if mine else {},
    )


def _signature(job: Job | None) -> tuple:
    if job is None:
        return ()
    return (id(job), job.state, job.step, len(job.losses), len(job.samples()), len(job.log), job.message, job.phase)


# ----------------------------------------------------------------------- UI
def build_ui(ctx: AppContext) -> gr.Blocks:
    """The Blocks of the app (not launched)."""
    lim = ctx.state.limits
    picker = ctx.picker_choices()
    subjects = [i for i in ctx.adapters(fitting_only=True) if not i.is_control]
    first = subjects[0] if subjects else None
    default_prompt = (first.instance_prompt if first and first.instance_prompt else "") or (
        "a large red circle in the center, on a white background"
    )
    builtin_subjects = integrations.builtin_subjects()
    control_script = _available(integrations.control_training_script)
    export_formats = integrations.export_formats()

    with gr.Blocks(title="ortho-diffusion") as demo:
        gr.Markdown(
            "## ortho-diffusion: orthogonal finetuning for diffusion models\n"
            f"Model **{html.escape(ctx.state.label)}** ({lim.native}×{lim.native}) · adapters and runs in "
            f"`{ctx.data_dir}`\n\n"
            "**Generate** images with the base model or with adapters and slide between them · "
            "**Train** a new adapter from a few images · **Adapters**: rename, delete, download, export."
        )
        with gr.Tabs():
            # ------------------------------------------------------ Generate
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=5):
                        prompt = gr.Textbox(label="Prompt", value=default_prompt, lines=2, elem_id="prompt")
                        negative = gr.Textbox(label="Negative prompt", placeholder="what the image should not show")
                        adapters = gr.Dropdown(
                            choices=picker,
                            value=[first.name] if first else [],
                            multiselect=True,
                            allow_custom_value=True,  # API callers may name adapters trained after page load
                            label="Adapters",
                            info="Subject and control adapters can be combined. None selected = the base model.",
                            elem_id="adapters",
                        )
                        t = gr.Slider(
                            0.0, lim.max_t, value=1.0, step=0.05, label="Rotation strength t",
                            info="0 = base model · 1 = finetuned · above 1 exaggerates. Moving it regenerates with the same seed.",
                            elem_id="t-slider",
                        )
                        with gr.Row():
                            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                            sweep_btn = gr.Button("Sweep across t", elem_id="sweep-btn")
                        with gr.Accordion("Settings", open=False):
                            with gr.Row():
                                seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=2**32 - 1)
                                steps = gr.Slider(1, lim.max_steps, value=25, step=1, label="Steps")
                                guidance = gr.Slider(0.0, lim.max_guidance, value=DEFAULT_GUIDANCE_SCALE, step=0.5, label="Guidance")
                            with gr.Row():
                                width = gr.Slider(lim.size_step, lim.max_size, value=lim.native, step=lim.size_step, label="Width")
                                height = gr.Slider(lim.size_step, lim.max_size, value=lim.native, step=lim.size_step, label="Height")
                        with gr.Accordion("Sweep settings", open=False):
                            with gr.Row():
                                sweep_count = gr.Slider(2, 12, value=6, step=1, label="Images")
                                sweep_end = gr.Slider(0.25, lim.max_t, value=lim.max_t, step=0.05, label="From t = 0 to")
                                sweep_over = gr.Radio([("t", "t"), ("BOFT factors", "factors")], value="t", label="Sweep over")
                        with gr.Accordion("BOFT per-factor mode", open=False):
                            gr.Markdown(
                                "A BOFT rotation is a product of butterfly factors. Keep only the first *k* "
                                "(at strength t) to see what each factor adds. Other methods ignore this.",
                                elem_classes="od-note",
                            )
                            with gr.Row():
                                per_factor = gr.Checkbox(label="Per-factor mode", value=False)
                                n_factors = gr.Slider(0, max(1, ctx.max_factors([first.name]) if first else 1), value=1,
                                                      step=1, label="Active factors k")
                        with gr.Accordion("Control image (for control adapters)", open=False):
                            with gr.Row():
                                control_file = CheckedImage(type="filepath", format="png", label="Control image",
                                                            sources=["upload", "clipboard"])
                                control_preview = gr.Image(label="Control map (what the adapter sees)", interactive=False,
                                                           format="png")
                            preprocessor = gr.Radio(
                                list(integrations.PREPROCESSOR_NAMES), value="Canny edges", label="Preprocessor",
                                info="Segmentation and control maps are used as given.",
                            )
                            control_scale = gr.Slider(0.0, lim.max_control_scale, value=1.0, step=0.05,
                                                      label="Control strength")
                    with gr.Column(scale=4):
                        image = gr.Image(label="Image", format="png", interactive=False, height=384, elem_id="output-image")
                        status = gr.Markdown("Press **Generate**.", elem_id="generate-status")
                        sweep_gallery = gr.Gallery(label="Sweep (same seed)", columns=6, height="auto", format="png",
                                                   elem_id="sweep-gallery")

            # ------------------------------------------------- Train a subject
            with gr.Tab("Train a subject", id="train-subject"):
                gr.Markdown(
                    "Teach the model **one subject** from a few pictures (3–10 is typical). The subject gets a rare "
                    "*token*; its *class* says what kind of thing it is. The adapter learns the prompt "
                    "“a ‹token› ‹class›”."
                    + (" With the embedded shapes model use a reserved token (sks, qwe, zxc, vbn) and a shape "
                       "(circle, square, triangle, star) as the class." if "shapes" in ctx.state.label else "")
                )
                with gr.Row():
                    with gr.Column(scale=5):
                        s_source = gr.Radio(
                            [("My images", "upload")] + ([("Built-in example subject", "builtin")] if builtin_subjects else []),
                            value="upload", label="Images",
                        )
                        s_files = gr.File(file_count="multiple", file_types=["image"], label="Subject images",
                                          elem_id="subject-files")
                        s_builtin = gr.Dropdown(
                            [(f"{b.name} (“{b.instance_prompt}”)", b.name) for b in builtin_subjects],
                            value=builtin_subjects[0].name if builtin_subjects else None,
                            label="Built-in example subject", visible=False,
                        )
                        with gr.Row():
                            s_token = gr.Textbox(label="Token", value="sks", max_lines=1)
                            s_class = gr.Textbox(label="Class", value="circle", max_lines=1)
                            s_name = gr.Textbox(label="Adapter name", value="my-subject", max_lines=1,
                                                info="letters, digits, - and _")
                        s_method, s_method_help, s_preset, s_preset_help, s_steps, adv, s_side = _method_and_preset("subject")
                        s_prior = gr.Checkbox(label="Prior preservation (generates class images first)", value=False)
                        with gr.Row():
                            s_start = gr.Button("Start training", variant="primary", elem_id="subject-start")
                            s_stop = gr.Button("Stop", variant="stop", elem_id="subject-stop")
                    with gr.Column(scale=5, elem_id="train-subject-panel"):
                        s_panel = _job_panel_components()

            # ------------------------------------------------- Train a control
            with gr.Tab("Train a control", id="train-control"):
                gr.Markdown(
                    "Teach the model to follow a **control image** (edges, face landmarks or a segmentation map). "
                    "Training pairs come from a zip or folder of images (and their maps), or from the built-in "
                    "shapes-world task."
                    + ("" if control_script else f"\n\n⚠️ {_unavailable_reason(integrations.control_training_script)}")
                )
                with gr.Row():
                    with gr.Column(scale=5):
                        c_source = gr.Radio(
                            [("Built-in shapes-world task", "builtin"), ("Zip archive", "zip"), ("Folder", "folder")],
                            value="builtin", label="Training data",
                        )
                        c_zip = gr.File(file_count="single", file_types=[".zip"], label="Zip of training images", visible=False)
                        c_folder = gr.File(file_count="directory", label="Folder of training images", visible=False)
                        with gr.Row():
                            c_type = gr.Radio(list(CONTROL_TYPES), value="Canny edges", label="Control type")
                            c_name = gr.Textbox(label="Adapter name", value="my-control", max_lines=1)
                        c_method, c_method_help, c_preset, c_preset_help, c_steps, c_adv, c_side = _method_and_preset("control")
                        with gr.Row():
                            c_start = gr.Button("Start training", variant="primary", interactive=bool(control_script),
                                                elem_id="control-start")
                            c_stop = gr.Button("Stop", variant="stop", elem_id="control-stop")
                    with gr.Column(scale=5, elem_id="train-control-panel"):
                        c_panel = _job_panel_components()

            # -------------------------------------------------------- Adapters
            with gr.Tab("Adapters", id="adapters"):
                gr.Markdown("Your adapters and the built-in ones. Click a row to select it.")
                table = gr.Dataframe(
                    value=[describe(i, ctx.state.fingerprints) for i in ctx.adapters()],
                    headers=TABLE_HEADERS, interactive=False, wrap=True, elem_id="adapter-table",
                )
                a_message = gr.Markdown("")
                with gr.Row():
                    with gr.Column(scale=4):
                        a_selected = gr.Dropdown([i.name for i in ctx.adapters()], label="Selected adapter", value=None,
                                                 info="click a row of the table, or pick one here",
                                                 allow_custom_value=True)  # API callers name adapters made later
                        a_details = gr.JSON(label="Metadata")
                    with gr.Column(scale=4):
                        with gr.Row():
                            a_new_name = gr.Textbox(label="New name", max_lines=1)
                            a_rename = gr.Button("Rename")
                        with gr.Row():
                            a_delete = gr.Button("Delete", variant="stop")
                            a_confirm = gr.Button("Yes, delete it for good", variant="stop", visible=False)
                            a_cancel = gr.Button("Keep it", visible=False)
                        with gr.Row():
                            a_download = gr.Button("Download")
                            a_export_fmt = gr.Radio(export_formats or list(integrations.DEFAULT_EXPORT_FORMATS),
                                                    value=(export_formats or ["peft"])[0], label="Export format",
                                                    interactive=bool(export_formats))
                            a_export_scale = gr.Number(label="Strength t baked in", value=1.0, minimum=0.0,
                                                       maximum=lim.max_t, interactive=bool(export_formats))
                            a_export = gr.Button("Export", interactive=bool(export_formats))
                        if not export_formats:
                            gr.Markdown("Export to peft / LyCORIS / merged models is not available in this version yet.",
                                        elem_classes="od-note")
                        a_file = gr.File(label="File to save", interactive=False, height=90)
                        with gr.Accordion("Import an adapter file", open=False):
                            a_upload = gr.File(file_types=[".safetensors"], label="ortho-diffusion adapter (.safetensors)")
                            a_import_name = gr.Textbox(label="Name (default: the file name)", max_lines=1)
                            a_import = gr.Button("Import")

        timer = gr.Timer(1.0)
        seen = gr.State(())

        # ================================================================ wiring
        gen_inputs = [prompt, negative, seed, steps, guidance, width, height, adapters, t, per_factor, n_factors,
                      control_file, preprocessor, control_scale]

        @user_errors
        def generate(prompt, negative_prompt, seed, steps, guidance, width, height, adapters, t, per_factor,
                     n_factors, control_image, preprocessor, control_scale):
            req = ctx.request(prompt, negative_prompt, seed, steps, guidance, width, height, adapters, t, per_factor,
                              n_factors, control_image, preprocessor, control_scale)
            for img, text in ctx.generate(req):
                yield img, text

        gr.on(
            # input, not release: release misses values typed into the slider's number box.
            [generate_btn.click, prompt.submit, t.input],
            generate, gen_inputs, [image, status], api_name="generate", trigger_mode="always_last",
            concurrency_limit=1, concurrency_id="model",
        )

        @user_errors
        def sweep(prompt, negative_prompt, seed, steps, guidance, width, height, adapters, t, per_factor,
                  n_factors, control_image, preprocessor, control_scale, count, t_end, over):
            req = ctx.request(prompt, negative_prompt, seed, steps, guidance, width, height, adapters, t, per_factor,
                              n_factors, control_image, preprocessor, control_scale)
            start = time.perf_counter()
            items = ctx.sweep(req, count, t_end, over)
            return items, f"**Sweep** of {len(items)} images, seed {req.seed} · {time.perf_counter() - start:.1f} s"

        sweep_btn.click(sweep, gen_inputs + [sweep_count, sweep_end, sweep_over], [sweep_gallery, status],
                        api_name="sweep", concurrency_limit=1, concurrency_id="model")

        @user_errors
        def preview_control(path, name, w, h):
            if not path:
                return None
            return ctx.control_map(path, name, int(w), int(h))

        gr.on([control_file.change, preprocessor.change], preview_control,
              [control_file, preprocessor, width, height], control_preview, api_name="preview_control")

        def picked(names):
            """Fit the factor slider to the BOFT adapters and the preprocessor to a control adapter."""
            top = ctx.max_factors(names or [])
            tasks = [i.control_task for i in ctx.adapters() if i.name in (names or []) and i.is_control]
            suggested = {"canny": "Canny edges", "landmarks": "Face landmarks",
                         "segmentation": "Segmentation map (as given)"}.get(tasks[0] if tasks else "")
            return (gr.update(maximum=max(1, top), value=top or 1, interactive=bool(top)),
                    gr.update(value=suggested) if suggested else gr.skip())

        adapters.change(picked, adapters, [n_factors, preprocessor], api_name="adapters_picked",
                        api_visibility="undocumented")

        # ---------------------------------------------------------- training
        def settings(method, steps_, lr, batch, block, factors, text_enc, ckpt, val, seed_, side):
            return TrainSettings.from_form(method, steps_, lr, batch, block, factors, text_enc, ckpt, val, seed_, side)

        def follow(job: Job, kind: str):
            last = None
            while True:
                sig = _signature(job)
                if sig != last:
                    last = sig
                    yield job_panel(job, kind)
                if not job.active:
                    break
                time.sleep(0.5)

        @user_errors
        def train_subject(name, source, files, builtin, token, class_word, method, preset, steps_, lr, batch, block,
                          factors, text_enc, ckpt, val, seed_, prior, side="input"):
            job = ctx.start_subject(name, source, files, builtin, token, class_word,
                                    settings(method, steps_, lr, batch, block, factors, text_enc, ckpt, val, seed_, side),
                                    prior=bool(prior))
            yield from follow(job, "subject")

        s_outputs = list(s_panel)
        train_event = s_start.click(
            train_subject,
            [s_name, s_source, s_files, s_builtin, s_token, s_class, s_method, s_preset, s_steps, *adv, s_prior, s_side],
            s_outputs, api_name="train_subject", concurrency_limit=None,
        )

        @user_errors
        def train_control(name, source, archive, folder, ctype, method, preset, steps_, lr, batch, block, factors,
                          text_enc, ckpt, val, seed_, side="input"):
            job = ctx.start_control(name, source, archive, folder, ctype,
                                    settings(method, steps_, lr, batch, block, factors, text_enc, ckpt, val, seed_, side))
            yield from follow(job, "control")

        c_outputs = list(c_panel)
        control_event = c_start.click(
            train_control,
            [c_name, c_source, c_zip, c_folder, c_type, c_method, c_preset, c_steps, *c_adv, c_side],
            c_outputs, api_name="train_control", concurrency_limit=None,
        )

        @user_errors
        def stop_training():
            message = ctx.stop()
            gr.Info(message)
            return message

        stop_message = gr.Markdown(visible=False)
        s_stop.click(stop_training, None, stop_message, api_name="stop_training", concurrency_limit=None)
        c_stop.click(stop_training, None, stop_message, api_name="stop_training_control", concurrency_limit=None)

        def training_status() -> dict:
            """The current (or last) training job as JSON; {} when none ran yet."""
            return ctx.jobs.job.to_dict() if ctx.jobs.job else {}

        gr.api(training_status, api_name="training_status", concurrency_limit=None)  # for scripts

        # The "Careful" preset's help promises prior preservation: the checkbox follows the preset.
        s_preset.change(lambda name: PRESETS[name]["prior"] if name in PRESETS else gr.skip(), s_preset, s_prior,
                        api_name="subject_preset_prior", api_visibility="private")

        s_source.change(lambda src: (gr.update(visible=src == "upload"), gr.update(visible=src == "builtin"),
                                     gr.update(interactive=src == "upload"), gr.update(interactive=src == "upload")),
                        s_source, [s_files, s_builtin, s_token, s_class], api_name="subject_source",
                        api_visibility="undocumented")

        def builtin_fields(name):
            subject = next((b for b in builtin_subjects if b.name == name), None)
            if subject is None:
                return gr.skip(), gr.skip(), gr.skip()
            return subject.token, subject.class_word, f"{subject.name}"

        s_builtin.change(builtin_fields, s_builtin, [s_token, s_class, s_name], api_name="builtin_subject",
                         api_visibility="undocumented")
        c_source.change(lambda src: (gr.update(visible=src == "zip"), gr.update(visible=src == "folder")),
                        c_source, [c_zip, c_folder], api_name="control_source", api_visibility="undocumented")

        # ---------------------------------------------------------- adapters
        def lists(current: list[str] | None = None, selected: str | None = None):
            names = [i.name for i in ctx.adapters()]
            choices = ctx.picker_choices()
            valid = {v for _, v in choices}
            keep = [c for c in (current or []) if c in valid]
            return (
                gr.update(choices=choices, value=keep),
                [describe(i, ctx.state.fingerprints) for i in ctx.adapters()],
                gr.update(choices=names, value=selected if selected in names else None),
            )

        list_outputs = [adapters, table, a_selected]

        def list_adapters(current, selected):
            return lists(current, selected)

        train_event.then(list_adapters, [adapters, a_selected], list_outputs, api_name="refresh_after_subject",
                         api_visibility="undocumented")
        control_event.then(list_adapters, [adapters, a_selected], list_outputs, api_name="refresh_after_control",
                           api_visibility="undocumented")
        demo.load(list_adapters, [adapters, a_selected], list_outputs, api_name="list_adapters")

        @user_errors
        def details(name):
            if not name:
                return None
            info = ctx.library.get(name)
            meta = dict(info.metadata)
            for key in list(meta):
                if key.startswith("modules."):
                    meta[key] = f"{len(meta[key].split(','))} modules"
            return {"file": str(info.path), "fits this model": ctx.state.fits(info), **meta}

        a_selected.change(details, a_selected, a_details, api_name="adapter_details")

        def select_row(evt: gr.SelectData, rows):
            try:
                return rows.iloc[evt.index[0], 0] if hasattr(rows, "iloc") else rows[evt.index[0]][0]
            except (IndexError, KeyError, TypeError):
                return gr.skip()

        table.select(select_row, table, a_selected, api_name="select_adapter_row", api_visibility="undocumented")

        @user_errors
        def rename(old, new, current):
            message = ctx.rename(old or "", new or "")
            return (f"**Done**: {message}", *lists(current, (new or "").strip()))

        a_rename.click(rename, [a_selected, a_new_name, adapters], [a_message, *list_outputs], api_name="rename_adapter")

        def ask_delete(name):
            if not name:
                return "Select an adapter first.", gr.update(visible=False), gr.update(visible=False)
            return f"Delete **{name}**? This cannot be undone.", gr.update(visible=True), gr.update(visible=True)

        a_delete.click(ask_delete, a_selected, [a_message, a_confirm, a_cancel], api_name="ask_delete",
                       api_visibility="undocumented")
        a_cancel.click(lambda: ("Kept.", gr.update(visible=False), gr.update(visible=False)), None,
                       [a_message, a_confirm, a_cancel], api_name="cancel_delete", api_visibility="undocumented")

        @user_errors
        def delete(name, current):
            message = ctx.delete(name or "")
            return (f"**Done**: {message}", gr.update(visible=False), gr.update(visible=False), *lists(current, None))

        a_confirm.click(delete, [a_selected, adapters], [a_message, a_confirm, a_cancel, *list_outputs],
                        api_name="delete_adapter")

        @user_errors
        def download(name):
            if not name:
                raise user_error("Select an adapter first.")
            return str(ctx.download(name))

        a_download.click(download, a_selected, a_file, api_name="download_adapter")

        @user_errors
        def export(name, fmt, scale):
            if not name:
                raise user_error("Select an adapter first.")
            return str(ctx.export(name, fmt, float(scale if scale is not None else 1.0)))

        a_export.click(export, [a_selected, a_export_fmt, a_export_scale], a_file, api_name="export_adapter")

        @user_errors
        def import_adapter(path, name, current):
            message = ctx.import_file(path, name or "")
            return (f"**Done**: {message}", *lists(current, None))

        a_import.click(import_adapter, [a_upload, a_import_name, adapters], [a_message, *list_outputs],
                       api_name="import_adapter")

        # ------------------------------------------------------ live status
        def tick(seen_sig, current, selected):
            job = ctx.jobs.job
            sig = _signature(job)
            if sig == seen_sig:
                return (seen_sig, *[gr.skip()] * (len(s_outputs) + len(c_outputs) + len(list_outputs)))
            ended_now = job is not None and not job.active and (not seen_sig or seen_sig[1] in ("starting", "running"))
            refreshed = lists(current, selected) if ended_now else [gr.skip()] * len(list_outputs)
            return (sig, *job_panel(job, "subject"), *job_panel(job, "control"), *refreshed)

        timer.tick(tick, [seen, adapters, a_selected], [seen, *s_outputs, *c_outputs, *list_outputs],
                   api_name="tick", api_visibility="undocumented", show_progress="hidden", concurrency_limit=None)
    return demo


def _method_and_preset(prefix: str):
    """Method and preset pickers with explanations, steps, and the advanced settings."""
    method = gr.Radio(list(METHOD_HELP), value="oft", label="Method")
    method_help = gr.Markdown(METHOD_HELP["oft"], elem_classes="od-note")
    preset = gr.Radio(list(PRESETS), value="Standard", label="Preset")
    preset_help = gr.Markdown(PRESETS["Standard"]["help"], elem_classes="od-note")
    steps = gr.Slider(1, 3000, value=PRESETS["Standard"]["steps"], step=1, label="Training steps",
                      elem_id=f"{prefix}-steps")
    with gr.Accordion("Advanced settings", open=False):
        with gr.Row():
            lr = gr.Number(label="Learning rate", value=PRESETS["Standard"]["lr"])
            batch = gr.Slider(1, 16, value=4, step=1, label="Batch size")
            seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
        with gr.Row():
            block = gr.Number(label="Block size (0 = automatic)", value=0, precision=0, minimum=0)
            factors = gr.Slider(1, 6, value=2, step=1, label="BOFT factors")
            text_enc = gr.Checkbox(label="Also train the text encoder", value=False)
        with gr.Row():
            # The subject benchmark's finding: on the output side OFT forgot less than LoRA at
            # equal fidelity; the input side is the OFT paper's and peft's convention.
            side = gr.Radio([("Input (OFT paper, peft)", "input"), ("Output (LyCORIS, kohya)", "output")],
                            value="input", label="Rotation side",
                            info="on the output side OFT forgot less than LoRA in the subject benchmark")
        with gr.Row():
            ckpt = gr.Number(label="Checkpoint every (steps)", value=100, precision=0, minimum=1)
            val = gr.Number(label="Sample previews every (steps)", value=100, precision=0, minimum=1)
    method.change(lambda m: METHOD_HELP.get(m, ""), method, method_help, api_name=f"{prefix}_method_help",
                  api_visibility="private")

    def apply_preset(name):
        p = PRESETS.get(name)
        if p is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        every = max(1, p["steps"] // 4)  # four previews and checkpoints per run
        return p["help"], p["steps"], p["lr"], p["batch"], every, every

    preset.change(apply_preset, preset, [preset_help, steps, lr, batch, ckpt, val], api_name=f"{prefix}_preset",
                  api_visibility="private")
    steps.release(lambda n: (max(1, int(n) // 4), max(1, int(n) // 4)), steps, [ckpt, val],
                  api_name=f"{prefix}_steps", api_visibility="private")
    return method, method_help, preset, preset_help, steps, [lr, batch, block, factors, text_enc, ckpt, val, seed], side


def _job_panel_components() -> tuple:
    """Status, progress bar, loss plot, sample previews, command, log, job JSON."""
    status = gr.Markdown(_status_markdown(None, ""))
    progress = gr.HTML(_progress_html(None))
    loss = gr.LinePlot(_loss_frame(None), x="step", y="loss", title="Training loss", height=220)
    samples = gr.Gallery(label="Sample previews (as they are written)", columns=3, height="auto", format="png",
                         elem_classes="od-samples")
    command = gr.Code(label="Command (you can run the same in a terminal)", language="shell", interactive=False,
                      max_lines=6)
    with gr.Accordion("Log", open=False):
        logbox = gr.Textbox(label="Last output lines", lines=10, max_lines=20, interactive=False)
        job_json = gr.JSON(label="Job")
    return status, progress, loss, samples, command, logbox, job_json


def _available(fn: Callable[[], Any]) -> bool:
    try:
        fn()
        return True
    except integrations.NotAvailableError:
        return False


def _unavailable_reason(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except integrations.NotAvailableError as err:
        return str(err)
    return ""
