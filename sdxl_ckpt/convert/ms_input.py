"""A MindSpore file (``.ckpt``, or MindSpore-named safetensors) under SD names, for conversions that start there.

The variant comes from the sentinel keys and metadata (``sdxl.detect``, which reads MindSpore names as well as SD
ones), the renames from that variant's keymap (``keymaps.load_keymap``: the explicit SD <-> MindSpore pairs).
A name the keymap does not list is an error naming it, with the closest MindSpore name as a hint. Keys MindSpore
does not store (CLIP-L ``position_ids``) are simply absent: the caller decides whether it needs them.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path

from sdxl_ckpt.errors import InputError, KeyMismatchError
from sdxl_ckpt.formats.ckpt_io import scan_ckpt, verify_crc
from sdxl_ckpt.formats.entries import TensorEntry
from sdxl_ckpt.formats.safetensors_io import read_safetensors
from sdxl_ckpt.keymaps import VARIANTS, load_keymap
from sdxl_ckpt.sdxl.detect import Detection, detect_variant


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
        detection = detect_variant(shapes, metadata, path=src)
    elif keys in VARIANTS:
        detection = Detection(keys, "--keys")
    else:
        raise InputError(f"--keys must be one of auto, {', '.join(VARIANTS)}, not {keys!r}")
    ms_to_sd = load_keymap(detection.variant).ms_to_sd
    unknown = [e.name for e in entries if e.name not in ms_to_sd]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(ms_to_sd), n=1, cutoff=0.9)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        more = f" ({len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise KeyMismatchError(
            f"not a MindSpore name of the {detection.variant} keymap{hint}{more}", path=src, key=unknown[0]
        )
    renamed = {ms_to_sd[e.name]: dataclasses.replace(e, name=ms_to_sd[e.name]) for e in entries}
    return MindSporeInput(renamed, dict(metadata), detection, records, crc)
