"""The Gradio page: classify an image with a VAN and show where its Large Kernel Attention looks.

``build_demo(...)`` only arranges components and wires events; the work is done by
the functions above it (``read_image``, ``ModelStore``, ``run_prediction``, ...), which
call ``explain``. Models are loaded once per process and shared by all sessions; each
session keeps its chosen model and its last result in ``gr.State``.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gradio as gr
import PIL.Image
import torch
from torch import nn

from .files import is_image_file
from .explain import Analysis, ClassMapCache, Heatmap, analyse, display_size, overlay
from .fuse import fuse
from .images import BadImageError, open_image
from .model import VARIANTS
from .weights import CheckpointError, load_model

COLORMAPS = ("turbo", "jet", "inferno", "viridis", "magma", "coolwarm")
OFFICIAL_VARIANTS = ("van_b0", "van_b1", "van_b2", "van_b3")
MAX_FILE_SIZE = "10mb"
MAX_PIXELS = 40_000_000
# Uploads are scaled to at most this many pixels on the long side before anything else,
# so prediction, class maps and overlays all see the same image.
WORKING_SIDE = 1024
DEFAULT_CHOICE = "startup"
STAGE_NOTE = (
    "**Stage maps are class-agnostic**: they show where the network's Large Kernel Attention "
    "gates its features unlike everywhere else (*where the network looks*), not evidence for any class. "
    "Pick a class below for the **evidence for that class** (Grad-CAM on the LKA attention)."
)


@dataclass(frozen=True)
class ModelKey:
    """What to load: anything ``load_model`` accepts, and whether to fetch official weights."""

    source: str
    pretrained: bool = False

    @property
    def random(self) -> bool:
        """A registered variant without pretrained weights: randomly initialised."""
        return self.source in VARIANTS and not self.pretrained


@dataclass
class LoadedModel:
    """A model ready to serve: the unfused one (class maps), its fused copy (prediction) and a forward lock."""

    key: ModelKey
    model: nn.Module
    fused: nn.Module
    class_maps: ClassMapCache
    lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self) -> str:
        """Markdown: name, variant, size, input and labels, with a warning for random weights."""
        params = sum(p.numel() for p in self.model.parameters())
        labels = self.model.labels
        shown = ", ".join(labels[:8]) + (f", … ({len(labels)} in all)" if len(labels) > 8 else "")
        size = self.model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        name = Path(self.key.source).name if Path(self.key.source).is_dir() else self.key.source
        weights = "⚠️ **random weights**: predictions are meaningless" if self.key.random else (
            "official ImageNet-1k weights" if self.key.pretrained else "trained weights")
        return (f"**{name}** · {self.model.variant} · {params / 1e6:.2f} M parameters · {size} px input · "
                f"{weights}\n\nLabels: {shown}")


class ModelStore:
    """Models loaded once per process and shared by every session (least recently used dropped past ``maxsize``)."""

    def __init__(self, maxsize: int = 3, device: str | None = None) -> None:
        self.maxsize = maxsize
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._models: OrderedDict[ModelKey, LoadedModel] = OrderedDict()
        self._loading: dict[ModelKey, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: ModelKey) -> LoadedModel:
        """The loaded model for ``key``, loading, fusing and warming it up on first use (once per key)."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            loaded = self._load(key)
            with self._lock:
                self._models[key] = loaded
                self._loading.pop(key, None)
                while len(self._models) > self.maxsize:
                    self._models.popitem(last=False)
        return loaded

    def _load(self, key: ModelKey) -> LoadedModel:
        """Load, fuse and warm up one model."""
        model = load_model(key.source, pretrained=key.pretrained).to(self.device)
        loaded = LoadedModel(key, model, fuse(model), ClassMapCache(model))
        width = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        analyse(loaded.fused, PIL.Image.new("RGB", (width, width)))
        return loaded


