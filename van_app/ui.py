"""The Gradio page: classify an image with a VAN and show where its Large Kernel Attention looks.

``build_demo(...)`` only arranges components and wires events to the top-level
handlers above it, each bound to the page's ``Page`` (models, results, settings).
What a public page needs is decided here:

- Images are read by ``read_upload`` only, never by gradio (events run with
  ``preprocess=False``): the file's bytes, format and declared pixels are checked
  from its header before any pixel is decoded, whether it came as an upload, an
  example, a ``data:`` URL or a URL (fetched by ``serving.fetch_limited``); only
  files in gradio's upload folder are read. Request bodies are capped before
  gradio parses them (``serving.BodyLimit``).
- All model work (prediction, class maps, loads) shares one concurrency limit
  (``WORK``); past ``MAX_QUEUE`` waiting events the page says the app is busy.
- A prediction is one pass of the served model (``LoadedModel.serving``: the engine
  ``fuse`` built, with the attention maps as outputs of the same graph). The public
  ``/predict`` event answers with the labels alone: every file in an answer costs an
  API client (gradio_client) a connection of its own, so the page draws the overlays
  in the event that follows (``details``), at the size it shows them (``GALLERY_SIDE``,
  ``SLIDER_SIDE``), as JPEG; the browser clears the previous maps when a prediction
  starts, so they never stand beside new labels (even when ``details`` is refused).
- Sessions hold a key (``gr.State``); results live in a bounded ``ResultStore``;
  gradio's cache is cleaned on a schedule.
- Everything from a model, a file or a visitor is escaped before it is shown
  (Markdown panels and error pop-ups render HTML).
- ``allow_local=False`` (a public deployment such as a Space): no server paths,
  no random-weight variants, and at most ``MAX_MODEL_BYTES`` of weights per load.
"""

from __future__ import annotations

import html
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
import PIL.Image
from starlette.middleware import Middleware

from . import VARIANTS
from .errors import first_line
from .explain import COMBINED_STAGES, Analysis, Heatmap, MapKind, analyse, find_map, overlay
from .files import is_image_file
from .images import BadImageError, ImageLimits, ImageTooLargeError, data_url_bytes, display_size, open_image
from .serving import (BodyLimit, LoadedModel, ModelKey, ModelStore, ResultStore, engine_name, fetch_limited,
                      request_limit)
from .weights import pretrained_variants

logger = logging.getLogger(__name__)

