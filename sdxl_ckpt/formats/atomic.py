"""Outputs appear complete or not at all: write beside the target, fsync, rename; remove the temp on any failure.

An existing output is refused unless ``overwrite`` is set, and is never modified before the new file is complete.
An output that IS one of the command's inputs (same real path, or same inode: a hard link or a bind mount), or
lies inside an input folder, is refused whatever ``overwrite`` says: replacing a source while reading it loses
the user's file. The temporary file is named ``.NAME.XXXX.partial``; a run killed before it could remove it
(SIGKILL, power loss) leaves it behind, so the next run to the same output removes such leftovers with a note.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from sdxl_ckpt.errors import InputError, OutputExistsError, OutputIsInputError, OutputWriteError

_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EDQUOT, errno.EIO}
PARTIAL_SUFFIX = ".partial"
# mkstemp's random part: 8 characters of [a-z0-9_]
_PARTIAL_RANDOM = re.compile(r"[a-z0-9_]{8}")


def _input_files(inputs: Iterable[str | os.PathLike | None]) -> Iterator[tuple[Path, bool]]:
    """Every existing input path (a folder itself, then each file below it) with ``True`` for folders."""
    for item in inputs:
        if item is None:
            continue
        path = Path(item)
        if path.is_dir():
            yield path, True
            for root, _dirs, files in os.walk(path):
                for name in files:
                    yield Path(root) / name, False
        elif path.exists():
            yield path, False


def check_not_an_input(out: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse ``out`` when it is, or would be created inside, one of ``inputs`` (files or folders)."""
    real_out = Path(os.path.realpath(out))
    try:
        stat_out = out.stat()
        out_id = (stat_out.st_dev, stat_out.st_ino)
    except OSError:
        out_id = None
    for path, is_dir in _input_files(inputs):
        real_in = Path(os.path.realpath(path))
        if is_dir:
            if real_out == real_in or real_in in real_out.parents:
                raise OutputIsInputError(
                    f"the output lies inside the input folder {path}; write it somewhere else", path=out
                )
            continue
        try:
            stat_in = path.stat()
        except OSError:
            continue
        if real_out == real_in or out_id == (stat_in.st_dev, stat_in.st_ino):
            raise OutputIsInputError(
                f"the output is the input file {path}; write it somewhere else (--overwrite never replaces an input)",
                path=out,
            )


def is_partial_of(candidate: str, name: str) -> bool:
    """True when ``candidate`` is one of the temporary names ``atomic_output`` uses for an output called ``name``."""
    prefix = f".{name}."
    if not (candidate.startswith(prefix) and candidate.endswith(PARTIAL_SUFFIX)):
        return False
    middle = candidate[len(prefix) : -len(PARTIAL_SUFFIX)]
    return bool(_PARTIAL_RANDOM.fullmatch(middle))


def remove_leftovers(out: Path) -> list[Path]:
    """Remove ``.NAME.XXXXXXXX.partial`` files of ``out`` left by killed runs, with a note; returns them."""
    parent = out.parent if str(out.parent) else Path(".")
    removed = []
    try:
        candidates = [p for p in parent.iterdir() if is_partial_of(p.name, out.name)]
    except OSError:
        return []
    for path in candidates:
        try:
            if path.is_dir():
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                shutil.rmtree(path)
            else:
                if _in_use(path):  # a live run to the same output holds its lock: not a leftover
                    continue
                size = path.stat().st_size
                path.unlink()
        except OSError:
            continue
        removed.append(path)
        print(f"note: removed {path} ({size} bytes), left by an interrupted earlier run", file=sys.stderr)
    return removed


