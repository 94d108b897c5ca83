"""The app served by ``python app.py`` on 127.0.0.1, driven over real HTTP with gradio_client; its helpers directly."""

from __future__ import annotations

import atexit
import functools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gradio as gr
import huggingface_hub
import pytest
from gradio_client import Client, handle_file
from PIL import Image, ImageDraw

from van_app.ui import (MAX_PIXELS, ModelKey, ModelStore, default_key, example_images, launch_options,
                       load_for_page, read_image, typed_source)

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """``python app.py`` with ``VAN_MODEL=model`` on a free local port, once it answers HTTP."""
    port = free_port()
    env = dict(os.environ, VAN_MODEL=model, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}:\n{process.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"app.py did not answer on {url} within {timeout} s")


def stop(process: subprocess.Popen) -> None:
    """Terminate the app and reap it."""
    process.terminate()
    process.wait(timeout=30)


@functools.cache
def shared_app() -> str:
    """URL of one ``python app.py`` (VAN_MODEL=van_micro) shared by the app and browser tests, stopped at exit."""
    process, url = start_app("van_micro")
    atexit.register(stop, process)
    return url


@pytest.fixture(scope="module")
def client() -> Client:
    return Client(shared_app(), verbose=False)


def shape_image(path: Path, size: tuple[int, int] = (80, 48), mode: str = "RGB") -> Path:
    """A small picture of a disc on a dark background, saved to ``path``."""
    image = Image.new("RGB", size, (30, 30, 60))
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=(240, 200, 30))
    image.convert(mode).save(path)
    return path


def test_predict_returns_top_k_labels_and_overlays(client, tmp_path):
    labels, gallery = client.predict(handle_file(shape_image(tmp_path / "disc.png")), api_name="/predict")
    assert len(labels["confidences"]) == 5
    assert [item["caption"].split(" (")[0] for item in gallery] == ["Stage 1", "Stage 2", "Stage 3", "Stage 4",
                                                                     "Combined"]
    with Image.open(gallery[-1]["image"]) as overlay:
        assert overlay.size == (80, 48) and overlay.mode == "RGB"


def test_api_exposes_only_predict(client):
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/predict"]


def test_not_an_image_is_refused_readably(client, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(Exception, match="Not an image"):
        client.predict(handle_file(path), api_name="/predict")


def test_corrupt_image_is_refused_readably(client, tmp_path):
    data = shape_image(tmp_path / "whole.png").read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="Corrupt or unreadable image"):
        client.predict(handle_file(path), api_name="/predict")


def test_file_over_the_upload_limit_is_refused(client, tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(b"\x89PNG" + os.urandom(11 * 1024 * 1024))
    with pytest.raises(Exception, match="exceeds the maximum file size"):
        client.predict(handle_file(path), api_name="/predict")


def test_too_many_pixels_is_refused_readably(client, tmp_path):
    path = tmp_path / "wide.png"
    Image.new("1", (MAX_PIXELS // 1000 + 1000, 1000)).save(path)
    with pytest.raises(Exception, match="Image too large"):
        client.predict(handle_file(path), api_name="/predict")


def test_animated_gif_is_classified_from_its_first_frame(client, tmp_path):
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    labels, gallery = client.predict(handle_file(path), api_name="/predict")
    assert len(labels["confidences"]) == 5 and len(gallery) == 5


def test_sixteen_bit_png_is_classified(client, tmp_path):
    path = tmp_path / "deep.png"
    Image.new("I;16", (50, 40), 40000).save(path)
    labels, _ = client.predict(handle_file(path), api_name="/predict")
    assert len(labels["confidences"]) == 5


def test_server_keeps_serving_after_a_bad_request(client, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    with pytest.raises(Exception):
        client.predict(handle_file(bad), api_name="/predict")
    labels, gallery = client.predict(handle_file(shape_image(tmp_path / "ok.png")), api_name="/predict")
    assert len(labels["confidences"]) == 5 and len(gallery) == 5


def test_default_model_is_the_first_export_under_checkpoints(tmp_path):
    (tmp_path / "b-model").mkdir()
    (tmp_path / "b-model" / "config.json").write_text("{}")
    (tmp_path / "a-notes").mkdir()
    assert default_key(tmp_path) == ModelKey(str(tmp_path / "b-model"))


def test_default_model_without_export_is_a_random_van_b0(tmp_path):
    key = default_key(tmp_path / "missing")
    assert key == ModelKey("van_b0") and key.random


def test_examples_are_every_image_in_the_folder(tmp_path):
    for name in ("b.jpg", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [Path(p).name for p in example_images(tmp_path)] == ["a.png", "b.jpg"]


def test_bundled_examples_are_images():
    paths = example_images(ROOT / "examples")
    assert paths and all(read_image(p).size[0] > 0 for p in paths)


def test_read_image_scales_large_images_down(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (3000, 1500)).save(path)
    assert read_image(str(path)).size == (1024, 512)


def test_missing_image_is_a_readable_error():
    with pytest.raises(gr.Error, match="No image"):
        read_image(None)


def test_launch_options_honour_gradio_environment(monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "127.0.0.1")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    assert launch_options()["server_name"] == "127.0.0.1" and launch_options()["server_port"] == 7999


def test_launch_options_default_to_all_interfaces_on_7860(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    options = launch_options()
    assert (options["server_name"], options["server_port"]) == ("0.0.0.0", 7860) and options["max_file_size"]


def test_official_weights_offline_and_uncached_are_a_readable_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(gr.Error, match="van_b0.*offline"):
        load_for_page(ModelStore(), ModelKey("van_b0", pretrained=True))


def test_typed_folder_that_is_not_a_model_is_a_readable_error(tmp_path):
    with pytest.raises(gr.Error, match="no config.json"):
        load_for_page(ModelStore(), ModelKey(str(tmp_path)))


def test_typed_source_must_not_be_empty():
    with pytest.raises(gr.Error, match="Type a Hub repo id"):
        typed_source("   ")


def test_typed_local_folder_loads_where_local_models_are_allowed(tmp_path):
    assert typed_source(f" {tmp_path} ") == ModelKey(str(tmp_path))


@pytest.mark.parametrize("text", ["checkpoints/van-b0-shapes", "/etc", "../secrets", "~/models/mine"])
def test_server_paths_are_refused_where_local_models_are_off(text, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(gr.Error, match="turned off"):
        typed_source(text, allow_local=False)


def test_hub_repo_ids_still_load_where_local_models_are_off():
    assert typed_source("someone/van-b0-pets", allow_local=False) == ModelKey("someone/van-b0-pets")


def test_a_hugging_face_space_turns_local_models_off(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/van-studio")
    process, url = start_app("van_micro")
    try:
        with urllib.request.urlopen(url + "config", timeout=10) as response:
            page = json.load(response)
    finally:
        stop(process)
    labels = [c["props"].get("label") for c in page["components"] if c.get("type") == "textbox"]
    assert "Hub repo id (owner/name)" in labels
    assert not any("local" in (label or "") for label in labels)
