"""A MindSpore file (``.ckpt``, or MindSpore-named safetensors) under SD names, for conversions that start there.

The variant comes from the architecture read from the names and shapes (``sdxl.architecture``, which reads
MindSpore names as well as SD ones); the names go back through the SD <-> MindSpore rename rules
(``keymaps.sd_ms``), so every variant the converters write reads back. A name the rules would not give is an error
naming it. Keys MindSpore
does not store (CLIP-L ``position_ids``) are simply absent: the caller decides whether it needs them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from sdxl_ckpt.errors import InputError, KeyMismatchError
from sdxl_ckpt.formats.ckpt_io import scan_ckpt, verify_crc
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.formats.safetensors_io import read_safetensors
from sdxl_ckpt.keymaps.sd_ms import ms_entries_as_sd
from sdxl_ckpt.sdxl.architecture import infer_architecture
from sdxl_ckpt.sdxl.variants import VARIANT_NAMES, Detection


@dataclass(frozen=True)
class MindSporeInput:
    """SD name -> entry (renamed, bytes untouched), the file's metadata, the variant and why, reader facts."""

    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    detection: Detection
    records: int | None
    crc_checked: bool | None


def read_mindspore_as_sd(src: str | Path, keys: str = "auto") -> MindSporeInput:
    """Read ``src`` (header or record scan only) and give every tensor its SD name."""
    src = Path(src)
    records = crc = None
    if src.suffix == ".safetensors":
        header = read_safetensors(src)
        entries, metadata = header.entries, header.metadata
    else:
        ckpt = scan_ckpt(src)
        entries, metadata, records, crc = ckpt.entries, {}, ckpt.records, verify_crc(ckpt)
    shapes = {e.name: e.shape for e in entries}
    if keys == "auto":
        detection = infer_architecture(shapes, metadata, path=src).detection
    elif keys in VARIANT_NAMES:
        detection = Detection(keys, "--keys")
    else:
        raise InputError(f"--keys must be one of auto, {', '.join(VARIANT_NAMES)}, not {keys!r}")
    named, problems = ms_entries_as_sd(entries)
    if problems:
        key, message = problems[0]
        more = f" ({len(problems) - 1} more)" if len(problems) > 1 else ""
        raise KeyMismatchError(f"{message}{more}", path=src, key=key)
    renamed = {sd: dataclasses.replace(e, name=sd) for sd, e in named.items()}
    return MindSporeInput(renamed, dict(metadata), detection, records, crc)
