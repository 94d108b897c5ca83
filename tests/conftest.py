"""Shared fixtures: tiny generated image folders and one tiny fine-tuning run exported once per session."""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

# The smallest useful fine-tuning run: the registered few-thousand-parameter VAN on 32 px images.
TINY_RUN = ["--model", "van_micro", "--pretrained", "none", "--img-size", "32", "--batch-size", "4",
            "--workers", "0", "--epochs", "1"]
TOKEN = "hf_localtesttoken0123456789"
# Fixtures that train or serve in a subprocess: every test using one is marked slow (``pytest -m "not slow"``).
SLOW_FIXTURES = frozenset({"trained", "split_run", "app_server", "app_url"})
ROOT = Path(__file__).resolve().parents[1]
# Labels and a folder name that are HTML and Markdown: the page must show them as text.
HOSTILE_LABELS = ['<img class="evil" src=x onerror="window.__pwned=1">', '<b class="evil">bold</b>',
                  '<a class="evil" href="https://example.com">link</a>', "**stars** [md](https://example.com) $$x$$"]
HOSTILE_FOLDER = '<img class=evil src=x onerror="window.__pwned=2">'
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the one revision every fake Hub repo is at


def make_image_folders(root: Path, classes: tuple[str, ...] = ("cat", "dog", "owl"), per_class: int = 8,
                       size: int = 40) -> Path:
    """``root/<class>/<i>.png``: noise tinted by class (so a tiny model can learn it), seeded."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random((size, size, 3)) * 80).astype(np.uint8)
            pixels[..., c % 3] += 150
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def run_cli(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 240,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a console script (``van-finetune``, ``van-push``) in a subprocess, capturing its output."""
    full_env = dict(os.environ, HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([script, *args], env=full_env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Iterator[Path]:
    """A temporary folder for the models ``fuse`` builds (exported graphs), for this process and the apps it starts."""
    folder = tmp_path_factory.mktemp("van_app_cache")
    previous = os.environ.get("VAN_APP_CACHE")
    os.environ["VAN_APP_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("VAN_APP_CACHE", None)
    else:
        os.environ["VAN_APP_CACHE"] = previous


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """(data folder, export folder, finished process) of a 2-epoch van_micro run with one corrupt image."""
    root = tmp_path_factory.mktemp("trained")
    data = make_image_folders(root / "pets")
    (data / "owl" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = root / "export"
    result = run_cli("van-finetune", "--data", str(data), *TINY_RUN, "--epochs", "2", "--output", str(out),
                     env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return data, out, result


class FakeHub(BaseHTTPRequestHandler):
    """The Hub endpoints huggingface_hub's create_repo, upload_folder and hf_hub_download call; the rest is a 404."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append({"method": self.command, "path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        endpoint = f"http://127.0.0.1:{self.server.server_port}"
        if self.path == "/api/repos/create":
            repo = json.loads(body)
            self._json({"url": f"{endpoint}/{repo['organization']}/{repo['name']}"})
        elif self.path == "/api/validate-yaml":
            self._json({"errors": [], "warnings": []})
        elif "/preupload/" in self.path:  # "regular" upload: file contents travel inside the commit itself
            files = json.loads(body)["files"]
            self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        elif "/commit/" in self.path:
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            self._json({"commitUrl": f"{endpoint}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})
        else:
            self._json({"error": "not found"}, 404)

    def do_GET(self) -> None:
        self.server.requests.append({"method": self.command, "path": self.path, "auth": self.headers.get("Authorization"), "body": b""})
        if "/resolve/" in self.path:
            self._resolve(send_body=True)
        else:
            self._json({"error": "not found"}, 404)

    def do_HEAD(self) -> None:
        self.server.requests.append({"method": self.command, "path": self.path, "auth": self.headers.get("Authorization"), "body": b""})
        self._resolve(send_body=False)

    def _resolve(self, send_body: bool) -> None:
        """``/<repo>/resolve/<revision>/<file>``: a file of ``server.files`` (``{"repo/file": bytes}``), else a 404."""
        repo, _, rest = self.path.partition("/resolve/")
        data = self.server.files.get(f"{repo.strip('/')}/{rest.partition('/')[2]}")
        self.send_response(404 if data is None else 200)
        self.send_header("X-Repo-Commit", HUB_COMMIT)
        if data is None:
            self.send_header("X-Error-Code", "EntryNotFound")
        else:
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", "0" if data is None else str(len(data)))
        self.end_headers()
        if send_body and data is not None:
            self.wfile.write(data)

    def _json(self, obj: dict, status: int = 200) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def fake_hub() -> Iterator[ThreadingHTTPServer]:
    """A running fake Hub on 127.0.0.1; ``server.requests`` lists what the client sent, ``server.files`` is served."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.requests = []
    server.files = {}
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hub() -> Iterator[ThreadingHTTPServer]:
    """A fake Hub for one test."""
    with fake_hub() as server:
        yield server


def hub_env(server: ThreadingHTTPServer, tmp_path: Path, token: str = TOKEN) -> dict[str, str]:
    """Environment pointing huggingface_hub at ``server`` with ``token`` and no stored login."""
    return {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_TOKEN": token,
            "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0"}


def commits(server: ThreadingHTTPServer) -> list[list[dict]]:
    """Each commit request as its NDJSON lines."""
    return [[json.loads(line) for line in r["body"].splitlines()] for r in server.requests if "/commit/" in r["path"]]


def committed_files(commit: list[dict]) -> dict[str, bytes]:
    """``{path in repo: content}`` of the file operations in one commit."""
    return {op["value"]["path"]: base64.b64decode(op["value"]["content"]) for op in commit if op["key"] == "file"}


def _end_with_parent() -> None:
    """In a child before it runs: SIGTERM it when the test process dies, so no crashed run leaves servers behind."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def serve_app(model: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """``python app.py`` with ``VAN_MODEL=model`` (and ``env``) on a free local port, once it answers HTTP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full_env = dict(os.environ, VAN_MODEL=model, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
                    GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", **(env or {}))
    # its output goes to a file: a pipe nobody reads fills up in a long session and the server blocks on its next line
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=full_env, preexec_fn=_end_with_parent,
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"app.py exited with {process.returncode}:\n{log.read()}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"app.py did not answer on {url} within {timeout} s")


def stop_app(process: subprocess.Popen) -> None:
    """Terminate an app started by ``serve_app`` and reap it."""
    process.terminate()
    process.wait(timeout=30)


def hooked_pass(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict, dict]:
    """What ``attention_pass`` must give, worked out independently: the unfolded model read with hooks on each LKA,
    the image and its blank reference in separate passes, and the evidence for each image's ``target`` class (by
    default its predicted class) at stages 1 and 2 (gradient times difference to the reference, by autograd on
    that model): (logits, block maps, evidence per stage)."""
    from van_app.attention import block_keys, reference, stage_block_maps
    from van_app.model import lka_modules

    def run(batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        captured = {}
        handles = [lka.register_forward_hook(lambda _m, _a, out, key=key: captured.__setitem__(key, out))
                   for key, lka in lka_modules(model)]
        try:
            return model(batch), captured
        finally:
            for handle in handles:
                handle.remove()

    with torch.enable_grad():
        logits, gated = run(x.clone().requires_grad_())
        with torch.no_grad():
            _, blank = run(reference(x))
        early = [key for key in block_keys(model) if key[0] in (0, 1)]
        seed = torch.nn.functional.one_hot(logits.argmax(1) if target is None else target, logits.shape[1]).float()
        grads = dict(zip(early, torch.autograd.grad(logits, [gated[key] for key in early], grad_outputs=seed)))
    evidence = {stage: sum((grads[key] * (gated[key] - blank[key])).sum(1) for key in early if key[0] == stage)
                .detach() for stage in (0, 1)}
    maps = {}
    for stage in sorted({s for s, _ in gated}):
        keys = [key for key in block_keys(model) if key[0] == stage]
        maps.update(zip(keys, stage_block_maps([gated[k].detach() for k in keys], [blank[k] for k in keys])))
    return logits.detach(), maps, evidence


@pytest.fixture(scope="session")
def reference() -> dict[str, torch.Tensor]:
    """The fixed 224 px input (``tests/fixtures``) and each peer's logits and pooled features for it."""
    tensors = load_file(ROOT / "tests" / "fixtures" / "reference.safetensors")
    tensors["input"] = tensors["input"].float()
    return tensors


@pytest.fixture(scope="session")
def app_server() -> Iterator[tuple[subprocess.Popen, str]]:
    """(process, URL) of one ``python app.py`` (VAN_MODEL=van_micro) shared by the app and browser tests."""
    process, url = serve_app("van_micro")
    try:
        yield process, url
    finally:
        stop_app(process)


@pytest.fixture(scope="session")
def app_url(app_server: tuple[subprocess.Popen, str]) -> str:
    """URL of the shared app."""
    return app_server[1]


@pytest.fixture(scope="session")
def hostile_export(tmp_path_factory) -> Path:
    """A van_micro export named ``HOSTILE_FOLDER`` whose labels are ``HOSTILE_LABELS``."""
    from safetensors.torch import save_file

    from van_app import load_model
    from van_app.export import RunInfo, export_config
    from van_app.files import EXPORT_CONFIG, EXPORT_WEIGHTS, write_json
    from van_app.predict import data_config

    folder = tmp_path_factory.mktemp("hostile") / HOSTILE_FOLDER
    model = load_model("van_micro", num_classes=len(HOSTILE_LABELS))
    run = RunInfo("hostile labels", {}, {}, "tests/conftest.py")
    write_json(folder / EXPORT_CONFIG, export_config(model, HOSTILE_LABELS, data_config(model), run))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / EXPORT_WEIGHTS))
    return folder


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that use a training or serving fixture ``slow``."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
