"""Publishing an export folder as a Hugging Face Hub model repo: create it if needed, upload in one commit.

Only the export files travel (never Lightning ``.ckpt`` pickles, logs or
checkpoints). The token comes from ``HF_TOKEN`` or the huggingface_hub login
and is handed to the client only: never printed, logged or written.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, get_token

from .errors import HubError, first_line
from .files import EXPORT_CONFIG, EXPORT_FILES, EXPORT_WEIGHTS


def require_token(token: str | None = None) -> str:
    """``token``, else the one from ``HF_TOKEN`` or ``hf auth login``; a clear error when there is none."""
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    return token


def check_export(folder: Path) -> None:
    """Refuse a folder that is not a van_app export (no weights or config)."""
    if not folder.is_dir():
        raise HubError(f"{folder}: no such folder")
    missing = [name for name in (EXPORT_WEIGHTS, EXPORT_CONFIG) if not (folder / name).is_file()]
    if missing:
        raise HubError(f"{folder}: not a van_app export (no {', '.join(missing)}); train one with van-finetune")


def push_export(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    api: HfApi | None = None,
    commit_message: str = "Upload VAN classifier from van_app",
) -> str:
    """Create ``repo_id`` if needed and upload the export files of ``folder`` in one commit; returns the repo URL."""
    folder = Path(folder)
    check_export(folder)
    api = api or HfApi(token=require_token(token))
    try:
        repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            allow_patterns=list(EXPORT_FILES),
            ignore_patterns=["*.ckpt", "checkpoints/*", "logs/*"],
            commit_message=commit_message,
        )
    except Exception as e:  # the client raises HTTP, connection, validation and OS errors of many types
        raise HubError(f"push to {repo_id} failed: {first_line(e)}") from e
    return str(repo)