@dataclass(frozen=True)
class Style:
    """How overlays are drawn."""

    colormap: str = "turbo"
    opacity: float = 0.5
    blocks: bool = False


@dataclass(frozen=True)
class Result:
    """A session's last prediction: the working image, its maps and, once asked, one class's maps."""

    key: ModelKey
    image: PIL.Image.Image
    analysis: Analysis
    seconds: float
    render_seconds: float = 0.0
    class_maps: tuple[Heatmap, ...] = ()


def default_key(checkpoints: Path) -> ModelKey:
    """The bundled export (first directory under ``checkpoints`` with a config.json), else a random van_b0."""
    exports = sorted(p.parent for p in checkpoints.glob("*/config.json")) if checkpoints.is_dir() else []
    return ModelKey(str(exports[0])) if exports else ModelKey("van_b0")


def example_images(folder: Path) -> list[str]:
    """Every image file in ``folder``, sorted by name."""
    if not folder.is_dir():
        return []
    return [str(p) for p in sorted(folder.iterdir()) if is_image_file(p)]


def read_image(path: str | None) -> PIL.Image.Image:
    """The upload at ``path`` as RGB scaled to ``WORKING_SIDE``, or a ``gr.Error`` saying what is wrong."""
    if not path:
        raise gr.Error("No image: upload, paste or take a picture first.")
    try:
        with PIL.Image.open(path) as probe:
            width, height = probe.size
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise gr.Error(f"Not a readable image ({type(e).__name__}): use a PNG, JPEG, WebP, GIF, BMP or TIFF file.") from e
    if width * height > MAX_PIXELS:
        raise gr.Error(f"Image too large: {width}×{height} pixels; the limit is {MAX_PIXELS // 1_000_000} megapixels.")
    try:
        image = open_image(path)
    except BadImageError as e:
        raise gr.Error(f"Corrupt or unreadable image: {str(e).split(': ', 1)[-1]}") from e
    size = display_size(image.size, WORKING_SIDE)
    return image if size == image.size else image.resize(size, PIL.Image.LANCZOS)


def gallery_items(result: Result, style: Style) -> list[tuple[PIL.Image.Image, str]]:
    """Overlays of every stage and the combined map (and each block if asked), with captions."""
    maps = [m for m in result.analysis.maps if style.blocks or "block" not in m.title]
    return [(overlay(result.image, m, result.analysis.geometry, style.colormap, style.opacity), caption(m))
            for m in maps]


def caption(heatmap: Heatmap) -> str:
    """A map's title, saying when it is constant."""
    note = " · constant map: no spatial detail, not drawn" if heatmap.constant else ""
    return f"{heatmap.title} ({heatmap.raw.shape[1]}×{heatmap.raw.shape[0]}){note}"


def slider_value(result: Result, style: Style) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """Original and overlay of the class map when one was asked for, else of the combined map."""
    chosen = result.class_maps[-1] if result.class_maps else next(m for m in result.analysis.maps
                                                                   if m.title == "Combined")
    return result.image, overlay(result.image, chosen, result.analysis.geometry, style.colormap, style.opacity)


def load_for_page(store: ModelStore, key: ModelKey) -> LoadedModel:
    """The model the picker asked for, or a ``gr.Error`` saying why it cannot be had (offline, bad folder, ...)."""
    try:
        return store.get(key)
    except (CheckpointError, OSError, ValueError) as e:
        raise gr.Error(f"Could not load {key.source}: {e}") from e


def typed_source(text: str, allow_local: bool = True) -> ModelKey:
    """The model key for the picker's text box, or a ``gr.Error``: empty, or a server path where those are off."""
    source = text.strip()
    if not source:
        raise gr.Error("Type a Hub repo id (owner/name)" + (" or a local export directory" if allow_local else "")
                       + " first.")
    if not allow_local and (Path(source).expanduser().exists() or source.startswith(("/", ".", "~"))):
        raise gr.Error(f"Loading files from the server is turned off here; {source!r} is not a Hub repo id "
                       "(owner/name).")
    return ModelKey(source)


