"""The app over real HTTP on 127.0.0.1 (``python app.py``, or built in-process where a test needs its own settings)
and its handlers directly: limits before decoding, one budget for model work, bounded state, escaping, the picker."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
from conftest import HOSTILE_FOLDER, HOSTILE_LABELS, ROOT, serve_app, stop_app
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError
from PIL import Image, ImageDraw, ImageFile

from van_app import pretrained_variants
from van_app.images import ImageLimits, ImageTooLargeError
from van_app.serving import BodyLimit, ModelKey, ModelStore, ResultStore, fetch_limited
from van_app.engines import EngineModel, installed_engines
from van_app.ui import (GALLERY_SIDE, MAX_PIXELS, SLIDER_SIDE, Page, Style, build_demo, default_key, details,
                        example_images, explain_class, launch_options, load_for_page, markdown_text, page_model,
                        predict, predict_on_change, read_upload, restyle, shown, slider_value, timing, typed_source)
from van_app.explain import MapKind, find_map, overlay

slow = pytest.mark.slow


def shape_image(path: Path, size: tuple[int, int] = (80, 48), mode: str = "RGB") -> Path:
    """A small picture of a disc on a dark background, saved to ``path``."""
    image = Image.new("RGB", size, (30, 30, 60))
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=(240, 200, 30))
    image.convert(mode).save(path)
    return path


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def data_url(raw: bytes) -> str:
    """``raw`` as a base64 PNG ``data:`` URL."""
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class PeakMemory:
    """The largest RSS growth of a process while the block runs, sampled every 10 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.base, self.peak, self._stop = pid, rss_mb(pid), rss_mb(pid), threading.Event()

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.01)

    @property
    def growth(self) -> float:
        return self.peak - self.base


def call_event(url: str, name: str, data: list, timeout: float = 60) -> tuple[int, dict]:
    """Run the event named ``name`` as the page does (queue join, then its event stream): (HTTP status, message).

    The message is the final ``process_completed`` one, or the JSON of a refused join.
    """
    config = httpx.get(url + "config", timeout=timeout).json()
    fn_index = next(d["id"] for d in config["dependencies"] if d["api_name"] == name)
    session = uuid.uuid4().hex
    body = json.dumps({"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None,
                       "trigger_id": None})
    with httpx.Client(timeout=timeout) as client:
        joined = client.post(url + "gradio_api/queue/join", content=body, headers={"content-type": "application/json"})
        if joined.status_code != 200:
            return joined.status_code, joined.json()
        with client.stream("GET", url + f"gradio_api/queue/data?session_hash={session}") as stream:
            for line in stream.iter_lines():
                if line.startswith("data:") and (message := json.loads(line[5:]))["msg"] == "process_completed":
                    return joined.status_code, message
    raise AssertionError(f"{name}: the event stream ended without completing")


def error_of(message: dict) -> str:
    """The error text of a failed event."""
    assert not message["success"], message
    return message["output"]["error"]


@pytest.fixture
def client(app_url: str) -> Client:
    return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Page:
    """The page's handler context around a van_micro, with a tiny result store and a temporary upload folder."""
    uploads = tmp_path_factory.mktemp("uploads")
    return Page(ModelStore(), ResultStore(maxsize=3), ModelKey("van_micro"), uploads)


def uploaded(page: Page, image: Image.Image | bytes, name: str = "upload.png") -> dict:
    """``image`` saved in the page's upload folder, as the payload an event carries."""
    path = page.uploads / uuid.uuid4().hex / name
    path.parent.mkdir()
    path.write_bytes(image if isinstance(image, bytes) else png_bytes(image))
    return {"path": str(path), "orig_name": name, "meta": {"_type": "gradio.FileData"}}


# --- the served app -------------------------------------------------------------------------------------------


@slow
def test_predict_answers_with_the_top_k_labels_alone(client, tmp_path):
    labels = client.predict(handle_file(shape_image(tmp_path / "disc.png")), api_name="/predict")
    assert labels["label"] == labels["confidences"][0]["label"] and len(labels["confidences"]) == 5


@slow
def test_api_exposes_only_predict(client):
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/predict"]


