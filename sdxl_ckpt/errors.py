"""One error type for everything a user can cause, so the CLI prints one line and exits with a known code.

Exit codes (documented in README):
  0  success / identical / verified
  1  a check ran and found a difference (``verify``, ``diff``)
  2  bad input: missing or malformed file, unknown or missing keys, wrong shapes, existing output
  3  cannot write the output: full disk, read-only directory, file-size limit
  130 / 143 / 129 interrupted (SIGINT / SIGTERM / SIGHUP)
"""

from __future__ import annotations

import os
from pathlib import Path


class SdxlCkptError(Exception):
    """A problem the user can fix; ``str(err)`` is the single line shown to them."""

    exit_code = 2
    problems: list[dict[str, object]] | None = None  # every problem, when the message shows only the first few

    def __init__(self, message: str, *, path: object | None = None, key: str | None = None) -> None:
        parts = []
        if path is not None:
            parts.append(str(path))
        if key is not None:
            parts.append(f"key {key!r}")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path = path
        self.key = key


class InputError(SdxlCkptError):
    """The input is missing, of the wrong kind, or does not match what the conversion expects."""


class CorruptFileError(InputError):
    """The file exists but its bytes are not a valid safetensors / ckpt (truncated, bad header, bad record)."""


class KeyMismatchError(InputError):
    """Keys missing, unexpected, or with a shape/dtype that the keymap does not allow."""


class OutputExistsError(InputError):
    """The output exists and ``--overwrite`` was not given; the existing file is left untouched."""


class OutputIsInputError(InputError):
    """The output is one of the command's inputs or lies inside an input folder; ``--overwrite`` never lifts it."""


def require_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path when it is an existing regular file; otherwise the one-line input error every reader gives."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file" if not path.exists() else "not a file", path=path)
    return path


class OutputWriteError(SdxlCkptError):
    """The output could not be written (disk full, read-only directory, file-size limit)."""

    exit_code = 3