def _in_use(path: Path) -> bool:
    """Whether a running ``atomic_output`` holds the lock on this temporary (the kernel drops it when it dies)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def check_output(path: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Fail early (before any work) when the output is an input, exists, or its folder is missing / not writable.

    Leftover temporaries of earlier killed runs to the same output are removed here (with a note).
    """
    out = Path(path)
    check_not_an_input(out, inputs)
    if out.exists() and not overwrite:
        raise OutputExistsError("output exists; pass --overwrite to replace it", path=out)
    if out.is_dir():
        raise OutputExistsError("output is a directory", path=out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputWriteError("output folder does not exist", path=parent)
    if not os.access(parent, os.W_OK):
        raise OutputWriteError("output folder is not writable", path=parent)
    remove_leftovers(out)
    return out


def drop_page_cache(fd: int) -> None:
    """Tell the kernel the file's (already fsynced, hence clean) pages may go.

    MindSpore's ``load_checkpoint`` refuses a .ckpt larger than MemFree, and page cache does not count as free:
    a multi-GB ckpt just written sits in the cache and makes the machine look full. Without ``posix_fadvise``
    (not Linux) nothing is done.
    """
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def drop_cached_inputs(paths: Iterable[str | os.PathLike | None]) -> None:
    """Let the kernel drop the cached pages of the files a ckpt was made from (None and missing paths skipped).

    ``load_checkpoint`` reads the whole .ckpt into memory, then checks that MemFree still exceeds its size; the
    read itself adds the file to the page cache. So a just-converted ckpt loads only when the cache is nearly
    empty: about three times its size free (its bytes, their cache, and the check). The converter's own input
    is cache it filled; dropping it is what lets a 6.9 GB base load on a 24 GB machine right after st-to-ms.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        if path is None:
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


OUTPUT_SUFFIXES = {".ckpt": "ckpt", ".safetensors": "safetensors"}


def output_format(path: str | os.PathLike, requested: str | None, allowed: tuple[str, ...], command: str) -> str:
    """The format to write: the output's extension decides; ``--format`` may only agree with it.

    A ``.safetensors`` name holding ckpt bytes (or the reverse) is refused by every reader afterwards, so the
    mislabel is an error here, before any work. Another extension takes ``--format`` or the first allowed format.
    """
    suffix = OUTPUT_SUFFIXES.get(Path(path).suffix.lower())
    if requested is not None and requested not in allowed:
        raise InputError(f"--format must be one of {', '.join(allowed)}, not {requested!r}")
    if requested is not None and suffix is not None and requested != suffix:
        raise InputError(
            f"--format {requested} contradicts the output name (a {Path(path).suffix} file); "
            f"name the output .{requested} or drop --format",
            path=path,
        )
    chosen = suffix or requested or allowed[0]
    if chosen not in allowed:
        raise InputError(
            f"{command} writes {' or '.join(allowed)}, not {chosen}; name the output .{allowed[0]}", path=path
        )
    return chosen


def _default_mode(path: Path, mode: int = 0o666) -> None:
    """mkstemp / mkdtemp create 0600 / 0700; give the output the mode a plain open() / mkdir() would (minus umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


@contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False, drop_cache: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary file; on normal exit it is fsynced and renamed to ``path``, else removed.

    ``drop_cache``: release the written file's page cache after the fsync (``drop_page_cache``: what a .ckpt needs
    to load right away). It costs ~0.3 s per 7 GB, so other outputs keep their cache as any copy would.
    """
    out = check_output(path, overwrite)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=PARTIAL_SUFFIX, dir=out.parent or ".")
    except OSError as exc:
        raise OutputWriteError(f"cannot create a file here: {exc.strerror}", path=out.parent) from None
    tmp = Path(tmp_name)
    try:
        _default_mode(tmp)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # marks the temporary as in use (see remove_leftovers)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            if drop_cache:
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


def check_output_dir(
    path: str | os.PathLike,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike | None] = (),
    marker: str = "model_index.json",
) -> Path:
    """Fail early (before any work) for an output FOLDER: an input, a file, or a non-empty folder without
    ``overwrite``; with it, only a folder holding ``marker`` is replaced, so a mistyped ``-o`` cannot wipe
    unrelated files. Leftover partial folders of killed runs are removed (with a note)."""
    out = Path(path)
    check_not_an_input(out, inputs)
    _check_dir_target(out, overwrite, marker)
    remove_leftovers(out)
    return out


def _check_dir_target(out: Path, overwrite: bool, marker: str) -> None:
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


def _put_folder(tmp: Path, out: Path, overwrite: bool, marker: str) -> None:
    """Put ``tmp`` at ``out``; an existing (re-checked) folder is moved aside and deleted after the rename."""
    if not out.exists():
        os.rename(tmp, out)
        return
    _check_dir_target(out, overwrite, marker)  # it may have changed while we worked
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
def atomic_output_dir(
    path: str | os.PathLike, overwrite: bool = False, marker: str = "model_index.json"
) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``path``; on normal exit it becomes ``path``, else it is removed.

    A pipeline folder is many files: an interrupted build never leaves a half-written folder under the final
    name (the rename within one file system is atomic).
    """
    out = check_output_dir(path, overwrite, marker=marker)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=PARTIAL_SUFFIX, dir=out.parent))
    except OSError as exc:
        raise OutputWriteError(f"cannot create a folder here: {exc.strerror}", path=out.parent) from None
    try:
        _default_mode(tmp, 0o777)
        yield tmp
        _put_folder(tmp, out, overwrite, marker)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in _WRITE_ERRNOS:
            raise OutputWriteError(f"write failed: {exc.strerror}", path=out) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
