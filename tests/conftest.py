"""Shared fixtures: tiny generated image folders and one tiny fine-tuning run exported once per session."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The smallest useful fine-tuning run: the registered few-thousand-parameter VAN on 32 px images.
TINY_RUN = ["--model", "van_micro", "--pretrained", "none", "--img-size", "32", "--batch-size", "4",
            "--workers", "0", "--epochs", "1"]


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