COLORMAPS = ("turbo", "jet", "inferno", "viridis", "magma", "coolwarm")
MAX_FILE_BYTES = 10 * 2**20
MAX_PIXELS = 40_000_000
# One load on a public page: the largest official weights (van_b3, about 180 MB) fit, a 200M-parameter model does not.
MAX_MODEL_BYTES = 256 * 2**20
# Uploads are scaled to at most this many pixels on the long side before anything else,
# so prediction, class maps and overlays all see the same image.
WORKING_SIDE = 1024
# Overlays are drawn at (about) the size they are shown: the gallery is 260 px high, the slider at most 420.
GALLERY_SIDE = 384
SLIDER_SIDE = 640
WORK = "model"  # the concurrency id every event that runs a model or decodes an image shares
WORK_LIMIT = 2
MAX_QUEUE = 16
MAX_RESULTS = 32
RESULT_TTL = 900
CACHE_CLEANUP = (600, 1800)  # every 10 minutes, delete cached uploads and outputs older than 30
MAX_SESSIONS = 2000
DEFAULT_CHOICE = "startup"
EXPIRED = "This result has expired (results are kept for 15 minutes): classify the image again."
STAGE_NOTE = (
    "The slider shows the **evidence for the predicted class** (the class's gradient times what Large Kernel "
    "Attention passes on, `u * attn`, against a blank image, at stages 1-2); pick another class below to see the "
    "evidence for it. "
    "**The gallery's stage maps are class-agnostic**: they show where the network's LKA gates its features "
    "unlike everywhere else (*where the network looks*), not evidence for any class."
)
# Markdown punctuation that could start emphasis, links, autolinks, code, headings, lists, tables or math
# ("<", ">" and "&" become entities).
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()#+\-.!|~$:@])")
_HUB_REPO = re.compile(r"(hf-hub:)?[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class Style:
    """How overlays are drawn."""

    colormap: str = "turbo"
    opacity: float = 0.8
    blocks: bool = False


@dataclass(frozen=True)
class Result:
    """A session's last prediction: the working image, its maps and, once asked, one class's maps."""

    key: ModelKey
    image: PIL.Image.Image
    analysis: Analysis
    seconds: float
    engine: str = "PyTorch"
    class_maps: tuple[Heatmap, ...] = ()


@dataclass
class Page:
    """What the handlers of one page share: models, results and settings."""

    models: ModelStore
    results: ResultStore
    start: ModelKey
    uploads: Path
    allow_local: bool = True
    k: int = 5
    max_model_bytes: int | None = None  # what a visitor's choice may load (the startup model is the operator's)
    limits: ImageLimits = field(default_factory=lambda: ImageLimits(MAX_FILE_BYTES, MAX_PIXELS))


def page_error(message: str) -> gr.Error:
    """A ``gr.Error`` shown literally: gradio renders error pop-ups as HTML."""
    return gr.Error(html.escape(message))


def markdown_text(text: object) -> str:
    """``text`` on one line, shown literally inside Markdown (no HTML, emphasis, links or math)."""
    line = " ".join(str(text).split())
    return html.escape(_MARKDOWN_PUNCTUATION.sub(r"\\\1", line), quote=False)


def is_random(key: ModelKey) -> bool:
    """A registered variant without pretrained weights: randomly initialised."""
    return key.source in VARIANTS and not key.pretrained


def describe(loaded: LoadedModel) -> str:
    """Markdown: name, variant, size, input and labels (all escaped), with a warning for random weights."""
    model, key = loaded.model, loaded.key
    params = sum(p.numel() for p in model.parameters())
    labels = model.labels
    shown = ", ".join(markdown_text(label) for label in labels[:8])
    more = f", … ({len(labels)} in all)" if len(labels) > 8 else ""
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    name = Path(key.source).name if Path(key.source).is_dir() else key.source
    weights = "⚠️ **random weights**: predictions are meaningless" if is_random(key) else (
        "official ImageNet-1k weights" if key.pretrained else "trained weights")
    return (f"**{markdown_text(name)}** · {markdown_text(model.variant)} · {params / 1e6:.2f} M parameters · "
            f"{size} px input · {weights}\n\nLabels: {shown}{more}")


def default_key(checkpoints: Path) -> ModelKey:
    """The bundled export (first directory under ``checkpoints`` with a config.json), else a random van_b0."""
    exports = sorted(p.parent for p in checkpoints.glob("*/config.json")) if checkpoints.is_dir() else []
    return ModelKey(str(exports[0])) if exports else ModelKey("van_b0")


def example_images(folder: Path) -> list[str]:
    """Every image file in ``folder``, sorted by name."""
    if not folder.is_dir():
        return []
    return [str(p) for p in sorted(folder.iterdir()) if is_image_file(p)]


def read_upload(page: Page, payload: dict | None) -> PIL.Image.Image:
    """The image an event carries (an uploaded file or a ``data:`` URL) as RGB scaled to ``WORKING_SIDE``.

    Raises a ``gr.Error`` saying what is wrong; limits are checked before any pixel is decoded.
    """
    if not payload:
        raise page_error("No image: upload, paste or take a picture first.")
    name = Path(str(payload.get("orig_name") or "image")).name
    url = str(payload.get("url") or "")
    try:
        if url.startswith("data:"):
            source: Path | bytes = data_url_bytes(url, page.limits.max_bytes)
        else:
            source = Path(str(payload.get("path") or "")).resolve()
            if not source.is_relative_to(page.uploads.resolve()) or not source.is_file():
                raise page_error("Only images uploaded to this page can be classified: upload the file.")
        return open_image(source, page.limits, WORKING_SIDE, name=name)
    except ImageTooLargeError as e:
        if e.what == "pixels" and e.size:
            raise page_error(f"Image too large: {e.size[0]}×{e.size[1]} pixels; the limit is "
                             f"{e.limit // 1_000_000} megapixels.") from e
        raise page_error(f"Image too large: {first_line(e)}. Images may have at most "
                         f"{e.limit // 2**20} MB.") from e
    except BadImageError as e:
        raise page_error(f"{first_line(e)}.") from e


def fetch_urls_within(component: gr.Image, max_bytes: int) -> gr.Image:
    """``component`` whose URL inputs (sent by API clients) are downloaded by ``fetch_limited``, within ``max_bytes``.

    Gradio downloads such a URL whole, before any handler runs, through the
    component's ``async_move_resource_to_block_cache``; this instance's is wrapped
    (subclassing a component would make gradio write a ``.pyi`` stub beside this module).
    """
    move = component.async_move_resource_to_block_cache

    async def bounded(url_or_path: str | Path | None) -> str | None:
        if not (isinstance(url_or_path, str) and url_or_path.startswith(("http://", "https://"))):
            return await move(url_or_path)
        try:
            path = str(await fetch_limited(url_or_path, Path(component.GRADIO_CACHE), max_bytes))
        except ImageTooLargeError as e:
            raise page_error(f"Image too large: {first_line(e)}. Images may have at most {max_bytes // 2**20} MB."
                             ) from e
        except BadImageError as e:
            raise page_error(f"Could not fetch the image URL: {first_line(e)}.") from e
        component.temp_files.add(path)
        return path

    component.async_move_resource_to_block_cache = bounded
    return component


def shown(image: PIL.Image.Image, side: int) -> PIL.Image.Image:
    """``image`` scaled down to at most ``side`` pixels on its longer side, as the page shows it."""
    size = display_size(image.size, side)
    return image if size == image.size else image.resize(size, PIL.Image.BILINEAR)


def gallery_items(result: Result, style: Style) -> list[tuple[PIL.Image.Image, str]]:
    """Overlays of every stage and the combined map (and each block if asked), with captions, at gallery size."""
    maps = [m for m in result.analysis.maps if style.blocks or m.kind is not MapKind.BLOCK]
    small = shown(result.image, GALLERY_SIDE)
    return [(overlay(small, m, result.analysis.geometry, style.colormap, style.opacity), caption(m)) for m in maps]


def caption(heatmap: Heatmap) -> str:
    """A map's title (the combined map's with the stages it averages), saying when it is constant."""
    title = heatmap.title
    if heatmap.kind is MapKind.COMBINED and heatmap.target is None:
        stages = [str(s + 1) for s in COMBINED_STAGES]
        title += f": stage{'s' if len(stages) > 1 else ''} {', '.join(stages)}"
    note = " · constant map: no spatial detail, not drawn" if heatmap.constant else ""
    return f"{title} ({heatmap.raw.shape[1]}×{heatmap.raw.shape[0]}){note}"


def slider_value(result: Result, style: Style) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """Original and overlay of the evidence for the class asked for, else for the predicted class, at slider size."""
    chosen = find_map(result.class_maps or result.analysis.evidence, MapKind.COMBINED)
    small = shown(result.image, SLIDER_SIDE)
    return small, overlay(small, chosen, result.analysis.geometry, style.colormap, style.opacity)


def timing(result: Result, render_seconds: float) -> str:
    """Markdown with the time the prediction and the overlays took, and what ran the model."""
    return (f"Time: {1000 * (result.seconds + render_seconds):.0f} ms: prediction, maps and evidence "
            f"{1000 * result.seconds:.0f} ms ({markdown_text(result.engine)}), overlays "
            f"{1000 * render_seconds:.0f} ms")


def load_for_page(store: ModelStore, key: ModelKey, max_bytes: int | None = None) -> LoadedModel:
    """The model ``key`` names, or a one-line ``gr.Error`` saying why it cannot be had, whatever the loader raised."""
    try:
        return store.get(key, max_bytes)
    except Exception as e:
        logger.warning("could not load %s", key.source, exc_info=True)
        raise page_error(f"Could not load {key.source}: {first_line(e)}") from e


def page_model(page: Page, key: ModelKey) -> LoadedModel:
    """``load_for_page`` for ``key``, bounded by ``page.max_model_bytes`` unless it is the startup model."""
    return load_for_page(page.models, key, None if key == page.start else page.max_model_bytes)


def typed_source(text: str, allow_local: bool = True) -> ModelKey:
    """The model key for the picker's text box, or a ``gr.Error`` saying why not.

    Where ``allow_local`` is off only Hub repo ids pass: no server paths, and no bare
    variant names (random weights serve no visitor).
    """
    source = text.strip()
    if not source:
        raise page_error("Type a Hub repo id (owner/name)" + (" or a local export directory" if allow_local else "")
                         + " first.")
    if allow_local:
        return ModelKey(source)
    if source in VARIANTS:
        raise page_error(f"{source} has no trained weights here (random weights would serve no visitor): pick an "
                         "official model above or type a Hub repo id (owner/name).")
    if Path(source).expanduser().exists() or source.startswith(("/", ".", "~")) or not _HUB_REPO.fullmatch(source):
        raise page_error(f"Loading files from the server is turned off here; {source!r} is not a Hub repo id "
                         "(owner/name).")
    return ModelKey(source)


def predict(page: Page, image: dict | None, key: ModelKey) -> tuple[dict[str, float], str]:
    """Top-k labels and the key of the result (maps included) kept for this session; ``details`` draws it."""
    picture = read_upload(page, image)
    loaded = page_model(page, key)
    model = loaded.serving
    start = time.perf_counter()
    analysis = analyse(model, picture, k=page.k, blocks=True)
    result = Result(key, picture, analysis, time.perf_counter() - start, engine_name(model))
    return analysis.top, page.results.put(result)


def predict_on_change(page: Page, image: dict | None, key: ModelKey) -> tuple:
    """``predict`` when there is an image; cleared outputs when it was removed."""
    if not image:
        return None, None
    return predict(page, image, key)


def details(page: Page, token: str | None, style: Style) -> tuple:
    """The gallery's overlays, the comparison slider, the timing line and a cleared class picker for the session's
    result (all cleared when there is none)."""
    result = page.results.get(token)
    if result is None:
        return [], None, "", gr.update(value=None)
    start = time.perf_counter()
    items, slider = gallery_items(result, style), slider_value(result, style)
    return items, slider, timing(result, time.perf_counter() - start), gr.update(value=None)


def explain_class(page: Page, label: str | None, token: str | None, style: Style) -> tuple[PIL.Image.Image, ...]:
    """The comparison slider with the evidence for ``label`` (``explain.class_maps``, on the served engine once it
    is built), computed once."""
    if token is None:
        raise page_error("Classify an image first.")
    result = page.results.get(token)
    if result is None:
        raise page_error(EXPIRED)
    loaded = page_model(page, result.key)
    if label not in loaded.model.labels:
        raise page_error(f"Unknown class {label!r} for this model.")
    index = loaded.model.labels.index(label)
    predicted = result.analysis.evidence[-1].target
    maps = result.analysis.evidence if index == predicted else loaded.class_maps(result.image, index, loaded.fast)
    result = replace(result, class_maps=tuple(maps))
    page.results.put(result, token)
    return slider_value(result, style)


def restyle(page: Page, token: str | None, colormap: str, opacity: float, blocks: bool) -> tuple:
    """The new style, and the gallery and slider redrawn with it (left as they are when the result expired)."""
    if colormap not in COLORMAPS or not isinstance(opacity, (int, float)):
        raise page_error(f"Unknown colormap {colormap!r} or opacity {opacity!r}.")
    style = Style(colormap, min(1.0, max(0.0, float(opacity))), bool(blocks))
    if token is None:
        return style, [], None
    result = page.results.get(token)
    if result is None:
        gr.Warning(html.escape(EXPIRED))
        return style, gr.skip(), gr.skip()
    return style, gallery_items(result, style), slider_value(result, style)


def load(page: Page, key: ModelKey, progress: gr.Progress) -> tuple:
    """The chosen key, its description and the class picker's new choices."""
    progress(0, desc=f"Loading {key.source}")
    loaded = page_model(page, key)
    return key, describe(loaded), gr.update(choices=loaded.model.labels, value=None)


def choose(page: Page, choice: str, progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple:
    """Load the startup model or an official pretrained variant picked in the radio."""
    if choice == DEFAULT_CHOICE:
        return load(page, page.start, progress)
    if choice not in pretrained_variants():
        raise page_error(f"{choice!r} is not one of the models offered here.")
    return load(page, ModelKey(choice, pretrained=True), progress)


def choose_source(page: Page, text: str, progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple:
    """Load the model typed in the text box (a Hub repo id; locally also a folder or a variant)."""
    return load(page, typed_source(text, page.allow_local), progress)


def bind(handler: Callable, page: Page) -> Callable:
    """``handler`` with ``page`` as its first argument, keeping its name (gradio names events after it)."""
    bound = partial(handler, page)
    bound.__name__ = handler.__name__
    return bound


def launch_options(max_file_bytes: int = MAX_FILE_BYTES) -> dict[str, Any]:
    """``launch()`` arguments: 0.0.0.0:7860 unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT say otherwise, and limits.

    Request bodies are capped (``BodyLimit``) for every route, uploads at ``max_file_bytes``,
    and gradio keeps the state of at most ``MAX_SESSIONS`` sessions.
    """
    return dict(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        max_file_size=max_file_bytes,
        state_session_capacity=MAX_SESSIONS,
        app_kwargs={"middleware": [Middleware(BodyLimit, max_bytes=request_limit(max_file_bytes))]},
    )


def build_demo(model: str | None = None, *, root: Path | None = None, k: int = 5, allow_local: bool = True,
               work_limit: int = WORK_LIMIT, max_queue: int = MAX_QUEUE, results: ResultStore | None = None,
               delete_cache: tuple[int, int] = CACHE_CLEANUP) -> gr.Blocks:
    """The app: ``model`` (anything ``load_model`` accepts) or the bundled export under ``root/checkpoints``.

    ``allow_local=False`` (public deployments) limits the picker to the startup model,
    official pretrained variants and Hub repo ids, each load to ``MAX_MODEL_BYTES``.
    """
    root = root or Path.cwd()
    store = ModelStore(threads=max(1, (os.cpu_count() or 1) // work_limit))
    start = ModelKey(model) if model else default_key(root / "checkpoints")
    startup = store.get(start)
    start_label = ("Random van_b0 (no bundled model yet)" if start == ModelKey("van_b0") and not model
                   else f"Startup model: {Path(start.source).name or start.source}")
    choices = [(start_label, DEFAULT_CHOICE)] + [(f"{v} · ImageNet-1k (official, downloaded on demand)", v)
                                                 for v in pretrained_variants()]
    # Handlers get the raw values and check them themselves: gradio's checks decode images and repeat choices unescaped.
    raw = {"preprocess": False}
    work = {"concurrency_id": WORK, "concurrency_limit": work_limit, **raw}

    with gr.Blocks(title="VAN Studio: what a Visual Attention Network sees", delete_cache=delete_cache) as demo:
        current = gr.State(start)
        style = gr.State(Style())
        result = gr.State(None, time_to_live=RESULT_TTL)
        gr.Markdown("# VAN Studio: what a Visual Attention Network sees\n"
                    "Classify an image and see where each stage's Large Kernel Attention looks.")
        with gr.Row():
            with gr.Column(scale=1):
                image = fetch_urls_within(gr.Image(type="filepath", image_mode=None,
                                                   sources=["upload", "clipboard", "webcam"],
                                                   height=280, label="Image (upload, paste or webcam)"),
                                          MAX_FILE_BYTES)
                button = gr.Button("Classify and explain", variant="primary")
                examples = example_images(root / "examples")
                if examples:
                    gr.Examples([[p] for p in examples], inputs=[image], label="Examples")
            with gr.Column(scale=1):
                labels = gr.Label(num_top_classes=k, label="Top predictions", elem_id="labels")
                elapsed = gr.Markdown()
                info = gr.Markdown(describe(startup), latex_delimiters=[], elem_id="model-info")
        gr.Markdown(STAGE_NOTE)
        gallery = gr.Gallery(label="Where the network looks (class-agnostic): stages and combined",
                             columns=5, rows=1, height=260, object_fit="contain", format="jpeg",
                             elem_id="overlays")
        with gr.Row():
            with gr.Column(scale=1):
                target = gr.Dropdown(choices=startup.model.labels, value=None, filterable=True, elem_id="target",
                                     label="Evidence for another class")
                opacity = gr.Slider(0.0, 1.0, value=Style().opacity, step=0.05, label="Overlay opacity")
                colormap = gr.Dropdown(list(COLORMAPS), value=Style().colormap, label="Colormap")
                blocks = gr.Checkbox(value=False, label="Also show each block's map")
            with gr.Column(scale=2):
                compare = gr.ImageSlider(type="pil", max_height=420, format="jpeg", elem_id="compare",
                                         slider_position=25,  # the overlay takes three quarters at first
                                         label="Original ↔ evidence for the predicted class (or the class picked)")
        with gr.Accordion("Model", open=False):
            picker = gr.Radio(choices, value=DEFAULT_CHOICE, label="Model")
            with gr.Row():
                source = gr.Textbox(label="Hub repo id (owner/name)" + (" or local export directory"
                                                                        if allow_local else ""), scale=3)
                load_button = gr.Button("Load", scale=1)

        page = Page(store, results or ResultStore(MAX_RESULTS, RESULT_TTL), start, Path(image.GRADIO_CACHE),
                    allow_local, k, None if allow_local else MAX_MODEL_BYTES)
        for trigger in (button.click, image.change):
            # in the browser, at once: the previous image's maps never stand beside the new labels
            trigger(None, None, [gallery, compare], js="() => [[], null]", api_visibility="private")
        predicted = button.click(bind(predict, page), [image, current], [labels, result], api_name="predict", **work)
        changed = image.change(bind(predict_on_change, page), [image, current], [labels, result],
                               api_visibility="private", **work)
        for event in (predicted, changed):
            event.success(bind(details, page), [result, style], [gallery, compare, elapsed, target],
                          api_visibility="private", **raw)
        target.input(bind(explain_class, page), [target, result, style], [compare], api_visibility="private",
                     **work)
        for control in (colormap.change, blocks.change, opacity.release):
            control(bind(restyle, page), [result, colormap, opacity, blocks], [style, gallery, compare],
                    api_visibility="private", **work)
        for loaded in (picker.input(bind(choose, page), [picker], [current, info, target],
                                    api_visibility="private", **work),
                       load_button.click(bind(choose_source, page), [source], [current, info, target],
                                         api_visibility="private", **work)):
            loaded.success(bind(predict_on_change, page), [image, current], [labels, result],
                           api_visibility="private", **work).success(
                bind(details, page), [result, style], [gallery, compare, elapsed, target], api_visibility="private",
                **raw)
    return demo.queue(default_concurrency_limit=1, max_size=max_queue)
