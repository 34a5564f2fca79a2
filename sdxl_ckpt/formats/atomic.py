"""Outputs appear complete or not at all: write beside the target, fsync, rename; remove the temp on any failure.

An existing output is refused unless ``overwrite`` is set, and is never modified before the new file is complete.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from sdxl_ckpt.errors import OutputExistsError, OutputWriteError

_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EDQUOT, errno.EIO}


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any work) when the output exists or its folder is missing / not writable."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise OutputExistsError("output exists; pass --overwrite to replace it", path=out)
    if out.is_dir():
        raise OutputExistsError("output is a directory", path=out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputWriteError("output folder does not exist", path=parent)
    if not os.access(parent, os.W_OK):
        raise OutputWriteError("output folder is not writable", path=parent)
    return out


def drop_page_cache(fd: int) -> None:
    """Tell the kernel the file's (already fsynced, hence clean) pages may go.

    MindSpore's ``load_checkpoint`` refuses a .ckpt larger than MemFree, and page cache does not count as free:
    a multi-GB ckpt just written sits in the cache and makes the machine look full. Without ``posix_fadvise``
    (not Linux) nothing is done.
    """
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _default_mode(path: Path) -> None:
    """mkstemp creates 0600 files; give the output the mode a plain open() would (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary file; on normal exit it is fsynced and renamed to ``path``, else removed."""
    out = check_output(path, overwrite)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent or ".")
    except OSError as exc:
        raise OutputWriteError(f"cannot create a file here: {exc.strerror}", path=out.parent) from None
    tmp = Path(tmp_name)
    try:
        _default_mode(tmp)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            drop_page_cache(handle.fileno())
        if out.exists() and not overwrite:  # appeared while we worked: never clobber it
            raise OutputExistsError("output appeared while writing; not replaced", path=out)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in _WRITE_ERRNOS:
            raise OutputWriteError(f"write failed: {exc.strerror}", path=out) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
