"""Streaming safetensors: read the header only, read tensors one at a time, write header first then bytes.

The ``safetensors`` library loads or saves whole dicts; converting a 7 GB model must never hold it, so the
format (8-byte little-endian header length, JSON header, packed data) is handled here, with every field
validated so a truncated or hostile file gives one ``CorruptFileError`` naming the file and key.
The writer orders tensors as the library does (larger item size first, then by name) and pads the header the
same way, so for the same tensors the bytes equal ``safetensors.numpy.save_file``'s output (the library keeps
``__metadata__`` in a hash map, so with several metadata keys only its order may differ).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np

from sdxl_ckpt.errors import CorruptFileError, InputError, require_file
from sdxl_ckpt.formats.atomic import atomic_output
from sdxl_ckpt.formats.digest import MODELSPEC_HASH, PLACEHOLDER, ContentDigest, placeholder_offset
from sdxl_ckpt.formats.dtypes import ITEMSIZE, ST_TO_NUMPY
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.formats.fastio import SMALL_BYTES, Background, map_bytes, open_sources, write_content
from sdxl_ckpt.formats.nonfinite import NonFiniteWatch
from sdxl_ckpt.progress import byte_bar

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the library's own limit


@dataclass(frozen=True)
class SafetensorsFile:
    """A parsed header: entries in file-offset order, the ``__metadata__`` dict, and where data starts."""

    path: Path
    entries: list[TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int

    def by_name(self) -> dict[str, TensorEntry]:
        return {e.name: e for e in self.entries}


def _reader(path: Path, name: str, offset: int, nbytes: int, dtype: str, shape: tuple[int, ...]):
    """A loader returning a read-only view over the tensor's own memory map (see ``fastio.map_bytes``)."""

    def load() -> np.ndarray:
        return map_bytes(path, offset, nbytes, name).view(ST_TO_NUMPY[dtype]).reshape(shape)

    return load


