"""Serving the page to the public: the models and results it holds, bounded, and the requests it admits.

- ``ModelStore``: models loaded once per process, the last few kept. A model serves at once
  through its folded eager copy while ``fuse`` builds the fastest engine in the background
  (an ONNX graph with the attention maps as outputs, cached on disk by ``engines``); the
  engine takes over once it is built and warmed up, so the page answers while it warms up.
- ``ResultStore``: each session's last result kept server-side under a random key,
  bounded in number and age whatever the number of sessions.
- ``BodyLimit``: an ASGI middleware that refuses any request body over a size before
  the app reads it (gradio decodes ``data:`` URLs from the JSON of an event).
- ``fetch_limited``: the download of an image URL an API client sends, to public
  addresses only and stopped past a byte limit (gradio's own download is unbounded).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import httpx
import PIL.Image
import torch
from torch import nn

from .engines import EngineModel
from .explain import ClassMapCache, analyse
from .files import IMAGE_SUFFIXES
from .fold import fold
from .fuse import fuse
from .images import BadImageError, ImageTooLargeError
from .weights import load_model

# Hosts gradio itself fetches from without an address check (Hugging Face's own, behind split DNS).
TRUSTED_HOSTS = ("hf.co", "huggingface.co", "*.hf.co", "*.huggingface.co")
MAX_REDIRECTS = 5
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelKey:
    """What to load: anything ``load_model`` accepts, and whether to fetch official weights."""

    source: str
    pretrained: bool = False


@dataclass
class LoadedModel:
    """A model ready to serve: the unfused one, its folded eager copy, the class maps asked for, and the engine once
    built.

    ``serving`` is safe to call from several threads at once (neither model uses hooks).
    ``ready`` is set when the background build has finished, whether an engine came of it or not.
    """

    key: ModelKey
    model: nn.Module
    eager: nn.Module
    class_maps: ClassMapCache
    fast: nn.Module | EngineModel | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def serving(self) -> nn.Module | EngineModel:
        """The fastest model built so far: ``fuse``'s once ready, the folded eager model until then."""
        return self.fast if self.fast is not None else self.eager


def engine_name(model: nn.Module | EngineModel) -> str:
    """What runs ``model``'s predictions of one image with attention maps: an ONNX engine's name, or "PyTorch"."""
    if isinstance(model, EngineModel):
        return model.engine_for((1, 3, *model.input_size), maps=True)
    return "PyTorch"