def run_prediction(store: ModelStore, path: str | None, key: ModelKey, k: int = 5) -> Result:
    """Read the upload and analyse it with the fused model (prediction and attention maps in one pass)."""
    image = read_image(path)
    loaded = store.get(key)
    start = time.perf_counter()
    with loaded.lock:
        analysis = analyse(loaded.fused, image, k=k, blocks=True)
    return Result(key, image, analysis, time.perf_counter() - start)


def timing(result: Result) -> str:
    """Markdown with the time the prediction and the overlays took."""
    return (f"Time: {1000 * (result.seconds + result.render_seconds):.0f} ms: prediction and attention maps "
            f"{1000 * result.seconds:.0f} ms, overlays {1000 * result.render_seconds:.0f} ms")


def launch_options() -> dict[str, Any]:
    """``launch()`` arguments: 0.0.0.0:7860 unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT say otherwise."""
    return dict(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        max_file_size=MAX_FILE_SIZE,
    )


def readable_upload_errors(component: gr.Image) -> gr.Image:
    """``component`` whose undecodable uploads raise a readable ``gr.Error`` instead of a server traceback.

    Wraps the instance's ``preprocess``: subclassing a component would make gradio
    write a ``.pyi`` stub beside this module whenever it is imported.
    """
    preprocess = component.preprocess

    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
            raise gr.Error(f"Not an image ({type(e).__name__}): use a PNG, JPEG, WebP, GIF, BMP or TIFF file.") from e

    component.preprocess = checked
    return component