@slow
def test_not_an_image_is_refused_readably(client, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(AppError, match=r"notes\.png: not a readable image \(not a PNG, JPEG"):
        client.predict(handle_file(path), api_name="/predict")


@slow
def test_corrupt_image_is_refused_readably(client, tmp_path):
    data = shape_image(tmp_path / "whole.png").read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AppError, match=r"truncated\.png: not a readable image \(.*truncated"):
        client.predict(handle_file(path), api_name="/predict")


@slow
def test_file_over_the_upload_limit_is_refused(client, tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(b"\x89PNG" + os.urandom(11 * 1024 * 1024))
    with pytest.raises(ValueError, match="exceeds the maximum file size of 10485760 bytes"):
        client.predict(handle_file(path), api_name="/predict")


@slow
def test_too_many_pixels_is_refused_readably(client, tmp_path):
    path = tmp_path / "wide.png"
    Image.new("1", (MAX_PIXELS // 1000 + 1000, 1000)).save(path)
    with pytest.raises(AppError, match=f"Image too large: {MAX_PIXELS // 1000 + 1000}×1000 pixels"):
        client.predict(handle_file(path), api_name="/predict")


@slow
def test_image_bomb_sent_as_a_data_url_is_refused_at_once_without_decoding(app_server):
    process, url = app_server
    bomb = png_bytes(Image.new("1", (13000, 13000)))  # about 20 KB declaring 169 megapixels
    with PeakMemory(process.pid) as memory:
        start = time.perf_counter()
        _, message = call_event(url, "predict", [{"url": data_url(bomb), "path": "bomb.png"}, None])
        seconds = time.perf_counter() - start
    assert "Image too large: 13000×13000 pixels" in error_of(message)
    assert seconds < 1.0 and memory.growth < 100


@slow
def test_request_body_over_the_limit_is_refused_before_it_is_read(app_server):
    process, url = app_server
    payload = {"url": data_url(png_bytes(Image.new("RGB", (8, 8))) + bytes(30 * 2**20)), "path": "big.png"}
    with PeakMemory(process.pid) as memory:
        start = time.perf_counter()
        status, answer = call_event(url, "predict", [payload, None])
        seconds = time.perf_counter() - start
    assert status == 413 and "Request too large" in answer["detail"]
    assert seconds < 3.0 and memory.growth < 100


@slow
def test_small_data_url_is_classified(app_url):
    image = Image.new("RGB", (60, 40), (200, 40, 40))
    _, message = call_event(app_url, "predict", [{"url": data_url(png_bytes(image)), "path": "x.png"}, None])
    assert message["success"] and len(message["output"]["data"][0]["confidences"]) == 5


@slow
def test_server_files_outside_the_upload_folder_are_not_read(app_url):
    _, message = call_event(app_url, "predict", [{"path": str(ROOT / "examples" / "circle.png")}, None])
    assert "Only images uploaded to this page can be classified" in error_of(message)


@slow
def test_image_urls_are_fetched_from_public_addresses_only(app_url):
    payload = {"path": "https://images.invalid/photo.png", "meta": {"_type": "gradio.FileData"}}
    _, message = call_event(app_url, "predict", [payload, None])
    assert error_of(message) == "Could not fetch the image URL: images.invalid does not resolve to a public address."


@slow
def test_animated_gif_is_classified_from_its_first_frame(client, tmp_path):
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    labels = client.predict(handle_file(path), api_name="/predict")
    assert len(labels["confidences"]) == 5


@slow
def test_sixteen_bit_png_is_classified(client, tmp_path):
    path = tmp_path / "deep.png"
    Image.new("I;16", (50, 40), 40000).save(path)
    labels = client.predict(handle_file(path), api_name="/predict")
    assert len(labels["confidences"]) == 5


@slow
def test_server_keeps_serving_after_a_bad_request(client, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    with pytest.raises(AppError, match="not a readable image"):
        client.predict(handle_file(bad), api_name="/predict")
    labels = client.predict(handle_file(shape_image(tmp_path / "ok.png")), api_name="/predict")
    assert len(labels["confidences"]) == 5


@slow
def test_load_errors_reach_the_page_as_escaped_text(app_url, tmp_path):
    folder = tmp_path / HOSTILE_FOLDER
    folder.mkdir()
    _, message = call_event(app_url, "choose_source", [str(folder)])
    error = error_of(message)
    assert error.startswith("Could not load ") and "no config.json" in error
    assert "&lt;img class=evil src=x onerror=&quot;window.__pwned=2&quot;&gt;" in error and "<img" not in error


@slow
def test_expired_result_is_reported_when_a_class_is_picked(app_url):
    _, message = call_event(app_url, "explain_class", ["class_0", None, None])
    assert error_of(message) == "Classify an image first."


# --- one budget for the model ---------------------------------------------------------------------------------


@slow
def test_model_work_shares_one_budget_and_overflow_is_refused_as_busy(monkeypatch, tmp_path):
    import van_app.ui

    running, most = [0], [0]
    lock = threading.Lock()
    real_analyse = van_app.ui.analyse

    def slow_analyse(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.4)
        try:
            return real_analyse(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(van_app.ui, "analyse", slow_analyse)
    demo = build_demo("van_micro", root=tmp_path, work_limit=1, max_queue=2)
    demo.launch(**dict(launch_options(), server_name="127.0.0.1", server_port=None), prevent_thread_lock=True,
                quiet=True)
    try:
        path = shape_image(tmp_path / "disc.png")
        outcomes: list[str] = []

        def visitor(event: str) -> None:
            if event == "predict":
                try:
                    Client(demo.local_url, verbose=False).predict(handle_file(path), api_name="/predict")
                    outcomes.append("ok")
                except QueueError as e:
                    outcomes.append(str(e))
            else:
                payload = {"url": data_url(path.read_bytes()), "path": "disc.png"}
                status, message = call_event(demo.local_url, event, [payload, None])
                outcomes.append("ok" if status == 200 and message["success"] else message.get("detail", message))

        visitors = [threading.Thread(target=visitor, args=(event,)) for event in ["predict", "predict_on_change"] * 4]
        for thread in visitors:
            thread.start()
        for thread in visitors:
            thread.join()
    finally:
        demo.close()
    refused = [text for text in outcomes if text != "ok"]
    assert most[0] == 1 and outcomes.count("ok") >= 3 and refused
    assert all("Queue is full" in text for text in refused), refused


# --- bounded state --------------------------------------------------------------------------------------------


def test_result_store_keeps_at_most_maxsize_results():
    store = ResultStore(maxsize=2)
    keys = [store.put(i) for i in range(5)]
    assert len(store) == 2 and [store.get(k) for k in keys] == [None, None, None, 3, 4]


def test_result_store_forgets_results_after_their_time_to_live():
    now = [0.0]
    store = ResultStore(ttl=10, clock=lambda: now[0])
    key = store.put("result")
    now[0] = 9.9
    assert store.get(key) == "result"
    now[0] = 10.0
    assert store.get(key) is None and len(store) == 0


def test_sessions_hold_only_a_key_and_results_stay_bounded(page):
    for i in range(5):
        _, key = predict(page, uploaded(page, Image.new("RGB", (64, 48), (40 * i, 0, 0))), page.start)
        assert isinstance(key, str) and len(key) < 40
    assert len(page.results) == page.results.maxsize == 3


def test_page_answers_with_pytorch_while_the_engine_warms_up(tmp_path, monkeypatch):
    import van_app.serving

    release, real_fuse = threading.Event(), van_app.serving.fuse
    monkeypatch.setattr(van_app.serving, "fuse", lambda *args, **kwargs: release.wait(60) and real_fuse(*args, **kwargs))
    page = Page(ModelStore(threads=1), ResultStore(), ModelKey("van_micro"), tmp_path)
    loaded = page.models.get(page.start)
    picture = Image.new("RGB", (64, 48), (200, 40, 0))
    _, key = predict(page, uploaded(page, picture), page.start)
    assert page.results.get(key).engine == "PyTorch" and not loaded.ready.is_set()
    release.set()
    assert loaded.ready.wait(120)
    _, key = predict(page, uploaded(page, picture), page.start)
    assert page.results.get(key).engine in installed_engines()


def test_overlays_are_drawn_at_the_size_they_are_shown(page):
    _, key = predict(page, uploaded(page, Image.new("RGB", (1600, 1200), (0, 90, 200))), page.start)
    gallery, (original, overlay), _, _ = details(page, key, Style())
    assert [image.size for image, _ in gallery] == [(GALLERY_SIDE, GALLERY_SIDE * 3 // 4)] * 5
    assert original.size == overlay.size == (SLIDER_SIDE, SLIDER_SIDE * 3 // 4)


def test_the_page_draws_the_stage_overlays_after_the_prediction(page):
    _, key = predict(page, _disc(page), page.start)
    gallery, _, line, _ = details(page, key, Style())
    assert [caption.split(" (")[0] for _, caption in gallery] == ["Stage 1", "Stage 2", "Stage 3", "Stage 4",
                                                                  "Combined: stage 1"]
    assert line.startswith("Time: ") and "overlays" in line


def test_removing_the_image_clears_the_overlays(page):
    assert predict_on_change(page, None, page.start) == (None, None)
    gallery, compare, line, _ = details(page, None, Style())
    assert (gallery, compare, line) == ([], None, "")


def _disc(page: Page) -> dict:
    image = Image.new("RGB", (80, 48), (30, 30, 60))
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=(240, 200, 30))
    return uploaded(page, image)


def test_the_slider_shows_the_evidence_for_the_predicted_class_at_first(page):
    top, key = predict(page, _disc(page), page.start)
    result = page.results.get(key)
    labels = page_model(page, page.start).model.labels
    assert {m.target for m in result.analysis.evidence} == {labels.index(next(iter(top)))}
    small = shown(result.image, SLIDER_SIDE)
    want = overlay(small, find_map(result.analysis.evidence, MapKind.COMBINED), result.analysis.geometry,
                   Style().colormap, Style().opacity)
    assert np.array_equal(np.asarray(slider_value(result, Style())[1]), np.asarray(want))


def test_picking_the_predicted_class_shows_the_evidence_from_the_same_pass(page, monkeypatch):
    top, key = predict(page, _disc(page), page.start)
    loaded = page_model(page, page.start)
    monkeypatch.setattr(loaded, "class_maps", lambda *args: pytest.fail("the evidence was computed again"))
    explain_class(page, next(iter(top)), key, Style())
    result = page.results.get(key)
    assert result.class_maps == tuple(result.analysis.evidence)


def test_picking_another_class_shows_the_evidence_for_it(page):
    top, key = predict(page, _disc(page), page.start)
    labels = page_model(page, page.start).model.labels
    other = next(label for label in labels if label != next(iter(top)))
    explain_class(page, other, key, Style())
    assert {m.target for m in page.results.get(key).class_maps} == {labels.index(other)}


def test_picking_another_class_runs_on_the_served_engine_once_it_is_built(page, monkeypatch):
    top, key = predict(page, _disc(page), page.start)
    loaded = page_model(page, page.start)
    assert loaded.ready.wait(120) and isinstance(loaded.fast, EngineModel)
    runs = []
    cache = loaded.class_maps
    monkeypatch.setattr(loaded, "class_maps", lambda image, index, served: runs.append(served) or cache(image, index,
                                                                                                         served))
    other = next(label for label in loaded.model.labels if label != next(iter(top)))
    explain_class(page, other, key, Style())
    assert runs == [loaded.fast]


def test_timing_says_what_ran_the_model(page):
    _, key = predict(page, uploaded(page, Image.new("RGB", (64, 48))), page.start)
    result = replace(page.results.get(key), engine="onnxruntime")
    assert "ms (onnxruntime), overlays 12 ms" in timing(result, 0.012)


def test_picking_a_class_for_an_expired_result_says_so(page):
    with pytest.raises(gr.Error, match="expired"):
        explain_class(page, "class_0", "no-such-key", Style())


def test_restyling_an_expired_result_keeps_the_new_style(page):
    with pytest.warns(UserWarning, match="expired"):
        style, gallery, compare = restyle(page, "no-such-key", "jet", 0.7, True)
    assert style == Style("jet", 0.7, True) and gallery == compare == gr.skip()


@slow
def test_gradio_cache_is_cleaned_on_schedule(tmp_path):
    demo = build_demo("van_micro", root=tmp_path, delete_cache=(1, 1))
    demo.launch(**dict(launch_options(), server_name="127.0.0.1", server_port=None), prevent_thread_lock=True,
                quiet=True)
    try:
        Client(demo.local_url, verbose=False).predict(handle_file(shape_image(tmp_path / "a.png")), api_name="/predict")
        cached = [f for files in demo.temp_file_sets for f in files]
        assert cached and all(Path(f).exists() for f in cached)
        time.sleep(3.5)
        assert not any(Path(f).exists() for f in cached)
    finally:
        demo.close()


# --- reading uploads ------------------------------------------------------------------------------------------


def test_header_over_the_pixel_limit_is_refused_before_decoding(page):
    tiny_limits = Page(page.models, page.results, page.start, page.uploads, limits=ImageLimits(10**6, 100))
    with pytest.raises(gr.Error, match="Image too large: 20×10 pixels; the limit is 0 megapixels"):
        read_upload(tiny_limits, uploaded(page, Image.new("RGB", (20, 10))))


def test_file_over_the_byte_limit_is_refused(page):
    small = Page(page.models, page.results, page.start, page.uploads, limits=ImageLimits(100, 10**6))
    with pytest.raises(gr.Error, match="Image too large: upload.png: .* bytes; the limit is 100"):
        read_upload(small, uploaded(page, Image.effect_noise((64, 64), 50)))


def test_data_url_over_the_byte_limit_is_refused_from_its_length(page):
    small = Page(page.models, page.results, page.start, page.uploads, limits=ImageLimits(1000, 10**6))
    with pytest.raises(gr.Error, match="Image too large: data: URL of about"):
        read_upload(small, {"url": "data:image/png;base64," + "A" * 4000})


def test_formats_other_than_the_listed_ones_are_refused(page):
    ppm = io.BytesIO()
    Image.new("RGB", (8, 8)).save(ppm, "PPM")
    with pytest.raises(gr.Error, match=r"not a readable image \(not a PNG, JPEG"):
        read_upload(page, uploaded(page, ppm.getvalue(), "image.png"))


def test_large_jpeg_is_decoded_at_a_reduced_scale_to_the_working_size(page, monkeypatch):
    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), np.uint8)).save(photo, "JPEG")
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    image = read_upload(page, uploaded(page, photo.getvalue(), "photo.jpg"))
    assert image.size == (1024, 768) and set(decoded) == {(2000, 1500)}


def test_exif_orientation_survives_the_reduction(page):
    stored = Image.new("RGB", (3000, 1000), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif)
    assert read_upload(page, uploaded(page, buffer.getvalue())).size == (341, 1024)


def test_missing_image_is_a_readable_error(page):
    with pytest.raises(gr.Error, match="No image"):
        read_upload(page, None)


def test_bundled_examples_are_images(page):
    for path in example_images(ROOT / "examples"):
        assert read_upload(page, uploaded(page, Path(path).read_bytes())).size[0] > 0


def test_request_body_limit_refuses_declared_and_streamed_bodies():
    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    async def chunks():
        for _ in range(4):
            yield b"x" * 40

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=BodyLimit(app, max_bytes=100))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            return [(await http.post("/", content=b"x" * 100)).status_code,
                    (await http.post("/", content=b"x" * 101)).status_code,
                    (await http.post("/", content=chunks())).status_code]

    import asyncio

    assert asyncio.run(run()) == [200, 413, 413]


def test_url_download_stops_past_the_byte_limit(tmp_path):
    import asyncio

    async def chunks():
        for _ in range(3):
            yield b"x" * 600

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/moved":
            return httpx.Response(302, headers={"location": "/small.png"})
        if request.url.path == "/declared.png":
            return httpx.Response(200, headers={"content-length": "5000"}, content=b"x" * 5000)
        if request.url.path == "/streamed.png":
            return httpx.Response(200, content=chunks())
        return httpx.Response(200, content=b"x" * 50)

    def fetch(path: str) -> Path:
        return asyncio.run(fetch_limited(f"https://images.example{path}", tmp_path, 1000,
                                         transport=httpx.MockTransport(server)))

    assert fetch("/moved").read_bytes() == b"x" * 50
    for path in ("/declared.png", "/streamed.png"):
        with pytest.raises(ImageTooLargeError, match="the limit is 1,000|more than 1,000 bytes"):
            fetch(path)


# --- escaping -------------------------------------------------------------------------------------------------


def test_markdown_text_leaves_no_html_or_markdown():
    shown = markdown_text('<b class="x">**bold**</b> [a](http://e) $$x$$\n# h')
    assert "<" not in shown and ">" not in shown
    assert shown == (r'&lt;b class="x"&gt;\*\*bold\*\*&lt;/b&gt; \[a\]\(http\://e\) \$\$x\$\$ \# h')


# --- the model picker -----------------------------------------------------------------------------------------


def test_default_model_is_the_first_export_under_checkpoints(tmp_path):
    (tmp_path / "b-model").mkdir()
    (tmp_path / "b-model" / "config.json").write_text("{}")
    (tmp_path / "a-notes").mkdir()
    assert default_key(tmp_path) == ModelKey(str(tmp_path / "b-model"))


def test_default_model_without_export_is_van_b0(tmp_path):
    assert default_key(tmp_path / "missing") == ModelKey("van_b0")


def test_examples_are_every_image_in_the_folder(tmp_path):
    for name in ("b.jpg", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [Path(p).name for p in example_images(tmp_path)] == ["a.png", "b.jpg"]


def test_launch_options_honour_gradio_environment(monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "127.0.0.1")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    assert launch_options()["server_name"] == "127.0.0.1" and launch_options()["server_port"] == 7999


def test_official_weights_offline_and_uncached_are_a_readable_error(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(gr.Error, match="van_b0.*offline"):
        load_for_page(ModelStore(), ModelKey("van_b0", pretrained=True))


def test_typed_folder_that_is_not_a_model_is_a_readable_error(tmp_path):
    with pytest.raises(gr.Error, match="no config.json"):
        load_for_page(ModelStore(), ModelKey(str(tmp_path)))


def test_any_loader_failure_is_one_readable_line(monkeypatch):
    def broken(key: ModelKey, max_bytes: int | None) -> None:
        raise RuntimeError("size mismatch for head.weight\nlong tensor dump")

    store = ModelStore()
    monkeypatch.setattr(store, "_load", broken)
    with pytest.raises(gr.Error) as refused:
        load_for_page(store, ModelKey("someone/model"))
    assert refused.value.message == "Could not load someone/model: size mismatch for head.weight"


def test_a_visitors_load_is_bounded_but_not_the_startup_model(page, hostile_export):
    exported = ModelKey(str(hostile_export))
    bounded = Page(ModelStore(), page.results, page.start, page.uploads, max_model_bytes=1000)
    with pytest.raises(gr.Error, match=r"Could not load .*more than the 1,000 allowed"):
        page_model(bounded, exported)
    assert page_model(replace(bounded, start=exported), exported).model.labels == HOSTILE_LABELS


def test_typed_source_must_not_be_empty():
    with pytest.raises(gr.Error, match="Type a Hub repo id"):
        typed_source("   ")


def test_typed_local_folder_loads_where_local_models_are_allowed(tmp_path):
    assert typed_source(f" {tmp_path} ") == ModelKey(str(tmp_path))


@pytest.mark.parametrize("text", ["checkpoints/van-b0-shapes", "/etc", "../secrets", "~/models/mine", "not a repo"])
def test_server_paths_are_refused_where_local_models_are_off(text, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(gr.Error, match="turned off"):
        typed_source(text, allow_local=False)


def test_variants_without_weights_are_refused_where_local_models_are_off():
    with pytest.raises(gr.Error, match=r"van_b6 has no trained weights here \(random weights would serve no"):
        typed_source("van_b6", allow_local=False)


def test_hub_repo_ids_still_load_where_local_models_are_off():
    assert typed_source("someone/van-b0-pets", allow_local=False) == ModelKey("someone/van-b0-pets")


@pytest.fixture(scope="module")
def space_url() -> str:
    process, url = serve_app("van_micro", env={"SPACE_ID": "someone/van-studio"})
    try:
        yield url
    finally:
        stop_app(process)


@slow
def test_a_space_offers_only_models_with_weights(space_url):
    with urllib.request.urlopen(space_url + "config", timeout=10) as response:
        page = json.load(response)
    radio = next(c["props"] for c in page["components"] if c.get("type") == "radio")
    assert [value for _, value in radio["choices"]] == ["startup", *pretrained_variants()]
    textboxes = [c["props"].get("label") for c in page["components"] if c.get("type") == "textbox"]
    assert textboxes == ["Hub repo id (owner/name)"]


@slow
def test_a_space_refuses_a_random_variant_at_once(space_url):
    start = time.perf_counter()
    _, message = call_event(space_url, "choose_source", ["van_b6"])
    assert time.perf_counter() - start < 3.0  # loading it took 8-40 s and 2-3 GB
    assert error_of(message).startswith("van_b6 has no trained weights here")
