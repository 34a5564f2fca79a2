"""Content hashes that stay the same when only the header changes, computed in one streaming pass.

Conventions (documented in README "Inspect, diff, hashes"):
- ``content_sha256`` of a safetensors file is Stability's ModelSpec ``modelspec.hash_sha256``: ``"0x"`` + sha256 over
  every byte after the JSON header (the packed tensor data as stored), header excluded. This is what the ModelSpec
  reference example computes, so a file's stored ``modelspec.hash_sha256`` can be checked against it.
- For a MindSpore ckpt (no header to exclude) it is sha256 over the tensors' raw bytes in record order.
- Each tensor gets sha256 over its raw little-endian bytes (BF16 as its bit patterns).
- A component hash is sha256 over the 32-byte digests of its tensors, taken in order of SD name, so the UNet of an SD
  file and of the ckpt made from it hash alike when their bytes are equal (MindSpore names are mapped back first).
Non-finite values are counted in the same pass, so ``--hash`` also reports NaN / Inf.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from sdxl_ckpt.errors import CorruptFileError
from sdxl_ckpt.formats.dtypes import ST_TO_NUMPY
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.formats.nonfinite import NonFinite, count_nonfinite
from sdxl_ckpt.formats.safetensors_io import SafetensorsFile
from sdxl_ckpt.progress import byte_bar

CHUNK_BYTES = 16 * 1024 * 1024  # a multiple of every item size


@dataclass(frozen=True)
class TensorDigest:
    sha256: str
    nonfinite: NonFinite = field(default_factory=NonFinite)


@dataclass(frozen=True)
class ContentHash:
    """``content_sha256`` ("0x..."), per-tensor digests keyed by stored name, and the bytes hashed."""

    content_sha256: str
    tensors: dict[str, TensorDigest]
    nbytes: int


def _spans(sf: SafetensorsFile) -> list[tuple[int, int, TensorEntry]]:
    """(absolute begin, end, entry) in file order; the header was validated by ``read_safetensors``."""
    with open(sf.path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    spans = []
    for entry in sf.entries:
        begin, end = header[entry.name]["data_offsets"]
        spans.append((sf.data_start + begin, sf.data_start + end, entry))
    return sorted(spans, key=lambda s: s[0])


def hash_safetensors(sf: SafetensorsFile, *, quiet: bool = True) -> ContentHash:
    """One sequential read of the data section: ModelSpec hash, per-tensor sha256 and NaN/Inf counts."""
    whole = hashlib.sha256()
    digests: dict[str, TensorDigest] = {}
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    total = sf.file_size - sf.data_start
    with open(sf.path, "rb") as handle, byte_bar(total, f"hashing {sf.path.name}", quiet) as bar:
        handle.seek(sf.data_start)
        pos = sf.data_start

        def pump(until: int, tensor_hash=None, entry: TensorEntry | None = None) -> NonFinite:
            nonlocal pos
            found = NonFinite()
            while pos < until:
                want = min(CHUNK_BYTES, until - pos)
                got = handle.readinto(view[:want])
                if got != want:  # the file shrank after its header was read
                    raise CorruptFileError(
                        f"truncated while hashing at byte {pos + got}", path=sf.path, key=entry.name if entry else None
                    )
                chunk = view[:want]
                whole.update(chunk)
                if tensor_hash is not None:
                    tensor_hash.update(chunk)
                    found = found + count_nonfinite(np.frombuffer(chunk, ST_TO_NUMPY[entry.dtype]), entry.dtype)
                pos += want
                bar.update(want)
            return found

        for begin, end, entry in _spans(sf):
            pump(begin)  # a gap between tensors belongs to the file hash only
            tensor_hash = hashlib.sha256()
            found = pump(end, tensor_hash, entry)
            digests[entry.name] = TensorDigest(tensor_hash.hexdigest(), found)
        pump(sf.file_size)
    return ContentHash("0x" + whole.hexdigest(), digests, total)


def hash_entries(entries: Iterable[TensorEntry], *, quiet: bool = True, desc: str = "hashing") -> ContentHash:
    """Hash entries read one at a time (ckpt records, diffusers shards): sha256 over their bytes in this order."""
    planned = list(entries)
    whole = hashlib.sha256()
    digests: dict[str, TensorDigest] = {}
    total = sum(e.nbytes for e in planned)
    with byte_bar(total, desc, quiet) as bar:
        for entry in planned:
            array = entry.load()
            data = memoryview(array.reshape(-1).view("u1")) if array.size else memoryview(b"")
            whole.update(data)
            digests[entry.name] = TensorDigest(hashlib.sha256(data).hexdigest(), count_nonfinite(array, entry.dtype))
            bar.update(entry.nbytes)
    return ContentHash("0x" + whole.hexdigest(), digests, total)


def component_hash(digests: Mapping[str, TensorDigest]) -> str:
    """sha256 over the tensors' 32-byte digests in name order (``digests`` keyed by SD name)."""
    combined = hashlib.sha256()
    for name in sorted(digests):
        combined.update(bytes.fromhex(digests[name].sha256))
    return combined.hexdigest()
