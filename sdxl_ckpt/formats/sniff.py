"""What a file or folder IS, from its first bytes and (for safetensors) its key names: one sniffer for every command.

A user who hands ``st-to-ms`` a LoRA, a PyTorch pickle or a MindSpore ckpt must be told what the file is and
which command takes it, not "header length implausible" or 1599 key problems. Content decides, not the suffix:
a ckpt byte stream saved under a ``.safetensors`` name is still a ckpt. Only when the first bytes match no known
layout does the suffix pick the reader, so that reader's precise error (truncated, bad record...) is shown.
Nothing is unpickled and no tensor bytes are read; a safetensors header is parsed by the real reader.

SD-layout knowledge (which prefixes make a whole SDXL checkpoint) belongs to ``sdxl_ckpt.sdxl``: callers pass
``partial_of``, which names what an SD-prefixed file lacks (``None`` for a whole checkpoint).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdxl_ckpt.errors import CorruptFileError, InputError, SdxlCkptError

PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
ZIP_MAGIC = b"PK\x03\x04"
MS_SUFFIXES = (".gamma", ".beta", ".embedding_table")
MAX_SNIFF_HEADER = 100 * 1024 * 1024  # the safetensors library's own header limit
LORA_COMMAND = "sdxl-ckpt lora inspect|convert|merge"

# kind -> (what it is, what to do with it)
KINDS: dict[str, tuple[str, str]] = {
    "missing": ("no such file or folder", ""),
    "empty": ("an empty file (0 bytes)", "nothing to read; the file was probably cut off while it was written"),
    "folder": ("a folder", "`diffusers-to-sd` converts a diffusers pipeline folder"),
    "torch-zip": (
        "a PyTorch pickle checkpoint (zip archive, torch.save)",
        "never unpickled by this tool (it can run code); save it as safetensors in a trusted environment first",
    ),
    "pickle": (
        "a legacy PyTorch pickle checkpoint",
        "never unpickled by this tool (it can run code); save it as safetensors in a trusted environment first",
    ),
    "npz": ("a numpy .npz archive", "`verify --reference` reads a reference written by `reference`"),
    "ckpt": ("a MindSpore ckpt", "`ms-to-st` converts it to SD safetensors; `verify` runs it"),
    "sd": ("an SD safetensors file", "`st-to-ms` converts it to MindSpore; `reference` runs it"),
    "ms-safetensors": (
        "a MindSpore-named safetensors file",
        "`ms-to-st` converts it to SD safetensors; `verify` runs it",
    ),
    "partial": ("a partial SD safetensors file", "the conversions need a whole SDXL checkpoint"),
    "diffusers-weights": (
        "one diffusers component's weights",
        "put it in its diffusers folder; `diffusers-to-sd` converts the pipeline folder",
    ),
    "lora-kohya": ("a kohya LoRA", f"use `{LORA_COMMAND}`"),
    "lora-peft": ("a PEFT / diffusers LoRA (lora_A / lora_B)", f"use `{LORA_COMMAND}`"),
    "lora-diffusers-old": ("an old diffusers attention-processor LoRA", f"use `{LORA_COMMAND}`"),
    "lycoris": ("a LyCORIS (LoHa / LoKr) file", "not supported: not a full checkpoint"),
    "safetensors": ("a safetensors file", ""),
    "no-tensors": ("a safetensors file holding no tensors", "nothing to convert"),
    "unknown": ("neither a safetensors file nor a MindSpore ckpt (unrecognised first bytes)", ""),
}
SAFETENSORS_KINDS = frozenset(
    {"sd", "ms-safetensors", "partial", "diffusers-weights", "lora-kohya", "lora-peft", "lora-diffusers-old"}
    | {"lycoris", "safetensors", "no-tensors"}
)

# diffusers' own (un-prefixed) key names of one component
_DIFFUSERS_STARTS = {
    "unet": ("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "time_embedding.", "add_embedding."),
    "vae": ("encoder.", "decoder.", "quant_conv.", "post_quant_conv."),
    "text encoder": ("text_model.", "embeddings.", "encoder.layers.", "text_projection."),
}


@dataclass(frozen=True)
class Sniffed:
    """The sniffer's verdict: ``kind`` (a key of ``KINDS``), extra ``detail``, and the parsed safetensors header."""

    path: Path
    kind: str
    detail: str = ""
    error: SdxlCkptError | None = None  # a safetensors-looking file whose header the reader refused
    names: Sequence[str] = field(default_factory=tuple, repr=False)

    @property
    def what(self) -> str:
        text = KINDS[self.kind][0]
        return f"{text} ({self.detail})" if self.detail else text

    @property
    def advice(self) -> str:
        return KINDS[self.kind][1]