def _check_entry(path: Path, name: str, info: object, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(info, dict):
        raise CorruptFileError("header entry is not an object", path=path, key=name)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ST_TO_NUMPY:
        raise CorruptFileError(f"unknown dtype {dtype!r}", path=path, key=name)
    # ``type(x) is int``: JSON gives int, never a subclass, except bool (true / false), which must not pass
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise CorruptFileError(f"bad shape {shape!r}", path=path, key=name)
    if math.prod(d for d in shape if d) * ITEMSIZE[dtype] >= 2**63:  # numpy refuses it even with a 0 dim
        raise CorruptFileError(f"shape {shape} is too large for any array", path=path, key=name)
    if type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int or type(offsets[1]) is not int:
        raise CorruptFileError(f"bad data_offsets {offsets!r}", path=path, key=name)
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CorruptFileError(f"bad data_offsets {offsets!r}", path=path, key=name)
    if end > data_size:
        raise CorruptFileError(
            f"data_offsets end {end} lies past the end of the data ({data_size} bytes): truncated file?",
            path=path,
            key=name,
        )
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != expected:
        raise CorruptFileError(f"{end - begin} bytes for shape {shape} {dtype} (needs {expected})", path=path, key=name)
    return dtype, tuple(shape), begin, end


# the last header parsed, with the bytes it was parsed from: a command sniffs its input, then reads it, and
# parsing and validating SDXL's 2,500 entries twice cost tens of milliseconds of a small conversion
_last_parsed: tuple[tuple[str, int, bytes], SafetensorsFile] | None = None


def read_safetensors(path: str | os.PathLike) -> SafetensorsFile:
    """Parse and validate the header of ``path``; no tensor bytes are read.

    When the path, the file size and every header byte equal the previous call's, that parse is reused (the
    result depends on nothing else); the caller gets new containers for the entries and the metadata.
    """
    global _last_parsed
    path = require_file(path)
    size = path.stat().st_size
    raw = _header_bytes(path, size)
    identity = (str(path), size, raw)
    if _last_parsed is None or _last_parsed[0] != identity:
        _last_parsed = (identity, _parse_header(path, size, raw))
    parsed = _last_parsed[1]
    return replace(parsed, entries=list(parsed.entries), metadata=dict(parsed.metadata))


def _header_bytes(path: Path, size: int) -> bytes:
    """The JSON header's bytes, after the checks on its length prefix."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"not a safetensors file ({size} bytes, no header length)", path=path)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise CorruptFileError(f"header length {header_len} is implausible: not a safetensors file", path=path)
        if 8 + header_len > size:
            raise CorruptFileError(
                f"header claims {header_len} bytes but the file has {size - 8}: truncated", path=path
            )
        raw = handle.read(header_len)
    if len(raw) != header_len:  # the file shrank since its size was read
        raise CorruptFileError(f"header claims {header_len} bytes but only {len(raw)} could be read", path=path)
    return raw


def _parse_header(path: Path, size: int, raw: bytes) -> SafetensorsFile:
    header_len = len(raw)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON errors, int-digit limit
        raise CorruptFileError(f"header is not valid JSON ({exc.__class__.__name__})", path=path) from None
    if not isinstance(header, dict):
        raise CorruptFileError("header is not a JSON object", path=path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptFileError("__metadata__ must map strings to strings", path=path)
    data_start = 8 + header_len
    data_size = size - data_start
    spans = []
    entries = []
    for name, info in header.items():
        dtype, shape, begin, end = _check_entry(path, name, info, data_size)
        spans.append((begin, end, name))
        entries.append(
            TensorEntry(
                name,
                dtype,
                shape,
                _reader(path, name, data_start + begin, end - begin, dtype, shape),
                source=str(path),
                span=(str(path), data_start + begin),
            )
        )
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CorruptFileError(f"tensor data overlaps {n0!r}", path=path, key=n1)
    order = {name: i for i, (_b, _e, name) in enumerate(spans)}
    entries.sort(key=lambda e: order[e.name])
    return SafetensorsFile(path, entries, dict(metadata), data_start, size)


def library_order(entries: Iterable[TensorEntry]) -> list[TensorEntry]:
    """The order ``safetensors`` itself writes: larger item size first, then by name."""
    return sorted(entries, key=lambda e: (-ITEMSIZE[e.dtype], e.name))


def build_header(entries: list[TensorEntry], metadata: Mapping[str, str] | None) -> bytes:
    """The header bytes (length prefix included) for ``entries`` written in the given order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_pieces(
    handle: BinaryIO,
    entry: TensorEntry,
    pieces: Iterator[np.ndarray],
    checks: Background,
    watch: NonFiniteWatch,
    digest: ContentDigest | None,
) -> None:
    """Write one tensor given as consecutive flat uint8 pieces; they must add up to its declared size."""
    written = 0
    for piece in pieces:
        checks.put(watch.check_part, entry.name, piece, entry.dtype)
        content = memoryview(piece)
        if digest is not None:
            digest.feed(content)
        handle.write(content)
        written += len(content)
    checks.put(watch.end_parts, entry.name)
    if written != entry.nbytes:
        raise InputError(f"produced {written} bytes, planned {entry.nbytes}", key=entry.name)


def write_safetensors(
    path: str | os.PathLike,
    entries: Iterable[TensorEntry],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
    quiet: bool = True,
    desc: str = "writing",
    order: str = "library",
    digest: ContentDigest | None = None,
) -> list[TensorEntry]:
    """Stream ``entries`` into ``path`` atomically, one tensor in memory at a time; returns the written order.

    Every entry's ``load()`` must return exactly its declared dtype and shape (checked, naming the key).
    With ``digest`` the data section is hashed as it is written and the value is stored as ModelSpec
    ``modelspec.hash_sha256`` (a same-length placeholder in the header, overwritten before the file is complete).
    """
    planned = list(entries)
    names = [e.name for e in planned]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError("two tensors would get the same output name", key=dup)
    if order == "library":
        planned = library_order(planned)
    if digest is not None:
        metadata = {**(metadata or {}), MODELSPEC_HASH: PLACEHOLDER}
    header = build_header(planned, metadata)
    watch = NonFiniteWatch()  # NaN / Inf are written as they are, but never silently
    with (
        atomic_output(path, overwrite) as handle,
        byte_bar(sum(e.nbytes for e in planned), desc, quiet) as bar,
        Background() as checks,
        open_sources(),
    ):  # the NaN / Inf check overlaps the write
        handle.write(header)
        for entry in planned:
            pieces = entry.streamed_pieces
            if pieces is not None:  # cast chunk by chunk on worker threads while earlier chunks are written
                _write_pieces(handle, entry, pieces(), checks, watch, digest)
                bar.update(entry.nbytes)
                continue
            array = entry.load()
            expect = ST_TO_NUMPY[entry.dtype]
            if tuple(array.shape) != entry.shape or array.dtype != expect:
                raise InputError(
                    f"produced {array.dtype}{list(array.shape)}, planned {entry.dtype}{list(entry.shape)}",
                    key=entry.name,
                )
            checks.put(watch.check, entry.name, array, entry.dtype, inline=entry.nbytes < SMALL_BYTES)
            content = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
            if digest is not None:
                digest.feed(content)
            write_content(handle, content, entry.passthrough_span)
            del array, content
            bar.update(entry.nbytes)
        if digest is not None:
            handle.seek(placeholder_offset(header))
            handle.write(digest.value().encode("ascii"))
            handle.seek(0, os.SEEK_END)
    watch.finish()
    return planned
