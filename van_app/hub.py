"""Publishing an export folder as a Hugging Face Hub model repo: create it if needed, upload in one commit.

Only the files of a complete export travel (never Lightning ``.ckpt`` pickles,
logs or checkpoints), and the model card is written for the target repo. The
token comes from ``HF_TOKEN`` or the huggingface_hub login and is handed to the
client only: never printed, logged or written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, get_token

from .errors import HubError, first_line
from .files import CARD, EXPORT_CONFIG, EXPORT_FILES, EXPORT_WEIGHTS, METRICS


def require_token(token: str | None = None) -> str:
    """``token``, else the one from ``HF_TOKEN`` or ``hf auth login``; a clear error when there is none."""
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    return token


def check_export(folder: Path) -> dict[str, Any]:
    """The config of ``folder`` if it is a complete van_app export; else a ``HubError`` naming what is missing."""
    if not folder.is_dir():
        raise HubError(f"{folder}: no such folder")
    if not (folder / EXPORT_CONFIG).is_file() or not (folder / EXPORT_WEIGHTS).is_file():
        raise HubError(f"{folder}: not a van_app export (no {EXPORT_CONFIG} or {EXPORT_WEIGHTS}); "
                       f"train one with van-finetune")
    try:
        config = json.loads((folder / EXPORT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HubError(f"{folder / EXPORT_CONFIG}: unreadable ({first_line(e)})") from e
    if not isinstance(config, dict):
        raise HubError(f"{folder / EXPORT_CONFIG}: not a van_app export config (a JSON object)")
    listed = config.get("files")
    expected = [name for name in listed if name in EXPORT_FILES] if isinstance(listed, list) else list(EXPORT_FILES)
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise HubError(f"{folder}: incomplete van_app export, missing {', '.join(missing)}; "
                       f"export it again with van-finetune")
    return config


def card_for(folder: Path, config: dict[str, Any], repo_id: str) -> bytes:
    """The export's model card naming ``repo_id`` in its usage snippets (as written, for exports that predate it)."""
    from .export import RunInfo, model_card

    if RunInfo.from_config(config) is None:
        return (folder / CARD).read_bytes()
    metrics = json.loads((folder / METRICS).read_text(encoding="utf-8"))
    return str(model_card(config, metrics, repo_id)).encode("utf-8")


def push_export(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    api: HfApi | None = None,
    commit_message: str = "Upload VAN classifier from van_app",
) -> str:
    """Create ``repo_id`` if needed and upload the export files of ``folder`` in one commit; returns the repo URL.

    The model card is written for ``repo_id`` (its snippets load ``repo_id``); every
    other file is uploaded as it is on disk, and the local folder is left unchanged.
    """
    folder = Path(folder)
    config = check_export(folder)
    api = api or HfApi(token=require_token(token))
    try:
        card = card_for(folder, config, repo_id)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name)
                      for name in EXPORT_FILES if name != CARD and (folder / name).is_file()]
        operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card))
        repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message, repo_type="model")
    except Exception as e:  # the client raises HTTP, connection, validation and OS errors of many types
        raise HubError(f"push to {repo_id} failed: {first_line(e)}") from e
    return str(repo)
