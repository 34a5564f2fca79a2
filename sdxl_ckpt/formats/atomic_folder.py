"""Output folders appear complete or not at all: built under a hidden name beside the target, then renamed.

A diffusers pipeline folder is many files; a crash half-way must never leave something under the final name
that ``from_pretrained`` would half-load. The folder is built as ``.NAME.XXXX.partial`` in the target's parent
(same file system, so the final ``rename`` is atomic) and removed on any failure. ``overwrite`` replaces only a
folder that holds ``marker`` (``model_index.json`` for pipelines), so a mistyped ``-o`` never deletes unrelated
files; the old folder is moved aside first and deleted only once the new one is in place.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sdxl_ckpt.errors import OutputExistsError, OutputWriteError

_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EDQUOT, errno.EIO}


def check_output_folder(path: str | os.PathLike, overwrite: bool, marker: str = "model_index.json") -> Path:
    """Fail early (before any work): the target is a file, a non-empty folder without ``overwrite`` or without
    ``marker``, or its parent is missing or not writable."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputExistsError("output exists and is not a folder", path=out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError("output folder exists and is not empty; pass --overwrite to replace it", path=out)
        if not (out / marker).is_file():
            raise OutputExistsError(f"output folder has no {marker}; refusing to replace it", path=out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputWriteError("output's parent folder does not exist", path=parent)
    if not os.access(parent, os.W_OK):
        raise OutputWriteError("output's parent folder is not writable", path=parent)
    return out


def _replace(tmp: Path, out: Path, overwrite: bool, marker: str) -> None:
    """Put ``tmp`` at ``out``; an existing (checked) folder is moved aside, then deleted after the rename."""
    if not out.exists():
        os.rename(tmp, out)
        return
    check_output_folder(out, overwrite, marker)  # it may have changed while we worked
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / out.name, out)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False, marker: str = "model_index.json") -> Iterator[Path]:
    """Yield an empty hidden folder beside ``path``; on normal exit it becomes ``path``, else it is removed."""
    out = check_output_folder(path, overwrite, marker)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        raise OutputWriteError(f"cannot create a folder here: {exc.strerror}", path=out.parent) from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder a plain mkdir's mode
        yield tmp
        _replace(tmp, out, overwrite, marker)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in _WRITE_ERRNOS:
            raise OutputWriteError(f"write failed: {exc.strerror}", path=out) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