def build_demo(model: str | None = None, *, root: Path | None = None, k: int = 5, concurrency: int = 2,
               allow_local: bool = True) -> gr.Blocks:
    """The app: ``model`` (anything ``load_model`` accepts) or the bundled export under ``root/checkpoints``.

    ``allow_local=False`` (public deployments) limits the picker's text box to Hub repo ids.
    """
    root = root or Path.cwd()
    store = ModelStore()
    start_key = ModelKey(model) if model else default_key(root / "checkpoints")
    startup = store.get(start_key)
    start_label = ("Random van_b0 (no bundled model yet)" if start_key == ModelKey("van_b0") and not model
                   else f"Startup model: {Path(start_key.source).name or start_key.source}")
    choices = [(start_label, DEFAULT_CHOICE)] + [(f"{v} · ImageNet-1k (official, downloaded on demand)", v)
                                                 for v in OFFICIAL_VARIANTS]

    def choose(choice: str, progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple:
        key = start_key if choice == DEFAULT_CHOICE else ModelKey(choice, pretrained=True)
        return load(key, progress)

    def choose_source(text: str, progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple:
        return load(typed_source(text, allow_local), progress)

    def load(key: ModelKey, progress: gr.Progress) -> tuple:
        progress(0, desc=f"Loading {key.source}")
        loaded = load_for_page(store, key)
        return key, loaded.describe(), gr.update(choices=loaded.model.labels, value=None)

    def predict(path: str | None, key: ModelKey, style: Style) -> tuple:
        result = run_prediction(store, path, key, k)
        start = time.perf_counter()
        items = gallery_items(result, style)
        result = replace(result, render_seconds=time.perf_counter() - start)
        return result.analysis.top, items, result

    def predict_on_change(path: str | None, key: ModelKey, style: Style) -> tuple:
        if not path:
            return None, [], None
        return predict(path, key, style)

    def details(result: Result | None, style: Style) -> tuple:
        if result is None:
            return None, "", gr.update(value=None)
        return slider_value(result, style), timing(result), gr.update(value=None)

    def explain_class(label: str | None, result: Result | None, style: Style) -> tuple:
        if result is None:
            raise gr.Error("Classify an image first.")
        loaded = store.get(result.key)
        if label not in loaded.model.labels:
            raise gr.Error(f"Unknown class {label!r} for this model.")
        maps = loaded.class_maps(result.image, loaded.model.labels.index(label))
        result = replace(result, class_maps=tuple(maps))
        return slider_value(result, style), result

    def restyle(result: Result | None, colormap: str, opacity: float, blocks: bool) -> tuple:
        style = Style(colormap, float(opacity), bool(blocks))
        if result is None:
            return style, [], None
        return style, gallery_items(result, style), slider_value(result, style)

    with gr.Blocks(title="VAN Studio: what a Visual Attention Network sees") as demo:
        current = gr.State(start_key)
        style = gr.State(Style())
        result = gr.State(None, time_to_live=900)
        gr.Markdown("# VAN Studio: what a Visual Attention Network sees\n"
                    "Classify an image and see where each stage's Large Kernel Attention looks.")
        with gr.Row():
            with gr.Column(scale=1):
                image = readable_upload_errors(gr.Image(type="filepath", image_mode=None,
                                                        sources=["upload", "clipboard", "webcam"],
                                                        height=280, label="Image (upload, paste or webcam)"))
                button = gr.Button("Classify and explain", variant="primary")
                examples = example_images(root / "examples")
                if examples:
                    gr.Examples([[p] for p in examples], inputs=[image], label="Examples")
            with gr.Column(scale=1):
                labels = gr.Label(num_top_classes=k, label="Top predictions", elem_id="labels")
                elapsed = gr.Markdown()
                info = gr.Markdown(startup.describe())
        gr.Markdown(STAGE_NOTE)
        gallery = gr.Gallery(label="Where the network looks (class-agnostic): stages and combined",
                             columns=5, rows=1, height=260, object_fit="contain", format="jpeg",
                             elem_id="overlays")
        with gr.Row():
            with gr.Column(scale=1):
                target = gr.Dropdown(choices=startup.model.labels, value=None, filterable=True, elem_id="target",
                                     label="Evidence for class (Grad-CAM on LKA attention, computed when picked)")
                opacity = gr.Slider(0.0, 1.0, value=Style().opacity, step=0.05, label="Overlay opacity")
                colormap = gr.Dropdown(list(COLORMAPS), value=Style().colormap, label="Colormap")
                blocks = gr.Checkbox(value=False, label="Also show each block's map")
            with gr.Column(scale=2):
                compare = gr.ImageSlider(type="pil", max_height=420, elem_id="compare",
                                         label="Original ↔ overlay (combined map, or the class's evidence)")
        with gr.Accordion("Model", open=False):
            picker = gr.Radio(choices, value=DEFAULT_CHOICE, label="Model")
            with gr.Row():
                source = gr.Textbox(label="Hub repo id (owner/name)" + (" or local export directory"
                                                                        if allow_local else ""), scale=3)
                load_button = gr.Button("Load", scale=1)

        predicted = button.click(predict, [image, current, style], [labels, gallery, result], api_name="predict")
        changed = image.change(predict_on_change, [image, current, style], [labels, gallery, result],
                               api_visibility="private")
        for event in (predicted, changed):
            event.success(details, [result, style], [compare, elapsed, target], api_visibility="private")
        target.input(explain_class, [target, result, style], [compare, result], api_visibility="private")
        for control in (colormap.change, blocks.change, opacity.release):
            control(restyle, [result, colormap, opacity, blocks], [style, gallery, compare],
                    api_visibility="private")
        for loaded in (picker.input(choose, [picker], [current, info, target], api_visibility="private"),
                       load_button.click(choose_source, [source], [current, info, target],
                                         api_visibility="private")):
            loaded.success(predict_on_change, [image, current, style], [labels, gallery, result],
                           api_visibility="private").success(
                details, [result, style], [compare, elapsed, target], api_visibility="private")
    return demo.queue(default_concurrency_limit=concurrency, max_size=64)