class ModelStore:
    """Models loaded once per process and shared by every session (least recently used dropped past ``maxsize``).

    ``threads`` is what one prediction may use of an engine (default: the cores shared by two concurrent calls).
    """

    def __init__(self, maxsize: int = 3, device: str | None = None, threads: int | None = None) -> None:
        self.maxsize = maxsize
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.threads = threads or max(1, (os.cpu_count() or 1) // 2)
        self._models: OrderedDict[ModelKey, LoadedModel] = OrderedDict()
        self._loading: dict[ModelKey, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: ModelKey, max_bytes: int | None = None) -> LoadedModel:
        """The loaded model for ``key``, loaded on first use (once per key), its engine built in the background.

        A load refuses weights files over ``max_bytes`` before reading or downloading them.
        """
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            try:
                loaded = self._load(key, max_bytes)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                self._models[key] = loaded
                while len(self._models) > self.maxsize:
                    self._models.popitem(last=False)
        return loaded

    def _load(self, key: ModelKey, max_bytes: int | None) -> LoadedModel:
        """Load one model and fold it (it serves at once); its engine is built by a background thread."""
        model = load_model(key.source, pretrained=key.pretrained, max_bytes=max_bytes).to(self.device)
        eager = fold(model)
        loaded = LoadedModel(key, model, eager, ClassMapCache(eager))
        # Not a daemon: an interpreter that exits mid-build waits for it (OpenVINO aborts the process when torn down
        # under a running call).
        threading.Thread(target=self._speed_up, args=(loaded,), name=f"fuse {key.source}").start()
        return loaded

    def _speed_up(self, loaded: LoadedModel) -> None:
        """Build ``loaded``'s fastest model, warm it up (attention maps included) and let it serve."""
        try:
            fast = fuse(loaded.model, threads=self.threads)
            width = loaded.model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
            analyse(fast, PIL.Image.new("RGB", (width, width)))
            loaded.fast = fast
        except Exception:  # whatever the build raised, the eager model keeps serving
            logger.warning("%s keeps serving with PyTorch: its engine could not be built", loaded.key.source,
                           exc_info=True)
        finally:
            loaded.ready.set()


class ResultStore:
    """Values kept server-side under random keys: at most ``maxsize`` (least recently used dropped), ``ttl`` seconds each.

    A session holds only the key (in ``gr.State``), so the memory held for results
    is bounded by ``maxsize`` whatever the number of sessions.
    """

    def __init__(self, maxsize: int = 32, ttl: float = 900.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.maxsize = maxsize
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    def put(self, value: Any, key: str | None = None) -> str:
        """Keep ``value`` under ``key`` (a new random key when None) for ``ttl`` seconds from now; the key."""
        key = key or secrets.token_urlsafe(16)
        with self._lock:
            self._entries[key] = (self._clock() + self.ttl, value)
            self._entries.move_to_end(key)
            self._expire()
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return key

    def get(self, key: str | None) -> Any | None:
        """The value kept under ``key``, or None when there is none (never stored, expired or dropped)."""
        with self._lock:
            self._expire()
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key][1]

    def _expire(self) -> None:
        """Drop the entries whose time is up (the caller holds the lock)."""
        now = self._clock()
        for key in [k for k, (deadline, _) in self._entries.items() if deadline <= now]:
            del self._entries[key]


class BodyLimit:
    """ASGI middleware: an HTTP request whose body exceeds ``max_bytes`` gets a 413 before the app has read it.

    A declared ``Content-Length`` over the limit is refused without reading a byte; a
    streamed body is counted as the app reads it and cut off once over the limit.
    """

    def __init__(self, app: Callable, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Callable) -> None:
        """Answer 413 with a one-line JSON reason."""
        body = (f'{{"detail": "Request too large: the limit is {self.max_bytes / 2**20:.0f} MB. '
                f'Upload images of at most {self.max_bytes * 3 // 4 / 2**20:.0f} MB."}}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    """Raised inside ``BodyLimit`` when a streamed body passes its limit."""


def request_limit(max_file_bytes: int) -> int:
    """The largest request body to admit: one image of ``max_file_bytes`` as a base64 ``data:`` URL, plus JSON."""
    return max_file_bytes * 4 // 3 + 64 * 1024


def _trusted(host: str) -> bool:
    """Whether ``host`` is one of ``TRUSTED_HOSTS`` (``*.`` matches subdomains)."""
    host = host.lower()
    return any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in TRUSTED_HOSTS)


async def _transport_for(url: str) -> httpx.AsyncBaseTransport | None:
    """A transport pinned to a public address of ``url``'s host (None: trusted host), or ``BadImageError``."""
    import safehttpx

    host = httpx.URL(url).host
    if urlparse(url).scheme not in ("http", "https") or not host:
        raise BadImageError(f"not an http(s) URL: {url[:100]}")
    if _trusted(host):
        return None
    try:
        return safehttpx.AsyncSecureTransport(await safehttpx.async_validate_url(host))
    except ValueError as e:
        raise BadImageError(f"{host} does not resolve to a public address") from e


async def fetch_limited(url: str, folder: Path, max_bytes: int, timeout: float = 20.0,
                        transport: httpx.AsyncBaseTransport | None = None) -> Path:
    """Download ``url`` into ``folder`` and return the file; refused past ``max_bytes`` (declared or received).

    Only public addresses are contacted (each redirect checked again), unless a
    ``transport`` is given (tests). Raises ``BadImageError`` / ``ImageTooLargeError``.
    """
    for _ in range(MAX_REDIRECTS + 1):
        pinned = transport or await _transport_for(url)
        async with httpx.AsyncClient(transport=pinned, timeout=timeout) as client:
            try:
                async with client.stream("GET", url) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise BadImageError(f"download failed with HTTP status {response.status_code}")
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > max_bytes:
                        raise ImageTooLargeError(f"{declared:,} bytes; the limit is {max_bytes:,}",
                                                 "bytes", declared, max_bytes)
                    data = bytearray()
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > max_bytes:
                            raise ImageTooLargeError(f"more than {max_bytes:,} bytes", "bytes", len(data), max_bytes)
            except httpx.HTTPError as e:
                raise BadImageError(f"download failed ({type(e).__name__})") from e
        suffix = Path(urlparse(url).path).suffix.lower()
        name = "download" + (suffix if suffix in IMAGE_SUFFIXES else "")
        target = folder / hashlib.sha256(url.encode()).hexdigest()[:32] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bytes(data))
        return target
    raise BadImageError(f"more than {MAX_REDIRECTS} redirects")
