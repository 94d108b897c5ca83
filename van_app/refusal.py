"""A checkpoint refused in one line: where, what is wrong, and a few of many offenders by name.

Everything quoted comes from a file someone else made, so each name is cut to a
few dozen printable characters and the whole message to ``errors.MESSAGE_LIMIT``.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError, first_line

NAME_LIMIT = 60  # characters of one key or label quoted in a message
SOURCE_LIMIT = 120  # characters of a path or repo id quoted in a message


def show(text: object, limit: int = NAME_LIMIT) -> str:
    """``text`` fit for a one-line message: printable characters only, at most ``limit`` of them."""
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def count(what: str, names: list[str], noun: str = "key", shown: int = 3, limit: int = NAME_LIMIT) -> str:
    """``"missing 1,234 keys, e.g. a, b, c"``: how many, and the first few by name."""
    noun = noun if len(names) == 1 else f"{noun}s"
    listed = ", ".join(show(name, limit) for name in names[:shown])
    return f"{what} {len(names):,} {noun}{', e.g. ' if len(names) > shown else ': '}{listed}"


def refuse(source: Path | str, problem: str) -> CheckpointError:
    """The error for ``source`` (a long path keeps its end, the file name) and its problem."""
    where = show(source, limit=len(str(source)))
    where = where if len(where) <= SOURCE_LIMIT else "…" + where[-(SOURCE_LIMIT - 1):]
    return CheckpointError(first_line(f"{where}: {problem}"))