def _head(path: Path, size: int = 64) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def _first_zip_member(head: bytes) -> str:
    """The name of a zip's first member (local file header: name length at offset 26, name at 30)."""
    if len(head) < 30:
        return ""
    (length,) = struct.unpack("<H", head[26:28])
    return head[30 : 30 + length].decode("utf-8", "replace")


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= MAX_SNIFF_HEADER and head[8:9] == b"{"


def _looks_like_ckpt(head: bytes, file_size: int) -> bool:
    """``Checkpoint.value`` (field 1, length-delimited), a plausible length, then ``Value.tag`` (field 1)."""
    if head[:1] != b"\x0a":
        return False
    length, shift, pos = 0, 0, 1
    while pos < len(head) and pos < 11:
        byte = head[pos]
        length |= (byte & 0x7F) << shift
        shift += 7
        pos += 1
        if not byte & 0x80:
            break
    else:
        return False
    return 0 < length <= file_size and head[pos : pos + 1] == b"\x0a"


def _lora_kind(names: Collection[str]) -> str | None:
    for name in names:
        if name.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or ".lora_down." in name:
            return "lora-kohya"
        if ".lora_A." in name or ".lora_B." in name or name.endswith((".lora_A.weight", ".lora_B.weight")):
            return "lora-peft"
        if "_lora.down." in name or "_lora.up." in name or ".processor." in name and "lora" in name:
            return "lora-diffusers-old"
        if ".hada_w1_" in name or ".lokr_w1" in name:
            return "lycoris"
    return None


def _diffusers_component(names: Collection[str]) -> str | None:
    for component, starts in _DIFFUSERS_STARTS.items():
        if names and all(n.startswith(starts) for n in names):
            return component
    return None


def classify_names(
    names: Collection[str], metadata: dict[str, str], partial_of: Callable[[Collection[str]], str | None] | None
) -> tuple[str, str]:
    """``(kind, detail)`` of a readable safetensors file from its key names and metadata."""
    lora = _lora_kind(names)
    if lora:
        return lora, f"{len(names)} tensors"
    if metadata.get("format") == "ms" or any(n.endswith(MS_SUFFIXES) for n in names):
        return "ms-safetensors", ""
    component = _diffusers_component(names)
    if component:
        return "diffusers-weights", f"{component}, {len(names)} tensors"
    if partial_of is not None:
        missing = partial_of(names)
        if missing == "":
            return "safetensors", f"{len(names)} tensors, no SD key names"
        if missing:
            return "partial", missing
        return "sd", ""
    return "safetensors", ""


def sniff(path: str | os.PathLike, partial_of: Callable[[Collection[str]], str | None] | None = None) -> Sniffed:
    """What ``path`` is (see ``KINDS``), reading at most its first bytes and its safetensors header.

    ``partial_of(names)``: ``None`` for a whole SD checkpoint, a description of what it holds for a partial one,
    ``""`` when no key carries an SD prefix.
    """
    path = Path(path)
    if not path.exists():
        return Sniffed(path, "missing")
    if path.is_dir():
        return Sniffed(path, "folder")
    try:
        size = path.stat().st_size
        head = _head(path)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", path=path) from None
    if size == 0:
        return Sniffed(path, "empty")
    if head.startswith(ZIP_MAGIC):
        return Sniffed(path, "npz" if _first_zip_member(head).endswith(".npy") else "torch-zip")
    if head.startswith(PICKLE_PROTOCOLS):
        return Sniffed(path, "pickle")
    if _looks_like_safetensors(head) or (path.suffix == ".safetensors" and not _looks_like_ckpt(head, size)):
        return _sniff_safetensors(path, partial_of)
    if _looks_like_ckpt(head, size) or path.suffix == ".ckpt":
        return Sniffed(path, "ckpt")
    return Sniffed(path, "unknown")


def _sniff_safetensors(path: Path, partial_of: Callable[[Collection[str]], str | None] | None) -> Sniffed:
    from sdxl_ckpt.formats.safetensors_io import read_safetensors

    try:
        parsed = read_safetensors(path)
    except CorruptFileError as err:
        return Sniffed(path, "safetensors", "unreadable header", error=err)
    names = [e.name for e in parsed.entries]
    if not names:
        return Sniffed(path, "no-tensors")
    kind, detail = classify_names(names, parsed.metadata, partial_of)
    return Sniffed(path, kind, detail, names=names)


def expect(found: Sniffed, accepted: Collection[str], command: str, wants: str) -> Sniffed:
    """Return ``found`` when its kind is one ``command`` reads; else one InputError: what it is, what takes it.

    A safetensors-looking file whose header is corrupt raises the reader's own error (it names the fault).
    """
    if found.error is not None:
        raise found.error
    if found.kind in accepted:
        return found
    if found.kind == "missing":
        raise InputError("no such file or folder", path=found.path)
    advice = f": {found.advice}" if found.advice else ""
    raise InputError(f"this is {found.what}{advice} ({command}: needs {wants})", path=found.path)
