"""The errors users see: each is one line, fit to print before exiting or to show on the page.

Importing this module costs nothing (no torch, no timm), so the console scripts
can report a usage error before any heavy import.
"""

from __future__ import annotations

MESSAGE_LIMIT = 300


class CheckpointError(ValueError):
    """A file, folder or Hub repo that is not a usable VAN checkpoint."""


class DataError(ValueError):
    """A problem with the user's data folder."""


class HubError(RuntimeError):
    """A push to the Hugging Face Hub that could not happen."""


class UsageError(ValueError):
    """Options that contradict each other or the output folder's state."""


def first_line(error: BaseException | str, limit: int = MESSAGE_LIMIT) -> str:
    """The first meaningful line of an error message, at most ``limit`` characters.

    An exception re-raised from a DataLoader worker carries the worker's whole
    traceback ("Caught X in DataLoader worker process 0. Original Traceback ...");
    its last line holds the original message.
    """
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    line = lines[0]
    if line.startswith("Caught ") and "Original Traceback" in text:
        line = lines[-1].split(": ", 1)[-1]
    return line if len(line) <= limit else line[: limit - 1] + "…"
